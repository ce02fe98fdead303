"""Many domains (issue 27, part 2): the domain router (memdec.router.DomainRouter, `memdec router --domains`),
`serve`'s `auto` model, token routers in serve, the fast path and lm-eval, adapt's router stage and the λ_t plot.

The domain router reads the base alone (its pooled final hidden states of the prompt), so the decoders here
are tiny random models saved as checkpoints: which decoder answers is decided before any of them runs.
"""

import dataclasses
import json
import shutil

import numpy as np
import pytest
import torch

from memdec.checkpoint import DOMAIN_ROUTER_JSON, read_domain_router_json
from memdec.cli import main
from memdec.data import load_token_stream
from memdec.errors import MemdecError
from memdec.joint import MemoryDecoderModel
from memdec.router import load_domain_router, pooled_states
from memdec.routing import DomainRouterConfig, check_domain_config, random_windows, train_domain_router
from memdec.testing import save_tiny_model, tiny_model

PEAKED = {"initializer_range": 0.2}  # random tiny models with varied, non-flat distributions
DOMAINS = {"austen": "austen:valid", "code": "stdlib:valid"}


WIDE = {"hidden": 128}  # a random base 64 wide pools too little of a prompt's words apart (held-out ~0.75)
WINDOW = 128  # prompts of 32 to 128 tokens


@pytest.fixture(scope="module")
def base_dir(tmp_path_factory, tokenizer):
    return save_tiny_model(tmp_path_factory.mktemp("wide-base"), "llama", tokenizer, seed=0, **WIDE)


@pytest.fixture(scope="module")
def decoders(tmp_path_factory, base_dir, tokenizer):
    """Two memory decoder checkpoints over the tiny base (random weights, λ 0.5 and 0.3)."""
    from transformers import AutoModelForCausalLM

    root = tmp_path_factory.mktemp("domains")
    base = AutoModelForCausalLM.from_pretrained(base_dir).eval()
    for seed, (name, lam) in enumerate((("austen", 0.5), ("code", 0.3)), start=1):
        decoder = tiny_model("llama", tokenizer, seed=seed, n_layers=1, **WIDE, **PEAKED)
        MemoryDecoderModel(base, decoder, lmbda=lam).save_pretrained(root / name, tokenizer=tokenizer)
    return root


def domain_config(decoders, out, **kw) -> DomainRouterConfig:
    return DomainRouterConfig(memdec=[f"{n}={decoders / n}" for n in DOMAINS],
                              domain_corpus=[f"{n}={spec}" for n, spec in DOMAINS.items()], out=str(out),
                              **{"windows": 192, "window_tokens": WINDOW, "max_tokens": 12000, "device": "cpu", **kw})


@pytest.fixture(scope="module")
def domain_router(decoders, base_dir, tmp_path_factory):
    out = tmp_path_factory.mktemp("router") / "domains"
    info = train_domain_router(domain_config(decoders, out, model=str(base_dir)), log=lambda *_: None)
    return out, info


def test_the_domain_router_sends_each_corpus_to_its_own_decoder(domain_router, base_dir, tokenizer):
    """Held-out windows (the last tenth of each corpus, never fitted on) go to their own decoder, general text
    to none, at >= 0.9. Prompts from the test splits (other books, other modules, other essays) are routed
    far above chance (1/3) too; a random 2-block base is a weak encoder of text it has never modelled, so
    the bar there is 0.6 (docs/router.md, "Many domains")."""
    from transformers import AutoModelForCausalLM

    out, info = domain_router
    assert info["classes"] == ["none", "austen", "code"]
    assert info["valid"]["accuracy"] >= 0.9, info["valid"]
    assert all(v["accuracy"] >= 0.8 for v in info["valid"]["per_class"].values()), info["valid"]
    router, record = load_domain_router(out)
    assert [d["name"] for d in record["domains"]] == ["austen", "code"]
    base = AutoModelForCausalLM.from_pretrained(base_dir).eval()
    rng = np.random.default_rng(1)
    for label, spec in (("austen", "austen:test"), ("code", "stdlib:test"), ("none", "general:test")):
        stream = load_token_stream(spec, tokenizer, 6000)
        windows = random_windows(stream, 20, WINDOW, rng)
        routed = [router.route(pooled_states(base, torch.tensor([w.tolist()])))[0] for w in windows]
        assert sum(r == label for r in routed) / len(routed) >= 0.6, (spec, routed)


