"""The main job end to end on a tiny model: every stage, the report, caching and invalidation.

One finished run (module fixture) is shared; tests that change settings work on a copy of it."""

import json
import shutil

import pytest

from memdec.adapt import AdaptConfig, adapt
from memdec.report import format_summary
from memdec.checkpoint import read_memdec_json
from memdec.cli import main
from memdec.errors import MemdecError


def tiny_run(tiny_llama_dir, out, **kw):
    base = dict(
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
        max_steps=4,
        lr=1e-3,
        samples=2,
        alpha=[0.5],
        task_items=8,
        router_tokens=400,
    )
    base.update(kw)
    return AdaptConfig(**base)


@pytest.fixture(scope="module")
def finished(tiny_llama_dir, tmp_path_factory):
    return adapt(tiny_run(tiny_llama_dir, tmp_path_factory.mktemp("adapt") / "run"))


@pytest.fixture
def copy_of(finished, tmp_path):
    run = tmp_path / "run"
    shutil.copytree(finished, run, symlinks=True)
    return run


def test_the_report_has_every_system_and_its_plots(finished):
    run = finished
    report = json.loads((run / "report.json").read_text())
    assert [r["system"] for r in report["results"]] == ["base", "knn-lm", "memdec"]
    assert report["tokens"] == 199 and all(r["lambda"] is not None for r in report["results"][1:])
    assert (run / "report.md").read_text().count("| memdec |") == 1
    assert all("recurring_ppl" in r for r in report["results"])  # names and numbers shared with the datastore
    for png in ("lambda.png", "training.png"):
        assert (run / png).stat().st_size > 1000
    assert len(report["samples"]) == 2 and all(s["base"] is not None for s in report["samples"])
    assert "top-p 0.9" in (run / "report.md").read_text()  # samples are drawn as people would, and say how
    assert "knn-lm" in format_summary(run)


def test_every_system_is_scored_on_the_facts_and_general_tasks(finished):
    tasks = json.loads((finished / "tasks.json").read_text())
    assert set(tasks["tasks"]) == {"memdec_facts", "memdec_general_lambada", "memdec_general_cloze"}
    assert all(1 <= w["items"] <= 8 for w in tasks["tasks"].values()) and not tasks["skipped"]
    eval_rows = json.loads((finished / "eval.json").read_text())["results"]
    assert [r["system"] for r in tasks["results"]] == [r["system"] for r in eval_rows]
    for row, ev in zip(tasks["results"], eval_rows):
        assert row["lambda"] == ev["lambda"] and row["knn_temperature"] == ev.get("knn_temperature")
        assert set(row["tasks"]) == set(tasks["tasks"])
        for task, e in row["tasks"].items():
            assert e["n"] == tasks["tasks"][task]["items"] and 0 <= e["acc"] <= 1
            assert e["ci95"][0] <= e["acc"] <= e["ci95"][1] and e["correct"] == round(e["acc"] * e["n"])
    assert json.loads((finished / "report.json").read_text())["tasks"] == tasks
    md = (finished / "report.md").read_text()
    assert "| facts acc | general acc |" in md and "Wilson" in md
    n = tasks["tasks"]["memdec_facts"]["items"]
    assert md.split("| memdec |")[1].split("\n")[0].count(f"(n={n})") >= 1
    assert "facts" in format_summary(finished)


def test_the_checkpoint_loads_with_the_lambda_the_report_shows(finished):
    report = json.loads((finished / "report.json").read_text())
    shown = next(r["lambda"] for r in report["results"] if r["system"] == "memdec")
    info = read_memdec_json(finished / "memdec")
    assert info["lambda"] == shown and "chosen on austen:test" in info["lambda_source"]


def test_a_rerun_with_the_same_settings_is_cached(tiny_llama_dir, finished, capsys):
    capsys.readouterr()
    adapt(tiny_run(tiny_llama_dir, finished))
    assert capsys.readouterr().out.count("cached") == 6  # the router stage too


def test_a_kept_router_is_a_system_of_the_tasks_stage(tiny_llama_dir, copy_of):
    """eval.json's memdec+router row (the router stage kept one in RUN/memdec) is scored on the tasks with
    the router of RUN/memdec; the tasks stage records the systems it scored, so a change of them redoes it."""
    from memdec.adapt import AdaptRun, StageBook, resolve_settings, stage_inputs, task_systems
    ev = json.loads((copy_of / "eval.json").read_text())
    mem = next(r for r in ev["results"] if r["system"] == "memdec")
    ev["results"].append({**mem, "system": "memdec+router"})
    (copy_of / "eval.json").write_text(json.dumps(ev))
    s = resolve_settings(tiny_run(tiny_llama_dir, copy_of))
    job = AdaptRun(copy_of, s, "cpu", StageBook(copy_of), stage_inputs(s))
    systems = {x["system"]: x["args"] for x in task_systems(job)}
    assert list(systems) == [r["system"] for r in ev["results"]]
    assert systems["memdec+router"] == {"base": s.model, "device": "cpu", "memdec": str(copy_of / "memdec"),
                                        "router": str(copy_of / "memdec")}
    assert "router" not in systems["memdec"] and systems["memdec"]["lmbda"] == mem["lambda"]
    recorded = json.loads((copy_of / "stages.json").read_text())["tasks"]["summary"]["systems"]
    assert recorded == [r["system"] for r in ev["results"][:-1]]


