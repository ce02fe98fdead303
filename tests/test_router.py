"""The token router (memdec.router, memdec.routing, MemoryDecoderModel.router, eval/generate --router)."""

import json
import math

import pytest
import torch
import torch.nn.functional as F

import memdec.routing
from memdec.checkpoint import ROUTER_JSON, ROUTER_WEIGHTS, read_router_json
from memdec.cli import main
from memdec.data import load_token_stream, read_corpus
from memdec.decoders import ForkShape
from memdec.errors import MemdecError
from memdec.joint import MemoryDecoderLogitsProcessor, MemoryDecoderModel, attach_router
from memdec.models import tokenizer_fingerprint
from memdec.router import (SCALARS, ConstantRouter, RouterFeatures, RouterFitConfig, TokenRouter, fit_router,
                           load_router, save_router)
from memdec.routing import RouterConfig, check_router_config, collect_rows
from memdec.testing import save_tiny_model, tiny_model

PEAKED = {"initializer_range": 0.3}  # random tiny models with varied, non-flat distributions
LAM = 0.3


def fork_of(base, seed=0):
    """A fork:1 decoder of ``base`` whose own block and norm are moved away from the base's."""
    decoder = ForkShape(1).build(base)
    gen = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for p in ForkShape(1).own_tensors(decoder).values():
            p.add_(torch.randn(p.shape, generator=gen) * 0.1)
    return decoder.eval()


@pytest.fixture(scope="module", params=["separate", "fork"])
def models(request, tokenizer):
    base = tiny_model("llama", tokenizer, seed=0, **PEAKED)
    decoder = tiny_model("llama", tokenizer, seed=1, **PEAKED) if request.param == "separate" else fork_of(base)
    return base, decoder


def prompts(tokenizer, texts=("It is a truth universally acknowledged", "Emma Woodhouse, handsome")):
    tokenizer.padding_side = "left"
    return tokenizer(list(texts), return_tensors="pt", padding=True)


@pytest.fixture(scope="module")
def ckpt(tmp_path_factory, tokenizer):
    """A memory decoder checkpoint: a tiny model folder plus memdec.json."""
    folder = tmp_path_factory.mktemp("ckpt")
    save_tiny_model(folder, "llama", tokenizer, seed=1, **PEAKED)
    (folder / "memdec.json").write_text(json.dumps({
        "format": "memdec", "version": 1, "base_model": "tiny", "tokenizer_hash": tokenizer_fingerprint(tokenizer),
        "lambda": LAM}))
    return folder


# -- a constant router is the fixed-λ mixture, bit for bit ---------------------------------------


def test_a_constant_router_equals_fixed_lambda_exactly(models, tokenizer):
    base, decoder = models
    fixed = MemoryDecoderModel(base, decoder, lmbda=LAM)
    routed = MemoryDecoderModel(base, decoder, lmbda=0.9)  # its λ is not used: the router's is
    routed.router = ConstantRouter(LAM)
    enc = prompts(tokenizer)
    assert fixed.shares_trunk == routed.shares_trunk
    with torch.no_grad():
        assert torch.equal(fixed(**enc, use_cache=False).logits, routed(**enc, use_cache=False).logits)
    ids = enc["input_ids"][:1]
    targets = torch.cat([ids[:, 1:], ids[:, :1]], dim=1)[:, -5:]
    assert torch.equal(fixed.scorer()(ids, targets), routed.scorer()(ids, targets))
    pad = tokenizer.pad_token_id
    for kw in ({"do_sample": False}, {"do_sample": True, "top_k": 20}, {"num_beams": 3, "do_sample": False}):
        outs = []
        for joint in (fixed, routed):
            torch.manual_seed(7)
            outs.append(joint.generate(**enc, max_new_tokens=8, pad_token_id=pad, **kw))
        assert torch.equal(outs[0], outs[1]), kw


@pytest.mark.parametrize("lmbda", [0.0, 1.0])
def test_a_constant_router_at_the_ends_is_one_model(models, tokenizer, lmbda):
    base, decoder = models
    fixed, routed = MemoryDecoderModel(base, decoder, lmbda=lmbda), MemoryDecoderModel(base, decoder, lmbda=0.5)
    routed.router = ConstantRouter(lmbda)
    enc = prompts(tokenizer)
    with torch.no_grad():
        assert torch.equal(fixed(**enc, use_cache=False).logits, routed(**enc, use_cache=False).logits)


# -- a learned router reads both models' final hidden states, without a second forward -------------


def random_router(spec, seed=0):
    torch.manual_seed(seed)
    router = TokenRouter(spec, hidden=8, init_lambda=LAM)
    torch.nn.init.normal_(router.out.weight, std=1.0)
    return router.eval()