def test_domain_router_files_round_trip_and_are_checked(domain_router, tmp_path):
    out, _ = domain_router
    info = read_domain_router_json(out)
    assert info["classes"] == ["none", "austen", "code"] and info["hidden"] == 0
    bad = tmp_path / "bad"
    shutil.copytree(out, bad)
    record = json.loads((bad / DOMAIN_ROUTER_JSON).read_text())
    record["classes"] = ["austen", "code", "none"]
    (bad / DOMAIN_ROUTER_JSON).write_text(json.dumps(record))
    with pytest.raises(MemdecError, match='domains.json: field "classes"'):
        load_domain_router(bad)
    record["classes"] = ["none", "austen", "code"]
    del record["domains"][0]["decoder_fingerprint"]
    (bad / DOMAIN_ROUTER_JSON).write_text(json.dumps(record))
    with pytest.raises(MemdecError, match='domains item 0.*lacks field "decoder_fingerprint"'):
        load_domain_router(bad)


@pytest.mark.parametrize("change, message", [
    ({"memdec": ["austen=X"], "domain_corpus": ["austen=austen:valid", "code=stdlib:valid"]}, "has only one"),
    ({"domain_corpus": ["austen=austen:valid", "code=general:train"]}, "general text must be other text"),
    ({"memdec": ["none=X"], "domain_corpus": ["none=austen:valid"]}, "is the base alone"),
    ({"memdec": ["austen"], "domain_corpus": ["austen=austen:valid"]}, "give NAME=VALUE"),
    ({"windows": 0}, "--windows"),
    ({"hidden": -1}, "--hidden"),
    ({"domain_corpus": ["austen=nope.txt", "code=stdlib:valid"]}, "--domain-corpus austen"),
])
def test_bad_domain_flags_are_one_line_before_any_model_loads(decoders, tmp_path, change, message):
    cfg = domain_config(decoders, tmp_path / "out")
    for k, v in change.items():
        setattr(cfg, k, v)
    with pytest.raises(MemdecError, match=message):
        check_domain_config(cfg)
    assert not (tmp_path / "out").exists()


def test_router_domains_cli_and_a_foreign_folder(decoders, base_dir, tmp_path, capsys):
    foreign = tmp_path / "foreign"
    foreign.mkdir()
    (foreign / "notes.txt").write_text("mine")
    args = ["router", "--domains", "--model", str(base_dir), "--memdec", f"austen={decoders / 'austen'}",
            "--memdec", f"code={decoders / 'code'}", "--domain-corpus", "austen=austen:valid",
            "--domain-corpus", "code=stdlib:valid", "--windows", "16", "--window-tokens", "32", "--max-tokens", "4000",
            "--device", "cpu"]
    assert main([*args, "--out", str(foreign)]) == 2
    assert "memdec did not create" in capsys.readouterr().err
    assert (foreign / "notes.txt").read_text() == "mine" and len(list(foreign.iterdir())) == 1
    assert main([*args, "--out", str(tmp_path / "r")]) == 0
    assert "held-out accuracy" in capsys.readouterr().out
    assert read_domain_router_json(tmp_path / "r")["classes"] == ["none", "austen", "code"]


# -- serve: the `auto` model, token routers, a request's λ ----------------------------------------


def greedy_text(model, tokenizer, ids: list[int], n: int = 12) -> str:
    x = torch.tensor([ids])
    with torch.no_grad():
        out = model.generate(x, attention_mask=torch.ones_like(x), max_new_tokens=n, do_sample=False,
                             pad_token_id=tokenizer.pad_token_id)
    return tokenizer.decode(out[0, len(ids):], skip_special_tokens=True)


@pytest.fixture(scope="module")
def const_ckpt(decoders, tmp_path_factory, tokenizer):
    """The "code" decoder (memdec.json λ 0.3) with a constant router at λ 0.8 in its folder."""
    from memdec.checkpoint import decoder_fingerprint
    from memdec.models import tokenizer_fingerprint
    from memdec.router import ConstantRouter, save_router

    folder = tmp_path_factory.mktemp("const") / "const"
    shutil.copytree(decoders / "code", folder)
    save_router(ConstantRouter(0.8), folder, {"base_model": "tiny", "tokenizer_hash": tokenizer_fingerprint(tokenizer),
                                              "decoder_fingerprint": decoder_fingerprint(folder)})
    return folder


@pytest.fixture(scope="module")
def routed_server(domain_router, decoders, const_ckpt, base_dir, tmp_path_factory):
    from test_serve import Server

    srv = Server(["--model", str(base_dir), "--router", str(domain_router[0]), "--memdec", f"const={const_ckpt}",
                  "--max-tokens", "12"], tmp_path_factory.mktemp("log") / "server.log")
    yield srv
    assert srv.stop() == 0, srv.log.read_text()


