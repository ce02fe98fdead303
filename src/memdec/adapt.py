"""The main job: one command from a corpus to an adapted model, with a report.

    memdec adapt --model M --corpus TRAIN --valid V --test T --out RUN [--preset quick|full]

Stages, each cached in ``RUN/`` and resumable:

1. ``datastore``: keys, index and kNN targets of the training corpus (``RUN/datastore``);
2. ``train``: the memory decoder, λ chosen on the validation split (``RUN/memdec``);
   with ``--baselines``, then ``ce-decoder``, ``dapt`` and ``lora``: the baselines of
   ``memdec.baselines``, each trained on the same tokens with the same budget
   (``RUN/baselines/METHOD``);
3. ``eval``: base, base + kNN-LM and base + memory decoder (and the baselines) on the test split,
   λ of each chosen on the validation split, every row also scored on a general-text corpus
   (``--general``, default ``general:test``) to show forgetting (``RUN/eval.json``, ``RUN/lambda.png``);
   then ``tasks`` (``--task-items`` > 0): a factual-recall task from the test text and a general-ability task
   from ``--general`` (``memdec.tasks``, ``RUN/tasks/``), every system of the eval stage scored on them through
   lm-evaluation-harness at its chosen λ: accuracy, items and a 95% Wilson interval (``RUN/tasks.json``);
   then ``router`` (``--router auto``, the default): a token router (``memdec.routing``) fitted on
   training text the decoder did not train on (after the datastore's tokens) and ``general:train``,
   compared with the chosen λ on --valid and kept (copied into ``RUN/memdec``, where it loads by
   default) only if it wins there; then the eval table gains its ``memdec+router`` row on the test
   and general text, and ``RUN/router/lambda_t.json`` holds λ_t along a test passage (the report's plot);
4. ``samples``: continuations of a few test-set prompts, base beside joint (``RUN/samples.json``);

then ``RUN/report.md`` and ``RUN/report.json``. ``RUN/stages.json`` records each stage's settings;
a rerun skips stages whose settings are unchanged and redoes, saying why, those that changed. A rerun
with another --model, --corpus, --text-field, --valid, --test or --general (``RUN_IDENTITY``) is
another run: refused before anything loads, unless --overwrite replaces the run.
"""

from __future__ import annotations

import copy
import dataclasses
import hashlib
import importlib.util
import json
import math
import os
import shutil
import time
import typing
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Callable

import numpy as np
import torch

from .baselines import BaselineConfig, Method, get_method, method_names, method_of_row, methods, train_baseline
from .checkpoint import (MEMDEC_JSON, ROUTER_JSON, ROUTER_WEIGHTS, read_baseline_json, read_memdec_json,
                         write_baseline_json, write_memdec_json)
from .checks import (BOOL, NON_NEGATIVE, OBJECT, OWN_MARKER, TEXT, UNIT, Kind, check_device, check_fields as check_record,
                     check_non_negative, check_own_folder, check_positive, check_positive_int, check_temperature,
                     check_unit_interval, mark_own_folder)
from .data import corpus_text_hash, load_token_stream
from .datastore import DatastoreConfig, build_datastore
from .errors import CorpusError, MemdecError
from .evaluate import ROUTER_ROW, EvalConfig, read_eval_json, run_eval_report
from .files import atomic_write, atomic_write_json, read_json_object
from .joint import MemoryDecoderModel
from .models import DEFAULT_MODEL, load_model, load_tokenizer, resolve_device, resolve_model_spec
from .report import (ROUTER_LAMBDA_JSON, ROUTER_PLOT_TOKENS, FACTS_CONTEXT_TOKENS, FACTS_TASK, GENERAL_CONTEXT_WORDS, GENERAL_TASK, PHASE_ONE, SAMPLING,
                     TASK_CHOICES, TASK_SEED, candidate_label, candidate_name, read_router_lambdas, read_samples,
                     read_tasks_json, two_phase_name, write_report)
from .routing import RouterConfig, train_router
from .store import describe, read_manifest
from .tables import accuracy_entry
from .tasks import memdec_lm_class, write_facts_task, write_general_task
from .train import TRAIN_HELP, TrainConfig, check_decoder_shape, planned_steps, train
from .transfer import INITS, TransferConfig, check_source, source_fingerprint, transfer

HELDOUT_TOKENS_PER_ITEM = 200  # the facts task reads this many test tokens per item wanted (at least --test-tokens)
# The default is chosen by its worst domain (docs/domains.md): lora:16 came within 0.7% of the copy on Austen and
# 0.3% on code but 14% behind it on a biomedical vocabulary, so the default is the copy; compact shapes are options.
DEFAULT_DECODER = "copy"
TRANSFER_BUDGET = 0.25  # --transfer-from: a quarter of the source decoder's training tokens, unless --max-steps
LORA_LR_SCALE = 5.0  # LoRA's few, zero-started parameters want a larger step than full fine-tuning
LORA_R = 8


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
    general: str | None = option("general-text corpus on which every system is also scored (forgetting); 'none' to skip",
                                 "general:test")


@dataclass
class CallOptions:
    """How this call runs: where, from which preset, on which device; no stage's fingerprint holds them."""

    out: str = option("run folder; a rerun resumes and skips finished stages. The run is defined by --model, --corpus, "
                      "--text-field, --valid, --test and --general: a rerun with other values is refused (choose a new "
                      "--out, or --overwrite); other flags (budgets, --preset, --alpha, --baselines, --task-items, ...) "
                      "redo only the stages they change", "runs/demo")
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
                                 unless="copy")
    alpha: list[float] | None = option(
        "weight of the kNN KL term in the training loss; several values train one decoder each and keep the best on "
        "--valid (preset: 0.25 0, i.e. kNN distillation against cross-entropy only)", check=check_unit_interval, each=True)
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

    router: str = option("after the eval stage, fit a token router (λ_t per position, docs/router.md) on training text "
                         f"the decoder did not train on and {ROUTER_GENERAL}; auto keeps it (in RUN/memdec, where it "
                         "loads by default) only if it beats the chosen λ on --valid; off: no router", "auto",
                         check=_check_router_mode)
    router_tokens: int | None = option("domain tokens (and as many general ones) the router fits on (preset's by "
                                       "default)", check=_check_tokens)


@dataclass
class TransferInputs:
    """--transfer-from and its options: the train stage transfers a decoder instead of training one."""

    transfer_from: str | None = option("the train stage transfers this memory decoder (a checkpoint for another base "
                                       "model, e.g. another tokenizer) to --model instead of training one from the base "
                                       "(`memdec transfer`)")
    transfer_budget: float | None = option(f"--transfer-from: train for this fraction of the source decoder's training "
                                           f"tokens (default {TRANSFER_BUDGET:g}; --max-steps instead sets the steps)")
    transfer_init: str = option("--transfer-from: the new embedding and LM-head rows, 'mapped' (from the source's rows "
                                "of each token's pieces) or 'random' (the ablation)", "mapped")


@dataclass
class AdaptConfig(RouterInputs, TransferInputs, BaselineInputs, SampleInputs, TaskInputs, EvalInputs, TrainInputs, DatastoreInputs,
                  CallOptions, RunInputs):
    """``memdec adapt``'s command line: every stage's options in one flat config, one flag per field
    (those declared ``cli=False`` are the presets' and have no flag)."""


@dataclass
class Preset:
    """A preset: the value of every stage option that the user leaves out, and of those no flag sets."""

    train_tokens: int | None
    valid_tokens: int
    test_tokens: int
    k: int
    knn_temp: float
    ds_block_size: int
    ds_stride: int
    init_layers: int | None
    alpha: list[float]
    lr: float
    epochs: float
    batch_size: int
    train_block_size: int
    eval_every: int
    eval_block_size: int
    eval_stride: int
    samples: int
    sample_tokens: int
    task_items: int
    router_tokens: int = 32_768


