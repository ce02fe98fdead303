"""Issue 26 (a): `memdec train --decoder SPEC` trains any decoder shape, a finished run keeps only what a
user needs (`--keep-trainer-state`), `--save-dtype` sets the weights' dtype, and `memdec adapt --decoder`
keeps only the chosen candidate (`--keep-candidates`). Tiny Llama (2 blocks) from conftest."""

import json
from dataclasses import asdict

import pytest
import torch
from safetensors.torch import load_file

from memdec.adapt import AdaptConfig, adapt
from memdec.checkpoint import read_memdec_json
from memdec.checks import OWN_MARKER
from memdec.cli import main
from memdec.decoders import shared_split, trunk_hash
from memdec.errors import MemdecError
from memdec.joint import MemoryDecoderModel
from memdec.models import load_model
from memdec.train import TrainConfig, Trainer, run_fingerprint, train

OWN = {f"model.layers.1.{p}" for p in [
    "self_attn.q_proj.weight", "self_attn.k_proj.weight", "self_attn.v_proj.weight", "self_attn.o_proj.weight",
    "mlp.gate_proj.weight", "mlp.up_proj.weight", "mlp.down_proj.weight", "input_layernorm.weight",
    "post_attention_layernorm.weight"]} | {"model.norm.weight"}


def config(store, out, **kw):
    base = dict(datastore=str(store), out=str(out), max_steps=6, batch_size=2, block_size=32, lr=1e-3, warmup=1,
                save_every=2, log_every=1, seed=0, decoder="fork:1")
    base.update(kw)
    return TrainConfig(**base)


def losses(out) -> list[float]:
    return [json.loads(line)["loss"] for line in (out / "log.jsonl").read_text().splitlines() if "loss" in line]


def same_tensors(a, b) -> bool:
    x, y = load_file(a), load_file(b)
    return x.keys() == y.keys() and all(torch.equal(x[k], y[k]) for k in x)


@pytest.fixture(scope="module")
def trained(store, tmp_path_factory):
    """A fork:1 run kept in memory: (trainer, checkpoint folder)."""
    trainer = Trainer(config(store, tmp_path_factory.mktemp("fork") / "run", keep_trainer_state=True))
    return trainer, trainer.run()


def test_a_fork_saves_only_its_own_tensors_and_loads_on_the_shared_trunk(trained, tiny_llama_dir, tokenizer):
    trainer, out = trained
    assert set(load_file(str(out / "decoder.safetensors"))) == OWN
    assert not (out / "model.safetensors").exists() and not (out / "config.json").exists()
    assert not [p for p in out.rglob(".*tmp*")] and not [p for p in out.glob(".save.*")]
    base, _ = load_model(str(tiny_llama_dir))
    info = read_memdec_json(out)
    assert info["decoder"] == {
        "shape": "fork",
        "blocks": 1,
        "trunk_hash": trunk_hash(base, 1),
        "trunk_dtype": "float32",
    }
    assert info["trainable_parameters"] < info["n_parameters"]
    model = MemoryDecoderModel.from_pretrained(base, out, tokenizer=tokenizer)
    assert model.shares_trunk and shared_split(base, model.memdec) == 1
    in_memory = MemoryDecoderModel(load_model(str(tiny_llama_dir))[0], trainer.unwrapped.eval(), lmbda=model.lmbda)
    ids = torch.tensor([tokenizer.encode("It is a truth universally acknowledged, that a single man")])
    with torch.no_grad():
        got, want = model(ids).logits, in_memory(ids).logits
        assert (got - torch.log_softmax(base(ids).logits, -1)).abs().max() > 1e-3  # it did learn something
        assert torch.allclose(got, want, atol=1e-5, rtol=0)


def test_a_fork_step_holds_its_own_tensors_and_an_interrupted_run_resumes_bit_for_bit(trained, store, tmp_path,
                                                                                    interrupt_at):
    _, straight = trained
    step = straight / "trainer_state" / "step-00000006"
    assert sorted(p.name for p in step.iterdir()) == ["decoder.safetensors", "optimizer.pt", "rng-0.json", "state.json"]
    assert set(load_file(str(step / "decoder.safetensors"))) == OWN
    with pytest.raises(interrupt_at.error):
        train(config(store, tmp_path / "run"), on_step=interrupt_at(3))
    assert (tmp_path / "run" / "trainer_state" / "step-00000002").is_dir()  # interrupted: the state stays
    resumed = train(config(store, tmp_path / "run"))
    assert losses(resumed) == losses(straight)
    assert same_tensors(resumed / "decoder.safetensors", straight / "decoder.safetensors")