def complete(srv, model: str, prompt: str, **extra) -> dict:
    import httpx

    body = {"model": model, "prompt": prompt, "max_tokens": 12, "temperature": 0, **extra}
    reply = httpx.post(srv.url + "/v1/completions", json=body, timeout=60)
    assert reply.status_code == 200, reply.text
    return reply.json()


def test_serve_auto_answers_with_the_routed_domain_exactly(routed_server, domain_router, base_dir, tokenizer):
    import httpx

    listed = {m["id"]: m for m in httpx.get(routed_server.url + "/v1/models").json()["data"]}
    assert {"austen", "code", "const", "auto"} <= set(listed)
    assert listed["auto"]["memdec"]["domains"] == ["austen", "code"]
    rng = np.random.default_rng(3)
    seen = set()
    for spec in ("austen:valid", "stdlib:valid", "general:train"):  # text the router was fitted on: routed surely
        for window in random_windows(load_token_stream(spec, tokenizer, 6000), 2, WINDOW, rng):
            prompt = tokenizer.decode(window.tolist())
            auto = complete(routed_server, "auto", prompt)
            domain = auto["memdec_domain"]
            named = complete(routed_server, domain, prompt)
            assert "memdec_domain" not in named  # only a routed answer carries it
            assert auto["choices"][0]["text"] == named["choices"][0]["text"]
            assert auto["model"] == "auto" and auto["object"] == "text_completion"
            seen.add(domain)
    assert seen == {"austen", "code", base_dir.name}  # each corpus went to its own decoder, general text to the base
    reply = httpx.post(routed_server.url + "/v1/completions", json={"model": "auto", "prompt": "x", "lambda": 0.5})
    assert reply.status_code == 400 and reply.json()["error"]["param"] == "lambda"


def test_serve_streams_the_routed_domain(routed_server, tokenizer):
    import httpx

    prompt = tokenizer.decode(load_token_stream("stdlib:valid", tokenizer, 400)[:100].tolist())
    with httpx.stream("POST", routed_server.url + "/v1/completions", timeout=60,
                      json={"model": "auto", "prompt": prompt, "max_tokens": 6, "temperature": 0, "stream": True}) as r:
        events = [json.loads(line[6:]) for line in r.iter_lines() if line.startswith("data: {")]
    assert events and all(e["memdec_domain"] == "code" for e in events)


def test_serve_honours_a_token_router_and_a_requests_lambda(routed_server, const_ckpt, base_dir, tokenizer):
    """The checkpoint's constant router (λ 0.8) gives exactly the fixed-λ 0.8 tokens; a request's `lambda` mixes
    at that λ, not at the router's."""
    from transformers import AutoModelForCausalLM

    base = AutoModelForCausalLM.from_pretrained(base_dir).eval()
    prompt = tokenizer("It is a truth universally acknowledged")["input_ids"]
    fixed = {lam: greedy_text(MemoryDecoderModel.from_pretrained(base, const_ckpt, lam, tokenizer=tokenizer), tokenizer,
                              prompt) for lam in (0.8, 0.05)}
    assert fixed[0.8] != fixed[0.05]  # the two λ tell apart
    text = "It is a truth universally acknowledged"
    assert complete(routed_server, "const", text)["choices"][0]["text"] == fixed[0.8]
    assert complete(routed_server, "const", text, **{"lambda": 0.05})["choices"][0]["text"] == fixed[0.05]


def test_serve_router_arguments_are_checked_before_loading(domain_router, decoders, tmp_path, capsys):
    other = tmp_path / "other"
    shutil.copytree(decoders / "austen", other)
    with open(other / "model.safetensors", "ab") as f:
        f.write(b" ")  # other weights
    assert main(["serve", "--router", str(domain_router[0]), "--memdec", f"austen={other}", "--port", "1"]) == 2
    assert "trained for other decoder weights" in capsys.readouterr().err
    assert main(["serve", "--router", str(tmp_path), "--port", "1"]) == 2
    assert "not a domain router" in capsys.readouterr().err


# -- the fast path never mixes a router's model at a fixed λ ---------------------------------------


