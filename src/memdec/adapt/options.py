"""``memdec adapt``'s options, each declared once (``option``), in the dataclass of the stage whose
input it is, with its help, check and fingerprint key beside it: ``RunInputs`` (the run's identity),
``CallOptions``, ``DatastoreInputs``, ``TrainInputs``, ``EvalInputs``, ``BaselineInputs``,
``TaskInputs``, ``SampleInputs``, ``RouterInputs``, ``TransferInputs``; ``AdaptConfig`` composed from
them for the command line; ``check_fields`` and ``stage_fields`` read the declarations."""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass, field
from typing import Callable

from ..checks import check_non_negative, check_positive, check_positive_int, check_temperature, check_unit_interval
from ..decoders import parse_shape
from ..errors import MemdecError
from ..models import DEFAULT_MODEL
from ..train import TRAIN_HELP

# The default is chosen by its worst domain (docs/domains.md): lora:16 came within 0.7% of the copy on Austen and
# 0.3% on code but 14% behind it on a biomedical vocabulary, so the default is the copy; compact shapes are options.
DEFAULT_DECODER = "copy"
TRANSFER_BUDGET = 0.25  # --transfer-from: a quarter of the source decoder's training tokens, unless --max-steps
LORA_LR_SCALE = 5.0  # LoRA's few, zero-started parameters want a larger step than full fine-tuning
LORA_R = 8


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


_KEEP = object()  # ``unless``'s default: the field is always part of its stage's fingerprint


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


def option(help: str, default=None, *, check: Callable | None = None, each: bool = False, fallback=None,
           key: str | None = None, unless=_KEEP, flag: str | None = None, cli: bool = True):
    """One option of ``memdec adapt``, declared beside its field.

    ``default``: the flag's default (None: the preset's value, else ``fallback``); ``help``: what
    ``memdec adapt --help`` shows; ``check(value, flag)``: the one check of its resolved value (of
    each element with ``each``; None is never checked); ``key``: its name in the stage's fingerprint
    (default: the field's), where it is left out at the value ``unless`` (so that runs made before
    it existed keep their fingerprint); ``cli=False``: a preset's value that no flag sets directly.
    """
    meta = {"help": help, "check": check, "each": each, "fallback": fallback, "key": key, "unless": unless, "cli": cli}
    if flag:
        meta["flag"] = flag
    return field(default=default, metadata=meta)


@dataclass
class RunInputs:
    """What defines a run (``RUN_IDENTITY``): another value makes another run, refused in the same --out
    without --overwrite."""

    model: str = option("base model spec: alias (smollm2-135m), local HF folder, .gguf file, or hub id", DEFAULT_MODEL)
    corpus: str = option("training corpus spec (the datastore and the decoder's training text)", "austen:train")
    text_field: str = option("JSONL / dataset field that holds the text", "text")
    valid: str = option("validation corpus: chooses lambda and the checkpoint", "austen:valid")
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
    device: str = option("auto, cpu or cuda", "auto")
    keep_trainer_state: bool = option("keep each trained decoder's trainer_state/ (optimizer state) once it finishes, "
                                      "to extend it later; an interrupted run always keeps it", False)
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
    k: int | None = option("neighbours per kNN target", check=check_positive_int)
    knn_temp: float | None = option("temperature of the kNN target distribution", check=check_temperature)
    ds_block_size: int | None = option("the datastore's window length", check=check_positive_int, key="block_size",
                                       flag="--block-size", cli=False)
    ds_stride: int | None = option("the datastore's window stride", key="stride", cli=False)