def test_the_router_sees_each_models_final_hidden_state(models, tokenizer):
    base, decoder = models
    joint = MemoryDecoderModel(base, decoder, lmbda=LAM)
    spec = RouterFeatures(base.config.hidden_size, decoder.config.hidden_size)
    joint.router = random_router(spec)
    enc = prompts(tokenizer)
    with torch.no_grad():
        got = joint(**enc, use_cache=False).logits
        ob = base(**enc, output_hidden_states=True, use_cache=False)
        od = decoder(**enc, output_hidden_states=True, use_cache=False)  # the fork as a separate forward
        lp_b, lp_m = F.log_softmax(ob.logits.float(), -1), F.log_softmax(od.logits.float(), -1)
        lam = joint.router(spec.from_logprobs(ob.hidden_states[-1], od.hidden_states[-1], lp_b, lp_m))
    want = torch.logaddexp(lp_b + torch.log1p(-lam)[..., None], lp_m + torch.log(lam)[..., None])
    assert lam.std() > 0.05  # λ_t varies per position
    assert torch.allclose(got, want, atol=1e-5)
    # the scorer: the same mixture at the targets; generate with a cache: the same tokens as without
    row = int(enc["attention_mask"].all(-1).nonzero()[0])  # the prompt without padding
    ids = enc["input_ids"][row : row + 1]
    targets = torch.cat([ids[:, 1:], ids[:, :1]], dim=1)[:, -6:]
    scored = joint.scorer()(ids, targets)
    assert torch.allclose(scored, want[row : row + 1, -6:].gather(-1, targets[..., None]).squeeze(-1), atol=1e-5)
    pad = tokenizer.pad_token_id
    cached = joint.generate(**enc, max_new_tokens=6, do_sample=False, pad_token_id=pad)
    uncached = joint.generate(**enc, max_new_tokens=6, do_sample=False, pad_token_id=pad, use_cache=False)
    assert torch.equal(cached, uncached)


@pytest.mark.parametrize("kind", ["constant", "learned"])
def test_the_logits_processor_mixes_at_the_routers_lambda(models, tokenizer, kind):
    """An unmodified base's generate() with the processor and a router: the tokens of MemoryDecoderModel
    with that router (greedy, and sampling with a seed); the hook on the base's head goes with close()."""
    base, decoder = models
    joint = MemoryDecoderModel(base, decoder, lmbda=0.9)
    spec = RouterFeatures(base.config.hidden_size, decoder.config.hidden_size)
    joint.router = ConstantRouter(LAM) if kind == "constant" else random_router(spec)
    enc = prompts(tokenizer)
    pad = tokenizer.pad_token_id
    head = base.get_output_embeddings()
    # the processor runs a fork as a separate full model: its log-probs equal the shared trunk's to rounding,
    # which a sampled token may cross; sampling is compared bit for bit on a separate decoder
    strategies = [{"do_sample": False}] + ([] if joint.shares_trunk else [{"do_sample": True, "top_k": 20}])
    for kw in strategies:
        torch.manual_seed(3)
        want = joint.generate(**enc, max_new_tokens=8, pad_token_id=pad, **kw)
        with MemoryDecoderLogitsProcessor(decoder, 0.9, enc["attention_mask"], router=joint.router, base=base) as proc:
            torch.manual_seed(3)
            got = base.generate(**enc, max_new_tokens=8, pad_token_id=pad, logits_processor=[proc], **kw)
        assert torch.equal(got, want), kw
        assert not head._forward_pre_hooks
    if kind == "learned":
        with pytest.raises(MemdecError, match="needs base="):
            MemoryDecoderLogitsProcessor(decoder, 0.9, router=joint.router)


# -- fitting ----------------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def fit_rows(tokenizer):
    """Rows of a tiny joint model: 'domain' (austen:valid) and general (general:train) text."""
    base = tiny_model("llama", tokenizer, seed=0, **PEAKED)
    joint = MemoryDecoderModel(base, tiny_model("llama", tokenizer, seed=1, **PEAKED), lmbda=LAM)
    cfg = RouterConfig(memdec="-", domain_corpus="austen:valid", valid="austen:test", out="-", block_size=64, stride=32)
    domain = collect_rows(joint, load_token_stream("austen:valid", tokenizer, 1500), cfg, "cpu", None, "domain")
    general = collect_rows(joint, load_token_stream("general:train", tokenizer, 1500), cfg, "cpu", None, "general")
    spec = RouterFeatures(base.config.hidden_size, base.config.hidden_size)
    is_general = torch.cat([torch.zeros(len(domain), dtype=torch.bool), torch.ones(len(general), dtype=torch.bool)])
    return (torch.cat([domain.features, general.features]), torch.cat([domain.lp_base, general.lp_base]),
            torch.cat([domain.lp_mem, general.lp_mem]), is_general, spec)


