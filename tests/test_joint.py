"""MemoryDecoderModel: construction, checks, mixing, caches, scoring, and `memdec eval --memdec`."""

import json
import math

import numpy as np
import pytest
import torch
import torch.nn.functional as F

from memdec.cli import main
from memdec.data import load_token_stream
from memdec.errors import MemdecError, TokenizerMismatchError
from memdec.evaluate import EvalConfig, run_eval_report
from memdec.scoring import base_scorer, score_tokens
from memdec.checkpoint import read_memdec_json
from memdec.joint import JointCache, MemoryDecoderModel, position_ids_from_mask
from memdec.models import tokenizer_fingerprint
from memdec.testing import save_tiny_model, tiny_model, tiny_tokenizer

PEAKED = {"initializer_range": 0.3}  # random tiny models with varied, non-flat distributions


def write_checkpoint(folder, tokenizer, arch="llama", seed=1, **info):
    """A memory decoder checkpoint: a tiny model folder plus memdec.json."""
    save_tiny_model(folder, arch, tokenizer, seed=seed, **PEAKED)
    meta = {"format": "memdec", "version": 1, "base_model": "tiny", "tokenizer_hash": tokenizer_fingerprint(tokenizer),
            "lambda": 0.25, "alpha": 0.5, "k": 16, "knn_temperature": 1.0, "datastore_manifest_hash": None,
            "train_stats": {}}
    meta.update(info)
    (folder / "memdec.json").write_text(json.dumps(meta))
    return folder


@pytest.fixture(scope="module")
def ckpt(tmp_path_factory, tokenizer):
    return write_checkpoint(tmp_path_factory.mktemp("memdec-ckpt"), tokenizer)


def pair(arch, tokenizer, lmbda=0.3, temperature=1.0):
    base = tiny_model(arch, tokenizer, seed=0, **PEAKED)
    memdec = tiny_model(arch, tokenizer, seed=1, **PEAKED)
    return MemoryDecoderModel(base, memdec, lmbda=lmbda, temperature=temperature)


def left_padded(tokenizer, texts):
    tokenizer.padding_side = "left"
    return tokenizer(texts, return_tensors="pt", padding=True)


# -- checkpoints and checks ------------------------------------------------------------------


def test_read_memdec_json_errors(tmp_path, ckpt):
    assert read_memdec_json(ckpt)["lambda"] == 0.25
    assert read_memdec_json(ckpt / "memdec.json")["format"] == "memdec"
    with pytest.raises(MemdecError, match="no such memory decoder"):
        read_memdec_json(tmp_path / "missing")
    with pytest.raises(MemdecError, match="no memdec.json"):
        read_memdec_json(tmp_path)
    bad = tmp_path / "memdec.json"
    for text, needle in [("{not json", "unreadable"), ("[1]", "JSON object"), ('{"format": "memdec"}', "lacks"),
                         (json.dumps({"format": "x", "version": 1, "base_model": "m", "tokenizer_hash": "h",
                                      "lambda": .1}), "unsupported checkpoint format"),
                         (json.dumps({"format": "memdec", "version": 1, "base_model": "m", "tokenizer_hash": "h",
                                      "lambda": 2}), r'field "lambda" must be a number in \[0, 1\], got 2')]:
        bad.write_text(text)
        with pytest.raises(MemdecError, match=needle):
            read_memdec_json(tmp_path)


def test_from_pretrained_takes_the_checkpoint_lambda(tokenizer, tiny_llama_dir, ckpt):
    base = tiny_model("llama", tokenizer, seed=0)
    model = MemoryDecoderModel.from_pretrained(base, ckpt, tokenizer=tokenizer)
    assert model.lmbda == 0.25 and model.temperature == 1.0 and model.memdec_info["k"] == 16
    assert model.memdec.dtype == base.dtype and model.memdec.device == base.device
    assert MemoryDecoderModel.from_pretrained(base, ckpt, 0.7, tokenizer=tokenizer).lmbda == 0.7
    # a spec string for the base, and a tokenizer found beside a base model loaded from a folder
    from_spec = MemoryDecoderModel.from_pretrained(str(tiny_llama_dir), ckpt)
    assert from_spec.lmbda == 0.25 and from_spec.base.config.num_hidden_layers == 2
    # the wrapper's config is a copy: the base model's is left alone
    from_spec.config.use_cache = False
    assert from_spec.base.config.use_cache is not False


