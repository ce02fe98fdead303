"""Nothing lost, nothing run: interrupted saves, folders memdec did not create, non-finite values,
loading without unpickling, settings checked before any work, and one line per bad input.

Each test here failed before its fix (see docs/reliability.md for the table).
"""

import json
import os
import pickle
import shutil
import signal
import subprocess
import sys

import numpy as np
import pytest
from safetensors.torch import load_file

from memdec.adapt import AdaptConfig, adapt
from memdec.checks import mark_own_folder
from memdec.cli import build_parser, main
from memdec.datastore import DatastoreConfig, build_datastore
from memdec.errors import CorpusError, DatastoreError, MemdecError
from memdec.train import TrainConfig, train


def config(store, out, **kw):
    base = dict(datastore=str(store), out=str(out), max_steps=6, batch_size=2, block_size=32, lr=1e-3, warmup=1,
                save_every=2, log_every=1, seed=0)
    base.update(kw)
    return TrainConfig(**base)


def same_weights(a, b) -> bool:
    x, y = load_file(a / "model.safetensors"), load_file(b / "model.safetensors")
    return x.keys() == y.keys() and all(bool((x[k] == y[k]).all()) for k in x)


def logged_steps(out) -> list[int]:
    return [json.loads(line)["step"] for line in (out / "log.jsonl").read_text().splitlines()]


def committed_steps(out) -> list[str]:
    return sorted(p.name for p in (out / "trainer_state").iterdir())


@pytest.fixture(scope="module")
def straight(store, tmp_path_factory):
    """An uninterrupted run: what every interrupted-then-resumed run must equal."""
    return train(config(store, tmp_path_factory.mktemp("straight") / "run", keep_trainer_state=True))


# --- 1. a checkpoint step is all or nothing ----------------------------------------------------


@pytest.mark.parametrize("event", ["rng", "weights", "optimizer", "state", "renamed"])
def test_sigint_inside_a_save_then_resume_equals_an_uninterrupted_run(store, tmp_path, straight, event):
    def on_save(name, step):
        if (name, step) == (event, 4):
            raise KeyboardInterrupt  # what Ctrl-C's default handler raises at this point (real signals: SIGKILL below)

    with pytest.raises(KeyboardInterrupt):
        train(config(store, tmp_path / "run"), on_save=on_save)
    resumed = train(config(store, tmp_path / "run", keep_trainer_state=True))
    assert same_weights(resumed, straight)
    assert same_weights(resumed / "trainer_state" / "step-00000006", straight / "trainer_state" / "step-00000006")
    assert logged_steps(resumed) == [1, 2, 3, 4, 5, 6]  # a resumed run repeats no step in its log
    assert committed_steps(resumed) == ["step-00000006"]  # no staging folder, no older step left


@pytest.mark.parametrize("event", ["weights", "renamed"])
def test_sigkill_inside_a_save_then_resume_equals_an_uninterrupted_run(store, tmp_path, straight, event):
    cfg = config(store, tmp_path / "run")
    script = (
        "import json, os, signal, sys\n"
        "from memdec.train import TrainConfig, train\n"
        "cfg = TrainConfig(**json.loads(sys.argv[1]))\n"
        f"kill = lambda name, step: os.kill(os.getpid(), signal.SIGKILL) if (name, step) == ({event!r}, 4) else None\n"
        "train(cfg, on_save=kill)\n"
    )
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    proc = subprocess.run([sys.executable, "-c", script, json.dumps(cfg.__dict__)], env=env, capture_output=True,
                          timeout=300)
    assert proc.returncode == -signal.SIGKILL, proc.stderr[-2000:]
    resumed = train(cfg)
    assert same_weights(resumed, straight) and logged_steps(resumed) == [1, 2, 3, 4, 5, 6]


# --- 2. folders memdec did not create ----------------------------------------------------------