def test_fitting_lowers_the_loss_and_keeps_lambda_low_on_general_text(fit_rows):
    features, lp_base, lp_mem, is_general, spec = fit_rows
    assert features.shape == (len(lp_base), 64 + 64 + len(SCALARS))
    cfg = RouterFitConfig(hidden=16, epochs=15, lr=3e-3, batch_size=256, general_weight=0.5, init_lambda=LAM)
    router, stats = fit_router(features, lp_base, lp_mem, is_general, cfg, spec)
    assert stats["held_best"]["loss"] < stats["held_fixed"]["loss"]  # better than the fixed λ it started at
    assert stats["epochs"][-1]["train_loss"] < stats["epochs"][0]["train_loss"]
    with torch.no_grad():
        lam = router(features)
    assert lam[is_general].mean() < lam[~is_general].mean()
    again, stats2 = fit_router(features, lp_base, lp_mem, is_general, cfg, spec)  # deterministic for a seed
    assert stats2 == stats and all(torch.equal(a, b) for a, b in zip(router.state_dict().values(),
                                                                     again.state_dict().values()))


def test_save_and_load_give_the_same_lambdas(tmp_path, fit_rows):
    features, *_, spec = fit_rows
    router = random_router(spec)
    router.set_scalar_stats(features[:, -len(SCALARS):])
    save_router(router, tmp_path / "r", {"base_model": "tiny", "tokenizer_hash": "t", "decoder_fingerprint": "d"})
    loaded, info = load_router(tmp_path / "r")
    assert info["kind"] == "mlp" and info["d_base"] == 64 and info["scalars"] == list(SCALARS)
    with torch.no_grad():
        assert torch.equal(router(features), loaded(features))
    save_router(
        ConstantRouter(0.4), tmp_path / "c", {"base_model": "tiny", "tokenizer_hash": "t", "decoder_fingerprint": "d"}
    )
    constant, _ = load_router(tmp_path / "c")
    assert isinstance(constant, ConstantRouter) and constant.lmbda == 0.4
    assert not (tmp_path / "r" / f"{ROUTER_JSON}.tmp").exists()


# -- router.json and its weights: one line each -------------------------------------------------------


@pytest.fixture
def saved(tmp_path):
    router = random_router(RouterFeatures(64, 64))
    return save_router(
        router, tmp_path / "r", {"base_model": "tiny", "tokenizer_hash": "t", "decoder_fingerprint": "d"}
    )


BAD_FIELDS = [("kind", "linear"), ("kind", 1), ("d_base", 0), ("d_base", "64"), ("d_mem", True), ("hidden", 1.5),
              ("scalars", "base_entropy"), ("scalars", [1, 2]), ("base_model", None), ("tokenizer_hash", 3),
              ("decoder_fingerprint", []), ("fixed_lambda", 2), ("temperature", 0), ("valid", [1]),
              ("train_stats", "x"), ("version", 2), ("format", "memdec")]


@pytest.mark.parametrize("name,value", BAD_FIELDS)
def test_a_bad_router_json_field_is_one_line(saved, name, value):
    file = saved / ROUTER_JSON
    record = json.loads(file.read_text())
    record[name] = value
    file.write_text(json.dumps(record))
    with pytest.raises(MemdecError) as err:
        load_router(saved)
    assert str(file) in str(err.value) and "\n" not in str(err.value)
    assert name in str(err.value) or "format" in str(err.value)


@pytest.mark.parametrize("name", ["kind", "d_base", "scalars", "decoder_fingerprint", "tokenizer_hash"])
def test_a_missing_router_json_field_is_one_line(saved, name):
    file = saved / ROUTER_JSON
    record = json.loads(file.read_text())
    del record[name]
    file.write_text(json.dumps(record))
    with pytest.raises(MemdecError, match=f'lacks field "{name}"'):
        read_router_json(saved)


@pytest.mark.parametrize("content", [b"", b"\xff\xfe garbage", b"[1, 2]", b'"text"', b'{"format": "memdec-rou'])
def test_garbage_router_json_is_one_line(saved, content):
    (saved / ROUTER_JSON).write_bytes(content)
    with pytest.raises(MemdecError) as err:
        load_router(saved)
    assert "router.json" in str(err.value) and "\n" not in str(err.value)


