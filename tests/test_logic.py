"""Unit tests of the pure logic that the end-to-end tests cover only indirectly: settings, teacher
candidates, the stage record, run folders, log-space mixing and the table renderer; and pinned
stage fingerprints, so that runs made by earlier versions stay cached."""

import json
import math

import numpy as np
import pytest
import torch

from memdec.adapt import (
    PRESETS,
    AdaptConfig,
    StageBook,
    _fingerprint,
    resolve_settings,
    stage_inputs,
    teacher_candidates,
)
from memdec.checkpoint import apply_run
from memdec.errors import MemdecError
from memdec.evaluate import EvalConfig
from memdec.generate import GenerateConfig
from memdec.scoring import mix_logprobs
from memdec.report import task_cell
from memdec.tables import accuracy_entry, render_table, wilson_interval


def test_resolve_settings_layers_overrides_on_the_preset():
    s = resolve_settings(AdaptConfig())
    assert (s.train_tokens, s.k, s.alpha, s.teacher_base_weight) == (24_000, 1024, [0.25, 0.0], [0.0])
    assert s.general_tokens == s.test_tokens == PRESETS["quick"].test_tokens and s.lora_lr == 5 * s.lr
    assert s.task_items == 0 and resolve_settings(AdaptConfig(preset="full")).task_items == 500
    s = resolve_settings(AdaptConfig(block_size=256, train_tokens=0, general="none", lr=1e-3, lora_lr=2e-3))
    assert (s.ds_block_size, s.ds_stride, s.eval_block_size, s.eval_stride, s.train_block_size) == (
        256,
        128,
        256,
        128,
        256,
    )
    assert s.train_tokens is None and s.general is None and s.lora_lr == 2e-3
    with pytest.raises(MemdecError, match="preset"):
        resolve_settings(AdaptConfig(preset="huge"))
    with pytest.raises(MemdecError, match="held-out"):
        resolve_settings(AdaptConfig(valid="austen:train"))


def test_teacher_candidates_pair_beta_only_with_positive_alpha():
    assert teacher_candidates([0.25, 0.0], [0.0]) == [(0.25, 0.0), (0.0, 0.0)]
    assert teacher_candidates([0.5, 0.0, 0.5], [0.0, 0.5]) == [(0.5, 0.0), (0.5, 0.5), (0.0, 0.0)]


def test_stage_book_says_what_changed(tmp_path, capsys):
    book = StageBook(tmp_path, plan=["datastore", "train"])
    inputs = {"k": 8, "corpus": "a"}
    assert not book.is_done("datastore", inputs) and book.changed("datastore", inputs) == []
    assert book.begin("datastore", inputs, "keys") == (False, []) and "[1/2] datastore: keys" in capsys.readouterr().out
    book.run("datastore", inputs, lambda: {"n": 3})
    again = StageBook(tmp_path, plan=["datastore", "train"])  # read back from stages.json
    assert again.is_done("datastore", inputs) and again.summary("datastore") == {"n": 3}
    assert again.changed("datastore", {"k": 16, "corpus": "a"}) == ["k"]
    assert again.changed("datastore", {"k": 8}) == ["corpus"]
    assert again.begin("datastore", {"k": 16, "corpus": "a"}, "keys") == (False, ["k"])
    assert "settings changed (k)" in capsys.readouterr().out