def test_train_refuses_a_folder_it_did_not_create(store, tmp_path):
    mine = tmp_path / "mine"
    mine.mkdir()
    files = {"config.json": '{"mine": true}', "tokenizer.json": "{}", "log.jsonl": "my own log\n"}
    for name, text in files.items():
        (mine / name).write_text(text)
    with pytest.raises(MemdecError, match="did not create"):
        train(config(store, mine))
    assert {p.name: p.read_text() for p in mine.iterdir()} == files
    with pytest.raises(MemdecError, match="inside the datastore"):  # --out equal to the datastore
        train(config(store, store))
    done = train(config(store, tmp_path / "dapt-like", max_steps=2))  # a memdec folder of another kind of run
    from memdec.baselines import BaselineConfig, train_baseline

    with pytest.raises(MemdecError, match="another run"):
        train_baseline(BaselineConfig(method="dapt", datastore=str(store), out=str(done), max_steps=2, batch_size=2,
                                      block_size=32, save_every=2))


def adapt_config(model_dir, run, **kw):
    return AdaptConfig(**{**dict(model=str(model_dir), corpus="austen:train", valid="austen:valid", test="austen:test",
                                 out=str(run), train_tokens=400, valid_tokens=200, test_tokens=200, k=8,
                                 block_size=64, max_steps=1, batch_size=2, samples=0, general="none"), **kw})


def test_adapt_checks_everything_before_writing(tiny_llama_dir, tmp_path):
    empty = tmp_path / "empty.txt"
    empty.write_text("   \n")
    with pytest.raises(CorpusError, match="--corpus"):
        adapt(adapt_config(tiny_llama_dir, tmp_path / "new", corpus=str(empty)))
    assert not (tmp_path / "new").exists()

    run = tmp_path / "run"  # an adapt run folder: a failed validation leaves it as it was
    run.mkdir()
    (run / "stages.json").write_text('{"datastore": {"status": "done"}}\n')
    (run / "settings.json").write_text('{"model": "earlier"}\n')
    before = {p.name: p.read_text() for p in run.iterdir()}
    for bad in (
        dict(corpus=str(empty)),
        dict(k=0),
        dict(alpha=[1.5]),
        dict(lr=float("nan")),
        dict(model="no-such-model"),
    ):
        with pytest.raises(MemdecError):
            adapt(adapt_config(tiny_llama_dir, run, **bad))
        assert {p.name: p.read_text() for p in run.iterdir()} == before

    theirs = tmp_path / "theirs"
    theirs.mkdir()
    (theirs / "notes.txt").write_text("keep me")
    with pytest.raises(MemdecError, match="did not create"):
        adapt(adapt_config(tiny_llama_dir, theirs))
    assert [p.name for p in theirs.iterdir()] == ["notes.txt"]


# --- 3. non-finite values stop a run; corrupt targets are refused ------------------------------


def test_a_diverging_run_stops_and_keeps_its_last_good_checkpoint(store, tmp_path):
    out = tmp_path / "run"
    with pytest.raises(MemdecError, match="not finite.*last good checkpoint is step 1"):
        train(config(store, out, lr=1e10, warmup=0, save_every=1))
    assert committed_steps(out) == ["step-00000001"]
    for f in out.rglob("*.safetensors"):
        assert all(bool(t.isfinite().all()) for t in load_file(f).values())
    resumable = json.loads((out / "trainer_state" / "step-00000001" / "state.json").read_text())
    assert resumable["step"] == 1


def corrupt_copy(store, tmp_path, name, edit):
    copy = tmp_path / name
    shutil.copytree(store, copy)
    arrays = {f: np.load(copy / "targets" / f"{f}.npy", mmap_mode="r+") for f in ("probs", "token_ids")}
    edit(arrays)
    for a in arrays.values():
        a.flush()
    return copy


@pytest.mark.parametrize("name, edit, needle", [
    ("nan", lambda a: a["probs"].__setitem__(5, np.nan), "not in \\[0, 1\\]"),
    ("half", lambda a: a["probs"].__setitem__(slice(None), a["probs"] * 0.5), "sums to 0\\.(49|50)"),
    ("negative-id", lambda a: a["token_ids"].__setitem__(3, -4), "negative token id"),
    ("huge-id", lambda a: a["token_ids"].__setitem__(3, 10**6), "token id 1000000"),
])
def test_corrupt_targets_are_refused_before_training(store, tmp_path, name, edit, needle):
    copy = corrupt_copy(store, tmp_path, name, edit)
    with pytest.raises(DatastoreError, match=needle):
        train(config(copy, tmp_path / "out"))
    assert not (tmp_path / "out").exists()