def test_a_finished_run_drops_its_trainer_state_unless_kept(store, tmp_path):
    out = train(config(store, tmp_path / "dropped", max_steps=2, decoder="copy"))
    assert not (out / "trainer_state").exists() and (out / "model.safetensors").is_file()
    log = (out / "log.jsonl").read_text()
    assert train(config(store, out, max_steps=2, decoder="copy")) == out  # the same run again: done, nothing trained
    assert (out / "log.jsonl").read_text() == log
    with pytest.raises(MemdecError, match="another run"):
        train(config(store, out, max_steps=2, decoder="copy", lr=5e-4))
    kept = train(config(store, tmp_path / "kept", max_steps=2, decoder="copy", keep_trainer_state=True))
    assert sorted(p.name for p in (kept / "trainer_state").iterdir()) == ["step-00000002"]


def test_extending_a_run_needs_its_trainer_state(store, tmp_path):
    """--patience stops a run early (lr 0: no validation improves); rerun without it, the run goes on to
    its last step only where the trainer state was kept."""
    early = dict(
        decoder="copy", lr=0.0, valid="austen:test", valid_max_tokens=64, eval_every=1, patience=1, max_steps=4
    )
    for keep in (False, True):
        out = train(config(store, tmp_path / f"keep-{keep}", keep_trainer_state=keep, **early))
        assert json.loads((out / "memdec.json").read_text())["stopped_early_at"] == 2
        longer = config(store, out, keep_trainer_state=keep, **{**early, "patience": None})
        if not keep:
            with pytest.raises(MemdecError, match=r"finished at step 2 and its trainer state was dropped .*"
                                                  r"--keep-trainer-state"):
                train(longer)
        else:
            train(longer)
            assert [json.loads(line)["step"] for line in (out / "log.jsonl").read_text().splitlines()] == [1, 2, 3, 4]


def test_save_dtype_bfloat16_halves_the_weights_and_loads(store, tmp_path, tiny_llama_dir, tokenizer):
    base, _ = load_model(str(tiny_llama_dir))
    ids = torch.tensor([tokenizer.encode("It is a truth universally acknowledged")])
    for decoder, weights in (("copy", "model.safetensors"), ("fork:1", "decoder.safetensors")):
        full = train(config(store, tmp_path / f"{decoder}-32", max_steps=2, decoder=decoder))
        half = train(config(store, tmp_path / f"{decoder}-16", max_steps=2, decoder=decoder, save_dtype="bfloat16"))
        ratio = (half / weights).stat().st_size / (full / weights).stat().st_size
        assert 0.45 < ratio < 0.55, ratio
        assert {t.dtype for t in load_file(str(half / weights)).values()} == {torch.bfloat16}
        want = {k: v.to(torch.bfloat16) for k, v in load_file(str(full / weights)).items()}
        assert same_tensors(half / weights, full / weights) is False and all(
            torch.equal(v, want[k]) for k, v in load_file(str(half / weights)).items())  # the same run, rounded
        model = MemoryDecoderModel.from_pretrained(base, half, tokenizer=tokenizer)
        assert model.memdec.dtype == torch.float32 and model.shares_trunk == (decoder != "copy")
        with torch.no_grad():
            assert torch.isfinite(model(ids).logits).all()
        if decoder != "copy":  # the trunk is the base's, in its dtype: recorded as such
            assert read_memdec_json(half)["decoder"]["trunk_dtype"] == "float32"