def test_changed_training_settings_redo_training_but_keep_the_datastore(tiny_llama_dir, copy_of, capsys):
    adapt(tiny_run(tiny_llama_dir, copy_of, alpha=[0.0], task_items=0))
    out = capsys.readouterr().out
    assert "[1/5] datastore" in out and out.count("cached") == 1 and "settings changed (alpha)" in out


def test_several_teachers_train_one_decoder_each_and_keep_the_best(tiny_llama_dir, copy_of):
    run = copy_of
    adapt(tiny_run(tiny_llama_dir, run, alpha=[0.5, 0.0], teacher_base_weight=[0.0, 0.5], samples=0, task_items=0))
    summary = json.loads((run / "stages.json").read_text())["train"]["summary"]
    scores, chosen = summary["valid_joint_ppl"], summary["chosen"]
    assert list(scores) == ["alpha-0.5", "alpha-0.5-base-0.5", "alpha-0"] and scores[chosen] == min(scores.values())
    assert (run / "memdec").resolve() == (run / "candidates" / chosen).resolve()
    info = read_memdec_json(run / "memdec")
    assert (info["alpha"], info["teacher_base_weight"]) == (
        summary["chosen_alpha"],
        summary["chosen_teacher_base_weight"],
    )
    assert "runner-up" in (run / "report.md").read_text() and "β=0.5" in (run / "report.md").read_text()


def test_two_phase_candidate_splits_the_same_steps_and_competes_on_valid(tiny_llama_dir, copy_of):
    """--two-phase 0.5: CE for half the CE-only candidate's steps, then α=0.5 from its best
    checkpoint for the other half; chosen on valid like the others, both phases' time counted."""
    run = copy_of
    adapt(tiny_run(tiny_llama_dir, run, alpha=[0.0], two_phase=[0.5], samples=0, task_items=0))
    summary = json.loads((run / "stages.json").read_text())["train"]["summary"]
    assert list(summary["valid_joint_ppl"]) == ["alpha-0", "two-phase-0.5"]
    assert summary["valid_joint_ppl"][summary["chosen"]] == min(summary["valid_joint_ppl"].values())
    phase_one, phase_two = run / "candidates" / "two-phase-ce", run / "candidates" / "two-phase-0.5"
    one, two = read_memdec_json(phase_one), read_memdec_json(phase_two)
    steps = read_memdec_json(run / "candidates" / "alpha-0")["train_config"]["max_steps"]
    assert (one["alpha"], one["train_config"]["max_steps"]) == (0.0, steps // 2)
    assert (two["alpha"], two["train_config"]["max_steps"]) == (0.5, steps - steps // 2)
    assert two["init"] == str(phase_one) and len(two["init_hash"]) == 16
    assert summary["train_seconds"]["two-phase-0.5"] == round(one["train_seconds"] + two["train_seconds"], 1)
    assert "CE, then α=0.5" in (run / "report.md").read_text()
    with pytest.raises(MemdecError, match="--two-phase"):
        adapt(tiny_run(tiny_llama_dir, run, two_phase=[0.0]))


def test_a_training_budget_skips_later_candidates(tiny_llama_dir, copy_of, capsys):
    adapt(tiny_run(tiny_llama_dir, copy_of, alpha=[0.5, 0.0], train_budget=0.0, samples=0, task_items=0))
    summary = json.loads((copy_of / "stages.json").read_text())["train"]["summary"]
    assert list(summary["valid_joint_ppl"]) == ["alpha-0.5"] and summary["skipped"] == ["alpha-0"]
    assert "skipped" in capsys.readouterr().out


def test_eval_takes_a_run_folder(finished, tmp_path):
    rc = main(["eval", "--run", str(finished), "--corpus", "austen:test", "--max-tokens", "100", "--block-size", "64",
               "--json", str(tmp_path / "e.json")])
    assert rc == 0
    rows = json.loads((tmp_path / "e.json").read_text())["results"]
    assert [r["system"] for r in rows] == ["base", "knn-lm", "memdec"]


def test_adapt_refuses_training_on_test(tiny_llama_dir, tmp_path):
    with pytest.raises(MemdecError, match="held-out"):
        adapt(tiny_run(tiny_llama_dir, tmp_path / "r", test="austen:valid"))