# --- 4. loading never unpickles ---------------------------------------------------------------


class _Payload:
    def __init__(self, marker):
        self.marker = marker

    def __reduce__(self):
        return (open, (self.marker, "w"))  # would create the marker file if unpickled


def test_resume_never_unpickles_what_is_on_disk(store, tmp_path, interrupt_at):
    out = tmp_path / "run"
    with pytest.raises(interrupt_at.error):
        train(config(store, out), on_step=interrupt_at(2))
    marker = tmp_path / "ran-code"
    step = out / "trainer_state" / "step-00000002"
    with open(step / "optimizer.pt", "wb") as f:
        pickle.dump(_Payload(str(marker)), f)
    with open(out / "trainer_state" / "rng_0.pt", "wb") as f:  # where older memdec kept RNG states
        pickle.dump(_Payload(str(marker)), f)
    with pytest.raises(MemdecError, match="unreadable optimizer state"):
        train(config(store, out))
    assert not marker.exists()
    assert json.loads((step / "rng-0.json").read_text())["step"] == 2  # RNG states are plain JSON


# --- 5. settings are checked before any model loads -------------------------------------------


@pytest.fixture
def no_model_loads(monkeypatch):
    def boom(*args, **kwargs):
        raise AssertionError("a model was loaded before the settings were checked")

    import importlib

    for module in (
        "memdec.train.recipe",
        "memdec.train.step",
        "memdec.train.validate",
        "memdec.evaluate",
        "memdec.joint",
        "memdec.models",
    ):
        if hasattr(importlib.import_module(module), "load_model"):
            monkeypatch.setattr(f"{module}.load_model", boom)


@pytest.mark.parametrize("bad", [
    dict(lambdas=[1.5]), dict(teacher_base_weight=2.0), dict(grad_accum=0), dict(max_grad_norm=float("nan")),
    dict(min_lr_ratio=float("nan")), dict(lr=-1.0), dict(lr=float("nan")), dict(batch_size=0), dict(block_size=0),
    dict(eval_every=0), dict(save_every=0), dict(alpha=float("nan")), dict(max_steps=0),
])
def test_train_settings_are_checked_before_any_work(store, tmp_path, no_model_loads, bad):
    with pytest.raises(MemdecError):
        train(config(store, tmp_path / "out", **bad))
    assert not (tmp_path / "out").exists()


def test_eval_and_generate_settings_are_checked_before_any_model_loads(tiny_llama_dir, store, tmp_path, no_model_loads):
    from memdec.evaluate import EvalConfig, run_eval_report
    from memdec.generate import GenerateConfig, run_generate

    base = dict(model=str(tiny_llama_dir), corpus="austen:valid", max_tokens=100, block_size=64)
    for bad, needle in (
        (dict(knn=str(store), knn_temp=0.0), "--knn-temp"),
        (dict(knn=str(store), knn_k=0), "--knn-k"),
        (dict(recurring=str(tmp_path / "missing")), "--recurring"),
        (dict(block_size=0), "--block-size"),
        (dict(json=str(tmp_path)), "--json"),
        (dict(knn=str(store), lmbda=1.5), "--lambda"),
    ):
        with pytest.raises(MemdecError, match=needle):
            run_eval_report(EvalConfig(**{**base, **bad}))
    for bad, needle in ((dict(prompt=[""]), "--prompt"), (dict(do_sample=True, temperature=0.0), "--temperature"),
                        (dict(max_new_tokens=0), "--max-new-tokens")):
        with pytest.raises(MemdecError, match=needle):
            run_generate(
                GenerateConfig(**{**dict(prompt=["Anne"], model=str(tiny_llama_dir), memdec=str(tmp_path)), **bad})
            )


