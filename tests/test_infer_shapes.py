"""Every inference path loads any decoder shape, and a fork of the loaded base shares its trunk.

One fork decoder (``fork:1`` of a tiny 4-block Llama, its own block and norm perturbed) is saved
twice: as a fork checkpoint (its own block only, through ``MemoryDecoderModel.save_pretrained``) and
materialised as a copy checkpoint (a full model folder with its own trunk). ``memdec eval``,
``memdec generate``, ``memdec serve`` and the lm-eval model's ``load_system`` must give, on the fork,
exactly the numbers and tokens of the copy (1e-5 where floats are compared), and the fork must run
its trunk once: shared with the base, never copied per decoder.
"""

from __future__ import annotations

import concurrent.futures as cf
import copy
import math

import numpy as np
import pytest
import torch

from memdec.checkpoint import read_memdec_json
from memdec.decoders import parse_shape, shape_of, shared_split
from memdec.evaluate import (
    EvalConfig,
    load_inputs,
    prepare_config,
    run_eval_report,
    score_systems,
    shared_memdec_scorer,
)
from memdec.fast import FastJointGenerator, fast_scorer
from memdec.generate import GenerateConfig, run_generate
from memdec.joint import MemoryDecoderModel
from memdec.models import load_model
from memdec.scoring import scale_logits
from memdec.tasks import load_system
from memdec.testing import save_tiny_model

LAYERS = 4
SPEC = "fork:1"
PEAKED = {"initializer_range": 0.3}  # varied, non-flat distributions
TEMPERATURE = 1.3  # the decoder's temperature: every path divides by it (scoring.scale_logits)
PROMPTS = ["It is a truth universally acknowledged", "Emma Woodhouse, handsome,", "Mr. Darcy"]


def perturbed(base, spec: str = SPEC, seed: int = 0):
    """A decoder of shape ``spec`` built from ``base``, its own tensors moved away from the base's."""
    shape = parse_shape(spec)
    decoder = shape.build(base)
    gen = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for tensor in shape.own_tensors(decoder).values():
            tensor.add_(torch.randn(tensor.shape, generator=gen) * 0.2)
    return decoder


@pytest.fixture(scope="module")
def ckpts(tmp_path_factory, tokenizer):
    """{"base": base folder, "fork", "fork2": fork checkpoints, "copy": the first fork materialised}."""
    root = tmp_path_factory.mktemp("shapes")
    base_dir = save_tiny_model(root / "base", "llama", tokenizer, seed=0, n_layers=LAYERS, **PEAKED)
    base, tok = load_model(str(base_dir))
    fork, fork2 = perturbed(base, seed=0), perturbed(base, seed=1)
    MemoryDecoderModel(base, fork, lmbda=0.4, temperature=TEMPERATURE).save_pretrained(root / "fork", tokenizer=tok)
    MemoryDecoderModel(base, fork2, lmbda=0.3, temperature=TEMPERATURE).save_pretrained(root / "fork2", tokenizer=tok)
    MemoryDecoderModel(base, copy.deepcopy(fork), lmbda=0.4, temperature=TEMPERATURE).save_pretrained(
        root / "copy", tokenizer=tok)
    paths = {"base": base_dir, "fork": root / "fork", "fork2": root / "fork2", "copy": root / "copy"}
    assert shape_of(read_memdec_json(paths["fork"])) == parse_shape(SPEC)
    assert shape_of(read_memdec_json(paths["copy"])) == parse_shape("copy")
    return paths


def joint_of(ckpts, which: str):
    base, tok = load_model(str(ckpts["base"]))
    return MemoryDecoderModel.from_pretrained(base, ckpts[which], tokenizer=tok), tok


def test_scale_logits_divides_in_float32_and_leaves_temperature_one_alone():
    logits = torch.tensor([[1.0, -2.0, 3.0]], dtype=torch.bfloat16)
    assert scale_logits(logits, 1.0) is logits
    scaled = scale_logits(logits, 2.0)
    assert scaled.dtype == torch.float32 and torch.equal(scaled, logits.float() / 2.0)


def test_the_fork_shares_and_equals_its_copy(ckpts):
    fork, _ = joint_of(ckpts, "fork")
    ref, tok = joint_of(ckpts, "copy")
    assert fork.shares_trunk and not ref.shares_trunk and fork.temperature == ref.temperature == TEMPERATURE
    assert shared_split(fork.base, fork.memdec) == LAYERS - 1
    ids = torch.tensor([tok.encode(PROMPTS[0])])
    with torch.no_grad():
        torch.testing.assert_close(fork(ids).logits, ref(ids).logits, atol=1e-5, rtol=1e-5)


