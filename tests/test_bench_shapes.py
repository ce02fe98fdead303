"""bench/shapes.py end to end on a tiny model: rows, the table, a rerun that skips finished rows."""

from __future__ import annotations

import importlib.util
import sys
from pathlib import Path

import pytest

from memdec.checkpoint import read_memdec_json
from memdec.files import read_jsonl
from memdec.testing import save_tiny_model

SCRIPT = Path(__file__).resolve().parent.parent / "bench" / "shapes.py"


@pytest.fixture(scope="module")
def shapes():
    spec = importlib.util.spec_from_file_location("bench_shapes", SCRIPT)
    module = importlib.util.module_from_spec(spec)
    sys.modules[spec.name] = module  # its dataclasses look their module up there
    spec.loader.exec_module(module)
    yield module
    sys.modules.pop(spec.name, None)


@pytest.fixture(scope="module")
def four_blocks(tmp_path_factory, tokenizer):
    return save_tiny_model(tmp_path_factory.mktemp("tiny4"), "llama", tokenizer, seed=0, n_layers=4)


def _argv(model, out: Path, *more: str) -> list[str]:
    return ["--model", str(model), "--out", str(out), "--train-tokens", "1500", "--valid-tokens", "300",
            "--test-tokens", "300", "--block-size", "64", "--threads", "1", *more]


def test_rows_table_and_a_rerun_that_skips_them(shapes, four_blocks, tmp_path, capsys):
    out = tmp_path / "shapes"
    assert shapes.main(_argv(four_blocks, out, "--shapes", "copy", "fork:1", "--alphas", "0.25")) == 0
    rows = read_jsonl(out / "rows.jsonl")
    assert [(r["domain"], r["decoder"], r["alpha"]) for r in rows] == [
        ("austen", "copy", 0.25),
        ("austen", "fork:1", 0.25),
    ]
    copy_row, fork_row = rows
    for row in rows:
        info = read_memdec_json(row["checkpoint"])
        assert row["trainable_parameters"] == info["trainable_parameters"]
        assert row["train_seconds"] == info["train_seconds"]
        assert not (Path(row["checkpoint"]) / "trainer_state").exists()
        assert (
            row["test_tokens"] == 299 and 0 <= row["lambda"] <= 1 and row["base_test_ppl"] == rows[0]["base_test_ppl"]
        )
    assert fork_row["shares_trunk"] and not copy_row["shares_trunk"]
    assert fork_row["trainable_parameters"] < copy_row["trainable_parameters"]
    assert fork_row["disk_bytes"] < copy_row["disk_bytes"]
    assert (out / "austen" / "copy-a0.25").is_dir() and (out / "austen" / "fork-1-a0.25").is_dir()
    table = capsys.readouterr().out
    assert "| austen | fork:1 | 0.25 | 0.0002 |" in table and "| austen | base |" in table
    assert "bench/inference.py --decoder" in table

    before = (out / "rows.jsonl").read_text()
    assert shapes.main(_argv(four_blocks, out, "--shapes", "copy", "fork:1", "--alphas", "0.25")) == 0
    assert (out / "rows.jsonl").read_text() == before  # finished rows are not redone
    assert "== austen" not in capsys.readouterr().out

    with open(out / "rows.jsonl", "a") as f:  # a row cut short by an interruption
        f.write('{"domain": "aus')
    assert shapes.main(_argv(four_blocks, out, "--shapes", "fork:1", "--alphas", "0", "0.25")) == 0
    assert (out / "rows.jsonl").read_text().startswith(before)
    assert [(r["decoder"], r["alpha"]) for r in read_jsonl(out / "rows.jsonl")][2:] == [("fork:1", 0.0)]


def test_bad_arguments_are_one_line_before_any_work(shapes, four_blocks, tmp_path, capsys):
    foreign = tmp_path / "foreign"
    foreign.mkdir()
    (foreign / "notes.txt").write_text("mine")
    cases = [
        (["--shapes", "fork:9"], "--shapes: decoder shape 'fork:9'"),
        (["--shapes", "fork:1", "--lr-scale", "fork:2=3"], "fork:2 is not one of --shapes"),
        (["--shapes", "fork:1", "--lr-scale", "fork:1"], "give SHAPE=X"),
        (["--domains", "klingon"], "unknown domain 'klingon'"),
        (["--alphas", "1.5"], "--alphas"),
    ]
    out = tmp_path / "new"
    for more, message in cases:
        assert shapes.main(_argv(four_blocks, out, *more)) == 2
        err = capsys.readouterr().err
        assert message in err and err.count("\n") == 1
    assert not out.exists()  # nothing written
    assert shapes.main(_argv(four_blocks, foreign, "--shapes", "fork:1")) == 2
    assert "did not create" in capsys.readouterr().err
    assert sorted(p.name for p in foreign.iterdir()) == ["notes.txt"]
