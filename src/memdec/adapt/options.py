"""``memdec adapt``'s options, each declared once (``option``), in the dataclass of the stage whose
input it is, with its help, check and fingerprint key beside it: ``RunInputs`` (the run's identity),
``CallOptions``, ``DatastoreInputs``, ``TrainInputs``, ``EvalInputs``, ``BaselineInputs``,
``TaskInputs``, ``SampleInputs``, ``RouterInputs``, ``TransferInputs``; ``AdaptConfig`` composed from
them for the command line; ``check_fields`` and ``stage_fields`` read the declarations."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

from ..baselines.lora import LORA_R, LoraOptions
from ..baselines.lora import LR_SCALE as LORA_LR_SCALE
from ..checks import check_non_negative, check_positive, check_positive_int, check_temperature, check_unit_interval
from ..datastore import DatastoreConfig
from ..decoders import parse_shape
from ..errors import MemdecError
from ..models import DEFAULT_MODEL
from ..options import check_options, fingerprint_fields, option_from
from ..options import option as declare
from ..train import TrainConfig
from ..transfer import TransferConfig

# The default is chosen by its worst domain (docs/domains.md): lora:16 (at 30x --lr) came within 0.1-1.1% of the copy
# on prose, code, reference docs and a medical ontology but 8.7% behind it on licence texts, and only the copy beat
# DAPT on every domain, so the default is the copy; compact shapes are options.
DEFAULT_DECODER = "copy"
TRANSFER_BUDGET = 0.25  # --transfer-from: a quarter of the source decoder's training tokens, unless --max-steps
# LORA_R and LORA_LR_SCALE: the LoRA baseline's rank and lr scale, declared (and explained) in memdec.baselines.lora


def full_model_decoder(spec: str) -> bool:
    """Whether ``--decoder spec`` names a shape that is a whole model of its own
    (``DecoderShape.full_model``: the copy), the one shape that starts from ``--init``; False for
    any other spec, one that names no shape included (``check_inputs`` then names what is wrong)."""
    try:
        return parse_shape(spec).full_model
    except MemdecError:
        return False


# --------------------------------------------------------------------------------------------
# The options: each declared once, in the dataclass of the stage whose inputs it is


def _check_tokens(value, what: str) -> int:
    """A token budget: a whole number of at least 2 (one position to score)."""
    if isinstance(value, bool) or not isinstance(value, int) or value < 2:
        raise MemdecError(f"{what} must be at least 2, got {value}")
    return value


def _check_count(value, what: str) -> int:
    """A count that may be 0 (0 skips the work)."""
    if isinstance(value, bool) or not isinstance(value, int) or value < 0:
        raise MemdecError(f"{what} must be 0 or more, got {value}")
    return value


def _check_two_phase(value, what: str) -> float:
    if check_unit_interval(value, what) == 0:
        raise MemdecError(f"{what} 0 is cross-entropy in both phases: give an alpha above 0")
    return value


def option(help: str, default: Any = None, **declared) -> Any:
    """One option of ``memdec adapt`` that no other command offers (``memdec.options.option``): its default
    None is the preset's value, else the ``fallback`` declared beside it; ``before``: the value of every
    run made before it existed (it then joins the stage's fingerprint only when it differs)."""
    return declare(help, default, **declared)


def offered(config_cls, name: str, default: Any = None, **changes) -> Any:
    """The option ``name`` that ``config_cls`` (``TrainConfig``, ``DatastoreConfig``, ...) declares, its help
    and check taken from there (``memdec.options.option_from``); default None: the preset's value."""
    return option_from(config_cls, name, default, **changes)


@dataclass
class RunInputs:
    """What defines a run (``RUN_IDENTITY``): another value makes another run, refused in the same --out
    without --overwrite."""

    model: str = offered(DatastoreConfig, "model", DEFAULT_MODEL)
    corpus: str = offered(DatastoreConfig, "corpus", "austen:train",
                          help="{help}: the training text of the datastore and the decoder")
    text_field: str = offered(DatastoreConfig, "text_field", "text")
    valid: str = offered(TrainConfig, "valid", "austen:valid")
    test: str = option("test corpus: the report's table; never seen in training or in choosing lambda", "austen:test")
    general: str | None = option("general-text corpus on which every system is also scored (forgetting); "
                                 "'none' to skip", "general:test")


@dataclass
class CallOptions:
    """How this call runs: where, from which preset, on which device; no stage's fingerprint holds them."""

    out: str = option("run folder; a rerun resumes and skips finished stages. The run is defined by --model, --corpus, "
                      "--text-field, --valid, --test and --general: a rerun with other values is refused (choose a new "
                      "--out, or --overwrite); other flags (budgets, --preset, --alpha, --baselines, --task-items, "
                      "...) redo only the stages they change", "runs/demo")
    preset: str = option("quick (15 min on a 2-core CPU) or full (whole corpus, for a GPU)", "quick")
    block_size: int | None = option("window length for the datastore, training and evaluation (strides become half "
                                    "of it)")  # sets ds_block_size, train_block_size, eval_block_size and the strides
    device: str = offered(TrainConfig, "device", "auto")
    keep_trainer_state: bool = offered(TrainConfig, "keep_trainer_state", False,
                                       help="each trained decoder: {help}")
    keep_candidates: bool | None = option(
        "keep the weights of every candidate decoder; by default only the chosen one's stay (the others' memdec.json "
        "and log.jsonl stay for the report). A rerun keeps what an earlier --keep-candidates kept: "
        "--no-keep-candidates removes them")
    overwrite: bool = option("replace the run in --out (a memdec adapt run folder) when its --model, --corpus, "
                             "--text-field, --valid, --test or --general differ: its files are deleted first; a run of "
                             "the same inputs resumes", False)


@dataclass
class DatastoreInputs:
    """The datastore stage's own inputs (with RunInputs' model, corpus and text field)."""

    train_tokens: int | None = option("use the first N tokens of the training corpus (preset's by default; 0 = all)",
                                      check=_check_tokens)
    k: int | None = offered(DatastoreConfig, "k", check=check_positive_int)
    knn_temp: float | None = offered(DatastoreConfig, "knn_temp", check=check_temperature)
    ds_block_size: int | None = option("the datastore's window length", check=check_positive_int, key="block_size",
                                       flag="--block-size", cli=False)
    ds_stride: int | None = option("the datastore's window stride", key="stride", cli=False)


@dataclass
class TrainInputs:
    """The train stage's own inputs: every candidate decoder's recipe, its budget and its validation."""

    init: str | None = offered(TrainConfig, "init")
    init_layers: int | None = offered(TrainConfig, "init_layers")
    decoder: str | None = offered(TrainConfig, "decoder", before="copy",  # the decoder of every run before --decoder
                                  help=f"{{help}} (default: {DEFAULT_DECODER}, the shape that held on every domain "
                                       f"measured, docs/domains.md; lora:16 is 4% of its bytes, within 1.1% of it "
                                       f"on four of five domains)")
    alpha: list[float] | None = offered(
        TrainConfig, "alpha", each=True, help="{help}; several values train one decoder each and keep the best on "
        "--valid (preset: 0.25 0, i.e. kNN distillation against cross-entropy only)")
    teacher_base_weight: list[float] | None = offered(
        TrainConfig, "teacher_base_weight", each=True, fallback=[0.0], before=[0.0],
        help="{help}; several values add one candidate decoder each for every alpha > 0 (default: 0, the pure kNN "
             "teacher)")
    two_phase: list[float] | None = option(
        "add a two-phase candidate for each value A: cross-entropy for the first half of the steps, then alpha=A from "
        "that decoder's best checkpoint for the other half (the official recipe's two phases, in the same total steps "
        "as every other candidate); e.g. --two-phase 0.5 (default: none)", check=_check_two_phase, each=True,
        fallback=[], before=[])
    train_budget: float | None = option("seconds of training after which no further candidate decoder is started "
                                        "(default: no limit)", check=check_non_negative, before=None)
    lr: float | None = offered(TrainConfig, "lr", check=check_positive)  # adapt: above 0
    epochs: float | None = offered(TrainConfig, "epochs", check=check_positive)
    max_steps: int | None = offered(TrainConfig, "max_steps")
    batch_size: int | None = offered(TrainConfig, "batch_size", help="{help} (and per optimizer step)")
    train_block_size: int | None = option("training's window length", check=check_positive_int, key="block_size",
                                          flag="--block-size", cli=False)
    valid_tokens: int | None = option("score the first N tokens of the validation corpus", check=_check_tokens)
    eval_every: int | None = offered(TrainConfig, "eval_every", cli=False, help="{help} (and save a checkpoint)")


@dataclass
class EvalInputs:
    """The eval stage's own inputs (with the train stage's, and the baselines' with --baselines)."""

    test_tokens: int | None = option("score the first N tokens of the test corpus", check=_check_tokens)
    general_tokens: int | None = option("score the first N tokens of --general (default: --test-tokens)",
                                        check=_check_tokens)
    eval_block_size: int | None = option("evaluation's window length", check=check_positive_int, key="block_size",
                                         flag="--block-size", cli=False)
    eval_stride: int | None = option("evaluation's window stride", key="stride", cli=False)


@dataclass
class BaselineInputs:
    """--baselines and the LoRA baseline's own options."""

    baselines: bool = option("also train dapt (full fine-tuning), lora and ce-decoder (alpha=0) on the same tokens and "
                             "budget, and report them", False)
    lora_r: int | None = offered(LoraOptions, "lora_r", help=f"--baselines: {{help}} (default {LORA_R})",
                                 fallback=LORA_R)
    lora_lr: float | None = option(  # the scale and why: memdec.baselines.lora.LR_SCALE
        f"--baselines: LoRA's peak learning rate (default {LORA_LR_SCALE:g} x --lr)", check=check_positive)


@dataclass
class TaskInputs:
    """The tasks stage's own input."""

    task_items: int | None = option(
        "items per lm-eval task scored for every system: factual recall (names and numbers of --test also in the "
        "training text) and general ability (--general); preset: quick 0 (CPU: opt in), full 500; 0 skips",
        check=_check_count, key="items")


@dataclass
class SampleInputs:
    """The samples stage's own inputs."""

    samples: int | None = option("test-set prompts continued in the report", check=_check_count)
    sample_tokens: int | None = option("new tokens of each sample", cli=False)


ROUTER_MODES = ("auto", "off")
ROUTER_GENERAL = "general:train"  # the router's general rows: disjoint from --general's default general:test


def _check_router_mode(value, what: str) -> str:
    if value not in ROUTER_MODES:
        raise MemdecError(f"{what} must be one of {', '.join(ROUTER_MODES)}, got {value!r}")
    return value


@dataclass
class RouterInputs:
    """The router stage's own inputs: a token router fitted once the eval stage chose λ."""

    router: str = option("after the eval stage, fit a token router (λ_t per position, docs/router.md) on training "
                         f"text the decoder did not train on and {ROUTER_GENERAL}; auto keeps it (in RUN/memdec, "
                         "where it loads by default) only if it beats the chosen λ on --valid; off: no router", "auto",
                         check=_check_router_mode)
    router_tokens: int | None = option("domain tokens (and as many general ones) the router fits on (preset's by "
                                       "default)", check=_check_tokens)


@dataclass
class TransferInputs:
    """--transfer-from and its options: the train stage transfers a decoder instead of training one."""

    transfer_from: str | None = option("the train stage transfers this memory decoder (a checkpoint for another base "
                                       "model, e.g. another tokenizer) to --model instead of training one from the "
                                       "base (`memdec transfer`)")
    transfer_budget: float | None = option(f"--transfer-from: train for this fraction of the source decoder's training "
                                           f"tokens (default {TRANSFER_BUDGET:g}; --max-steps instead sets the steps)")
    transfer_init: str = offered(TransferConfig, "new_rows", "mapped", help="--transfer-from: {help}")


@dataclass
class AdaptConfig(RouterInputs, TransferInputs, BaselineInputs, SampleInputs, TaskInputs, EvalInputs, TrainInputs,
                  DatastoreInputs, CallOptions, RunInputs):
    """``memdec adapt``'s command line: every stage's options in one flat config, one flag per field
    (those declared ``cli=False`` are the presets' and have no flag)."""


def check_fields(inputs) -> None:
    """Each option of one stage's dataclass through the check declared beside it (None is never checked)."""
    check_options(inputs)


def stage_fields(inputs, omit: bool = True) -> dict:
    """One stage's own inputs, each under its fingerprint key; with ``omit``, those added later left out at
    the value every earlier run had (``before``: ``memdec.options.fingerprint_fields``, the one rule)."""
    return fingerprint_fields(inputs, omit_unchanged=omit)