# -- memdec eval -------------------------------------------------------------------------------


def _eval(ckpts, which: str, **kw):
    cfg = EvalConfig(model=str(ckpts["base"]), corpus="austen:test", max_tokens=300, block_size=64, stride=32,
                     memdec=str(ckpts[which]), **kw)
    return run_eval_report(cfg)


def test_eval_of_a_fork_gives_the_copy_numbers_and_the_sweep(ckpts):
    kw = {"sweep": True, "valid": "austen:valid"}
    got, want = _eval(ckpts, "fork", **kw), _eval(ckpts, "copy", **kw)
    assert [r.system for r in got.rows] == ["base", "memdec"]
    assert got.rows[0].nll == want.rows[0].nll  # the base row: the same model, the same pass
    g, w = got.rows[1], want.rows[1]
    assert g.lmbda == w.lmbda and g.extra["lambda_source"] == "sweep"
    assert math.isclose(g.nll, w.nll, rel_tol=1e-5)
    assert math.isclose(g.extra["alone_ppl"], w.extra["alone_ppl"], rel_tol=1e-4)  # the decoder-alone column
    for key in ("test_ppl", "valid_ppl"):
        np.testing.assert_allclose(got.extra["sweep"]["systems"]["memdec"][key],
                                   want.extra["sweep"]["systems"]["memdec"][key], rtol=1e-5)


def test_eval_scores_a_fork_in_one_joint_pass(ckpts):
    """The memdec row of a fork comes from the joint pass (one base forward, then the decoder's own
    block on the captured hidden state), not from the decoder run as a full model: the base's top
    block runs in it, and its time is the mixture's own."""
    cfg = prepare_config(EvalConfig(model=str(ckpts["base"]), corpus="austen:test", max_tokens=300, block_size=64,
                                    stride=32, memdec=str(ckpts["fork"])))
    inputs = load_inputs(cfg)
    assert inputs.joint.shares_trunk
    calls = {"base": 0, "memdec": 0}

    def count(which):
        def hook(*_):
            calls[which] += 1
        return hook

    hooks = [inputs.model.model.layers[-1].register_forward_hook(count("base")),
             inputs.joint.memdec.model.layers[-1].register_forward_hook(count("memdec"))]
    try:
        scored = score_systems(cfg, inputs)
    finally:
        for h in hooks:
            h.remove()
    windows = calls["memdec"]
    assert windows > 1 and calls["base"] == 2 * windows  # the base pass, and the joint pass of the memdec row
    mix = scored.mixtures[0]
    assert mix.joint_seconds(123.0) == mix.seconds  # the joint pass timed both models: not added to the base's
    ids = torch.tensor([inputs.tokenizer.encode(PROMPTS[0] + " " + PROMPTS[1])])
    targets = ids[:, -6:].roll(-1, dims=1)
    torch.testing.assert_close(shared_memdec_scorer(inputs.joint)(ids, targets),
                               inputs.joint.memdec_scorer()(ids, targets), atol=1e-5, rtol=1e-5)


# -- memdec generate ---------------------------------------------------------------------------


@pytest.mark.parametrize("extra", [{}, {"processor": True}, {"num_beams": 2}])
def test_generate_on_a_fork_gives_the_copy_tokens(ckpts, extra):
    def run(which):
        return run_generate(GenerateConfig(prompt=PROMPTS, model=str(ckpts["base"]), memdec=str(ckpts[which]),
                                           max_new_tokens=10, device="cpu", **extra))

    got, want = run("fork"), run("copy")
    assert [r["joint"] for r in got] == [r["joint"] for r in want]
    assert any(r["joint"] for r in got)


# -- the fast path -----------------------------------------------------------------------------


