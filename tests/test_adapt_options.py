"""``memdec adapt``'s options, declared once in per-stage dataclasses: the command line they make is
the one users had before (every flag, its help and default), and the run's identity, the presets and
the checks all come from those declarations."""

import dataclasses

import pytest

from memdec import adapt
from memdec.cli import build_parser, main
from memdec.datastore import DATASTORE_HELP
from memdec.train import TRAIN_HELP

# `memdec adapt --help`'s flags, captured from the parser before the options were declared per stage
ADAPT_FLAGS = {
    "-h", "--help", "--model", "--corpus", "--valid", "--test", "--out", "--preset", "--train-tokens", "--valid-tokens",
    "--test-tokens", "--k", "--knn-temp", "--init", "--init-layers", "--alpha", "--teacher-base-weight", "--two-phase",
    "--train-budget", "--lr", "--epochs", "--max-steps", "--batch-size", "--block-size", "--samples", "--task-items",
    "--device", "--text-field", "--baselines", "--no-baselines", "--general", "--general-tokens", "--lora-r",
    "--lora-lr", "--transfer-from", "--transfer-budget", "--transfer-init", "--overwrite", "--no-overwrite",
} | {  # issue 26: decoder shapes, and a run that keeps only what a user needs
    "--decoder", "--keep-trainer-state", "--no-keep-trainer-state", "--keep-candidates", "--no-keep-candidates",
    "--router", "--router-tokens",  # issue 27: the router stage
}


def _adapt_parser():
    sub = next(a for a in build_parser()._actions if a.__class__.__name__ == "_SubParsersAction")
    return sub.choices["adapt"]


def test_adapt_flags_are_unchanged():
    flags = {s for a in _adapt_parser()._actions for s in a.option_strings}
    assert flags == ADAPT_FLAGS


def test_every_adapt_flag_has_its_help_from_the_field():
    helps = {a.dest: a.help for a in _adapt_parser()._actions if a.dest != "help"}
    assert not hasattr(adapt, "ADAPT_HELP")
    assert helps["lora_r"] == "--baselines: LoRA rank (default 8)"
    # declared once, on the stage's config; None: the preset's value, so no "(default: ...)" (nor datastore's note)
    assert helps["k"] == DATASTORE_HELP["k"] == "neighbours per position (the position itself excluded)"
    assert helps["lr"] == TRAIN_HELP["lr"] and helps["max_steps"] == TRAIN_HELP["max_steps"]
    assert helps["general"].endswith("'none' to skip (default: general:test)")
    assert all(h and not h.startswith(" (") for h in helps.values()), helps


def test_run_identity_is_the_run_inputs():
    assert list(adapt.RUN_IDENTITY) == [f.name for f in dataclasses.fields(adapt.RunInputs)]
    assert adapt.RUN_IDENTITY["text_field"] == "--text-field"


def test_presets_are_typed_and_resolve_per_stage():
    assert isinstance(adapt.PRESETS["quick"], adapt.Preset) and adapt.PRESETS["full"].task_items == 500
    s = adapt.resolve_settings(adapt.AdaptConfig(lora_r=4))
    assert isinstance(s.train, adapt.TrainInputs) and s.baseline.lora_r == 4 and s.lora_r == 4
    assert s.datastore.k == adapt.PRESETS["quick"].k and s.run.model == adapt.AdaptConfig().model
    flat = s.flat()  # RUN/settings.json: one flat object, as earlier versions wrote it
    assert len(flat) == 40 and flat["ds_block_size"] == 1024 and flat["decoder"] == "copy" and flat["lora_r"] == 4


@pytest.mark.parametrize("argv, message", [
    (["--k", "0"], "--k must be"),
    (["--lora-r", "0"], "--lora-r must be"),
    (["--train-budget", "-1"], "--train-budget"),
    (["--samples", "-1"], "--samples must be 0 or more"),
    (["--task-items", "-2"], "--task-items must be 0 or more"),
    (["--valid-tokens", "1"], "--valid-tokens must be at least 2"),
    (["--alpha", "1.5"], "--alpha"),
    (["--two-phase", "0"], "--two-phase 0"),
    (["--init", "x", "--init-layers", "2"], "--init or --init-layers"),
])
def test_each_option_is_checked_once_before_any_work(tmp_path, capsys, argv, message):
    out = tmp_path / "run"
    assert main(["adapt", "--out", str(out), *argv]) == 2
    err = capsys.readouterr().err
    assert err.startswith("memdec: error: ") and message in err and len(err.strip().splitlines()) == 1
    assert not out.exists()


def test_one_name_for_each_job_across_modules():
    """The check of a command's config is ``check_config`` in adapt, train, evaluate and serve; adapt's call is
    an ``AdaptRun`` (serve keeps ``Job``); eval's unused ``run_eval`` is gone; the default model is one constant."""
    import inspect

    from memdec import evaluate, serve, tasks, train
    from memdec.models import DEFAULT_MODEL

    for module in (adapt, train, evaluate, serve):
        assert callable(module.check_config), module.__name__
    assert not hasattr(adapt, "check_settings") and not hasattr(train, "check_train_config")
    assert not hasattr(evaluate, "check_eval_config") and not hasattr(evaluate, "run_eval")
    assert hasattr(adapt, "AdaptRun") and not hasattr(adapt, "Job")
    assert adapt.AdaptConfig().model == tasks.TasksConfig(kind="facts", out="t").model == DEFAULT_MODEL
    assert inspect.signature(tasks._MemdecLMMixin.__init__).parameters["base"].default == DEFAULT_MODEL


def test_the_decoder_shape_says_whether_it_is_a_full_model():
    """adapt asks the shape (``DecoderShape.full_model``), never compares the spec with a name."""
    assert adapt.full_model_decoder("copy") is True
    assert [adapt.full_model_decoder(spec) for spec in ("fork:2", "lora:16", "lora:8@2")] == [False] * 3
    assert adapt.full_model_decoder("copy:3") is False and adapt.full_model_decoder("nonsense") is False  # no shape