PRESETS: dict[str, Preset] = {
    # Fits 15 minutes of wall time on a 2-core CPU with the default model, set-up included.
    "quick": Preset(train_tokens=24_000, valid_tokens=2_048, test_tokens=4_096, k=1024, knn_temp=1.0, ds_block_size=1024,
                    ds_stride=768, init_layers=None, alpha=[0.25, 0.0], lr=2e-4, epochs=1.0, batch_size=4,
                    train_block_size=512, eval_every=3, eval_block_size=1024, eval_stride=512, samples=3, sample_tokens=40,
                    task_items=0,  # lm-eval tasks: opt in with --task-items on a CPU
                    router_tokens=4_096),  # the router stage: about a minute of the quick run's 15 (docs/router.md)
    # The whole training split; meant for a GPU.
    "full": Preset(train_tokens=None, valid_tokens=32_768, test_tokens=32_768, k=1024, knn_temp=1.0, ds_block_size=1024,
                   ds_stride=512, init_layers=None, alpha=[0.25, 0.0], lr=1e-4, epochs=2.0, batch_size=8,
                   train_block_size=1024, eval_every=50, eval_block_size=1024, eval_stride=512, samples=5, sample_tokens=60,
                   task_items=500),
}


@dataclass
class Settings:
    """The resolved settings of a run, per stage: the preset's values with the user's overrides on top.
    ``s.lora_r`` reads any stage's option by its (unique) name: ``s.baseline.lora_r``."""

    run: RunInputs
    datastore: DatastoreInputs
    train: TrainInputs
    eval: EvalInputs
    baseline: BaselineInputs
    tasks: TaskInputs
    sample: SampleInputs
    transfer: TransferInputs
    token_router: RouterInputs

    def __getattr__(self, name: str):
        if not name.startswith("_"):
            for stage in STAGES:
                if stage in self.__dict__ and name in OPTION_STAGE.get(stage, ()):
                    return getattr(self.__dict__[stage], name)
        raise AttributeError(f"{type(self).__name__} has no setting {name!r}")

    def flat(self) -> dict:
        """Every setting under its own name: ``RUN/settings.json`` and the report's ``settings``."""
        return {k: v for stage in STAGES for k, v in asdict(getattr(self, stage)).items()}


STAGES: dict[str, type] = {f.name: typing.get_type_hints(Settings)[f.name] for f in dataclasses.fields(Settings)}
OPTION_STAGE: dict[str, set[str]] = {stage: {f.name for f in dataclasses.fields(cls)} for stage, cls in STAGES.items()}
assert sum(map(len, OPTION_STAGE.values())) == len(set().union(*OPTION_STAGE.values())), "an option named twice"
assert not set(STAGES) & set().union(*OPTION_STAGE.values()), "a stage named like an option"

# the inputs that define what a run is: another value makes another run, refused in the same --out
# without --overwrite. Every other setting (token budgets, the preset, training and task options)
# only redoes the stages it changes, and keeps the rest.
RUN_IDENTITY = {f.name: "--" + f.name.replace("_", "-") for f in dataclasses.fields(RunInputs)}
# what memdec adapt writes in a run folder: all that --overwrite deletes
RUN_ENTRIES = ("stages.json", "settings.json", "datastore", "memdec", "candidates", "baselines", "eval.json",
               "lambda.png", "tasks", "tasks.json", "samples.json", "report.json", "report.md", "training.png", "router",
               "router_lambda.png")


def _flag(f: dataclasses.Field) -> str:
    return f.metadata.get("flag") or "--" + f.name.replace("_", "-")