def test_save_pretrained_saves_the_memory_decoder_only(tmp_path, tokenizer, ckpt):
    model = MemoryDecoderModel.from_pretrained(tiny_model("llama", tokenizer, seed=0), ckpt, 0.6, tokenizer=tokenizer)
    model.temperature = 1.5
    out = model.save_pretrained(tmp_path / "saved", tokenizer=tokenizer)
    info = read_memdec_json(out)
    assert info["lambda"] == 0.6 and info["temperature"] == 1.5 and info["k"] == 16
    again = MemoryDecoderModel.from_pretrained(model.base, out, tokenizer=tokenizer)
    assert again.lmbda == 0.6 and again.temperature == 1.5
    saved, loaded = model.memdec.state_dict(), again.memdec.state_dict()
    assert all(torch.equal(saved[k], loaded[k]) for k in saved)
    with pytest.raises(MemdecError, match="tokenizer="):
        pair("llama", tokenizer).save_pretrained(tmp_path / "x")


def test_tokenizer_mismatch_is_refused(tmp_path, tokenizer, ckpt):
    base = tiny_model("llama", tokenizer, seed=0)
    other = tiny_tokenizer(vocab_size=400)
    with pytest.raises(TokenizerMismatchError, match="another tokenizer"):
        MemoryDecoderModel.from_pretrained(base, ckpt, tokenizer=other)
    # memdec.json says the right tokenizer but the model has another vocabulary size
    wrong_vocab = write_checkpoint(tmp_path / "v400", other, tokenizer_hash=tokenizer_fingerprint(tokenizer))
    with pytest.raises(TokenizerMismatchError, match="scores 400 tokens"):
        MemoryDecoderModel.from_pretrained(base, wrong_vocab, tokenizer=tokenizer)
    with pytest.raises(TokenizerMismatchError):
        MemoryDecoderModel(base, tiny_model("llama", other, seed=1))
    # without a tokenizer and nothing to load one from: ask for it, or allow skipping the check
    with pytest.raises(MemdecError, match="pass tokenizer="):
        MemoryDecoderModel.from_pretrained(base, ckpt)
    assert MemoryDecoderModel.from_pretrained(base, ckpt, check_tokenizer=False).lmbda == 0.25


def test_lambda_outside_unit_interval_is_refused(tokenizer, ckpt):
    model = pair("llama", tokenizer)
    for bad in (-0.1, 1.5, float("nan"), "x"):
        with pytest.raises(MemdecError, match="lambda"):
            model.lmbda = bad
    with pytest.raises(MemdecError, match="lambda must lie in"):
        MemoryDecoderModel(model.base, model.memdec, lmbda=2.0)
    with pytest.raises(MemdecError):
        MemoryDecoderModel.from_pretrained(model.base, ckpt, -1, tokenizer=tokenizer)
    with pytest.raises(MemdecError, match="temperature"):
        MemoryDecoderModel(model.base, model.memdec, temperature=0)


# -- mixing ----------------------------------------------------------------------------------