def test_the_fast_path_falls_back_to_the_eager_path_with_a_token_router(tokenizer):
    from memdec.fast import FastJointGenerator, fast_scorer
    from memdec.router import RouterFeatures, TokenRouter

    base = tiny_model("llama", tokenizer, seed=0, **PEAKED)
    joint = MemoryDecoderModel(base, tiny_model("llama", tokenizer, seed=1, **PEAKED), lmbda=0.3)
    torch.manual_seed(0)
    router = TokenRouter(RouterFeatures(64, 64), hidden=8, init_lambda=0.3)
    torch.nn.init.normal_(router.out.weight, std=1.0)
    enc = tokenizer(["It is a truth universally acknowledged"], return_tensors="pt")
    fixed = joint.generate(**enc, max_new_tokens=12, do_sample=False, pad_token_id=1)
    joint.router = router.eval()
    routed = joint.generate(**enc, max_new_tokens=12, do_sample=False, pad_token_id=1)
    assert not torch.equal(fixed, routed)  # the router changes the tokens
    gen = FastJointGenerator(joint)
    with pytest.warns(UserWarning, match="token router"):
        fast = gen.generate(enc["input_ids"], attention_mask=enc["attention_mask"], max_new_tokens=12,
                            do_sample=False, pad_token_id=1)
    assert gen.last_path == "fallback" and torch.equal(fast, routed)
    ids = enc["input_ids"]
    assert torch.equal(fast_scorer(joint)(ids[:, :-1], ids[:, 1:]), joint.scorer()(ids[:, :-1], ids[:, 1:]))


# -- lm-eval: router=DIR ------------------------------------------------------------------------


@pytest.fixture(scope="module")
def token_router_dir(decoders, base_dir, tokenizer, tmp_path_factory):
    """A token router (random, so that λ_t varies) saved for the "austen" decoder."""
    from memdec.checkpoint import decoder_fingerprint
    from memdec.models import tokenizer_fingerprint
    from memdec.router import RouterFeatures, TokenRouter, save_router

    torch.manual_seed(0)
    router = TokenRouter(RouterFeatures(128, 128), hidden=8, init_lambda=0.5)
    torch.nn.init.normal_(router.out.weight, std=1.0)
    out = tmp_path_factory.mktemp("token-router") / "r"
    save_router(router.eval(), out, {"base_model": str(base_dir), "tokenizer_hash": tokenizer_fingerprint(tokenizer),
                                     "decoder_fingerprint": decoder_fingerprint(decoders / "austen")})
    return out


def test_lm_eval_honours_a_token_router_as_eval_scores_it(decoders, base_dir, token_router_dir, tokenizer):
    """The lm-eval model's log-likelihood of a continuation is the sum of the log-probs eval's memdec+router row
    scores (``routed_scorer``), and differs from the fixed λ's."""
    from memdec.tasks import load_system, memdec_lm_class

    lm = memdec_lm_class()(base=str(base_dir), memdec=str(decoders / "austen"), router=str(token_router_dir),
                           device="cpu", batch_size=1)
    assert lm.system.name == "memdec+router"
    context = tokenizer.encode("It is a truth universally acknowledged, that a single man")
    cont = tokenizer.encode(" in possession of a good fortune")
    ll, _ = lm._score(context, cont)
    ids = torch.tensor([context + cont])
    joint = lm.system.generator
    routed = joint.routed_scorer()(ids[:, :-1], ids[:, 1:])[0, -len(cont):]
    assert ll == pytest.approx(float(routed.double().sum()), abs=1e-4)
    fixed = joint.scorer(joint.lmbda)(ids[:, :-1], ids[:, 1:])[0, -len(cont):]
    assert abs(float(fixed.double().sum()) - ll) > 1e-2
    with pytest.raises(MemdecError, match="not both"):
        load_system(str(base_dir), memdec=str(decoders / "austen"), router=str(token_router_dir), lmbda=0.5)
    with pytest.raises(MemdecError, match="give memdec=CKPT"):
        load_system(str(base_dir), router=str(token_router_dir))
    with pytest.raises(MemdecError, match="another memory decoder"):
        load_system(str(base_dir), memdec=str(decoders / "code"), router=str(token_router_dir), device="cpu")


# -- adapt: the router stage, and the report's λ_t plot -------------------------------------------


