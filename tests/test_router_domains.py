"""Many domains (issue 27, part 2): the domain router (memdec.router.DomainRouter, `memdec router --domains`),
`serve`'s `auto` model, token routers in serve, the fast path and lm-eval, adapt's router stage and the λ_t plot.

The domain router reads the base alone (its pooled final hidden states of the prompt), so the decoders here
are tiny random models saved as checkpoints: which decoder answers is decided before any of them runs.
"""

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
