"""Issue 24, the command line: every bad flag is one line naming it, before any model loads or any
file is written; folders memdec did not create are never changed; every command's --help renders."""

from __future__ import annotations

import argparse
import dataclasses
import json
import os
from pathlib import Path

import matplotlib.figure
import pytest

from memdec.checks import (OWN_MARKER, check_device, check_own_folder, check_plain_name, check_writable_path,
                           mark_own_folder)
from memdec.cli import add_dataclass_args, build_parser, main
from memdec.errors import MemdecError
from memdec.evaluate import plot_lambda_curves
from memdec.models import tokenizer_fingerprint
from memdec.tasks import write_general_task
from memdec.testing import save_tiny_model

TEXT = " ".join(f"Captain Wentworth walked along the harbour with Anne on morning {i}, and the sea was calm and "
                f"bright before the travellers returned to their lodgings." for i in range(30))


def one_line_error(capsys, argv: list[str]) -> str:
    """The one `memdec: error:` line of a refused command (exit 2, no traceback)."""
    rc = main(argv)
    err = capsys.readouterr().err
    assert rc == 2 and "Traceback" not in err, err
    errors = [line for line in err.splitlines() if line.startswith("memdec: error:")]
    assert len(errors) == 1, err
    return errors[0]


@pytest.fixture(scope="module")
def ckpt(tmp_path_factory, tokenizer) -> Path:
    """A tiny memory decoder checkpoint (an HF folder and its memdec.json)."""
    folder = save_tiny_model(tmp_path_factory.mktemp("memdec-ckpt"), "llama", tokenizer, seed=1)
    (folder / "memdec.json").write_text(json.dumps({
        "format": "memdec", "version": 1, "base_model": "tiny", "tokenizer_hash": tokenizer_fingerprint(tokenizer),
        "lambda": 0.3, "alpha": 0.5, "k": None, "knn_temperature": None, "datastore_manifest_hash": None,
        "train_stats": {}}))
    return folder


@pytest.fixture
def corpus(tmp_path) -> Path:
    path = tmp_path / "general.txt"
    path.write_text(TEXT)
    return path


def a_file(tmp_path) -> Path:
    """A regular file: a path below it can never be written, even by root (chmod cannot deny root)."""
    path = tmp_path / "a-file"
    path.write_text("mine")
    return path


# --- 14. every --help renders ----------------------------------------------------------------


def test_every_help_renders(capsys):
    parser = build_parser()
    assert "datastore" in parser.format_help()
    sub = next(a for a in parser._actions if isinstance(a, argparse._SubParsersAction))
    for name, subparser in sub.choices.items():
        assert subparser.format_help()
        if name == "lm-eval":  # lm-eval's own command line answers --help
            continue
        with pytest.raises(SystemExit) as exit_:
            main([name, "--help"])
        assert exit_.value.code == 0, name
        assert "--" in capsys.readouterr().out


def test_datastore_help_shows_the_percent_sign(capsys):
    with pytest.raises(SystemExit):
        main(["datastore", "--help"])
    assert "±3.2%" in capsys.readouterr().out


def test_add_dataclass_args_escapes_every_percent_sign():
    @dataclasses.dataclass
    class Config:
        share: float = 0.5
        label: str = "50%"

    parser = argparse.ArgumentParser()
    add_dataclass_args(parser, Config, {"share": "a share in %, like 5% (or %d)", "label": "shown as 100%s"})
    text = parser.format_help()
    assert "a share in %, like 5% (or %d)" in text and "(default: 50%)" in text and "shown as 100%s" in text


# --- 2, 20. tasks: the ownership rule, a file as --out, lm-eval's bad arguments ----------------


def test_tasks_never_write_into_a_folder_memdec_did_not_create(tmp_path, corpus, capsys):
    mine = tmp_path / "mine"
    mine.mkdir()
    (mine / "memdec_general.jsonl").write_text("the user's own file\n")
    line = one_line_error(capsys, ["tasks", "general", "--corpus", str(corpus), "--out", str(mine), "--n-items", "5"])
    assert "--out" in line and "did not create" in line
    assert [p.name for p in mine.iterdir()] == ["memdec_general.jsonl"]
    assert (mine / "memdec_general.jsonl").read_text() == "the user's own file\n"
    out = tmp_path / "tasks"
    for _ in range(2):  # a new folder, then the folder memdec wrote: both fine
        assert main(["tasks", "general", "--corpus", str(corpus), "--out", str(out), "--n-items", "5"]) == 0
    assert sorted(p.name for p in out.iterdir()) == [OWN_MARKER, "memdec_general.jsonl", "memdec_general_cloze.yaml",
                                                    "memdec_general_lambada.yaml"]