def test_adapt_router_stage_keeps_the_router_only_if_it_wins_and_plots_lambda_t(tiny_llama_dir, tmp_path, capsys):
    from memdec.adapt import AdaptConfig, adapt

    run = tmp_path / "run"
    cfg = AdaptConfig(model=str(tiny_llama_dir), corpus="austen:train", valid="austen:valid", test="austen:test",
                      out=str(run), train_tokens=4000, valid_tokens=1024, test_tokens=1024, k=16, block_size=128,
                      batch_size=4, max_steps=30, lr=1e-3, samples=1, alpha=[0.25], task_items=0, router_tokens=2048)
    adapt(cfg)
    stages = json.loads((run / "stages.json").read_text())
    summary = stages["router"]["summary"]
    valid = json.loads((run / "router" / "router.json").read_text())["valid"]
    assert summary["kept"] == (valid["router_ppl"] < valid["fixed_ppl"])
    assert summary["valid"] == valid and summary["why"]
    rows = [r["system"] for r in json.loads((run / "eval.json").read_text())["results"]]
    assert (run / "memdec" / "router.json").is_file() == summary["kept"] == ("memdec+router" in rows)
    lam = json.loads((run / "router" / "lambda_t.json").read_text())
    assert len(lam["tokens"]) == len(lam["lambda_t"]) == 127 and all(0 < x <= 1 for x in lam["lambda_t"])
    report = (run / "report.md").read_text()
    assert "## Token router" in report and summary["why"] in report and "router_lambda.png" in report
    assert (run / "router_lambda.png").stat().st_size > 1000
    # a rerun is cached; --router off takes a kept router out of RUN/memdec and its row out of eval.json
    capsys.readouterr()
    adapt(cfg)
    assert any("token router" in line and "cached" in line for line in capsys.readouterr().out.splitlines())
    if not summary["kept"]:  # as a kept router would leave them: --router off must take them out
        for name in ("router.json", "router.safetensors"):
            shutil.copyfile(run / "router" / name, run / "memdec" / name)
        ev = json.loads((run / "eval.json").read_text())
        ev["results"].append({**ev["results"][-1], "system": "memdec+router"})
        (run / "eval.json").write_text(json.dumps(ev))
    adapt(dataclasses.replace(cfg, router="off"))
    assert not (run / "memdec" / "router.json").exists()
    assert "memdec+router" not in [r["system"] for r in json.loads((run / "eval.json").read_text())["results"]]
    assert "## Token router" not in (run / "report.md").read_text()


def test_a_token_router_saved_into_its_checkpoint_folder_loads_there(decoders, base_dir, tokenizer, tmp_path):
    """Its router.safetensors is no part of the decoder's fingerprint (it once was: the router then refused the
    very decoder it was trained for)."""
    from transformers import AutoModelForCausalLM

    from memdec.checkpoint import decoder_fingerprint
    from memdec.models import tokenizer_fingerprint
    from memdec.router import RouterFeatures, TokenRouter, save_router

    folder = tmp_path / "ckpt"
    shutil.copytree(decoders / "austen", folder)
    before = decoder_fingerprint(folder)
    save_router(
        TokenRouter(RouterFeatures(128, 128), hidden=8, init_lambda=0.5).eval(),
        folder,
        {"base_model": "tiny", "tokenizer_hash": tokenizer_fingerprint(tokenizer), "decoder_fingerprint": before},
    )
    assert decoder_fingerprint(folder) == before
    base = AutoModelForCausalLM.from_pretrained(base_dir).eval()
    assert isinstance(MemoryDecoderModel.from_pretrained(base, folder, tokenizer=tokenizer).router, TokenRouter)


# -- bench/domains.py on tiny models ---------------------------------------------------------------


def test_the_domains_benchmark_runs_on_tiny_models(domain_router, decoders, base_dir, tmp_path, capsys):
    import importlib.util
    from pathlib import Path

    spec = importlib.util.spec_from_file_location("bench_domains", Path(__file__).parents[1] / "bench" / "domains.py")
    bench = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(bench)
    assert bench.main(["corpora", "--out", str(tmp_path)]) == 0
    docs = [json.loads(line) for line in (tmp_path / "corpora" / "pydocs-test.jsonl").read_text().splitlines()]
    assert docs and all(d["text"] for d in docs)
    out = tmp_path / "stream.json"
    assert bench.main(["measure", "--model", str(base_dir), "--router", str(domain_router[0]), "--test",
                       "austen=austen:test", "--test", "code=stdlib:test", "--segments", "6", "--segment-tokens", "96",
                       "--prompt-tokens", "48", "--device", "cpu", "--budget-s", "600", "--out", str(out)]) == 0
    result = json.loads(out.read_text())
    assert result["segments"] == 6 and set(result["routing"]) == {"austen", "code", "general"}
    systems = result["systems"]
    for kind in (
        "austen",
        "code",
    ):  # the oracle is each domain's decoder at its best λ: no single decoder beats it there
        assert systems["oracle"][f"ppl_{kind}"] <= systems[f"single:{kind}"][f"ppl_{kind}"] + 1e-9
    assert systems["oracle"]["ppl_general"] == systems["base"]["ppl_general"]  # general text: the base alone
    assert result["best_single"] in ("single:austen", "single:code")
    assert "routing accuracy" in capsys.readouterr().out
