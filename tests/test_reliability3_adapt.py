"""Issue 24, round three: an adapt run is never silently replaced, ``--run`` never silently
overrides a flag, and a full disk mid-write is one line that keeps the previous complete file."""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest

from memdec.adapt import AdaptConfig, adapt, identity_changes, resolve_settings
from memdec.checkpoint import apply_run
from memdec.cli import build_parser, config_from_args, main
from memdec.errors import MemdecError
from memdec.evaluate import EvalConfig
from memdec.files import atomic_write, atomic_write_text
from memdec.generate import GenerateConfig
from memdec.models import DEFAULT_MODEL
from memdec.train import TrainConfig, train

SRC = str(Path(__file__).resolve().parents[1] / "src")


# --- a full disk mid-write ---------------------------------------------------------------------


def run_with_file_size_limit(limit: int, code: str, cwd: Path) -> subprocess.CompletedProcess:
    """Run ``code`` in a fresh Python whose files may not grow past ``limit`` bytes (RLIMIT_FSIZE,
    SIGXFSZ ignored): a write past it fails with EFBIG, as a write to a full disk fails with ENOSPC."""
    prelude = textwrap.dedent(f"""
        import resource, signal, sys
        signal.signal(signal.SIGXFSZ, signal.SIG_IGN)
        resource.setrlimit(resource.RLIMIT_FSIZE, ({limit}, {limit}))
    """)
    env = {**os.environ, "PYTHONPATH": SRC + os.pathsep + os.environ.get("PYTHONPATH", "")}
    return subprocess.run([sys.executable, "-c", prelude + textwrap.dedent(code)], cwd=cwd, env=env,
                          capture_output=True, text=True, timeout=300)


def test_a_failed_write_names_the_file_and_keeps_the_previous_one(tmp_path):
    target = tmp_path / "out.json"
    atomic_write_text(target, "old and complete\n")
    proc = run_with_file_size_limit(64, f"""
        from memdec.files import atomic_write_text
        try:
            atomic_write_text({str(target)!r}, "x" * 1000)
        except OSError as exc:
            print(exc.errno, exc.filename)
    """, tmp_path)
    errno_, filename = proc.stdout.split()
    assert (int(errno_), filename) == (27, str(target))  # EFBIG, the target named (not the temporary file)
    assert target.read_text() == "old and complete\n"
    assert sorted(p.name for p in tmp_path.iterdir()) == ["out.json"]  # no temporary file left


def test_a_full_disk_in_a_command_is_one_line_and_the_previous_files_stay(tmp_path):
    """`memdec tasks general` rewrites its task files; the second call's files do not fit: one line on
    stderr naming the file, exit code 1, the first call's complete files unchanged."""
    out = tmp_path / "tasks"
    cmd = ["tasks", "general", "--out", str(out), "--n-items", "3"]
    env = {**os.environ, "PYTHONPATH": SRC + os.pathsep + os.environ.get("PYTHONPATH", "")}
    first = subprocess.run([sys.executable, "-m", "memdec.cli", *cmd], env=env, capture_output=True, text=True,
                           timeout=300)
    assert first.returncode == 0, first.stderr
    before = {p.name: p.read_bytes() for p in out.iterdir()}
    jsonl = out / "memdec_general.jsonl"
    limit = jsonl.stat().st_size + 10  # the first call's file fits; one with 40 items does not
    proc = run_with_file_size_limit(limit, f"""
        from memdec.cli import main
        sys.exit(main({cmd[:-1] + ["40"]!r}))
    """, tmp_path)
    assert proc.returncode == 1, proc.stderr
    lines = proc.stderr.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith(f"memdec: error: {jsonl}: File too large (EFBIG)")
    assert "previous complete file or step is kept" in lines[0] and "Traceback" not in proc.stderr
    assert {p.name: p.read_bytes() for p in out.iterdir()} == before


@pytest.fixture(scope="module")
def trained_two_steps(store, tmp_path_factory):
    """A tiny 4-step training run stopped after its step 2 was committed: resuming it saves step 4."""
    out = tmp_path_factory.mktemp("fsize") / "run"
    cmd = ["train", "--datastore", str(store), "--out", str(out), "--max-steps", "4", "--batch-size", "2",
           "--block-size", "32", "--lr", "1e-3", "--warmup", "1", "--save-every", "2", "--seed", "0"]

    def stop_after_step_2(step, record):
        if step == 2:
            raise KeyboardInterrupt

    with pytest.raises(KeyboardInterrupt):
        train(config_from_args(TrainConfig, build_parser().parse_args(cmd)), on_step=stop_after_step_2)
    return out, cmd