def test_stage_fingerprints_are_pinned():
    """Changing these invalidates every finished run's cache: do it only on purpose (the samples stage
    changed when the report's samples moved from greedy to seeded top-p sampling; the router stage was
    added in round three, every earlier stage's fingerprint unchanged; the default decoder was lora:16 in round
    three and is the copy again in round four: a run with --decoder copy keeps the fingerprints of the runs made
    before, and so does a default run)."""
    copy = {k: _fingerprint(v) for k, v in stage_inputs(resolve_settings(AdaptConfig(decoder="copy"))).items()}
    assert copy == {"datastore": "888fc130e5e8", "train": "7d70aef6d424", "ce-decoder": "dcc9f4db2500",
                    "dapt": "987a37af5ebe", "lora": "f09a207aa4f2", "eval": "8c732d6ebf3c", "samples": "3975c289fa82",
                    "tasks": "aa168714b46e", "router": "a4db82cb4f58"}
    quick = {k: _fingerprint(v) for k, v in stage_inputs(resolve_settings(AdaptConfig())).items()}
    assert quick == copy
    lora = {k: _fingerprint(v) for k, v in stage_inputs(resolve_settings(AdaptConfig(decoder="lora:16"))).items()}
    assert lora == {**copy, "train": "07921afac225", "ce-decoder": "fed982c51462", "eval": "15bc04b9f3ba",
                    "router": "7a1a1c57bd13", "samples": "1023a8113438", "tasks": "fb19a7756c39"}
    full = AdaptConfig(baselines=True, preset="full", alpha=[0.5], teacher_base_weight=[0.0, 0.5], train_budget=600.0,
                       decoder="copy")
    assert {k: _fingerprint(v) for k, v in stage_inputs(resolve_settings(full)).items()} == {
        "datastore": "aa57179b327b", "train": "c10a9f218b60", "ce-decoder": "14a71001e6ae", "dapt": "85f23afe36da",
        "lora": "cf11f5df6d46", "eval": "0e4cba115563", "samples": "2dd966e2a0ad",
        "tasks": "5eebe2fddd93", "router": "494edfab209f"}
    assert resolve_settings(AdaptConfig(init_layers=4)).train.decoder == "copy"  # options that start from a full model
    assert resolve_settings(AdaptConfig(two_phase=[0.5])).train.decoder == "copy"


def test_transfer_stage_fingerprint_is_pinned(tmp_path):
    """--transfer-from adds SRC's memdec.json hash, the budget and the init to the train stage (and so
    to the stages after it); the datastore and the baselines keep the fingerprints of a plain run."""
    src = tmp_path / "src"
    src.mkdir()
    (src / "memdec.json").write_text('{"base_model": "smollm2-135m", "lambda": 0.3}\n')
    got = {k: _fingerprint(v) for k, v in stage_inputs(resolve_settings(AdaptConfig(transfer_from=str(src)))).items()}
    assert got == {"datastore": "888fc130e5e8", "train": "0ac439d593c5", "ce-decoder": "dcc9f4db2500",
                   "dapt": "987a37af5ebe", "lora": "f09a207aa4f2", "eval": "065c2e7b4e23", "samples": "71a0bc659e54",
                   "tasks": "dace3f4a3348", "router": "3e0c1aea5c74"}
    other = AdaptConfig(transfer_from=str(src), transfer_init="random", transfer_budget=0.1)
    assert _fingerprint(stage_inputs(resolve_settings(other))["train"]) == "cf7a7065cd76"


def fake_run(root, baselines=("dapt",)):
    (root / "memdec").mkdir(parents=True)
    (root / "memdec" / "memdec.json").write_text("{}")
    (root / "settings.json").write_text(json.dumps({"model": "m", "valid": "v", "test": "t", "test_tokens": 9}))
    for method in baselines:
        (root / "baselines" / method).mkdir(parents=True)
        (root / "baselines" / method / "baseline.json").write_text("{}")
    return root


def test_apply_run_fills_in_what_the_run_folder_provides(tmp_path):
    run = fake_run(tmp_path / "run")
    cfg = apply_run(EvalConfig(run=str(run)))
    assert (cfg.model, cfg.memdec, cfg.knn) == ("m", str(run / "memdec"), str(run / "datastore"))
    assert cfg.baseline == [str(run / "baselines" / "dapt")]
    assert apply_run(EvalConfig(run=str(run), baseline=["mine"])).baseline == ["mine"]  # given ones win
    gen = apply_run(GenerateConfig(prompt=["x"], run=str(run)))
    assert (gen.model, gen.memdec) == ("m", str(run / "memdec"))
    assert apply_run(EvalConfig(model="keep")).model == "keep"  # no run: unchanged
    with pytest.raises(MemdecError, match="not a finished memdec adapt run"):
        apply_run(EvalConfig(run=str(tmp_path)))


def test_mix_logprobs_is_exact_at_the_ends_and_log_linear_between():
    rng = np.random.default_rng(0)
    a, b = np.log(rng.dirichlet(np.ones(7))), np.log(rng.dirichlet(np.ones(7)))
    assert mix_logprobs(a, b, 0.0) is a and mix_logprobs(a, b, 1.0) is b
    np.testing.assert_allclose(mix_logprobs(a, b, 0.3), np.log(0.7 * np.exp(a) + 0.3 * np.exp(b)), rtol=1e-12)
    ta, tb = torch.from_numpy(a), torch.from_numpy(b)
    torch.testing.assert_close(mix_logprobs(ta, tb, 0.3), torch.from_numpy(np.log(0.7 * np.exp(a) + 0.3 * np.exp(b))))
    assert math.isclose(float(np.logaddexp.reduce(mix_logprobs(a, b, 0.6))), 0.0, abs_tol=1e-12)  # still sums to 1
    for bad in (-0.1, 1.5, float("nan")):
        with pytest.raises(MemdecError, match="lambda"):
            mix_logprobs(a, b, bad)