def test_the_fast_path_runs_a_fork_and_gives_the_same_tokens(ckpts):
    """fast.py runs a fork as a separate full model (its trunk twice): correct, if not optimal."""
    fork, tok = joint_of(ckpts, "fork")
    ref, _ = joint_of(ckpts, "copy")
    tok.padding_side = "left"
    enc = tok(PROMPTS[:2], return_tensors="pt", padding=True)
    kw = {"max_new_tokens": 8, "pad_token_id": 1}
    gen = FastJointGenerator(fork)
    fast = gen.generate(enc["input_ids"], attention_mask=enc["attention_mask"], **kw)
    assert gen.last_path == "static"
    assert torch.equal(fast, fork.generate(**enc, **kw)) and torch.equal(fast, ref.generate(**enc, **kw))
    ids = enc["input_ids"][:1]
    targets = ids[:, -4:].roll(-1, dims=1)
    torch.testing.assert_close(fast_scorer(fork)(ids, targets), ref.scorer()(ids, targets), atol=1e-5, rtol=1e-5)


# -- the lm-eval model -------------------------------------------------------------------------


def test_the_lm_eval_model_on_a_fork_gives_the_copy_numbers_and_tokens(ckpts):
    (got, tok), (want, _) = (
        load_system(str(ckpts["base"]), memdec=str(ckpts[w]), device="cpu") for w in ("fork", "copy")
    )
    assert got.generator.shares_trunk and not want.generator.shares_trunk
    ids = torch.tensor([tok.encode(PROMPTS[0]), tok.encode(PROMPTS[1])[:7] + [0] * (len(tok.encode(PROMPTS[0])) - 7)])
    batch, position = torch.tensor([0, 0, 1]), torch.tensor([2, ids.shape[1] - 1, 6])
    torch.testing.assert_close(got.rows(ids, batch, position), want.rows(ids, batch, position), atol=1e-5, rtol=1e-5)
    ids = torch.tensor([tok.encode(PROMPTS[2])])
    kw = {"max_new_tokens": 8, "do_sample": False, "pad_token_id": 1}
    assert torch.equal(got.generator.generate(ids, **kw), want.generator.generate(ids, **kw))


# -- memdec serve ------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def server(ckpts):
    """An in-process server (the real app and worker thread) with two fork domains and the first
    fork's copy: (client, Models)."""
    pytest.importorskip("httpx")
    from fastapi.testclient import TestClient

    from memdec.serve import ServeConfig, check_config, create_app, load_models

    cfg = ServeConfig(model=str(ckpts["base"]), memdec=[f"f={ckpts['fork']}", f"g={ckpts['fork2']}",
                                                        f"c={ckpts['copy']}"], device="cpu", max_batch=8)
    models = load_models(check_config(cfg))
    with TestClient(create_app(models, cfg)) as client:
        yield client, models


def _complete(client, model: str, prompt: str, max_tokens: int = 8) -> str:
    r = client.post("/v1/completions", json={"model": model, "prompt": prompt, "max_tokens": max_tokens,
                                             "temperature": 0})
    assert r.status_code == 200, r.text
    return r.json()["choices"][0]["text"]


def test_serve_forks_share_the_base_and_are_never_a_copy_of_it(server):
    _, models = server
    base = models.base
    for name in ("f", "g"):
        joint = models.joints[name]
        assert joint.shares_trunk and joint.memdec is not base
        assert shared_split(base, joint.memdec) == LAYERS - 1
    assert not models.joints["c"].shares_trunk
    # the memory held: one base, one own block + norm per fork, and the copy's full model
    stored = {}
    for model in (base, *(j.memdec for j in models.joints.values())):
        for p in model.parameters():
            stored[p.data_ptr()] = p.numel()
    own = sum(t.numel() for t in parse_shape(SPEC).own_tensors(models.joints["f"].memdec).values())
    full = sum(p.numel() for p in base.parameters())
    assert sum(stored.values()) == full + 2 * own + sum(p.numel() for p in models.joints["c"].memdec.parameters())


def test_serve_fork_answers_the_copy_tokens_alone_and_in_mixed_batches(server):
    client, _ = server
    alone = {(m, p): _complete(client, m, p) for m in ("f", "g", "c", models_base(server)) for p in PROMPTS}
    assert all(alone[("f", p)] == alone[("c", p)] for p in PROMPTS)
    assert any(alone[("f", p)] != alone[("g", p)] for p in PROMPTS)  # two domains, two decoders
    with cf.ThreadPoolExecutor(8) as pool:  # domains and prompts mixed, all at once
        futures = {key: pool.submit(_complete, client, *key) for key in alone}
        assert {key: f.result() for key, f in futures.items()} == alone


def models_base(server) -> str:
    return server[1].base_id