@pytest.mark.parametrize("fails_at", ["model.safetensors", "optimizer.pt"])
def test_a_full_disk_inside_a_checkpoint_save_is_one_line_and_the_previous_step_stays(
        trained_two_steps, tmp_path, fails_at):
    """The weights (safetensors' own writer) and the optimizer state (torch.save) fail with their own
    error kinds, not OSError: each is one line naming the file, and the committed step is intact."""
    done, cmd = trained_two_steps
    out = tmp_path / "run"
    shutil.copytree(done, out)
    step = out / "trainer_state" / "step-00000002"
    before = {p.name: p.read_bytes() for p in step.iterdir()}
    weights, optimizer = (step / "model.safetensors").stat().st_size, (step / "optimizer.pt").stat().st_size
    assert weights < optimizer  # Adam keeps two moments per weight
    others = max(p.stat().st_size for p in step.iterdir() if p.name not in ("model.safetensors", "optimizer.pt"))
    limit = weights - 1 if fails_at == "model.safetensors" else weights + 1
    assert others < limit < optimizer
    resume = [c if c != str(done) else str(out) for c in cmd]
    proc = run_with_file_size_limit(limit, f"""
        from memdec.cli import main
        sys.exit(main({resume!r}))
    """, tmp_path)
    assert proc.returncode == 1, proc.stderr
    lines = [line[line.index("memdec:"):] for line in proc.stderr.splitlines() if "memdec:" in line]  # after tqdm's bar
    assert "Traceback" not in proc.stderr, proc.stderr
    assert len(lines) == 1, proc.stderr
    assert lines[0].startswith("memdec: error: ") and fails_at in lines[0] and "File too large (EFBIG)" in lines[0]
    assert sorted(p.name for p in (out / "trainer_state").iterdir()) == ["step-00000002"]
    assert {p.name: p.read_bytes() for p in step.iterdir()} == before


def test_atomic_write_fsyncs_the_file_before_the_rename_and_the_folder_after(tmp_path, monkeypatch):
    """The power-loss half: the temporary file's bytes reach the disk before it is renamed, and the
    rename before atomic_write returns (os.fsync watched, not replaced)."""
    synced, real_fsync = [], os.fsync

    def watching_fsync(fd):
        path = Path(os.readlink(f"/proc/self/fd/{fd}"))
        synced.append((path.name, (tmp_path / "a.txt").exists()))
        return real_fsync(fd)

    if not Path("/proc/self/fd").is_dir():
        pytest.skip("needs /proc to name an fd")
    monkeypatch.setattr(os, "fsync", watching_fsync)
    atomic_write(tmp_path / "a.txt", lambda p: p.write_text("hello"))
    assert synced == [(".a.txt.tmp", False), (tmp_path.name, True)]
    assert (tmp_path / "a.txt").read_text() == "hello"


# --- an adapt run is never silently replaced -----------------------------------------------------


def tiny_adapt(tiny_llama_dir, out, **kw) -> AdaptConfig:
    """A whole adapt run on the tiny model in seconds: no tasks, no general corpus, one sample."""
    base = dict(
        model=str(tiny_llama_dir),
        corpus="austen:valid",
        valid="austen:test",
        test="austen:train",
        out=str(out),
        train_tokens=400,
        valid_tokens=120,
        test_tokens=120,
        k=8,
        block_size=64,
        batch_size=2,
        max_steps=2,
        lr=1e-3,
        samples=1,
        alpha=[0.5],
        task_items=0,
        general="none",
        router_tokens=400,
    )
    return AdaptConfig(**{**base, **kw})


@pytest.fixture(scope="module")
def finished_run(tiny_llama_dir, tmp_path_factory):
    return adapt(tiny_adapt(tiny_llama_dir, tmp_path_factory.mktemp("adapt3") / "run"))


def snapshot(folder: Path) -> dict[str, tuple[int, int]]:
    """Every file under ``folder`` with its size and modification time (symlinks as themselves)."""
    return {str(p.relative_to(folder)): (p.lstat().st_size, p.lstat().st_mtime_ns) for p in sorted(folder.rglob("*"))}


@pytest.mark.parametrize(
    "change, named",
    [
        (
            dict(corpus="austen:train", test="austen:valid"),
            "--corpus austen:valid -> austen:train; --test austen:train -> austen:valid",
        ),
        (dict(valid="general:test"), "--valid austen:test -> general:test"),
        (dict(text_field="body"), "--text-field text -> body"),
    ],
)
def test_a_rerun_with_other_inputs_is_refused_before_anything_loads(tiny_llama_dir, finished_run, change, named,
                                                                    capsys):
    before = snapshot(finished_run)
    capsys.readouterr()
    with pytest.raises(MemdecError) as err:
        adapt(tiny_adapt(tiny_llama_dir, finished_run, **change))
    msg = str(err.value)
    assert named in msg and "choose a new --out, or give --overwrite" in msg and "\n" not in msg
    assert capsys.readouterr().out == ""  # no stage began: nothing loaded
    assert snapshot(finished_run) == before