def test_render_table_markdown_and_text():
    rows = [["base", "32.60"], ["memdec", "29.25"]]
    assert render_table(["system", "ppl"], rows) == ["| system | ppl |", "| --- | --- |", "| base | 32.60 |",
                                                     "| memdec | 29.25 |"]
    assert render_table(["system", "ppl"], rows, "text") == ["system   ppl", "base   32.60", "memdec 29.25"]
    assert render_table(["a", "b"], [["x", "y"]], "text", align="<<") == ["a b", "x y"]
    with pytest.raises(ValueError):
        render_table(["a"], [], "html")


def test_wilson_interval_matches_known_values():
    """95% Wilson score intervals (Wilson 1927; e.g. Newcombe 1998, Table I; Brown, Cai & DasGupta 2001)."""
    for (k, n), (lo, hi) in {(5, 10): (0.2366, 0.7634), (0, 10): (0.0, 0.2775), (10, 10): (0.7225, 1.0),
                             (50, 100): (0.4038, 0.5962), (81, 263): (0.2553, 0.3662)}.items():
        got = wilson_interval(k, n)
        assert math.isclose(got[0], lo, abs_tol=1e-4) and math.isclose(got[1], hi, abs_tol=1e-4), (k, n, got)
    assert wilson_interval(0, 0) == (0.0, 1.0)
    assert wilson_interval(3, 4, z=1.0) != wilson_interval(3, 4)  # z sets the level
    with pytest.raises(ValueError):
        wilson_interval(5, 4)
    entry = accuracy_entry(0.5, 10)
    assert entry["correct"] == 5 and entry["ci95"] == [0.236593, 0.763407]
    assert task_cell(entry) == "0.50 ± 0.26 (n=10)" and task_cell(None) == "-"


def test_the_three_result_tables_share_one_renderer(tmp_path):
    """`memdec eval`'s table, the report's and its terminal summary: columns of memdec.tables.render_columns,
    each exactly as before it was shared."""
    from memdec.evaluate import ResultRow, format_table
    from memdec.report import format_summary, results_table
    from memdec.tables import Column, render_columns

    assert render_columns([{"a": "x"}], [Column("a", lambda r: r["a"], "<"), Column("n", lambda r: "12")], "text") == \
        ["a  n", "x 12"]
    rows = [ResultRow("base", "m", 2.5, 12.18249, 100.0, {"general_ppl": 30.1234, "trainable_parameters": 0}),
            ResultRow("memdec", "m+d", 2.3, 9.97, 60.0, {"trainable_parameters": 1234567, "train_seconds": 12.0}, 0.3)]
    assert format_table(rows, 9, "c", "g").splitlines() == [
        "9 tokens of c; general: g",
        "system lambda    nll    ppl general ppl tok/s x base trainable train s model",
        "base        - 2.5000 12.182      30.123 100.0      -         0       - m",
        "memdec   0.30 2.3000  9.970           -  60.0      - 1,234,567    12.0 m+d"]
    js = [r.to_json() for r in rows]
    assert results_table(js, None)[:4] == [
        "| system | λ | test ppl | vs base | trainable params | train time | tokens/s | inference time vs base |",
        "| --- | --- | --- | --- | --- | --- | --- | --- |",
        "| base | - | 12.18 |  | 0 | - | 100.0 | 1.00× |",
        "| memdec | 0.30 | 9.97 | -18.2% | 1.23 M | 12 s | 60.0 | 1.67× |"]
    (tmp_path / "report.json").write_text(
        json.dumps({"results": js, "tokens": 9, "corpus": "c", "stage_seconds": {"eval": 1.0}})
    )
    assert format_summary(tmp_path).splitlines()[:4] == [
        "9 test tokens of c",
        "system lambda    ppl vs base general vs base tok/s trainable train s",
        "base        - 12.182   +0.0%  30.123   +0.0% 100.0         0       -",
        "memdec   0.30  9.970  -18.2%       -          60.0    1.23 M      12"]
