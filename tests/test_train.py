"""End-to-end training on a tiny model: checkpoints that load, exact resume, clear errors, DDP."""

import json
import os
import subprocess
import sys

import numpy as np
import pytest
import torch
from safetensors.torch import load_file
from transformers import AutoModelForCausalLM

from memdec.errors import DatastoreError, MemdecError, TokenizerMismatchError
from memdec.train import TrainConfig, train


def config(store, out, **kw):
    base = dict(datastore=str(store), out=str(out), max_steps=6, batch_size=2, block_size=32, lr=1e-3, warmup=1,
                save_every=3, eval_every=3, log_every=1, seed=0)
    base.update(kw)
    return TrainConfig(**base)


def losses(out):
    return [json.loads(line)["loss"] for line in (out / "log.jsonl").read_text().splitlines()]


def test_checkpoint_loads_and_records(store, tmp_path, tokenizer):
    out = train(config(store, tmp_path / "ckpt", valid="austen:test", valid_max_tokens=200, block_size=32))
    model = AutoModelForCausalLM.from_pretrained(out)
    assert model.config.num_hidden_layers == 2
    info = json.loads((out / "memdec.json").read_text())
    manifest = json.loads((store / "manifest.json").read_text())
    assert info["tokenizer_hash"] == manifest["tokenizer_hash"] and info["base_model"] == manifest["model"]
    assert info["k"] == 16 and info["alpha"] == 0.5 and 0 < info["lambda"] < 1
    assert info["train_stats"]["best_ppl"] <= info["train_stats"]["valid_ppl_base"] * 1.5
    assert len(losses(out)) == 6 and all(np.isfinite(losses(out)))
    assert not [p for p in out.rglob(".*tmp*")]  # no temporary file left


def test_teacher_mixed_with_base_trains_and_is_recorded(store, tmp_path):
    """β > 0 runs a frozen base forward per step; β = 1 at α = 1 distils the base itself (KL starts at 0)."""
    out = train(config(store, tmp_path / "mix", max_steps=2, alpha=1.0, teacher_base_weight=1.0, lr=0.0))
    log = [json.loads(line) for line in (out / "log.jsonl").read_text().splitlines()]
    assert abs(log[0]["kl"]) < 1e-4  # the decoder starts as a copy of the base: nothing to learn
    assert json.loads((out / "memdec.json").read_text())["teacher_base_weight"] == 1.0
    with pytest.raises(MemdecError, match="another run"):
        train(config(store, tmp_path / "mix", max_steps=2, alpha=1.0, teacher_base_weight=0.5, lr=0.0))


def test_resume_continues_exactly(store, tmp_path, interrupt_at):
    straight = train(config(store, tmp_path / "a"))
    with pytest.raises(interrupt_at.error):
        train(config(store, tmp_path / "b"), on_step=interrupt_at(3))
    assert json.loads((tmp_path / "b" / "trainer_state" / "step-00000003" / "state.json").read_text())["step"] == 3
    resumed = train(config(store, tmp_path / "b"))
    assert losses(resumed) == losses(straight)
    a, b = load_file(straight / "model.safetensors"), load_file(resumed / "model.safetensors")
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)


def test_bad_inputs(store, tmp_path, tokenizer):
    from memdec.testing import save_tiny_model, tiny_tokenizer

    other = save_tiny_model(tmp_path / "other", "llama", tiny_tokenizer(vocab_size=300))
    with pytest.raises(TokenizerMismatchError, match="tokenizer"):
        train(config(store, tmp_path / "c", init=str(other)))
    with pytest.raises(MemdecError, match="no steps"):
        train(config(store, tmp_path / "d", max_steps=None, epochs=0.0))
    train(config(store, tmp_path / "e", max_steps=3))
    with pytest.raises(MemdecError, match="another run"):
        train(config(store, tmp_path / "e", max_steps=3, lr=5e-4))

    broken = tmp_path / "broken"
    import shutil

    shutil.copytree(store, broken)
    manifest = json.loads((broken / "manifest.json").read_text())
    manifest["steps"]["targets"]["status"] = "running"
    (broken / "manifest.json").write_text(json.dumps(manifest))
    with pytest.raises(DatastoreError, match="targets are not built"):
        train(config(broken, tmp_path / "f"))


def test_init_layers_shortened_copy(store, tmp_path, tiny_llama_dir):
    out = train(config(store, tmp_path / "short", init_layers=1, max_steps=2))
    assert AutoModelForCausalLM.from_pretrained(out).config.num_hidden_layers == 1