def resolve_settings(cfg: AdaptConfig) -> Settings:
    """Each stage's settings: the user's value, else the preset's, else the option's ``fallback``."""
    if cfg.preset not in PRESETS:
        raise MemdecError(f"unknown --preset '{cfg.preset}' (choose from: {', '.join(PRESETS)})")
    preset = asdict(PRESETS[cfg.preset])  # a deep copy: no run shares the preset's lists
    values = {}
    for cls in STAGES.values():
        for f in dataclasses.fields(cls):
            given = getattr(cfg, f.name, None)
            values[f.name] = given if given is not None else preset.get(f.name)
            if values[f.name] is None and f.metadata["fallback"] is not None:
                values[f.name] = copy.copy(f.metadata["fallback"])
    if cfg.block_size is not None:
        b = cfg.block_size
        values.update(ds_block_size=b, ds_stride=max(b // 2, 1), eval_block_size=b, eval_stride=max(b // 2, 1),
                      train_block_size=min(values["train_block_size"], b))
    if values["train_tokens"] == 0:
        values["train_tokens"] = None
    if str(values["general"]).lower() in ("", "none"):
        values["general"] = None
    values["baselines"] = bool(values["baselines"])
    if values["general_tokens"] is None:
        values["general_tokens"] = values["test_tokens"]
    if values["decoder"] is None:
        values["decoder"] = DEFAULT_DECODER
    if values["lora_lr"] is None:
        values["lora_lr"] = LORA_LR_SCALE * values["lr"]
    if values["transfer_from"] is not None and values["transfer_budget"] is None and values["max_steps"] is None:
        values["transfer_budget"] = TRANSFER_BUDGET
    for split in ("valid", "test"):
        if values[split] == values["corpus"]:
            raise MemdecError(f"--{split} is the training corpus; held-out text must not be trained on")
    return Settings(**{stage: cls(**{f.name: values[f.name] for f in dataclasses.fields(cls)})
                       for stage, cls in STAGES.items()})


def check_fields(inputs) -> None:
    """Each option of one stage's dataclass through the check declared beside it (None is never checked)."""
    for f in dataclasses.fields(inputs):
        value, check = getattr(inputs, f.name), f.metadata.get("check")
        if check is None or value is None:
            continue
        for v in (value if f.metadata["each"] else [value]):
            check(v, _flag(f))


def check_config(s: Settings) -> None:
    """Every resolved setting checked, one clear line each: before any model loads or file is written.
    Each option's own check is declared beside its field; here are those that relate two options."""
    for stage in STAGES:
        check_fields(getattr(s, stage))
    if s.init is not None and s.init_layers is not None:
        raise MemdecError("give --init or --init-layers, not both")
    if not s.alpha:
        raise MemdecError("--alpha needs at least one value in [0, 1]")
    if s.two_phase and s.decoder != "copy":
        raise MemdecError(f"--two-phase starts its second phase from the first one's checkpoint (--init), which "
                          f"--decoder copy alone takes: drop --two-phase or use --decoder copy, not {s.decoder}")
    if s.two_phase and s.max_steps is not None and s.max_steps < 2:
        raise MemdecError(f"--two-phase splits the steps in two: --max-steps must be at least 2, got {s.max_steps}")
    _check_transfer_options(s)


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


def _check_transfer_options(s: Settings) -> None:
    """--transfer-from and its options: one clear line each, before anything loads."""
    if s.transfer_from is None:
        if s.transfer_budget is not None or s.transfer_init != "mapped":
            raise MemdecError("--transfer-budget and --transfer-init need --transfer-from")
        return
    if s.transfer_init not in INITS:
        raise MemdecError(f"unknown --transfer-init '{s.transfer_init}' (mapped or random)")
    if s.two_phase:
        raise MemdecError("--two-phase trains a decoder from the base; --transfer-from starts from the source "
                          "decoder instead: give one or the other")
    if s.init is not None or s.init_layers is not None:
        raise MemdecError("--init and --init-layers choose a decoder trained from the base; --transfer-from "
                          "starts from the source decoder instead: give one or the other")
    if s.transfer_budget is not None and s.max_steps is not None:
        raise MemdecError("--transfer-budget and --max-steps both set the transfer's length: give one")
    if s.transfer_budget is not None and not (math.isfinite(s.transfer_budget) and 0 < s.transfer_budget <= 100):
        raise MemdecError(f"--transfer-budget must be a positive fraction of the source's training, got {s.transfer_budget}")


CORPUS_FLAGS = {"corpus": "--corpus", "valid": "--valid", "test": "--test", "general": "--general"}
CORPUS_HASHES = "corpus_hashes"  # in RUN/settings.json: {corpus, valid, test, general: the text's hash or None}


def check_inputs(s: Settings, run: Path) -> dict[str, str | None]:
    """The model spec resolves, every corpus reads, and ``run`` is new, empty or an adapt run:
    all before anything is loaded or written. Returns each corpus's text hash (``corpus_text_hash``,
    taken by the one pass that checks it; None for a built-in corpus and for no --general)."""
    check_own_folder(run, "adapt-run", legacy=is_stage_record)
    resolve_model_spec(s.model)
    check_decoder_shape(s.decoder, s.model, s.init, s.init_layers)
    if s.init is not None:
        resolve_model_spec(s.init)
    if s.transfer_from is not None:
        try:
            check_source(s.transfer_from)
        except MemdecError as exc:
            raise MemdecError(f"--transfer-from: {exc}") from None
    hashes = {}
    for key, flag in CORPUS_FLAGS.items():
        try:
            hashes[key] = None if getattr(s, key) is None else corpus_text_hash(getattr(s, key), s.text_field)
        except CorpusError as exc:
            raise CorpusError(f"{flag}: {exc}") from None
    return hashes


ADAPT_STAGES = ("datastore", "train", *method_names(), "eval", "router", "tasks", "samples")
STAGE_STATUSES = ("running", "done", "stale")
FINGERPRINT = Kind("a stage fingerprint", lambda v: isinstance(v, str) and len(v) == 12 and
                   all(c in "0123456789abcdef" for c in v))


def is_stage_record(run: Path) -> bool:
    """Whether ``run`` is an adapt run made before folder markers (no ``OWN_MARKER``): its ``stages.json``
    is a stage record of memdec adapt: a JSON object of at least one of its stages (and no other key),
    each with a status and a fingerprint it writes. A file of that name alone says nothing."""
    try:
        stages = json.loads((run / "stages.json").read_text())
    except (OSError, UnicodeDecodeError, ValueError):
        return False
    return (isinstance(stages, dict) and bool(stages) and set(stages) <= set(ADAPT_STAGES)
            and all(isinstance(e, dict) and e.get("status") in STAGE_STATUSES and FINGERPRINT.test(e.get("fingerprint"))
                    for e in stages.values()))


def identity_changes(s: Settings, run: Path, hashes: dict[str, str | None] | None = None) -> list[str]:
    """``--flag OLD -> NEW`` for each input of RUN_IDENTITY in which ``s`` differs from the run recorded in
    ``run/settings.json`` (none if there is no record), and ``--flag SPEC: its text changed`` for each
    corpus of the same spec whose text hash (``hashes``, from ``check_inputs``) differs from the one
    recorded. A ``--general`` added to a run that had none only adds work, and is no change."""
    record = run / "settings.json"
    if not (run / "stages.json").is_file() or not record.is_file():
        return []
    old = read_json_object(record, "run settings")
    changes = []
    for key, flag in RUN_IDENTITY.items():
        if key in old and old[key] is not None and old[key] != getattr(s, key):
            changes.append(f"{flag} {old[key]} -> {getattr(s, key) or 'none'}")
    recorded = old.get(CORPUS_HASHES) if isinstance(old.get(CORPUS_HASHES), dict) else {}
    for key, flag in CORPUS_FLAGS.items():
        before, now = recorded.get(key), (hashes or {}).get(key)
        if old.get(key) == getattr(s, key) and before is not None and now is not None and before != now:
            changes.append(f"{flag} {getattr(s, key)}: its text changed since the run was made "
                           f"(hash {before} -> {now})")
    return changes


def check_run_identity(s: Settings, run: Path, overwrite: bool, hashes: dict[str, str | None] | None = None) -> bool:
    """Whether ``run`` holds another run (other RUN_IDENTITY inputs, or a corpus whose text changed) that
    ``overwrite`` lets this call replace; raises MemdecError, naming each differing input, when it holds
    one and ``overwrite`` is off."""
    changes = identity_changes(s, run, hashes)
    if changes and not overwrite:
        raise MemdecError(f"--out {run} holds another run ({'; '.join(changes)}): rerunning would replace its "
                          f"datastore, decoders and report; choose a new --out, or give --overwrite to replace it")
    return bool(changes)


def clear_run(run: Path) -> None:
    """Delete what memdec adapt wrote in ``run`` (RUN_ENTRIES and their temporary files); anything else in
    the folder stays. The stage record is emptied first, so an interruption never leaves a stage recorded
    as done without its files; the folder's marker (``OWN_MARKER``) stays."""
    _say(f"--overwrite: replacing the run in {run}")
    atomic_write_json(run / "stages.json", {})
    for name in RUN_ENTRIES:
        if name == "stages.json":
            continue
        for p in (run / name, run / f".{name}.tmp"):
            if p.is_symlink() or p.is_file():
                p.unlink()
            elif p.is_dir():
                shutil.rmtree(p)


def teacher_candidates(alphas: list[float], betas: list[float]) -> list[tuple[float, float]]:
    """(α, β) of every candidate decoder, in the given order: β only matters where α > 0."""
    out: list[tuple[float, float]] = []
    for a in alphas:
        for b in (betas if a > 0 else [0.0]):
            if (a, b) not in out:
                out.append((a, b))
    return out


def _fingerprint(payload: dict) -> str:
    return hashlib.sha256(json.dumps(payload, sort_keys=True, default=str).encode()).hexdigest()[:12]


def stage_inputs(s: Settings) -> dict[str, dict]:
    """The settings each stage depends on, its upstream stages' included."""
    datastore = dict(model=s.model, corpus=s.corpus, text_field=s.text_field, **stage_fields(s.datastore))
    train = dict(datastore=datastore, valid=s.valid, **stage_fields(s.train))
    if s.transfer_from is not None:  # only when used, so that earlier runs keep their fingerprint
        train["transfer"] = dict(source=source_fingerprint(s.transfer_from), budget=s.transfer_budget, init=s.transfer_init)
    # the baselines: the memory decoder's budget (tokens, steps, batch, windows, schedule, validation), alpha=0
    budget = {k: v for k, v in train.items()
              if k not in ("init", "init_layers", "alpha", "teacher_base_weight", "train_budget", "transfer", "two_phase",
                           "decoder")}
    baselines = {m.name: dict(budget, **m.adapt_inputs(s)) for m in methods()}
    evaluation = dict(train=train, test=s.test, valid_tokens=s.valid_tokens, recurring="datastore", **stage_fields(s.eval))
    if s.general:
        evaluation["general"] = s.general
    else:
        del evaluation["general_tokens"]
    if s.baselines:
        evaluation["baselines"] = baselines
    samples = dict(eval=evaluation, test=s.test, sampling=SAMPLING, **stage_fields(s.sample))
    tasks = dict(eval=evaluation, test=s.test, heldout_tokens=task_heldout_tokens(s), general=s.general,
                 seed=TASK_SEED, context_tokens=FACTS_CONTEXT_TOKENS, context_words=GENERAL_CONTEXT_WORDS,
                 n_choices=TASK_CHOICES, **stage_fields(s.tasks))  # text_field: in eval
    router = dict(eval=evaluation, corpus=s.corpus, general=ROUTER_GENERAL, valid=s.valid, valid_tokens=s.valid_tokens,
                  plot_tokens=ROUTER_PLOT_TOKENS, **stage_fields(s.token_router))
    return {"datastore": datastore, "train": train, **baselines, "eval": evaluation, "router": router,
            "samples": samples, "tasks": tasks}


_ENTRY_FIELDS: dict[str, Kind] = {"status": Kind(f"one of {', '.join(STAGE_STATUSES)}", lambda v: v in STAGE_STATUSES),
                                  "fingerprint": FINGERPRINT, "inputs": OBJECT}
_DONE_FIELDS: dict[str, Kind] = {"seconds": NON_NEGATIVE, "summary": OBJECT}
_TEXTS = Kind("a list of strings", lambda v: isinstance(v, list) and all(isinstance(x, str) for x in v))
_SCORES = Kind("a JSON object of numbers", lambda v: isinstance(v, dict) and all(
    isinstance(x, (int, float)) and not isinstance(x, bool) and not math.isnan(x) for x in v.values()))
_SECONDS = Kind("a JSON object of numbers or nulls", lambda v: isinstance(v, dict) and all(
    x is None or NON_NEGATIVE.test(x) for x in v.values()))
SUMMARY_FIELDS: dict[str, dict[str, Kind]] = {  # what later stages and the report read of a stage's summary
    "datastore": {"describe": TEXT},
    "train": {"chosen": TEXT, "chosen_alpha": UNIT, "valid_joint_ppl": _SCORES, "train_seconds": _SECONDS,
              "skipped": _TEXTS, "keep_candidates": BOOL, "weights_removed": _TEXTS},
    **{name: {"reused_from": TEXT} for name in method_names()},
    "router": {"kept": BOOL, "why": TEXT},
    "tasks": {"systems": _TEXTS},
}


def stage_entry_problem(name: str, entry) -> str | None:
    """Why the record ``entry`` of the stage ``name`` in ``stages.json`` cannot be used (a field missing or
    of another type, where this module or the report reads it); None if it can."""
    where = f"stage {name}"
    if not isinstance(entry, dict):
        return f"{where}: must be a JSON object, got {json.dumps(entry)[:40]}"
    try:
        check_record(entry, where, _ENTRY_FIELDS)
        if entry["status"] == "done":
            check_record(entry, where, _DONE_FIELDS)
            check_record(entry["summary"], f"{where}: summary", SUMMARY_FIELDS.get(name, {}), optional=True)
    except MemdecError as exc:
        return str(exc)
    return None


class StageBook:
    """``RUN/stages.json``: which stages are done, with which settings, in how long; it owns the
    caching. ``begin`` says whether a stage is cached (same settings, done) or what changed;
    ``run`` does a stage's work between a ``running`` and a ``done`` record."""

    def __init__(self, run: Path, plan: list[str] | None = None):
        self.path = run / "stages.json"
        self.plan = plan or []
        self.stages: dict = read_json_object(self.path, "stage record") if self.path.is_file() else {}
        self.unusable = {name: why for name, entry in self.stages.items() if (why := stage_entry_problem(name, entry))}
        if self.unusable:  # redone as a stage whose settings changed, with every stage after it
            names = ", ".join(self.unusable)
            _say(f"warning: {self.path}: the record of {names} is unusable ({next(iter(self.unusable.values()))}); "
                 f"redoing {'it' if len(self.unusable) == 1 else 'them'} and the stages after")
            self.stages = {k: v for k, v in self.stages.items() if k not in self.unusable}
            for name in self.unusable:
                self.redo_after(name)

    def save(self) -> None:
        atomic_write_json(self.path, self.stages)

    def is_done(self, name: str, inputs: dict) -> bool:
        entry = self.stages.get(name)
        return bool(entry and entry.get("status") == "done" and entry.get("fingerprint") == _fingerprint(inputs))

    def changed(self, name: str, inputs: dict) -> list[str]:
        """Which top-level settings differ from the recorded run of this stage (empty if none was; ``its
        record`` where it was unusable)."""
        if name in self.unusable:
            return ["its record"]
        entry = self.stages.get(name)
        if not entry or entry.get("fingerprint") == _fingerprint(inputs):
            return []
        old = entry.get("inputs", {})
        return [k for k in sorted(set(old) | set(inputs)) if old.get(k) != inputs.get(k)] or ["settings"]

    def redo_after(self, name: str) -> None:
        """Mark every stage after ``name`` (in ``ADAPT_STAGES``' order) as to be redone: they read what it made."""
        later = ADAPT_STAGES[ADAPT_STAGES.index(name) + 1:] if name in ADAPT_STAGES else ()
        for stage in later:
            self.invalidate(stage)

    def invalidate(self, name: str) -> None:
        """Mark a done stage as to be redone (what it produced no longer matches), keeping its record."""
        if name in self.stages:
            self.stages[name]["status"] = "stale"

    def recorded_inputs(self, name: str) -> dict:
        return self.stages.get(name, {}).get("inputs", {})

    def summary(self, name: str) -> dict:
        return self.stages.get(name, {}).get("summary", {})

    def begin(self, name: str, inputs: dict, what: str) -> tuple[bool, list[str]]:
        """Announce a stage; returns (cached, the settings that changed since its last run)."""
        done, changed = self.is_done(name, inputs), self.changed(name, inputs)
        position = f"[{self.plan.index(name) + 1}/{len(self.plan)}] " if name in self.plan else ""
        head = f"{position}{name}: {what}"
        if done:
            _say(f"{head} — cached ({self.stages[name]['seconds']:.0f} s when built)")
        elif name in self.unusable:
            _say(f"{head} — its record was unusable; redoing this stage")
        elif changed:
            _say(f"{head} — settings changed ({', '.join(changed)}); redoing this stage")
        else:
            _say(head)
        return done, changed

    def run(self, name: str, inputs: dict, work: Callable[[], dict | None]) -> None:
        """Record ``name`` as running, call ``work()`` (which returns the stage's summary), record it done."""
        self.start(name, inputs)
        t0 = time.perf_counter()
        summary = work()
        self.finish(name, time.perf_counter() - t0, summary)

    def start(self, name: str, inputs: dict) -> None:
        self.stages[name] = {"status": "running", "fingerprint": _fingerprint(inputs), "inputs": inputs}
        self.save()

    def finish(self, name: str, seconds: float, summary: dict | None = None) -> None:
        self.stages[name].update(status="done", seconds=round(seconds, 1), summary=summary or {})
        self.save()

    def note(self, name: str, **fields) -> None:
        """Add ``fields`` to the summary of the done stage ``name`` (what a later step of this call decided)."""
        self.stages[name]["summary"].update(fields)
        self.save()


def _say(msg: str) -> None:
    print(msg, flush=True)


@dataclass
class AdaptRun:
    """One ``memdec adapt`` call: the run folder, its settings, the stages' inputs and their record."""

    run: Path
    s: Settings
    device: str
    book: StageBook
    inputs: dict
    keep_trainer_state: bool = False
    keep_candidates: bool = False

    @property
    def datastore(self) -> Path:
        return self.run / "datastore"

    @property
    def ckpt(self) -> Path:
        return self.run / "memdec"


def adapt(cfg: AdaptConfig) -> Path:
    """Run (or resume) every stage; returns the run folder, which holds report.md and report.json."""
    s = resolve_settings(cfg)
    run = Path(cfg.out).expanduser()
    check_config(s)
    check_device(cfg.device)
    hashes = check_inputs(s, run)
    replace = check_run_identity(s, run, cfg.overwrite, hashes)
    mark_own_folder(run, "adapt-run")  # first: the marker says the folder is memdec's (a run of an earlier release too)
    if replace:
        clear_run(run)
    with_tasks = bool(s.task_items) and lm_eval_available()
    plan = ["datastore", "train", *(method_names() if s.baselines else ()), "eval",
            *(["router"] if s.router == "auto" else []), *(["tasks"] if with_tasks else []), "samples"]
    book = StageBook(run, plan)
    book.save()
    atomic_write_json(run / "settings.json", {**s.flat(), CORPUS_HASHES: hashes})
    job = AdaptRun(run, s, cfg.device, book, stage_inputs(s), cfg.keep_trainer_state, cfg.keep_candidates)
    redo_unusable_outputs(job)
    t_run = time.perf_counter()
    if s.router == "off" or not book.is_done("router", job.inputs["router"]):
        drop_router(job)  # never a router of another decoder, or of a stage not done, beside RUN/memdec
    datastore_stage(job)
    train_cfg = train_stage(job)
    baseline_dirs = [baseline_stage(job, get_method(name), train_cfg) for name in plan if name in method_names()]
    if not keeps_candidates(job, cfg.keep_candidates):  # after the baselines: the ce-decoder may reuse α=0's files
        prune_candidates(job)
    eval_stage(job, baseline_dirs)
    if s.router == "auto":
        router_stage(job)
    if with_tasks:
        tasks_stage(job)
    samples_stage(job)
    write_report(run, s.flat(), book.stages, time.perf_counter() - t_run)
    return run


STAGE_OUTPUTS: dict[str, tuple[str, Callable[[Path], object]]] = {  # a done stage's file that later steps read
    "eval": ("eval.json", lambda f: read_eval_json(f, ("base", "memdec"))),
    "router": (f"router/{ROUTER_LAMBDA_JSON}", lambda f: read_router_lambdas(f) if f.is_file() else None),
    "tasks": ("tasks.json", read_tasks_json),
    "samples": ("samples.json", read_samples),
}


def redo_unusable_outputs(job: AdaptRun) -> None:
    """A done stage whose output file is missing or unusable (a field missing or of another type) is
    redone, with the stages that read it, saying why in one line: never a traceback further on."""
    for name, (file, read) in STAGE_OUTPUTS.items():
        if not job.book.is_done(name, job.inputs[name]):
            continue
        try:
            read(job.run / file)
        except MemdecError as exc:
            _say(f"warning: {exc}; redoing the {name} stage and the stages after")
            job.book.invalidate(name)
            job.book.redo_after(name)


def _remove(*paths: Path) -> None:
    """Delete what an earlier call of this run made (a symlink, or a folder under the run)."""
    for p in paths:
        if p.is_symlink() or p.is_file():
            p.unlink()
        elif p.exists():
            shutil.rmtree(p)


def datastore_stage(job: AdaptRun) -> None:
    """1. Keys, index and kNN targets of the training corpus, in ``RUN/datastore``."""
    s, book, inputs = job.s, job.book, job.inputs["datastore"]
    done, changed = book.begin("datastore", inputs, f"keys, index and kNN targets of {s.corpus}"
                               + (f" (first {s.train_tokens} tokens)" if s.train_tokens else ""))
    if not done:
        keys_identity = lambda d: {k: v for k, v in d.items() if k not in ("k", "knn_temp")}  # noqa: E731
        if changed and keys_identity(book.recorded_inputs("datastore")) != keys_identity(inputs):
            _remove(job.datastore)  # other keys: nothing to reuse (a k/T change reuses keys and index)

        def work() -> dict:
            build_datastore(DatastoreConfig(model=s.model, corpus=s.corpus, out=str(job.datastore), k=s.k,
                                            knn_temp=s.knn_temp, block_size=s.ds_block_size, stride=s.ds_stride,
                                            max_tokens=s.train_tokens, device=job.device, text_field=s.text_field))
            return {"describe": describe(job.datastore)}

        book.run("datastore", inputs, work)
    _say(book.summary("datastore").get("describe", ""))


def train_config(job: AdaptRun) -> TrainConfig:
    """The memory decoder's TrainConfig (its first teacher candidate); the baselines share its budget:
    every option of the train stage that TrainConfig has, under its fingerprint key (``block_size``)."""
    s, names = job.s, {f.name for f in dataclasses.fields(TrainConfig)}
    own = {k: v for k, v in stage_fields(s.train, omit=False).items() if k in names and k != "teacher_base_weight"}
    return TrainConfig(**{**own, "alpha": s.alpha[0]}, datastore=str(job.datastore), out=str(job.ckpt), valid=s.valid,
                       valid_max_tokens=s.valid_tokens, save_every=s.eval_every, device=job.device, warmup=2,
                       keep_trainer_state=job.keep_trainer_state)


def train_stage(job: AdaptRun) -> TrainConfig:
    """2. One memory decoder per teacher candidate (α, β); the best on --valid becomes ``RUN/memdec``.
    Returns the chosen candidate's TrainConfig."""
    s, book = job.s, job.book
    names = [candidate_name(a, b) for a, b in teacher_candidates(s.alpha, s.teacher_base_weight)]
    names += [two_phase_name(a) for a in s.two_phase]
    init = f"{s.init_layers} blocks" if s.init_layers else (s.init or (
        "full copy of the base" if s.decoder == "copy" else f"decoder {s.decoder} of the base"))
    if s.transfer_from is not None:
        init = (f"transferred from {s.transfer_from}, {s.transfer_init} rows, "
                + (f"{s.transfer_budget:g} of its training tokens" if s.transfer_budget is not None else f"{s.max_steps} steps"))
    done, changed = book.begin("train", job.inputs["train"], f"memory decoder ({' or '.join(candidate_label(n) for n in names)}, "
                               f"chosen on {s.valid}; {init})")
    if not done:
        if changed:
            _remove(job.ckpt, job.run / "candidates")
        book.run("train", job.inputs["train"], lambda: train_candidates(job))
    return dataclasses.replace(train_config(job), alpha=book.summary("train").get("chosen_alpha", s.alpha[0]))


def train_candidates(job: AdaptRun) -> dict:
    """Train each candidate on the same data and schedule (within --train-budget), link the best on
    --valid as ``RUN/memdec``; returns the stage's summary."""
    s, base_cfg = job.s, train_config(job)
    teachers = teacher_candidates(s.alpha, s.teacher_base_weight)
    several = len(teachers) + len(s.two_phase) > 1
    scores, seconds, skipped, t0 = {}, {}, [], time.perf_counter()
    spent = lambda: scores and s.train_budget is not None and time.perf_counter() - t0 > s.train_budget  # noqa: E731
    for alpha, beta in teachers:
        name = candidate_name(alpha, beta)
        if spent():
            skipped.append(name)
            continue
        out = job.run / "candidates" / name if several else job.ckpt
        cfg = dataclasses.replace(base_cfg, alpha=alpha, teacher_base_weight=beta, out=str(out))
        if s.transfer_from is not None:
            transfer(TransferConfig(**{**asdict(cfg), "decoder": s.transfer_from, "model": s.model, "init": s.transfer_init,
                                       "budget": s.transfer_budget}))
        else:
            train(cfg)
        info = read_memdec_json(out)
        scores[name], seconds[name] = info["train_stats"].get("best_ppl", math.inf), info.get("train_seconds")
    phase_one = None  # (its folder, the steps left for phase two): trained once, before the first two-phase candidate
    for alpha in s.two_phase:
        name = two_phase_name(alpha)
        if spent():
            skipped.append(name)
            continue
        out = job.run / "candidates" / name if several else job.ckpt
        phase_one = phase_one or train_phase_one(job, base_cfg)
        seconds[name] = train_phase_two(base_cfg, alpha, out, *phase_one)
        scores[name] = read_memdec_json(out)["train_stats"].get("best_ppl", math.inf)
    if skipped:
        _say(f"training budget of {s.train_budget:g} s spent: skipped {', '.join(candidate_label(n) for n in skipped)}")
    chosen = min(scores, key=scores.get)
    if several:
        _remove(job.ckpt)
        job.ckpt.symlink_to(Path("candidates") / chosen, target_is_directory=True)
    info = read_memdec_json(job.ckpt)
    return {"lambda": info["lambda"], "train_stats": info["train_stats"], "chosen": chosen,
            "chosen_alpha": info["alpha"], "chosen_teacher_base_weight": info.get("teacher_base_weight", 0.0),
            "valid_joint_ppl": scores, "train_seconds": seconds, "skipped": skipped}


PRUNED = "weights_removed"  # memdec.json of a candidate whose weights prune_candidates removed


def keeps_candidates(job: AdaptRun, asked: bool | None) -> bool:
    """Whether this call keeps every candidate's weights: ``asked`` (--keep-candidates, or
    --no-keep-candidates), else what an earlier call of this run asked (the train stage's summary
    records it), so that weights a user asked to keep are removed only when asked. Says in one line
    when an earlier call's choice holds, and which weights an earlier call removed (they cannot come
    back without training again); both are recorded for the report."""
    earlier = job.book.summary("train").get("keep_candidates")
    keep = bool(earlier) if asked is None else asked
    if asked is None and earlier:
        _say("candidates: keeping every candidate's weights, as an earlier call of this run asked (--keep-candidates); "
             "--no-keep-candidates removes them")
    folder, removed = job.run / "candidates", []
    if keep and folder.is_dir():
        removed = [c.name for c in sorted(folder.iterdir()) if (c / MEMDEC_JSON).is_file() and not c.is_symlink()
                   and read_memdec_json(c).get(PRUNED)]
        if removed:
            _say(f"candidates: the weights of {', '.join(candidate_label(n) for n in removed)} were removed by an "
                 f"earlier call without --keep-candidates; --keep-candidates cannot bring them back (only training "
                 f"them again can: another train stage)")
    if job.book.is_done("train", job.inputs["train"]):
        job.book.note("train", keep_candidates=keep, weights_removed=removed)
    return keep


def prune_candidates(job: AdaptRun) -> None:
    """Remove the weights (every file but ``memdec.json``, ``log.jsonl`` and the marker, and ``trainer_state/``) of
    each candidate decoder but the chosen one (``RUN/memdec``) and one a baseline reuses (the ce-decoder's
    α=0 candidate, whose files are hard links of the baseline's); their metrics stay for the report, and
    their ``memdec.json`` says that the weights are gone."""
    folder = job.run / "candidates"
    if not folder.is_dir():
        return
    keep = {job.ckpt.resolve()}  # the chosen one, and any a baseline reuses (hard links: removing frees nothing)
    keep |= {(job.run / r).resolve() for m in methods() if (r := job.book.summary(m.name).get("reused_from"))}
    for candidate in sorted(folder.iterdir()):
        if not candidate.is_dir() or candidate.resolve() in keep or not (candidate / MEMDEC_JSON).is_file():
            continue
        info = read_memdec_json(candidate)
        if info.get(PRUNED):
            continue
        write_memdec_json(candidate, {**info, PRUNED: "memdec adapt kept only the chosen candidate (--keep-candidates "
                                                      "keeps every one)"})  # first: never a weightless checkpoint
        for p in candidate.iterdir():
            if p.name not in (MEMDEC_JSON, "log.jsonl", OWN_MARKER):
                if p.is_dir() and not p.is_symlink():
                    shutil.rmtree(p)
                else:
                    p.unlink()
        _say(f"removed the weights of candidate {candidate_label(candidate.name)} (not chosen)")


def train_phase_one(job: AdaptRun, base_cfg: TrainConfig) -> tuple[Path, int]:
    """The first phase of the two-phase candidates, shared by all of them: cross-entropy for the first
    half of the CE-only candidate's steps, in ``RUN/candidates/two-phase-ce``. Returns its folder and
    the steps left for phase two."""
    total = planned_steps(base_cfg, read_manifest(job.datastore).n_keys)
    if total < 2:
        raise MemdecError(f"--two-phase splits the steps in two, but the run has {total} step; raise --epochs or --max-steps")
    first = job.run / "candidates" / PHASE_ONE
    train(dataclasses.replace(base_cfg, alpha=0.0, teacher_base_weight=0.0, max_steps=total // 2, out=str(first)))
    return first, total - total // 2


def train_phase_two(base_cfg: TrainConfig, alpha: float, out: Path, first: Path, steps: int) -> float | None:
    """A two-phase candidate's second phase: ``alpha`` for ``steps`` from phase one's best checkpoint
    ``first``, with a fresh optimizer and schedule. Returns both phases' seconds."""
    train(dataclasses.replace(base_cfg, alpha=alpha, teacher_base_weight=0.0, init=str(first), init_layers=None,
                              max_steps=steps, out=str(out)))
    phases = [read_memdec_json(p).get("train_seconds") for p in (first, out)]
    return None if None in phases else round(sum(phases), 1)


def baseline_stage(job: AdaptRun, method: Method, train_cfg: TrainConfig) -> str:
    """2b. A baseline on the memory decoder's TrainConfig: the same tokens, windows, steps and
    schedule, α=0. A method whose training is the memory decoder's with α=0 (ce-decoder) reuses the
    α=0 teacher candidate when there is one (not a transferred one). Returns the baseline's folder."""
    s, book, name = job.s, job.book, method.name
    folder = job.run / "baselines" / name
    done, changed = book.begin(name, job.inputs[name], method.adapt_what(s))
    if done:
        return str(folder)
    if changed:
        _remove(folder)
    reusable = job.run / "candidates" / candidate_name(0.0, 0.0)
    if (method.reuses_alpha0_decoder and s.transfer_from is None and (reusable / MEMDEC_JSON).is_file()
            and not read_memdec_json(reusable).get(PRUNED)):
        book.run(name, job.inputs[name], lambda: reuse_candidate(method, reusable, folder))
        return str(folder)

    def work() -> dict:
        train_baseline(BaselineConfig(**{**asdict(train_cfg), "alpha": 0.0, "out": str(folder), **method.adapt_options(s)},
                                      method=name))
        info = read_baseline_json(folder, method_names())
        return {k: info.get(k) for k in ("lambda", "trainable_parameters", "train_seconds")}

    book.run(name, job.inputs[name], work)
    return str(folder)


def reuse_candidate(method: Method, candidate: Path, folder: Path) -> dict:
    """The α=0 candidate as ``method``'s baseline (ce-decoder): its files hard-linked (no copy, no
    training), then ``baseline.json``. Returns the stage's summary."""
    folder.mkdir(parents=True, exist_ok=True)
    for f in candidate.iterdir():
        if f.is_file() and f.name not in (MEMDEC_JSON, "log.jsonl"):
            try:
                os.link(f, folder / f.name)
            except OSError:  # a filesystem without hard links
                shutil.copy2(f, folder / f.name)
    info = {**read_memdec_json(candidate), "reused_from": str(candidate.relative_to(folder.parent.parent))}
    write_baseline_json(folder, info, method.name, mixed=not method.alone)
    _say(f"{method.name}: reused {info['reused_from']} (the same recipe on the same tokens), not trained again")
    return {"lambda": info["lambda"], "trainable_parameters": info.get("trainable_parameters"),
            "train_seconds": info.get("train_seconds"), "reused_from": info["reused_from"]}


def eval_stage(job: AdaptRun, baseline_dirs: list[str]) -> None:
    """3. Every system on the test split, λ chosen on --valid; the memory decoder's chosen λ is
    written into its checkpoint, so that loading ``RUN/memdec`` gives the λ the report shows."""
    s, book = job.s, job.book
    done, _ = book.begin("eval", job.inputs["eval"], f"base, kNN-LM, memory decoder{' and baselines' if s.baselines else ''} "
                         f"on {s.test}{f' and {s.general}' if s.general else ''}, lambda chosen on {s.valid}")
    if done:
        return

    def work() -> None:
        report = run_eval_report(EvalConfig(
            model=s.model, corpus=s.test, max_tokens=s.test_tokens, block_size=s.eval_block_size, stride=s.eval_stride,
            device=job.device, memdec=str(job.ckpt), knn=str(job.datastore), sweep=True, valid=s.valid,
            valid_max_tokens=s.valid_tokens, plot=str(job.run / "lambda.png"), json=None,
            baseline=baseline_dirs or None, general=s.general, general_max_tokens=s.general_tokens,
            recurring=str(job.datastore)))
        atomic_write_json(job.run / "eval.json", report.to_json(s.test))
        chosen = next(r.lmbda for r in report.rows if r.system == "memdec")
        write_memdec_json(job.ckpt, {**read_memdec_json(job.ckpt), "lambda": chosen,
                                     "lambda_source": f"memdec adapt: chosen on {s.valid} ({s.valid_tokens} tokens)"})

    book.run("eval", job.inputs["eval"], work)


def drop_router(job: AdaptRun) -> None:
    """Take a kept router out of ``RUN/memdec`` (``router.json`` first: it commits one) and its row out of
    ``RUN/eval.json``: before upstream stages redo their work, or with ``--router off``."""
    _remove(job.ckpt / ROUTER_JSON, job.ckpt / ROUTER_WEIGHTS)
    file = job.run / "eval.json"
    if file.is_file() and job.book.is_done("eval", job.inputs["eval"]):  # else the eval stage writes it anew
        ev = read_eval_json(file)
        kept = [r for r in ev["results"] if r.get("system") != ROUTER_ROW]
        if len(kept) != len(ev["results"]):
            atomic_write_json(file, {**ev, "results": kept})


def router_stage(job: AdaptRun) -> None:
    """3b. A token router between the base and ``RUN/memdec``, fitted on the training corpus after the
    datastore's tokens and on ``general:train``; kept only if it beats the chosen λ on --valid."""
    s, book = job.s, job.book
    done, _ = book.begin("router", job.inputs["router"], f"token router on {s.corpus} (after the datastore's tokens) "
                         f"and {ROUTER_GENERAL}, kept only if it beats the fixed λ on {s.valid}")
    if done:
        return
    book.run("router", job.inputs["router"], lambda: fit_and_judge_router(job))


def fit_and_judge_router(job: AdaptRun) -> dict:
    """Fit into ``RUN/router``; keep it (copy into ``RUN/memdec``, add the eval row) only if it wins on --valid.
    Returns the stage's summary: ``kept`` and ``why``, the validation numbers, the seconds."""
    s = job.s
    _remove(job.run / "router", job.run / "router_lambda.png")
    if s.train_tokens is None:
        why = f"the datastore took all of {s.corpus}: no domain text the decoder did not train on is left to fit on"
        _say(f"router: not fitted: {why}")
        return {"kept": False, "why": why}
    t0 = time.perf_counter()
    info = train_router(RouterConfig(
        memdec=str(job.ckpt), domain_corpus=s.corpus, valid=s.valid, out=str(job.run / "router"), model=s.model,
        general=ROUTER_GENERAL, tokens=s.router_tokens, valid_tokens=s.valid_tokens, block_size=s.eval_block_size,
        stride=s.eval_stride, device=job.device, text_field=s.text_field), log=_say)
    v = info["valid"]
    kept = v["router_ppl"] < v["fixed_ppl"]
    why = (f"router {v['router_ppl']:.3f} vs fixed λ={v['fixed_lambda']:.2f} {v['fixed_ppl']:.3f} on {v['tokens']} "
           f"positions of {s.valid}: {'kept' if kept else 'not kept (it does not beat the fixed λ)'}")
    _say(f"router: {why}")
    summary = {"kept": kept, "why": why, "valid": v, "fit_seconds": round(time.perf_counter() - t0, 1)}
    if kept:
        for name in (ROUTER_WEIGHTS, ROUTER_JSON):  # router.json last: it commits the router
            atomic_write(job.ckpt / name, lambda tmp, src=job.run / "router" / name: shutil.copyfile(src, tmp))
        t1 = time.perf_counter()
        add_router_row(job, v["fixed_lambda"])
        summary["eval_seconds"] = round(time.perf_counter() - t1, 1)
    t2 = time.perf_counter()
    write_router_lambdas(job)
    summary["lambda_t_seconds"] = round(time.perf_counter() - t2, 1)
    return summary


def add_router_row(job: AdaptRun, lmbda: float) -> None:
    """The ``memdec+router`` row on the test (and general) text, scored as ``eval --router`` does, appended
    to ``RUN/eval.json``."""
    s = job.s
    report = run_eval_report(EvalConfig(
        model=s.model, corpus=s.test, max_tokens=s.test_tokens, block_size=s.eval_block_size, stride=s.eval_stride,
        device=job.device, memdec=str(job.ckpt), lmbda=lmbda, router=str(job.ckpt), general=s.general,
        general_max_tokens=s.general_tokens, json=None, plot=None))
    row = next(r for r in report.to_json(s.test)["results"] if r["system"] == ROUTER_ROW)
    ev = read_eval_json(job.run / "eval.json")
    results = [r for r in ev["results"] if r.get("system") != ROUTER_ROW] + [row]
    atomic_write_json(job.run / "eval.json", {**ev, "results": results})


def write_router_lambdas(job: AdaptRun) -> None:
    """λ_t of the fitted router along the first ``ROUTER_PLOT_TOKENS`` positions of the test text, each with
    its token: ``RUN/router/lambda_t.json`` (the report plots it)."""
    s = job.s
    base, tokenizer = load_model(s.model, device=resolve_device(job.device))
    joint = MemoryDecoderModel.from_pretrained(base, str(job.ckpt), tokenizer=tokenizer, router=str(job.run / "router"))
    n = min(ROUTER_PLOT_TOKENS, s.eval_block_size - 1)
    tokens = load_token_stream(s.test, tokenizer, n + 1, s.text_field)
    ids = torch.as_tensor(tokens, dtype=torch.long, device=base.device)[None]
    _, _, _, log_lam = joint.routed_logprobs(ids[:, :-1], ids[:, 1:])
    atomic_write_json(job.run / "router" / ROUTER_LAMBDA_JSON, {
        "corpus": s.test, "fixed_lambda": joint.lmbda, "kept": (job.ckpt / ROUTER_JSON).is_file(),
        "tokens": [tokenizer.decode([t]) for t in tokens[1:].tolist()],
        "lambda_t": [round(x, 5) for x in log_lam[0].exp().tolist()]}, ensure_ascii=False)


def lm_eval_available() -> bool:
    """Whether lm-evaluation-harness is installed (the optional extra ``memdec[eval]``); says so when not."""
    if importlib.util.find_spec("lm_eval") is not None:
        return True
    _say("tasks: lm-eval is not installed (pip install 'memdec[eval]'): no facts or general accuracy this run")
    return False


def task_heldout_tokens(s: Settings) -> int | None:
    """Test tokens the facts task reads: enough for ``task_items`` items, never fewer than --test-tokens."""
    if s.test_tokens is None:
        return None
    return max(s.test_tokens, HELDOUT_TOKENS_PER_ITEM * s.task_items)


def write_tasks(job: AdaptRun) -> tuple[dict, dict]:
    """Write the facts and general tasks into ``RUN/tasks``: ({task: {corpus, items}}, {kind: why it was skipped})."""
    s, out = job.s, job.run / "tasks"
    _remove(out)
    written, skipped = {}, {}
    try:
        write_facts_task(str(job.datastore), s.test, out, load_tokenizer(s.model), s.task_items, TASK_SEED,
                         FACTS_CONTEXT_TOKENS, TASK_CHOICES, heldout_max_tokens=task_heldout_tokens(s), name=FACTS_TASK,
                         text_field=s.text_field)
        written[FACTS_TASK] = {"corpus": s.corpus, "heldout": s.test, "items": _count_lines(out / f"{FACTS_TASK}.jsonl")}
    except MemdecError as exc:
        skipped["facts"] = str(exc)
    if s.general is None:
        skipped["general"] = "--general none"
    else:
        try:
            write_general_task(s.general, out, s.task_items, TASK_SEED, GENERAL_CONTEXT_WORDS, TASK_CHOICES, GENERAL_TASK,
                               s.text_field)
            n = _count_lines(out / f"{GENERAL_TASK}.jsonl")
            written.update({f"{GENERAL_TASK}_{kind}": {"corpus": s.general, "items": n} for kind in ("lambada", "cloze")})
        except MemdecError as exc:
            skipped["general"] = str(exc)
    for kind, why in skipped.items():
        _say(f"tasks: no {kind} task: {why}")
    return written, skipped


def _count_lines(path: Path) -> int:
    with open(path, encoding="utf-8") as f:
        return sum(1 for line in f if line.strip())


def task_systems(job: AdaptRun) -> list[dict]:
    """Each row of ``RUN/eval.json`` as the memdec lm-eval model's arguments, at the λ (and kNN temperature)
    the eval stage chose."""
    out = []
    for r in read_eval_json(job.run / "eval.json")["results"]:
        system, args = r["system"], {"base": job.s.model, "device": job.device}
        if system == "memdec":
            args.update(memdec=str(job.ckpt), lmbda=r["lambda"])
        elif system == ROUTER_ROW:  # the router stage kept a router: RUN/memdec holds it
            args.update(memdec=str(job.ckpt), router=str(job.ckpt))
        elif system == "knn-lm":
            args.update(knn=str(job.datastore), lmbda=r["lambda"], knn_temp=r.get("knn_temperature"), knn_k=r.get("k"))
        elif (method := method_of_row(system)) is not None:
            args.update(baseline=str(job.run / "baselines" / method.name), lmbda=r.get("lambda"))
        elif system != "base":
            continue
        out.append({"system": system, "lambda": r.get("lambda"), "knn_temperature": r.get("knn_temperature"), "args": args})
    return out


def score_tasks(args: dict, tasks_dir: Path, tasks: dict[str, dict]) -> dict:
    """One system on the tasks of ``tasks_dir`` through lm-eval: {task: accuracy entry}."""
    from lm_eval import simple_evaluate  # optional and heavy: only for this stage
    from lm_eval.tasks import TaskManager

    lm = memdec_lm_class()(**args)
    try:
        res = simple_evaluate(model=lm, tasks=list(tasks), task_manager=TaskManager(include_path=[str(tasks_dir)],
                              include_defaults=False), log_samples=False, bootstrap_iters=0, batch_size=1)
    finally:
        lm.system.close()
    out = {}
    for task in tasks:
        n = (res.get("n-samples") or {}).get(task, {}).get("effective", tasks[task]["items"])
        out[task] = accuracy_entry(float(res["results"][task]["acc,none"]), int(n))
        if "perplexity,none" in res["results"][task]:
            out[task]["perplexity"] = round(float(res["results"][task]["perplexity,none"]), 4)
    return out


def tasks_stage(job: AdaptRun) -> None:
    """3b. The factual-recall and general-ability tasks (``memdec.tasks``) written into ``RUN/tasks``, every
    system of the eval stage scored on them through lm-eval at its chosen λ: ``RUN/tasks.json``."""
    s, book, inputs = job.s, job.book, job.inputs["tasks"]
    systems = task_systems(job)
    names = [x["system"] for x in systems]
    recorded = book.summary("tasks").get("systems")  # None: a run of an earlier version
    if book.is_done("tasks", inputs) and recorded is not None and recorded != names:
        _say(f"tasks: the systems changed ({', '.join(recorded)} -> {', '.join(names)}); redoing this stage")
        book.invalidate("tasks")
    done, _ = book.begin("tasks", inputs, f"factual recall ({s.test}) and general ability "
                         f"({s.general or 'skipped'}) through lm-eval, {s.task_items} items each, every system")
    if done:
        return

    def work() -> dict:
        _remove(job.run / "tasks.json")
        written, skipped = write_tasks(job)
        rows = []
        for system in systems:
            t0 = time.perf_counter()
            scores = score_tasks(system.pop("args"), job.run / "tasks", written) if written else {}
            rows.append({**system, "tasks": scores, "seconds": round(time.perf_counter() - t0, 1)})
            _say(f"tasks: {system['system']}: " + ", ".join(f"{t} {e['acc']:.3f} (n={e['n']})" for t, e in scores.items()))
        atomic_write_json(job.run / "tasks.json", {"items": s.task_items, "seed": TASK_SEED, "tasks": written,
                                                   "skipped": skipped, "results": rows})
        return {"tasks": {t: w["items"] for t, w in written.items()}, "skipped": list(skipped), "systems": names}

    book.run("tasks", inputs, work)


def samples_stage(job: AdaptRun) -> None:
    """4. Continuations of a few test prompts, base beside joint, in ``RUN/samples.json``."""
    s, book = job.s, job.book
    done, _ = book.begin("samples", job.inputs["samples"], f"{s.samples} continuations of {s.test} prompts, base beside joint")
    if done:
        return

    def work() -> None:
        lmbda = next(r["lambda"] for r in read_eval_json(job.run / "eval.json", ("base", "memdec"))["results"]
                     if r["system"] == "memdec")
        atomic_write_json(job.run / "samples.json", generate_samples(s, job.ckpt, job.device, lmbda), ensure_ascii=False)

    book.run("samples", job.inputs["samples"], work)


def sample_prompts(s: Settings, tokenizer, n: int, prompt_tokens: int = 48) -> list[str]:
    """``n`` prompts from the test corpus: the text before evenly spaced positions of its scored slice."""
    tokens = load_token_stream(s.test, tokenizer, s.test_tokens, s.text_field)
    picks = np.linspace(prompt_tokens, len(tokens) - 1, n + 1, dtype=np.int64)[:-1] if n else []
    return [tokenizer.decode(tokens[p - prompt_tokens : p]) for p in picks]


def generate_samples(s: Settings, ckpt: Path, device: str, lmbda: float | None = None) -> list[dict]:
    """Continuations of test prompts by the base alone and by the joint model (at ``lmbda``, default
    the checkpoint's), drawn as ``SAMPLING`` says, with the same seed for both."""
    base, tokenizer = load_model(s.model, device=resolve_device(device))
    joint = MemoryDecoderModel.from_pretrained(base, str(ckpt), lmbda=lmbda, tokenizer=tokenizer)
    gen = dict(max_new_tokens=s.sample_tokens, pad_token_id=tokenizer.pad_token_id,
               **{k: v for k, v in SAMPLING.items() if k != "seed"})
    out = []
    for prompt in sample_prompts(s, tokenizer, s.samples):
        ids = tokenizer(prompt, return_tensors="pt").to(base.device)
        n = ids.input_ids.shape[1]
        with torch.no_grad():
            torch.manual_seed(SAMPLING["seed"])
            b = base.generate(**ids, **gen)[0, n:]
            torch.manual_seed(SAMPLING["seed"])
            j = joint.generate(**ids, **gen)[0, n:]
        out.append({"prompt": prompt, "base": tokenizer.decode(b, skip_special_tokens=True),
                    "memdec": tokenizer.decode(j, skip_special_tokens=True), "lambda": joint.lmbda})
    return out