@dataclass
class TrainInputs:
    """The train stage's own inputs: every candidate decoder's recipe, its budget and its validation."""

    init: str | None = option("initialise the memory decoder from this model spec (same tokenizer)")
    init_layers: int | None = option("initialise the memory decoder from the base's first N blocks (default: a full "
                                     "copy)", check=check_positive_int)
    decoder: str | None = option(f"{TRAIN_HELP['decoder']} (default: {DEFAULT_DECODER}, the shape that held on every "
                                 f"domain measured, docs/domains.md; lora:16 is 4% of its bytes where it holds)",
                                 unless="copy")  # the decoder of every run made before --decoder
    alpha: list[float] | None = option(
        "weight of the kNN KL term in the training loss; several values train one decoder each and keep the best on "
        "--valid (preset: 0.25 0, i.e. kNN distillation against cross-entropy only)", check=check_unit_interval,
        each=True)
    teacher_base_weight: list[float] | None = option(
        "mix the base model's distribution into the kNN teacher with this weight; several values add one candidate "
        "decoder each for every alpha > 0 (default: 0, the pure kNN teacher)", check=check_unit_interval, each=True,
        fallback=[0.0], unless=[0.0])
    two_phase: list[float] | None = option(
        "add a two-phase candidate for each value A: cross-entropy for the first half of the steps, then alpha=A from "
        "that decoder's best checkpoint for the other half (the official recipe's two phases, in the same total steps "
        "as every other candidate); e.g. --two-phase 0.5 (default: none)", check=_check_two_phase, each=True,
        fallback=[], unless=[])
    train_budget: float | None = option("seconds of training after which no further candidate decoder is started "
                                        "(default: no limit)", check=check_non_negative, unless=None)
    lr: float | None = option("peak learning rate", check=check_positive)
    epochs: float | None = option("passes over the training windows", check=check_positive)
    max_steps: int | None = option("optimizer steps (overrides --epochs)", check=check_positive_int)
    batch_size: int | None = option("windows per optimizer step", check=check_positive_int)
    train_block_size: int | None = option("training's window length", check=check_positive_int, key="block_size",
                                          flag="--block-size", cli=False)
    valid_tokens: int | None = option("score the first N tokens of the validation corpus", check=_check_tokens)
    eval_every: int | None = option("optimizer steps between validations (and checkpoints)", cli=False)


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
    lora_r: int | None = option(f"--baselines: LoRA rank (default {LORA_R})", check=check_positive_int, fallback=LORA_R)
    lora_lr: float | None = option(f"--baselines: LoRA's peak learning rate (default {LORA_LR_SCALE:g} x --lr)",
                                   check=check_positive)


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
    transfer_init: str = option("--transfer-from: the new embedding and LM-head rows, 'mapped' (from the source's rows "
                                "of each token's pieces) or 'random' (the ablation)", "mapped")


@dataclass
class AdaptConfig(RouterInputs, TransferInputs, BaselineInputs, SampleInputs, TaskInputs, EvalInputs, TrainInputs,
                  DatastoreInputs, CallOptions, RunInputs):
    """``memdec adapt``'s command line: every stage's options in one flat config, one flag per field
    (those declared ``cli=False`` are the presets' and have no flag)."""


def _flag(f: dataclasses.Field) -> str:
    """The command-line flag of the option ``f`` (``--block-size`` for each stage's window length)."""
    return f.metadata.get("flag") or "--" + f.name.replace("_", "-")


def check_fields(inputs) -> None:
    """Each option of one stage's dataclass through the check declared beside it (None is never checked)."""
    for f in dataclasses.fields(inputs):
        value, check = getattr(inputs, f.name), f.metadata.get("check")
        if check is None or value is None:
            continue
        for v in (value if f.metadata["each"] else [value]):
            check(v, _flag(f))


def stage_fields(inputs, omit: bool = True) -> dict:
    """One stage's own inputs, each under its fingerprint key; with ``omit``, those at their ``unless``
    value left out (so that runs made before the option existed keep their fingerprint)."""
    out = {}
    for f in dataclasses.fields(inputs):
        value = getattr(inputs, f.name)
        if omit and f.metadata["unless"] is not _KEEP and value == f.metadata["unless"]:
            continue
        out[f.metadata["key"] or f.name] = value
    return out