def test_ddp_two_cpu_processes_match_one_process(store, tmp_path):
    """2 processes x batch 1 with DDP train the weights of 1 process x batch 2 (up to float noise,
    which Adam's early steps amplify to ~lr), and not those of 1 process x batch 1."""
    single = train(config(store, tmp_path / "single", max_steps=3, batch_size=2, save_every=3))
    half = train(config(store, tmp_path / "half", max_steps=3, batch_size=1, save_every=3))
    cmd = [
        sys.executable,
        "-m",
        "accelerate.commands.launch",
        "--multi_gpu",
        "--num_processes",
        "2",
        "--num_machines",
        "1",
        "--mixed_precision",
        "no",
        "--dynamo_backend",
        "no",
        "-m",
        "memdec.cli",
        "train",
        "--datastore",
        str(store),
        "--out",
        str(tmp_path / "ddp"),
        "--max-steps",
        "3",
        "--batch-size",
        "1",
        "--block-size",
        "32",
        "--lr",
        "1e-3",
        "--warmup",
        "1",
        "--save-every",
        "3",
        "--seed",
        "0",
    ]
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    proc = subprocess.run(cmd, capture_output=True, text=True, env=env, timeout=300)
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert json.loads((tmp_path / "ddp" / "memdec.json").read_text())["world_size"] == 2
    a, b, c = (load_file(p / "model.safetensors") for p in (single, tmp_path / "ddp", half))
    dist = lambda x, y: max((x[k] - y[k]).abs().mean().item() for k in x)  # noqa: E731
    assert dist(a, b) < 0.1 * dist(a, c), (dist(a, b), dist(a, c))


def test_init_from_a_checkpoint_is_phase_two(store, tmp_path, interrupt_at):
    """--init CKPT starts from that checkpoint's weights with a fresh optimizer and schedule; the
    weights' hash is part of the run: resume is exact, and another --init (or the same folder
    retrained in place) refuses to resume."""
    phase1 = train(config(store, tmp_path / "p1", alpha=0.0, max_steps=3))
    still = train(config(store, tmp_path / "still", init=str(phase1), max_steps=1, lr=0.0))
    a, b = load_file(phase1 / "model.safetensors"), load_file(still / "model.safetensors")
    assert all(torch.equal(a[k], b[k]) for k in a)  # lr 0: the phase-one weights, unchanged
    info = json.loads((still / "memdec.json").read_text())
    assert info["init"] == str(phase1) and len(info["init_hash"]) == 16

    straight = train(config(store, tmp_path / "p2", init=str(phase1), alpha=0.5))
    assert json.loads((straight / "log.jsonl").read_text().splitlines()[0])["lr"] > 0  # a fresh warm-up
    with pytest.raises(interrupt_at.error):
        train(config(store, tmp_path / "p2b", init=str(phase1), alpha=0.5), on_step=interrupt_at(3))
    resumed = train(config(store, tmp_path / "p2b", init=str(phase1), alpha=0.5))
    assert losses(resumed) == losses(straight)

    other = train(config(store, tmp_path / "p1other", alpha=0.0, max_steps=3, lr=5e-4))
    with pytest.raises(MemdecError, match="another run"):
        train(config(store, tmp_path / "p2b", init=str(other), alpha=0.5))
    weights = load_file(phase1 / "model.safetensors")
    from safetensors.torch import save_file

    save_file({k: v + 1e-3 for k, v in weights.items()}, str(phase1 / "model.safetensors"), metadata={"format": "pt"})
    with pytest.raises(MemdecError, match="another run"):
        train(config(store, tmp_path / "p2b", init=str(phase1), alpha=0.5))


def test_init_tokenizer_is_checked_before_the_weights_load(store, tmp_path):
    from memdec.testing import save_tiny_model, tiny_tokenizer

    foreign = save_tiny_model(tmp_path / "foreign", "llama", tiny_tokenizer(vocab_size=300))
    (foreign / "model.safetensors").write_bytes(b"garbage")  # never read: the tokenizer check comes first
    with pytest.raises(TokenizerMismatchError, match="--init"):
        train(config(store, tmp_path / "c", init=str(foreign)))
    assert not (tmp_path / "c").exists()


def test_patience_stops_early_where_resume_would_too(store, tmp_path, interrupt_at):
    """lr 0: no validation ever beats the first, so patience 1 stops at the second validation;
    the best checkpoint is the first, the schedule is the full run's, and a rerun resumes to the
    same stop without another step."""
    kw = dict(valid="austen:test", valid_max_tokens=200, lr=0.0, max_steps=12, eval_every=2, save_every=100, patience=1)
    out = train(config(store, tmp_path / "es", **kw))
    info = json.loads((out / "memdec.json").read_text())
    assert info["stopped_early_at"] == 4 and info["train_stats"]["step"] == 2
    assert [json.loads(line)["step"] for line in (out / "log.jsonl").read_text().splitlines()][-1] == 4
    train(config(store, tmp_path / "es", **kw))  # resumes at step 4 and stops there again
    assert [json.loads(line)["step"] for line in (out / "log.jsonl").read_text().splitlines()][-1] == 4
    with pytest.raises(MemdecError, match="--patience"):
        train(config(store, tmp_path / "x", patience=2))