def test_tasks_out_naming_a_file_is_one_line(tmp_path, corpus, capsys):
    target = a_file(tmp_path)
    line = one_line_error(capsys, ["tasks", "facts", "--corpus", str(corpus), "--heldout", str(corpus),
                                   "--out", str(target)])
    assert "--out" in line and "is a file" in line
    assert target.read_text() == "mine"


def test_lm_eval_with_an_unknown_task_is_one_line(capsys):
    pytest.importorskip("lm_eval")
    line = one_line_error(capsys, ["lm-eval", "run", "--model", "memdec", "--tasks", "no_such_task"])
    assert "no_such_task" in line


# --- 3. names that become file names are plain names ------------------------------------------


def test_tasks_name_must_be_a_plain_name(tmp_path, corpus, capsys):
    out = tmp_path / "a" / "b" / "out"
    for name in ("../../escaped", "sub/name", "..", ""):
        line = one_line_error(capsys, ["tasks", "general", "--corpus", str(corpus), "--out", str(out),
                                       "--name", name, "--n-items", "5"])
        assert "--name" in line
    assert not (tmp_path / "a").exists() and sorted(p.name for p in tmp_path.iterdir()) == ["general.txt"]
    with pytest.raises(MemdecError, match="--name"):
        write_general_task(str(corpus), tmp_path / "lib", n_items=5, name="../escaped")
    assert not (tmp_path / "escaped.jsonl").exists()
    assert check_plain_name("memdec_general", "--name") == "memdec_general"


# --- 7. generate: the prompt and the new tokens fit the context -------------------------------


def test_generate_refuses_more_tokens_than_the_context(tiny_llama_dir, ckpt, capsys):
    argv = ["generate", "--model", str(tiny_llama_dir), "--memdec", str(ckpt), "--prompt", "Hello", "--device", "cpu"]
    line = one_line_error(capsys, argv + ["--max-new-tokens", "300"])  # the tiny model's context: 256 tokens
    assert "--max-new-tokens 300" in line and "maximum context length is 256 tokens" in line
    line = one_line_error(capsys, argv[:-4] + ["--prompt", "Anne " * 300, "--max-new-tokens", "1"])
    assert "--prompt" in line and "maximum context length is 256 tokens" in line
    assert main(argv + ["--max-new-tokens", "3"]) == 0


# --- 9. --device: what exists, in every command ------------------------------------------------


def test_every_command_refuses_a_device_that_does_not_exist(tiny_llama_dir, store, ckpt, tmp_path, capsys):
    model = str(tiny_llama_dir)
    commands = {
        "datastore": ["--model", model, "--corpus", "austen:valid", "--out", str(tmp_path / "ds")],
        "train": ["--datastore", str(store), "--out", str(tmp_path / "train"), "--max-steps", "1"],
        "baseline": [
            "--method",
            "dapt",
            "--datastore",
            str(store),
            "--out",
            str(tmp_path / "dapt"),
            "--max-steps",
            "1",
        ],
        "transfer": [
            "--decoder",
            str(ckpt),
            "--model",
            model,
            "--datastore",
            str(store),
            "--out",
            str(tmp_path / "transfer"),
            "--max-steps",
            "1",
        ],
        "adapt": ["--model", model, "--out", str(tmp_path / "run")],
        "eval": ["--model", model, "--corpus", "austen:valid", "--max-tokens", "50"],
        "generate": ["--model", model, "--memdec", str(ckpt), "--prompt", "Hello", "--max-new-tokens", "2"],
        "serve": ["--model", model],
    }
    for command, argv in commands.items():
        for device in ("tpu", "cuda:99", "cuda:x", ""):
            line = one_line_error(capsys, [command, *argv, "--device", device])
            assert "--device" in line, (command, line)
    assert sorted(p.name for p in tmp_path.iterdir()) == []  # nothing was written
    assert check_device("cpu") == "cpu" and check_device("auto") == "auto"


# --- 10. --threads ----------------------------------------------------------------------------


def test_datastore_refuses_threads_below_one(tiny_llama_dir, tmp_path, capsys):
    for threads in ("0", "-3"):
        line = one_line_error(capsys, ["datastore", "--model", str(tiny_llama_dir), "--corpus", "austen:valid",
                                       "--out", str(tmp_path / "ds"), "--max-tokens", "300", "--k", "8",
                                       "--block-size", "64", "--stride", "32", "--threads", threads, "--no-progress"])
        assert "--threads" in line
    assert not (tmp_path / "ds").exists()


# --- 12. datastore: the block size is checked before anything is written ---------------------