# --- 6. one line per bad input, never a traceback ---------------------------------------------


def one_line_error(capsys, argv) -> str:
    rc = main(argv)
    err = capsys.readouterr().err
    lines = [line for line in err.splitlines() if line.strip()]
    assert rc == 2 and "Traceback" not in err, err
    errors = [line for line in lines if line.startswith("memdec: error:")]
    assert len(errors) == 1, err
    return errors[0]


def test_bad_model_files_are_one_line(tiny_llama_dir, tmp_path, capsys, monkeypatch):
    monkeypatch.setenv("MEMDEC_HOME", str(tmp_path / "home"))
    rng = np.random.default_rng(0)
    (tmp_path / "random.gguf").write_bytes(rng.bytes(4096))
    (tmp_path / "truncated.gguf").write_bytes(b"GGUF\x03\x00\x00\x00" + rng.bytes(64))
    broken = tmp_path / "broken-model"
    shutil.copytree(tiny_llama_dir, broken)
    weights = broken / "model.safetensors"
    weights.write_bytes(weights.read_bytes()[: weights.stat().st_size // 2])
    for model, needle in (
        (tmp_path / "random.gguf", "not a readable GGUF"),
        (tmp_path / "truncated.gguf", "not a readable GGUF"),
        (broken, "cannot load the model"),
    ):
        line = one_line_error(capsys, ["eval", "--model", str(model), "--corpus", "austen:valid", "--max-tokens", "50",
                                       "--block-size", "32"])
        assert needle in line


def test_bad_flags_are_one_line(tiny_llama_dir, store, tmp_path, capsys):
    train_args = ["train", "--datastore", str(store), "--out", str(tmp_path / "out"), "--max-steps", "1"]
    for flags, needle in ((["--lr", "-1"], "--lr"), (["--lr", "nan"], "--lr"), (["--batch-size", "0"], "--batch-size"),
                          (["--block-size", "0"], "--block-size"), (["--eval-every", "0"], "--eval-every"),
                          (["--save-every", "0"], "--save-every"), (["--grad-accum", "0"], "--grad-accum")):
        assert needle in one_line_error(capsys, train_args + flags)
    eval_args = ["eval", "--model", str(tiny_llama_dir), "--corpus", "austen:valid", "--max-tokens", "50"]
    for flags, needle in (
        (["--knn", str(store), "--knn-k", "0"], "--knn-k"),
        (["--json", str(tmp_path)], "is a folder"),
        (["--block-size", "0"], "--block-size"),
    ):
        assert needle in one_line_error(capsys, eval_args + flags)
    gen_args = ["generate", "--model", str(tiny_llama_dir), "--memdec", str(tmp_path)]
    assert "--prompt" in one_line_error(capsys, gen_args + ["--prompt", ""])
    assert "--temperature" in one_line_error(
        capsys, gen_args + ["--prompt", "Anne", "--do-sample", "--temperature", "0"]
    )
    run = mark_own_folder(tmp_path / "run", "adapt-run")  # an adapt run folder whose stage record is corrupt
    (run / "stages.json").write_text("not json {")
    line = one_line_error(capsys, ["adapt", "--model", str(tiny_llama_dir), "--out", str(run)])
    assert "stages.json" in line and "unreadable stage record" in line
    bad_ids = corrupt_copy(store, tmp_path, "bad-ids", lambda a: a["token_ids"].__setitem__(0, 10**6))
    assert "token id" in one_line_error(capsys, ["train", "--datastore", str(bad_ids), "--out", str(tmp_path / "o2")])


# --- 7. smaller ones ---------------------------------------------------------------------------


def test_datastore_says_what_it_rebuilds_and_keeps_its_k_when_none_is_given(store, tmp_path, capsys):
    copy = tmp_path / "ds"
    shutil.copytree(store, copy)
    targets = {f: (copy / "targets" / f).read_bytes() for f in ("offsets.npy", "token_ids.npy", "probs.npy")}
    same = dict(model=json.loads((copy / "manifest.json").read_text())["model"], corpus="austen:valid", out=str(copy),
                block_size=64, stride=32, max_tokens=600)
    build_datastore(DatastoreConfig(**same))  # no --k: the folder's k=16, nothing rebuilt
    assert json.loads((copy / "manifest.json").read_text())["steps"]["targets"]["k"] == 16
    assert {f: (copy / "targets" / f).read_bytes() for f in targets} == targets
    assert "rebuilding" not in capsys.readouterr().err
    build_datastore(DatastoreConfig(**same, k=8))
    assert "rebuilding the kNN targets: k 16 -> 8" in capsys.readouterr().err


def test_targets_are_byte_identical_whatever_the_search_batch(store, tmp_path):
    copy = tmp_path / "ds"
    shutil.copytree(store, copy)
    manifest = json.loads((copy / "manifest.json").read_text())
    manifest["steps"]["targets"] = {"status": "pending"}
    (copy / "manifest.json").write_text(json.dumps(manifest))
    build_datastore(DatastoreConfig(model=manifest["model"], corpus="austen:valid", out=str(copy), k=16, block_size=64,
                                    stride=32, max_tokens=600, search_batch=64, progress=False))
    for f in ("offsets.npy", "token_ids.npy", "probs.npy"):
        assert (copy / "targets" / f).read_bytes() == (store / "targets" / f).read_bytes(), f
    with pytest.raises(DatastoreError, match="multiple of 64"):
        build_datastore(
            DatastoreConfig(model=manifest["model"], corpus="austen:valid", out=str(copy), search_batch=100)
        )


def test_real_model_targets_are_byte_identical_whatever_the_search_batch(default_model_available, tmp_path):
    """With 576-dimensional keys, BLAS rounding depended on the queries per search call: rows came
    out in another order, or with other entries, for another --search-batch."""
    first = tmp_path / "a"
    cfg = dict(model=default_model_available, corpus="austen:valid", k=64, block_size=256, stride=128,
               max_tokens=1500, progress=False)
    build_datastore(DatastoreConfig(**cfg, out=str(first), search_batch=1024))
    second = tmp_path / "b"
    shutil.copytree(first, second)
    manifest = json.loads((second / "manifest.json").read_text())
    manifest["steps"]["targets"] = {"status": "pending"}
    (second / "manifest.json").write_text(json.dumps(manifest))
    build_datastore(DatastoreConfig(**cfg, out=str(second), search_batch=320))
    for f in ("offsets.npy", "token_ids.npy", "probs.npy"):
        assert (second / "targets" / f).read_bytes() == (first / "targets" / f).read_bytes(), f


def test_max_tokens_tokenizes_only_what_it_needs(tokenizer, tmp_path):
    from memdec.data import load_token_stream, read_corpus, tokenize_documents

    text = read_corpus("austen:valid")[0].text.replace("\n", " ")
    big = tmp_path / "one-line.txt"
    big.write_text(text)
    full = tokenize_documents(tokenizer, read_corpus(str(big)))
    seen = []

    class Counting:
        eos_token_id = tokenizer.eos_token_id

        def __call__(self, texts, **kw):
            seen.append(sum(map(len, texts)) if isinstance(texts, list) else len(texts))
            return tokenizer(texts, **kw)

    for n in (2, 1000, 5000):
        seen.clear()
        got = load_token_stream(str(big), Counting(), max_tokens=n)
        assert np.array_equal(got, full[:n])
        assert sum(seen) < 0.5 * len(text)  # not the whole corpus
    docs = read_corpus("general:test")  # many documents: stops after the ones it needs
    whole = tokenize_documents(tokenizer, docs)
    assert np.array_equal(tokenize_documents(tokenizer, docs, max_tokens=3000), whole[:3000])


def test_help_shows_every_default_and_every_flag_has_help():
    parser = build_parser()
    for name, sub in parser._subparsers._group_actions[0].choices.items():
        for action in sub._actions:
            if action.dest == "help":
                continue
            assert action.help, f"memdec {name} {action.option_strings[0]} has no help text"
            if action.default not in (None, False):
                assert "(default: " in action.help, f"memdec {name} {action.option_strings[0]} hides its default"
