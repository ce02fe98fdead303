"""The main job end to end on a tiny model: every stage, the report, caching and invalidation."""

import json

import pytest

from memdec.adapt import AdaptConfig, adapt, format_summary
from memdec.cli import main


def tiny_run(tiny_llama_dir, out, **kw):
    base = dict(model=str(tiny_llama_dir), corpus="austen:valid", valid="austen:test", test="austen:train", out=str(out),
                train_tokens=600, valid_tokens=200, test_tokens=200, k=8, block_size=64, batch_size=2, max_steps=4,
                lr=1e-3, samples=2, alpha=[0.5])
    base.update(kw)
    return AdaptConfig(**base)


def test_adapt_end_to_end_then_cached_then_invalidated(tiny_llama_dir, tmp_path, capsys):
    run = adapt(tiny_run(tiny_llama_dir, tmp_path / "run"))
    report = json.loads((run / "report.json").read_text())
    assert [r["system"] for r in report["results"]] == ["base", "knn-lm", "memdec"]
    assert len({r["system"] for r in report["results"]}) == 3 and report["tokens"] == 199
    assert all(r["lambda"] is not None for r in report["results"][1:])
    assert (run / "report.md").read_text().count("| memdec |") == 1
    assert all("recurring_ppl" in r for r in report["results"])  # names and numbers shared with the datastore
    for png in ("lambda.png", "training.png"):
        assert (run / png).stat().st_size > 1000
    assert len(report["samples"]) == 2 and all(s["base"] is not None for s in report["samples"])
    assert "knn-lm" in format_summary(run)
    capsys.readouterr()

    adapt(tiny_run(tiny_llama_dir, tmp_path / "run"))  # same settings: every stage cached
    out = capsys.readouterr().out
    assert out.count("cached") == 4

    adapt(tiny_run(tiny_llama_dir, tmp_path / "run", alpha=[0.0]))  # training changed: datastore stays
    out = capsys.readouterr().out
    assert "[1/4] datastore" in out and out.count("cached") == 1 and "settings changed (alpha)" in out

    # several teachers (α, and β for α > 0): one decoder each, the best on --valid is RUN/memdec
    adapt(tiny_run(tiny_llama_dir, tmp_path / "run", alpha=[0.5, 0.0], teacher_base_weight=[0.0, 0.5], samples=0))
    stages = json.loads((run / "stages.json").read_text())
    summary = stages["train"]["summary"]
    scores, chosen = summary["valid_joint_ppl"], summary["chosen"]
    assert list(scores) == ["alpha-0.5", "alpha-0.5-base-0.5", "alpha-0"] and scores[chosen] == min(scores.values())
    assert (run / "memdec").resolve() == (run / "candidates" / chosen).resolve()
    info = json.loads((run / "memdec" / "memdec.json").read_text())
    assert (info["alpha"], info["teacher_base_weight"]) == (summary["chosen_alpha"], summary["chosen_teacher_base_weight"])
    assert "runner-up" in (run / "report.md").read_text() and "β=0.5" in (run / "report.md").read_text()

    # a training budget: the first candidate always trains, no other starts once it is spent
    adapt(tiny_run(tiny_llama_dir, tmp_path / "run", alpha=[0.5, 0.0], train_budget=0.0, samples=0))
    summary = json.loads((run / "stages.json").read_text())["train"]["summary"]
    assert list(summary["valid_joint_ppl"]) == ["alpha-0.5"] and summary["skipped"] == ["alpha-0"]
    assert "skipped" in capsys.readouterr().out

    # the run's folder stands in for --model/--memdec/--knn
    rc = main(["eval", "--run", str(run), "--corpus", "austen:test", "--max-tokens", "100", "--block-size", "64",
               "--json", str(tmp_path / "e.json")])
    assert rc == 0
    rows = json.loads((tmp_path / "e.json").read_text())["results"]
    assert [r["system"] for r in rows] == ["base", "knn-lm", "memdec"]


def test_adapt_refuses_training_on_test(tiny_llama_dir, tmp_path):
    from memdec.errors import MemdecError

    with pytest.raises(MemdecError, match="held-out"):
        adapt(tiny_run(tiny_llama_dir, tmp_path / "r", test="austen:valid"))