def test_a_refused_block_size_leaves_nothing_and_a_valid_rerun_succeeds(tiny_llama_dir, tmp_path, capsys):
    out = tmp_path / "ds"
    argv = ["datastore", "--model", str(tiny_llama_dir), "--corpus", "austen:valid", "--out", str(out),
            "--max-tokens", "300", "--k", "8", "--stride", "32", "--no-progress"]
    line = one_line_error(capsys, argv + ["--block-size", "100000"])
    assert "--block-size 100000" in line and "256" in line
    assert not out.exists()
    assert main(argv + ["--block-size", "64"]) == 0
    assert json.loads((out / "manifest.json").read_text())["block_size"] == 64


# --- 13. baseline: the right flag is blamed ---------------------------------------------------


def test_lora_dropout_out_of_range_blames_lora_dropout(store, tmp_path, capsys):
    for dropout in ("1.5", "-0.1", "1", "nan"):
        line = one_line_error(capsys, ["baseline", "--method", "lora", "--datastore", str(store),
                                       "--out", str(tmp_path / "lora"), "--max-steps", "1", "--lora-dropout", dropout])
        assert "--lora-dropout" in line and "--lora-targets" not in line
    assert not (tmp_path / "lora").exists()


# --- 19. unwritable outputs: refused before any work; the plot written atomically -------------


def test_unwritable_outputs_are_refused_before_any_model_loads(tiny_llama_dir, store, tmp_path, capsys):
    blocked = a_file(tmp_path) / "sub"  # below a regular file: nobody can create it
    missing_model = str(tmp_path / "no-such-model")  # would be the first error of a command that started work
    eval_args = ["eval", "--model", missing_model, "--corpus", "austen:valid", "--max-tokens", "50"]
    cases = [
        (eval_args + ["--json", str(blocked / "r.json")], "--json"),
        (eval_args + ["--memdec", str(tmp_path), "--lambda", "0.5", "--plot", str(blocked / "p.png")], "--plot"),
        (["train", "--datastore", str(store), "--out", str(blocked), "--max-steps", "1"], "--out"),
        (["datastore", "--model", missing_model, "--corpus", "austen:valid", "--out", str(blocked)], "--out"),
        (["adapt", "--model", str(tiny_llama_dir), "--out", str(blocked)], "--out"),
        (["tasks", "general", "--corpus", "no-such-corpus.txt", "--out", str(blocked)], "--out"),
    ]
    if Path("/sys").is_dir() and not os.access("/sys", os.W_OK):  # read-only even for root
        cases.append((eval_args + ["--json", "/sys/memdec-report.json"], "--json"))
    for argv, flag in cases:
        line = one_line_error(capsys, argv)
        assert flag in line and str(tmp_path / "no-such-model") not in line, line
    assert sorted(p.name for p in tmp_path.iterdir()) == ["a-file"]


def test_writable_and_own_folder_checks(tmp_path):
    assert (
        check_writable_path(tmp_path / "new" / "deeper" / "r.json", "--json") == tmp_path / "new" / "deeper" / "r.json"
    )
    with pytest.raises(MemdecError, match="--json .* is a folder"):
        check_writable_path(tmp_path, "--json")
    assert check_own_folder(tmp_path / "fresh", "adapt-run") == tmp_path / "fresh"
    (tmp_path / "run").mkdir()
    (tmp_path / "run" / "notes.txt").write_text("mine")
    with pytest.raises(MemdecError, match="did not create"):
        check_own_folder(tmp_path / "run", "adapt-run")
    (tmp_path / "run" / "stages.json").write_text("{}")  # a file name is no marker
    with pytest.raises(MemdecError, match="did not create"):
        check_own_folder(tmp_path / "run", "adapt-run")
    mark_own_folder(tmp_path / "run", "adapt-run")
    assert check_own_folder(tmp_path / "run", "adapt-run") == tmp_path / "run"


def test_the_plot_is_written_atomically(tmp_path, monkeypatch):
    path = tmp_path / "lambda.png"
    path.write_bytes(b"the previous plot")
    curves = {"memdec": {"test_ppl": [10.0, 8.0, 9.0], "valid_ppl": None, "lambda": 0.5}}

    def interrupted(self, fname, *args, **kwargs):  # a crash in the middle of the write
        Path(fname).write_bytes(b"half a png")
        raise KeyboardInterrupt

    with monkeypatch.context() as m:
        m.setattr(matplotlib.figure.Figure, "savefig", interrupted)
        with pytest.raises(KeyboardInterrupt):
            plot_lambda_curves(path, curves, [0.0, 0.5, 1.0], "test", None)
    assert path.read_bytes() == b"the previous plot" and sorted(p.name for p in tmp_path.iterdir()) == ["lambda.png"]
    plot_lambda_curves(path, curves, [0.0, 0.5, 1.0], "test", None)
    assert path.read_bytes().startswith(b"\x89PNG") and sorted(p.name for p in tmp_path.iterdir()) == ["lambda.png"]