def test_bad_router_weights_are_one_line(saved, tmp_path):
    weights = saved / ROUTER_WEIGHTS
    data = weights.read_bytes()
    weights.write_bytes(data[: len(data) // 2])
    with pytest.raises(MemdecError, match="router.safetensors"):
        load_router(saved)
    other = save_router(random_router(RouterFeatures(32, 64)), tmp_path / "o",
                        {"base_model": "tiny", "tokenizer_hash": "t", "decoder_fingerprint": "d"})
    weights.write_bytes((other / ROUTER_WEIGHTS).read_bytes())  # another router's shapes
    with pytest.raises(MemdecError, match="router.json describes shape"):
        load_router(saved)
    weights.unlink()
    with pytest.raises(MemdecError, match="missing"):
        load_router(saved)


def test_a_router_is_checked_against_the_decoder_it_routes(tmp_path, tokenizer, tiny_llama_dir, ckpt):
    base = tiny_model("llama", tokenizer, seed=0, **PEAKED)
    joint = MemoryDecoderModel.from_pretrained(base, ckpt, tokenizer=tokenizer)
    assert joint.router is None
    router = random_router(RouterFeatures(64, 64))
    save_router(router, tmp_path / "r", {"base_model": "tiny", "tokenizer_hash": tokenizer_fingerprint(tokenizer),
                                         "decoder_fingerprint": "0123456789abcdef"})
    with pytest.raises(MemdecError, match="another memory decoder"):
        attach_router(joint, tmp_path / "r", ckpt)


# -- the command line: flags checked before any model loads, end to end on tiny models -----------------


def refuse_models(monkeypatch):
    def boom(*a, **k):
        raise AssertionError("a model was loaded")

    monkeypatch.setattr(memdec.routing, "load_model", boom)


BAD_FLAGS = [(["--tokens", "0"], "--tokens"), (["--general-weight", "-1"], "--general-weight"),
             (["--lr", "nan"], "--lr"), (["--holdout", "1"], "--holdout"), (["--domain-skip-tokens", "-3"], "skip"),
             (["--general", "austen:nope"], "--general"), (["--valid", "/no/such/file.txt"], "--valid"),
             (["--device", "cuda:7"], "--device"), (["--stride", "999"], "--stride"),
             (["--general", "austen:valid"], "general text must be other text"),
             (["--memdec", "/no/such/ckpt"], "no such memory decoder")]


@pytest.mark.parametrize("extra,message", BAD_FLAGS)
def test_bad_router_flags_are_one_line_before_any_model_loads(monkeypatch, capsys, tmp_path, ckpt, extra, message):
    refuse_models(monkeypatch)
    args = ["router", "--memdec", str(ckpt), "--domain-corpus", "austen:valid", "--valid", "austen:test",
            "--out", str(tmp_path / "r"), "--model", "tiny"]
    assert main(args + extra) == 2
    err = capsys.readouterr().err
    assert err.startswith("memdec: error:") and err.count("\n") == 1 and message in err
    assert not (tmp_path / "r").exists()


def test_router_refuses_a_folder_it_did_not_create(monkeypatch, capsys, tmp_path, ckpt):
    refuse_models(monkeypatch)
    (tmp_path / "mine").mkdir()
    (tmp_path / "mine" / "notes.txt").write_text("keep")
    args = ["router", "--memdec", str(ckpt), "--domain-corpus", "austen:valid", "--valid", "austen:test",
            "--out", str(tmp_path / "mine")]
    assert main(args) == 2
    assert "did not create" in capsys.readouterr().err


def test_default_skip_is_the_decoders_training_tokens(tmp_path, ckpt, store):
    info = json.loads((ckpt / "memdec.json").read_text())
    folder = tmp_path / "c"
    folder.mkdir()
    for name, corpus, want in (("same", "austen:valid", 600), ("other", "austen:test", 0)):
        meta = {**info, "datastore": str(store), "corpus": "austen:valid"}
        (folder / "memdec.json").write_text(json.dumps(meta))
        cfg = check_router_config(RouterConfig(memdec=str(folder), domain_corpus=corpus, valid="austen:test",
                                               out=str(tmp_path / name)))
        assert cfg.domain_skip_tokens == want  # the store holds the first 600 tokens of austen:valid
    (folder / "memdec.json").write_text(
        json.dumps({**info, "datastore": str(tmp_path / "gone"), "corpus": "austen:valid"})
    )
    with pytest.raises(MemdecError, match="--domain-skip-tokens"):
        check_router_config(RouterConfig(memdec=str(folder), domain_corpus="austen:valid", valid="austen:test",
                                         out=str(tmp_path / "x")))


def test_router_end_to_end_then_eval_and_generate_read_it(tmp_path, capsys, tiny_llama_dir, ckpt, tokenizer):
    out = tmp_path / "router"
    args = ["router", "--model", str(tiny_llama_dir), "--memdec", str(ckpt), "--domain-corpus", "austen:train",
            "--domain-skip-tokens", "200", "--tokens", "800", "--general", "general:train", "--general-tokens", "800",
            "--valid", "austen:valid", "--valid-tokens", "400", "--out", str(out), "--block-size", "64",
            "--hidden", "16", "--epochs", "4", "--general-weight", "0.2", "--device", "cpu"]
    assert main(args) == 0
    printed = capsys.readouterr().out
    assert "router:" in printed and "fixed λ=0.30" in printed
    info = read_router_json(out)
    assert info["kind"] == "mlp" and info["fixed_lambda"] == LAM and info["train_stats"]["domain_rows"] == 799
    assert info["valid"]["tokens"] == 399 and info["valid"]["corpus"] == "austen:valid"
    assert (out / ROUTER_WEIGHTS).is_file()
    report = tmp_path / "eval.json"
    assert (
        main(
            [
                "eval",
                "--model",
                str(tiny_llama_dir),
                "--memdec",
                str(ckpt),
                "--router",
                str(out),
                "--corpus",
                "austen:valid",
                "--max-tokens",
                "400",
                "--block-size",
                "64",
                "--stride",
                "32",
                "--general",
                "general:test",
                "--general-max-tokens",
                "300",
                "--json",
                str(report),
                "--device",
                "cpu",
            ]
        )
        == 0
    )
    rows = {r["system"]: r for r in json.loads(report.read_text())["results"]}
    assert set(rows) == {"base", "memdec", "memdec+router"}
    # the same tokens and windows as the router's validation: the same perplexities
    assert rows["base"]["ppl"] == pytest.approx(info["valid"]["base_ppl"], rel=1e-4)
    assert rows["memdec"]["ppl"] == pytest.approx(info["valid"]["fixed_ppl"], rel=1e-4)
    assert rows["memdec+router"]["ppl"] == pytest.approx(info["valid"]["router_ppl"], rel=1e-4)
    assert rows["memdec+router"]["general_ppl"] is not None and rows["memdec+router"]["tokens"] == 399
    capsys.readouterr()
    assert main(["generate", "--model", str(tiny_llama_dir), "--memdec", str(ckpt), "--router", str(out),
                 "--prompt", "It is a truth", "--max-new-tokens", "5", "--device", "cpu"]) == 0
    assert "λ_t: router" in capsys.readouterr().out
    assert main(["generate", "--model", str(tiny_llama_dir), "--memdec", str(ckpt), "--router", str(out),
                 "--prompt", "x", "--lambda", "0.5"]) == 2


def test_a_router_in_the_checkpoint_folder_is_used_unless_it_lost(tmp_path, tokenizer, ckpt):
    import shutil

    folder = tmp_path / "ckpt"
    shutil.copytree(ckpt, folder)
    base = tiny_model("llama", tokenizer, seed=0, **PEAKED)
    info = {"base_model": "tiny", "tokenizer_hash": tokenizer_fingerprint(tokenizer),
            "decoder_fingerprint": memdec.routing.decoder_fingerprint(folder),
            "valid": {"router_ppl": 10.0, "fixed_ppl": 11.0}}
    save_router(ConstantRouter(0.6), folder, info)
    assert isinstance(MemoryDecoderModel.from_pretrained(base, folder, tokenizer=tokenizer).router, ConstantRouter)
    assert MemoryDecoderModel.from_pretrained(base, folder, tokenizer=tokenizer, auto_router=False).router is None
    assert MemoryDecoderModel.from_pretrained(base, folder, 0.2, tokenizer=tokenizer).router is None  # a given λ
    save_router(ConstantRouter(0.6), folder, {**info, "valid": {"router_ppl": 12.0, "fixed_ppl": 11.0}})
    with pytest.warns(UserWarning, match="lost to the fixed λ"):
        assert MemoryDecoderModel.from_pretrained(base, folder, tokenizer=tokenizer).router is None


def test_general_train_is_disjoint_from_general_test():
    train, test = read_corpus("general:train"), read_corpus("general:test")
    assert len(train) == 556 and len(test) == 261
    assert not {d.text for d in train} & {d.text for d in test}
    titles = {d.text.split("\n", 1)[0] for d in train}
    assert all(": " in t for t in titles) and math.isclose(len(titles), len(train))