@pytest.mark.parametrize(
    "spec, needle",
    [
        ("branch", r"--decoder: unknown decoder shape 'branch': one of copy, fork"),
        ("fork", r"--decoder: decoder shape 'fork': give the number of own blocks"),
        ("fork:0", r"--decoder: decoder shape 'fork:0': give the number of own blocks"),
        ("copy:2", r"--decoder: decoder shape 'copy:2': 'copy' takes no argument"),
        (
            "fork:3",
            r"--decoder: decoder shape 'fork:3': the number of own blocks must lie in 1\.\.2 \(the base model has 2",
        ),
    ],
)
def test_bad_decoder_specs_are_one_line_before_any_model_loads(store, tmp_path, capsys, monkeypatch, spec, needle):
    def boom(*args, **kwargs):
        raise AssertionError("a model was loaded before --decoder was checked")

    monkeypatch.setattr("memdec.train.recipe.load_model", boom)
    out = tmp_path / "out"
    argv = ["train", "--datastore", str(store), "--out", str(out), "--max-steps", "1", "--decoder", spec]
    assert main(argv) == 2
    err = capsys.readouterr().err.strip()
    assert len(err.splitlines()) == 1 and err.startswith("memdec: error: ")
    assert __import__("re").search(needle, err), err
    assert not out.exists()
    assert main([*argv[:-1], "fork:1", "--init-layers", "1"]) == 2
    assert "--init and --init-layers apply to --decoder copy only" in capsys.readouterr().err
    assert main([*argv[:-2], "--save-dtype", "int8"]) == 2
    assert "unknown --save-dtype 'int8' (float32, bfloat16, float16)" in capsys.readouterr().err


def test_copy_keeps_its_fingerprint_and_files(store, tmp_path):
    cfg = config(store, tmp_path / "copy", decoder="copy", max_steps=1)
    old = {k: v for k, v in asdict(cfg).items() if k not in ("decoder", "keep_trainer_state", "save_dtype")}
    # the fingerprint as it was computed before the decoder shapes (train.run_fingerprint then)
    for k in ("out", "device", "resume", "log_every", "eval_every", "save_every", "patience", "teacher_base_weight"):
        old.pop(k)
    old["datastore_manifest_hash"] = "m"
    legacy = __import__("hashlib").sha256(json.dumps(old, sort_keys=True).encode()).hexdigest()[:16]
    assert run_fingerprint(cfg, "m") == legacy
    assert run_fingerprint(config(store, "x", decoder="copy", keep_trainer_state=True, save_dtype="float16",
                                  max_steps=1), "m") == legacy
    assert run_fingerprint(config(store, "x", max_steps=1), "m") != legacy  # fork:1 is another run
    out = train(cfg)
    assert (out / "model.safetensors").is_file() and (out / "config.json").is_file()
    assert "decoder" not in read_memdec_json(out)


def test_adapt_trains_a_fork_and_keeps_only_what_a_user_needs(tiny_llama_dir, tmp_path, tokenizer):
    def run(out, **kw):
        return adapt(
            AdaptConfig(
                model=str(tiny_llama_dir),
                corpus="austen:valid",
                valid="austen:test",
                test="austen:train",
                out=str(out),
                train_tokens=600,
                valid_tokens=200,
                test_tokens=200,
                k=8,
                block_size=64,
                batch_size=2,
                max_steps=2,
                lr=1e-3,
                samples=0,
                alpha=[0.5, 0.0],
                task_items=0,
                general="none",
                decoder="fork:1",
                **kw,
            )
        )

    out = run(tmp_path / "run")
    chosen = (out / "memdec").resolve()
    assert set(load_file(str(out / "memdec" / "decoder.safetensors"))) == OWN
    assert not list(out.rglob("trainer_state")) and not list(out.rglob("model.safetensors"))
    for other in (out / "candidates").iterdir():
        if other != chosen:  # pruned: its metrics stay for the report
            assert sorted(p.name for p in other.iterdir()) == [OWN_MARKER, "log.jsonl", "memdec.json"]
    base, _ = load_model(str(tiny_llama_dir))
    assert MemoryDecoderModel.from_pretrained(base, out / "memdec", tokenizer=tokenizer).shares_trunk
    disk = json.loads((out / "report.json").read_text())["disk_bytes"]
    assert set(disk) == {"datastore", "memdec", "candidates", "baselines", "other", "total"}
    assert disk["total"] == sum(v for k, v in disk.items() if k != "total") and disk["baselines"] == 0
    assert disk["memdec"] > (out / "memdec" / "decoder.safetensors").stat().st_size
    assert "## Disk" in (out / "report.md").read_text()
    stages = json.loads((out / "stages.json").read_text())
    assert stages["train"]["inputs"]["decoder"] == "fork:1"
    kept = run(tmp_path / "kept", keep_candidates=True)
    assert all((c / "decoder.safetensors").is_file() for c in (kept / "candidates").iterdir())