def test_another_model_is_refused_on_the_command_line_in_one_line(tiny_llama_dir, tiny_gpt2_dir, finished_run, capsys):
    before = snapshot(finished_run)
    capsys.readouterr()
    rc = main(["adapt", "--model", str(tiny_gpt2_dir), "--corpus", "austen:valid", "--valid", "austen:test",
               "--test", "austen:train", "--general", "none", "--out", str(finished_run)])
    err = capsys.readouterr().err
    assert rc == 2 and err.count("\n") == 1
    assert err.startswith(f"memdec: error: --out {finished_run} holds another run (--model {tiny_llama_dir} -> "
                          f"{tiny_gpt2_dir}):")
    assert snapshot(finished_run) == before


def test_settings_that_only_redo_work_proceed(tiny_llama_dir, finished_run, tmp_path, capsys):
    run = tmp_path / "run"
    shutil.copytree(finished_run, run, symlinks=True)
    keys = snapshot(run / "datastore")
    capsys.readouterr()
    adapt(tiny_adapt(tiny_llama_dir, run, samples=2))
    out = capsys.readouterr().out
    assert out.count("cached") == 4 and "settings changed (samples)" in out
    assert snapshot(run / "datastore") == keys
    assert len(json.loads((run / "samples.json").read_text())) == 2


def test_a_general_corpus_may_be_added_but_not_changed(tiny_llama_dir, finished_run):
    s = resolve_settings(tiny_adapt(tiny_llama_dir, finished_run, general="general:test"))
    assert identity_changes(s, finished_run) == []  # the run had none: adding one only adds work
    settings = json.loads((finished_run / "settings.json").read_text())
    assert settings["general"] is None and settings["model"] == str(tiny_llama_dir)


def test_overwrite_replaces_the_run_and_keeps_what_memdec_did_not_write(tiny_llama_dir, finished_run, tmp_path, capsys):
    run = tmp_path / "run"
    shutil.copytree(finished_run, run, symlinks=True)
    (run / "notes.txt").write_text("mine")
    capsys.readouterr()
    adapt(tiny_adapt(tiny_llama_dir, run, corpus="austen:train", test="austen:valid", overwrite=True))
    out = capsys.readouterr().out
    assert f"--overwrite: replacing the run in {run}" in out and "cached" not in out and "settings changed" not in out
    stages = json.loads((run / "stages.json").read_text())
    assert (
        stages["datastore"]["inputs"]["corpus"] == "austen:train" and stages["eval"]["inputs"]["test"] == "austen:valid"
    )
    assert json.loads((run / "report.json").read_text())["train_corpus"] == "austen:train"
    assert (run / "notes.txt").read_text() == "mine"
    # a run of the same inputs is not replaced by --overwrite: it resumes, every stage cached
    adapt(tiny_adapt(tiny_llama_dir, run, corpus="austen:train", test="austen:valid", overwrite=True))
    assert capsys.readouterr().out.count("cached") == 5


def test_overwrite_never_touches_a_folder_memdec_did_not_create(tiny_llama_dir, tmp_path):
    mine = tmp_path / "mine"
    mine.mkdir()
    (mine / "settings.json").write_text("{}")
    with pytest.raises(MemdecError, match="a folder memdec did not create"):
        adapt(tiny_adapt(tiny_llama_dir, mine, overwrite=True))
    assert [p.name for p in mine.iterdir()] == ["settings.json"]


def test_adapt_help_says_which_inputs_define_the_run(capsys):
    with pytest.raises(SystemExit):
        main(["adapt", "--help"])
    text = " ".join(capsys.readouterr().out.split())
    assert "The run is defined by --model, --corpus, --text-field, --valid, --test and --general" in text
    assert "--overwrite" in text and "redo only the stages they change" in text


# --- --run never silently overrides a flag ----------------------------------------------------


@pytest.mark.parametrize("argv, flags", [
    (["eval", "--model", "{model}"], "--model"),
    (["eval", "--memdec", "{run}/memdec", "--knn", "{run}/datastore"], "--memdec or --knn"),
    (["generate", "--prompt", "Anne", "--model", "{model}"], "--model"),
    (["generate", "--prompt", "Anne", "--memdec", "{run}/memdec"], "--memdec"),
])
def test_run_beside_a_flag_it_gives_is_refused(tiny_llama_dir, finished_run, argv, flags, capsys):
    argv = [a.format(model=tiny_llama_dir, run=finished_run) for a in argv] + ["--run", str(finished_run)]
    capsys.readouterr()
    assert main(argv) == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and err.startswith(
        f"memdec: error: give --run or {flags}, not both: --run {finished_run}"
    )
    assert "would replace --" in err


def test_apply_run_still_fills_what_the_run_gives(tiny_llama_dir, finished_run):
    cfg = apply_run(EvalConfig(run=str(finished_run)))
    assert (cfg.model, cfg.memdec, cfg.knn) == (str(tiny_llama_dir), str(finished_run / "memdec"),
                                                 str(finished_run / "datastore"))
    assert apply_run(GenerateConfig(prompt=["x"])).model == DEFAULT_MODEL  # no run, no --model: the default
    assert apply_run(EvalConfig(model="keep")).model == "keep"
