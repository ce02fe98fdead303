"""Issues 32 and 36, round four, adapt's part: a log or record of other types is skipped or redone, never a
traceback; an unwritable special path is refused before any work; a folder is memdec's by its marker, not by
a file name; kept candidates stay kept; a changed corpus file is a changed run."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import pytest

from memdec.adapt import AdaptConfig, adapt
from memdec import checks
from memdec.checks import check_writable_path
from memdec.data import read_corpus
from memdec.errors import MemdecError
from memdec.report import format_summary
from test_reliability3_cli import one_line_error  # the one `memdec: error:` line of a refused command


def tiny_adapt(model, out, **kw) -> AdaptConfig:
    """A whole adapt run on the tiny model in seconds: two candidates (α 0.5 and 0), no router, no tasks."""
    base = dict(model=str(model), corpus="austen:valid", valid="austen:test", test="austen:train", out=str(out),
                train_tokens=400, valid_tokens=120, test_tokens=120, k=8, block_size=64, batch_size=2, max_steps=2,
                lr=1e-3, samples=1, alpha=[0.5, 0.0], task_items=0, general="none", router="off")
    return AdaptConfig(**{**base, **kw})


@pytest.fixture(scope="module")
def finished(tiny_llama_dir, tmp_path_factory):
    return adapt(tiny_adapt(tiny_llama_dir, tmp_path_factory.mktemp("adapt4") / "run"))


@pytest.fixture
def run(finished, tmp_path):
    """A copy of the finished run, to edit."""
    copy = tmp_path / "run"
    shutil.copytree(finished, copy, symlinks=True)
    return copy


def snapshot(folder: Path) -> dict[str, bytes | None]:
    return {str(p.relative_to(folder)): p.read_bytes() if p.is_file() else None for p in sorted(folder.rglob("*"))}


# --- 32.1: a candidate's log of other types, and the other records adapt and the report read ------------


def edit_log(log: Path, edit) -> None:
    records = [json.loads(line) for line in log.read_text().splitlines()]
    edit(records)
    log.write_text("".join((r if isinstance(r, str) else json.dumps(r)) + "\n" for r in records))


@pytest.mark.parametrize("edit", [
    pytest.param(lambda rs: rs[0].__setitem__("loss", "high"), id="string-loss"),
    pytest.param(lambda rs: rs[0].pop("loss"), id="missing-loss"),
    pytest.param(lambda rs: rs[0].pop("ce"), id="missing-ce"),
    pytest.param(lambda rs: rs[-1].__setitem__("valid_ppl_base", "12.5"), id="string-valid-ppl"),
    pytest.param(lambda rs: rs[0].__setitem__("loss", [1.0, 2.0]), id="list-loss"),
    pytest.param(lambda rs: rs[0].__setitem__("step", {"n": 1}), id="object-step"),
    pytest.param(lambda rs: rs.insert(1, "not json {"), id="not-json-line"),
])
def test_a_candidates_log_of_other_types_is_skipped_with_one_warning(tiny_llama_dir, run, edit, capsys):
    log = run / "candidates" / "alpha-0" / "log.jsonl"
    edit_log(log, edit)
    capsys.readouterr()
    adapt(tiny_adapt(tiny_llama_dir, run))
    out = capsys.readouterr().out
    warnings = [line for line in out.splitlines() if line.startswith("warning:")]
    assert len(warnings) == 1 and str(log) in warnings[0] and "skipped 1 record the training plot cannot use" in \
        warnings[0], out
    assert out.count("cached") == 4 and (run / "training.png").is_file()
    assert "![training curves](training.png)" in (run / "report.md").read_text()


def edit_json(file: Path, edit) -> None:
    record = json.loads(file.read_text())
    edit(record)
    file.write_text(json.dumps(record))


@pytest.mark.parametrize("file, edit, redone", [
    ("eval.json", lambda r: r["results"][2].__setitem__("ppl", "12.5"), "eval"),
    ("eval.json", lambda r: r["results"].pop(0), "eval"),  # no base row
    ("eval.json", lambda r: r.pop("tokens"), "eval"),
    ("samples.json", lambda r: r[0].__setitem__("lambda", "0.5"), "samples"),
])
def test_an_unusable_stage_output_is_redone_not_a_traceback(tiny_llama_dir, run, file, edit, redone, capsys):
    edit_json(run / file, edit)
    capsys.readouterr()
    adapt(tiny_adapt(tiny_llama_dir, run))
    out = capsys.readouterr().out
    assert f"warning: {run / file}" in out and f"redoing the {redone} stage" in out, out
    assert "Traceback" not in out
    assert json.loads((run / "report.json").read_text())["results"][0]["system"] == "base"


@pytest.mark.parametrize("edit, stage", [
    (lambda st: st["samples"].__setitem__("seconds", "slow"), "samples"),
    (lambda st: st["eval"].__setitem__("status", 1), "eval"),
    (lambda st: st["train"]["summary"].__setitem__("valid_joint_ppl", {"alpha-0.5": "low", "alpha-0": 3.0}), "train"),
    (lambda st: st.__setitem__("samples", ["done"]), "samples"),
])
def test_an_unusable_stage_record_is_redone_with_one_warning(tiny_llama_dir, run, edit, stage, capsys):
    edit_json(run / "stages.json", edit)
    capsys.readouterr()
    adapt(tiny_adapt(tiny_llama_dir, run))
    out = capsys.readouterr().out
    warnings = [line for line in out.splitlines() if line.startswith("warning:")]
    assert len(warnings) == 1 and f"the record of {stage} is unusable" in warnings[0], out
    assert f"{stage}: " in out and "its record was unusable; redoing this stage" in out
    assert all(e["status"] == "done" for e in json.loads((run / "stages.json").read_text()).values())
    assert (run / "report.md").is_file()


@pytest.mark.parametrize("edit, message", [
    (lambda r: r["results"][1].__setitem__("tokens_per_s", "fast"),
     r'report.json \(results item 1\): field "tokens_per_s" must be a positive'),
    (lambda r: r.__setitem__("results", r["results"][1:]), 'report.json: no "base" row'),
    (lambda r: r.__setitem__("stage_seconds", [1, 2]), 'report.json: field "stage_seconds" must be a JSON object'),
])
def test_the_terminal_summary_reads_report_json_checked(run, edit, message):
    edit_json(run / "report.json", edit)
    with pytest.raises(MemdecError, match=message):
        format_summary(run)


# --- 32.5: an unwritable special path, refused before any work --------------------------------------------


SPECIAL = [p for p in ("/proc", "/sys") if Path(p).is_dir()]


@pytest.mark.skipif(not SPECIAL, reason="needs /proc or /sys")
@pytest.mark.parametrize("root", SPECIAL)
def test_an_output_in_proc_or_sys_is_refused_before_any_model_loads(store, tmp_path, root, capsys):
    missing_model = str(tmp_path / "no-such-model")  # the first error of a command that started its work
    eval_args = ["eval", "--model", missing_model, "--corpus", "austen:valid", "--max-tokens", "64"]
    cases = [
        (eval_args + ["--json", f"{root}/memdec-x.json"], "--json"),
        (eval_args + ["--memdec", str(tmp_path), "--lambda", "0.5", "--plot", f"{root}/memdec-x.png"], "--plot"),
        (["datastore", "--model", missing_model, "--corpus", "austen:valid", "--out", f"{root}/memdec-ds"], "--out"),
        (["train", "--datastore", str(store), "--out", f"{root}/memdec-ckpt", "--max-steps", "1"], "--out"),
        (["adapt", "--model", missing_model, "--out", f"{root}/memdec-run"], "--out"),
        (["tasks", "general", "--out", f"{root}/memdec-tasks"], "--out"),
    ]
    for argv, flag in cases:
        line = one_line_error(capsys, argv)
        assert line.startswith(f"memdec: error: {flag} {root}/memdec-") and f"cannot write in {root}" in line, line
    with pytest.raises(MemdecError, match="cannot write in"):
        check_writable_path(f"{root}/memdec-x.json", "--json")


# --- 36.1: a folder is memdec's by its marker; runs of the previous release are still recognised ----------


def users_folder(tmp_path: Path, files: dict[str, str]) -> Path:
    folder = tmp_path / "mine"
    for name, text in files.items():
        (folder / name).parent.mkdir(parents=True, exist_ok=True)
        (folder / name).write_text(text)
    return folder


@pytest.mark.parametrize("overwrite", [False, True])
def test_a_users_folder_holding_a_stages_json_is_never_taken(tiny_llama_dir, tmp_path, overwrite):
    mine = users_folder(tmp_path, {"stages.json": '{"build": {"status": "done", "took": 3}}\n',
                                   "settings.json": '{"theme": "dark"}\n', "report.md": "# my report\n"})
    before = snapshot(mine)
    with pytest.raises(MemdecError, match="is a folder memdec did not create"):
        adapt(tiny_adapt(tiny_llama_dir, mine, overwrite=overwrite))
    assert snapshot(mine) == before


def test_every_command_refuses_a_folder_holding_only_its_file_names(finished, store, tmp_path, capsys):
    ckpt = str(finished / "memdec")
    cases = [
        (["train", "--datastore", str(store), "--out", "{out}", "--max-steps", "1"],
         {"trainer_state/notes.txt": "mine", "memdec.json": '{"mine": true}'}),
        (["router", "--memdec", ckpt, "--domain-corpus", "austen:valid", "--valid", "austen:test", "--out", "{out}"],
         {"router.json": '{"mine": true}', "memdec.json": '{"format": "mine"}'}),
        (["router", "--domains", "--memdec", f"a={ckpt}", "--memdec", f"b={ckpt}", "--domain-corpus", "a=austen:valid",
          "--domain-corpus", "b=austen:test", "--out", "{out}"], {"domains.json": '{"format": "mine"}'}),
        (["tasks", "general", "--out", "{out}", "--n-items", "2"], {"memdec_tasks.json": '{"writer": "me"}'}),
        (["datastore", "--model", str(finished), "--corpus", "austen:valid", "--out", "{out}"],
         {"manifest.json": '{"version": 1}'}),
    ]
    for i, (argv, files) in enumerate(cases):
        mine = users_folder(tmp_path / str(i), files)
        before = snapshot(mine)
        line = one_line_error(capsys, [a.replace("{out}", str(mine)) for a in argv])
        assert "is a folder memdec did not create" in line, line
        assert snapshot(mine) == before


def test_each_folder_is_marked_first_and_another_kind_is_refused(finished, store, tmp_path, capsys):
    kinds = {finished: "adapt-run", finished / "datastore": "datastore", finished / "memdec": "checkpoint",
             finished / "candidates" / "alpha-0": "checkpoint"}
    assert {path: checks.folder_kind(path) for path in kinds} == kinds
    line = one_line_error(capsys, ["train", "--datastore", str(store), "--out", str(finished), "--max-steps", "1"])
    assert "is a memdec adapt run folder, not a checkpoint folder" in line
    with pytest.raises(MemdecError, match="is a memdec datastore, not an adapt run folder"):
        checks.check_own_folder(finished / "datastore", "adapt-run")
    assert (
        checks.check_own_folder(finished / "memdec", "router", "checkpoint") == finished / "memdec"
    )  # a router's place


def test_a_run_of_the_previous_release_resumes_and_is_marked(tiny_llama_dir, run, capsys):
    """The previous release wrote no marker: a stages.json that is memdec's stage record (its stages, each with a
    status and a fingerprint) is recognised, and the rerun marks the folder."""
    for marker in run.rglob(checks.OWN_MARKER):
        marker.unlink()
    capsys.readouterr()
    adapt(tiny_adapt(tiny_llama_dir, run))
    assert capsys.readouterr().out.count("cached") == 4
    assert checks.folder_kind(run) == "adapt-run"
    stages = json.loads((run / "stages.json").read_text())
    (run / checks.OWN_MARKER).unlink()
    (run / "stages.json").write_text(json.dumps({**stages, "build": stages["eval"]}))  # not memdec's record
    with pytest.raises(MemdecError, match="did not create"):
        adapt(tiny_adapt(tiny_llama_dir, run))


# --- 36.3: kept candidates stay until the user asks ----------------------------------------------------


def weights(run: Path, name: str) -> list[str]:
    return sorted(p.name for p in (run / "candidates" / name).glob("*.safetensors"))


def test_kept_candidates_stay_until_the_user_asks_and_lost_ones_are_named(tiny_llama_dir, run, capsys):
    other = next(p.name for p in (run / "candidates").iterdir() if p.resolve() != (run / "memdec").resolve())
    assert weights(run, other) == []  # the finished run kept only the chosen one
    capsys.readouterr()
    adapt(tiny_adapt(tiny_llama_dir, run, keep_candidates=True))  # asked later: the weights cannot come back
    out = capsys.readouterr().out
    assert "were removed by an earlier call without --keep-candidates" in out and "cannot bring them back" in out
    assert "were removed by an earlier call without it" in (run / "report.md").read_text()

    kept = run.parent / "kept"  # a run that kept them from the start
    adapt(tiny_adapt(tiny_llama_dir, kept, keep_candidates=True))
    assert weights(kept, other)
    capsys.readouterr()
    adapt(tiny_adapt(tiny_llama_dir, kept))  # a rerun without the flag keeps them, and says so
    out = capsys.readouterr().out
    assert weights(kept, other) and "as an earlier call of this run asked (--keep-candidates)" in out
    assert "their weights kept (--keep-candidates)" in (kept / "report.md").read_text()
    adapt(tiny_adapt(tiny_llama_dir, kept, keep_candidates=False))  # the user asks
    assert weights(kept, other) == []


def test_no_keep_candidates_is_a_flag(tmp_path):
    from memdec.cli import build_parser, config_from_args

    parse = lambda *a: config_from_args(AdaptConfig, build_parser().parse_args(["adapt", *a]))  # noqa: E731
    assert (parse().keep_candidates, parse("--keep-candidates").keep_candidates,
            parse("--no-keep-candidates").keep_candidates) == (None, True, False)


# --- 36.4: a changed corpus file is a changed run --------------------------------------------------------


@pytest.fixture
def corpus_files(tmp_path):
    text = read_corpus("austen:valid")[0].text
    files = {"corpus": tmp_path / "train.txt", "valid": tmp_path / "valid.txt"}
    files["corpus"].write_text(text[:6000])
    files["valid"].write_text(text[6000:9000])
    return files


@pytest.mark.parametrize("changed", ["corpus", "valid"])
def test_a_changed_corpus_file_is_refused_without_overwrite(tiny_llama_dir, tmp_path, corpus_files, changed, capsys):
    cfg = lambda **kw: tiny_adapt(tiny_llama_dir, tmp_path / "run", corpus=str(corpus_files["corpus"]),  # noqa: E731
                                  valid=str(corpus_files["valid"]), alpha=[0.0], samples=0, **kw)
    run = adapt(cfg())
    before = snapshot(run)
    corpus_files[changed].write_text("A changed first line.\n" + corpus_files[changed].read_text())
    with pytest.raises(MemdecError) as err:
        adapt(cfg())
    flag = {"corpus": "--corpus", "valid": "--valid"}[changed]
    assert f"holds another run ({flag} {corpus_files[changed]}: its text changed since the run was made" in str(
        err.value
    )
    assert "\n" not in str(err.value) and snapshot(run) == before
    capsys.readouterr()
    adapt(cfg(overwrite=True))
    out = capsys.readouterr().out
    assert "--overwrite: replacing the run" in out and "cached" not in out
    settings = json.loads((run / "settings.json").read_text())
    from memdec.data import corpus_text_hash

    assert settings["corpus_hashes"][changed] == corpus_text_hash(str(corpus_files[changed]))
    assert settings["corpus_hashes"]["test"] is None  # a built-in corpus: fixed package data, never read to hash