@pytest.mark.parametrize("lmbda", [0.0, 0.3, 1.0])
def test_forward_mixes_in_log_space(tokenizer, lmbda):
    model = pair("llama", tokenizer, lmbda=lmbda, temperature=1.7)
    ids = torch.tensor([tokenizer.encode("It is a truth universally acknowledged, that a single man")])
    with torch.no_grad():
        out = model(ids, use_cache=False)
        pb = F.softmax(model.base(ids).logits.double(), -1)
        pm = F.softmax(model.memdec(ids).logits.double() / 1.7, -1)
    ref = torch.log((1 - lmbda) * pb + lmbda * pm)
    assert out.logits.shape == (1, ids.shape[1], len(tokenizer)) and out.cache is None
    torch.testing.assert_close(out.logits.double(), ref, atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(out.logits.exp().sum(-1), torch.ones(ids.shape), atol=1e-4, rtol=0)
    with torch.no_grad():
        if lmbda == 0.0:  # exact: the base model's own log-softmax
            assert torch.equal(out.logits, F.log_softmax(model.base(ids).logits.float(), -1))
        if lmbda == 1.0:
            assert torch.equal(out.logits, F.log_softmax(model.memdec(ids).logits.float() / 1.7, -1))
        # labels give the mixture's mean NLL
        loss = model(ids, labels=ids, use_cache=False).loss
    nll = -ref[0, :-1].gather(-1, ids[0, 1:, None]).mean()
    assert math.isclose(loss.item(), nll.item(), rel_tol=1e-5)


@pytest.mark.parametrize("arch", ["llama", "gpt2"])
def test_cached_incremental_path_equals_full_forward(tokenizer, arch):
    """Prefill a prefix, then feed one token at a time through the JointCache: same log-probs as one
    full forward, on a left-padded batch with its attention mask and positions."""
    model = pair(arch, tokenizer, lmbda=0.4)
    enc = left_padded(tokenizer, ["It is a truth universally acknowledged, that", "Emma Woodhouse, handsome"])
    ids, mask = enc["input_ids"], enc["attention_mask"]
    pos = position_ids_from_mask(mask, ids.shape[1])
    with torch.no_grad():
        full = model(ids, attention_mask=mask, position_ids=pos, use_cache=False).logits
        k = ids.shape[1] - 5
        out = model(ids[:, :k], attention_mask=mask[:, :k], position_ids=pos[:, :k], use_cache=True)
        cache, steps = out.cache, [out.logits]
        assert isinstance(cache, JointCache) and cache.get_seq_length() == k
        assert cache.memdec.get_seq_length() == k
        for t in range(k, ids.shape[1]):
            out = model(ids[:, t : t + 1], attention_mask=mask[:, : t + 1], position_ids=pos[:, t : t + 1], cache=cache)
            steps.append(out.logits)
    inc = torch.cat(steps, dim=1)
    real = mask.bool()  # padded positions hold garbage in both paths
    torch.testing.assert_close(inc[real], full[real], atol=2e-5, rtol=1e-5)


def test_joint_cache_reorders_both_caches(tokenizer):
    model = pair("llama", tokenizer)
    ids = torch.tensor([tokenizer.encode("It is a truth")] * 3)
    ids[1, -1] = 50
    with torch.no_grad():
        cache = model(ids, use_cache=True).cache
    keys = lambda c: c.layers[0].keys.clone()  # noqa: E731
    kb, km = keys(cache.base), keys(cache.memdec)
    cache.reorder_cache(torch.tensor([1, 1, 0]))
    assert torch.equal(keys(cache.base), kb[[1, 1, 0]]) and torch.equal(keys(cache.memdec), km[[1, 1, 0]])
    cache.crop(-1)
    assert cache.base.get_seq_length() == cache.memdec.get_seq_length() == ids.shape[1] - 1


# -- scoring ---------------------------------------------------------------------------------


def test_scorers_mix_target_logprobs_only(tokenizer, monkeypatch):
    """The joint scorer equals the full mixture gathered at the targets, and never calls a
    logaddexp on anything of vocabulary size."""
    model = pair("gpt2", tokenizer, lmbda=0.35, temperature=1.3)
    ids = torch.tensor([tokenizer.encode("It is a truth universally acknowledged, that a single man in possession")])
    inputs, targets = ids[:, :-1], ids[:, -6:]
    with torch.no_grad():
        full = model(inputs, use_cache=False).logits[:, -6:]
    ref = full.gather(-1, targets[..., None]).squeeze(-1)

    shapes = []
    real_logaddexp = torch.logaddexp
    monkeypatch.setattr(torch, "logaddexp", lambda a, b: shapes.append(tuple(a.shape)) or real_logaddexp(a, b))
    got = model.scorer()(inputs, targets)
    torch.testing.assert_close(got, ref, atol=1e-5, rtol=1e-5)
    assert shapes == [(1, 6)]
    lp_base, lp_mem = model.target_logprobs_pair(inputs, targets)
    torch.testing.assert_close(lp_base, base_scorer(model.base)(inputs, targets))
    torch.testing.assert_close(lp_mem, model.memdec_scorer()(inputs, targets))
    with torch.no_grad():
        mem_lp = F.log_softmax(model.memdec(inputs).logits[:, -6:] / 1.3, -1)
    mem_ref = mem_lp.gather(-1, targets[..., None]).squeeze(-1)
    torch.testing.assert_close(lp_mem, mem_ref, atol=1e-5, rtol=1e-5)
    assert torch.equal(model.scorer(0.0)(inputs, targets), lp_base)


# -- memdec eval --memdec --------------------------------------------------------------------


def test_eval_memdec_row_equals_joint_scoring(tokenizer, tiny_llama_dir, ckpt):
    cfg = EvalConfig(model=str(tiny_llama_dir), corpus="austen:valid", max_tokens=300, block_size=128, stride=64,
                     memdec=str(ckpt))
    report = run_eval_report(cfg)
    base_row, mem_row = report.rows
    assert (base_row.system, mem_row.system) == ("base", "memdec")
    assert mem_row.lmbda == 0.25 and mem_row.extra["lambda_source"] == "checkpoint"
    assert mem_row.tokens_per_s < base_row.tokens_per_s  # its time counts both forwards
    joint = MemoryDecoderModel.from_pretrained(str(tiny_llama_dir), ckpt)
    tokens = load_token_stream("austen:valid", tokenizer, 300)
    nll, _ = score_tokens(joint.scorer(), tokens, 128, 64, progress=False)
    assert math.isclose(mem_row.nll, float(np.mean(nll, dtype=np.float64)), rel_tol=1e-5)
    # λ = 0 is the base model exactly
    zero = run_eval_report(EvalConfig(**{**cfg.__dict__, "lmbda": 0.0})).rows
    assert zero[1].nll == zero[0].nll and zero[1].lmbda == 0.0


def test_eval_cli_sweep_json_and_plot(tiny_llama_dir, ckpt, tmp_path, capsys):
    out, png = tmp_path / "r.json", tmp_path / "sweep.png"
    rc = main(["eval", "--model", str(tiny_llama_dir), "--corpus", "austen:test", "--valid", "austen:valid",
               "--max-tokens", "200", "--block-size", "128", "--stride", "64", "--memdec", str(ckpt), "--sweep",
               "--json", str(out), "--plot", str(png)])
    assert rc == 0
    report = json.loads(out.read_text())
    assert report["corpus"] == "austen:test" and report["tokens"] == 199
    base, mem = report["results"]
    assert base["system"] == "base" and base["lambda"] is None and mem["system"] == "memdec"
    sweep = report["sweep"]["systems"]["memdec"]
    grid = report["sweep"]["grid"]
    assert len(grid) == 21 and grid[0] == 0.0 and grid[-1] == 1.0
    assert mem["lambda"] == grid[int(np.argmin(sweep["valid_ppl"]))] == sweep["lambda"]
    assert mem["lambda_source"] == "sweep" and math.isclose(mem["valid_ppl"], min(sweep["valid_ppl"]), rel_tol=1e-6)
    assert math.isclose(sweep["test_ppl"][0], base["ppl"], rel_tol=1e-4)  # λ=0 on test is the base row
    assert math.isclose(sweep["test_ppl"][grid.index(mem["lambda"])], mem["ppl"], rel_tol=1e-4)
    assert png.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    printed = capsys.readouterr().out
    assert "memdec" in printed and "chosen on austen:valid" in printed


def test_eval_cli_bad_lambda_flags(tiny_llama_dir, ckpt, tmp_path, capsys):
    base = ["eval", "--model", str(tiny_llama_dir), "--corpus", "austen:valid", "--max-tokens", "50",
            "--block-size", "64", "--stride", "32"]
    other_tok = write_checkpoint(tmp_path / "other", tiny_tokenizer(vocab_size=400))
    cases = [
        (["--memdec", str(ckpt), "--lambda", "1.5"], "must lie in [0, 1]"),
        (["--memdec", str(ckpt), "--lambda", "0.2", "--sweep", "--valid", "austen:valid"], "not both"),
        (["--memdec", str(ckpt), "--sweep"], "give --valid"),
        (["--lambda", "0.2"], "need a system to mix in"),
        (["--memdec", str(tmp_path)], "no memdec.json"),
        (["--memdec", str(other_tok)], "another tokenizer"),
    ]
    for extra, needle in cases:
        rc = main(base + extra)
        err = capsys.readouterr().err
        assert rc == 2 and needle in err and "Traceback" not in err, (extra, err)
