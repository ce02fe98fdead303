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
4. ``samples``: continuations of a few test-set prompts, base beside joint (``RUN/samples.json``);

then ``RUN/report.md`` and ``RUN/report.json``. ``RUN/stages.json`` records each stage's settings;
a rerun skips stages whose settings are unchanged and redoes, saying why, those that changed. A rerun
with another --model, --corpus, --text-field, --valid, --test or --general (``RUN_IDENTITY``) is
another run: refused before anything loads, unless --overwrite replaces the run.
"""

from __future__ import annotations

import dataclasses
import hashlib
import importlib.util
import json
import math
import os
import shutil
import time
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Callable

import numpy as np
import torch

from .baselines import BaselineConfig, Method, get_method, method_names, method_of_row, methods, train_baseline
from .checkpoint import MEMDEC_JSON, read_baseline_json, read_memdec_json, write_baseline_json, write_memdec_json
from .checks import (check_device, check_non_negative, check_own_folder, check_positive, check_positive_int,
                     check_temperature, check_unit_interval)
from .data import load_token_stream, read_corpus
from .datastore import DatastoreConfig, build_datastore, describe, read_manifest
from .errors import CorpusError, MemdecError
from .evaluate import EvalConfig, run_eval_report
from .files import atomic_write_json, atomic_write_text, read_json, read_json_object, read_jsonl
from .joint import MemoryDecoderModel
from .models import load_model, load_tokenizer, resolve_device, resolve_model_spec
from .tables import render_table
from .tasks import memdec_lm_class, write_facts_task, write_general_task
from .train import TrainConfig, planned_steps, train
from .transfer import INITS, TransferConfig, check_source, source_fingerprint, transfer

PRESETS: dict[str, dict] = {
    # Fits 15 minutes of wall time on a 2-core CPU with the default model, set-up included.
    "quick": dict(train_tokens=24_000, valid_tokens=2_048, test_tokens=4_096, k=1024, knn_temp=1.0,
                  ds_block_size=1024, ds_stride=768, init_layers=None, alpha=[0.25, 0.0], lr=2e-4, epochs=1.0,
                  batch_size=4, train_block_size=512, eval_every=3, eval_block_size=1024, eval_stride=512,
                  samples=3, sample_tokens=40, task_items=0),  # lm-eval tasks: opt in with --task-items on a CPU
    # The whole training split; meant for a GPU.
    "full": dict(train_tokens=None, valid_tokens=32_768, test_tokens=32_768, k=1024, knn_temp=1.0,
                 ds_block_size=1024, ds_stride=512, init_layers=None, alpha=[0.25, 0.0], lr=1e-4, epochs=2.0,
                 batch_size=8, train_block_size=1024, eval_every=50, eval_block_size=1024, eval_stride=512,
                 samples=5, sample_tokens=60, task_items=500),
}


@dataclass
class AdaptConfig:
    model: str = "smollm2-135m"
    corpus: str = "austen:train"
    valid: str = "austen:valid"
    test: str = "austen:test"
    out: str = "runs/demo"
    preset: str = "quick"
    # stage options; None takes the preset's value
    train_tokens: int | None = None
    valid_tokens: int | None = None
    test_tokens: int | None = None
    k: int | None = None
    knn_temp: float | None = None
    init: str | None = None
    init_layers: int | None = None
    alpha: list[float] | None = None  # several: one decoder each, the best on --valid is kept
    teacher_base_weight: list[float] | None = None  # β candidates for every α > 0: teacher (1-β)·p_kNN + β·p_base
    two_phase: list[float] | None = None  # α of two-phase candidates: CE for half the steps, then α for the rest
    train_budget: float | None = None  # seconds: start no further candidate decoder once training has used this
    lr: float | None = None
    epochs: float | None = None
    max_steps: int | None = None
    batch_size: int | None = None
    block_size: int | None = None  # sets the datastore's, training's and evaluation's windows at once
    samples: int | None = None
    task_items: int | None = None  # items per lm-eval task (facts, general); 0 skips the tasks stage
    device: str = "auto"
    text_field: str = "text"
    baselines: bool = False  # also train and report dapt, lora and ce-decoder under the same budget
    general: str | None = "general:test"  # general-text corpus for the forgetting column; "none" to skip
    general_tokens: int | None = None  # default: --test-tokens
    lora_r: int | None = None  # default 8
    lora_lr: float | None = None  # default: LORA_LR_SCALE x --lr
    transfer_from: str | None = None  # a memory decoder for another base (tokenizer): transfer it instead of training
    transfer_budget: float | None = None  # its training: this fraction of SRC's training tokens (default 0.25)
    transfer_init: str = "mapped"  # the new embedding and LM-head rows: mapped or random
    overwrite: bool = False  # replace a run in --out whose defining inputs (RUN_IDENTITY) differ


SAMPLING = dict(do_sample=True, top_p=0.9, temperature=0.8, seed=0)  # how the report's samples are drawn
# the lm-eval tasks of the tasks stage (memdec.tasks): fixed, so that every run's tasks are alike
TASK_SEED = 0
FACTS_CONTEXT_TOKENS = 64
GENERAL_CONTEXT_WORDS = 60
TASK_CHOICES = 4
HELDOUT_TOKENS_PER_ITEM = 200  # the facts task reads this many test tokens per item wanted (at least --test-tokens)
FACTS_TASK, GENERAL_TASK = "memdec_facts", "memdec_general"
# the report's columns: task name -> column; the LAMBADA-style task is in tasks.json and report.json
TASK_COLUMNS = {FACTS_TASK: "facts acc", f"{GENERAL_TASK}_cloze": "general acc"}
TRANSFER_BUDGET = 0.25  # --transfer-from: a quarter of the source decoder's training tokens, unless --max-steps
LORA_LR_SCALE = 5.0  # LoRA's few, zero-started parameters want a larger step than full fine-tuning
LORA_R = 8


ADAPT_HELP = {
    "model": "base model spec: alias (smollm2-135m), local HF folder, .gguf file, or hub id",
    "corpus": "training corpus spec (the datastore and the decoder's training text)",
    "valid": "validation corpus: chooses lambda and the checkpoint",
    "test": "test corpus: the report's table; never seen in training or in choosing lambda",
    "out": "run folder; a rerun resumes and skips finished stages. The run is defined by --model, --corpus, "
           "--text-field, --valid, --test and --general: a rerun with other values is refused (choose a new --out, or "
           "--overwrite); other flags (budgets, --preset, --alpha, --baselines, --task-items, ...) redo only the "
           "stages they change",
    "preset": "quick (15 min on a 2-core CPU) or full (whole corpus, for a GPU)",
    "train_tokens": "use the first N tokens of the training corpus (preset's by default; 0 = all)",
    "valid_tokens": "score the first N tokens of the validation corpus",
    "test_tokens": "score the first N tokens of the test corpus",
    "k": "neighbours per kNN target",
    "knn_temp": "temperature of the kNN target distribution",
    "init": "initialise the memory decoder from this model spec (same tokenizer)",
    "init_layers": "initialise the memory decoder from the base's first N blocks (default: a full copy)",
    "alpha": "weight of the kNN KL term in the training loss; several values train one decoder each and keep "
             "the best on --valid (preset: 0.25 0, i.e. kNN distillation against cross-entropy only)",
    "teacher_base_weight": "mix the base model's distribution into the kNN teacher with this weight; several values "
                           "add one candidate decoder each for every alpha > 0 (default: 0, the pure kNN teacher)",
    "two_phase": "add a two-phase candidate for each value A: cross-entropy for the first half of the steps, then "
                 "alpha=A from that decoder's best checkpoint for the other half (the official recipe's two phases, "
                 "in the same total steps as every other candidate); e.g. --two-phase 0.5 (default: none)",
    "train_budget": "seconds of training after which no further candidate decoder is started (default: no limit)",
    "lr": "peak learning rate",
    "epochs": "passes over the training windows",
    "max_steps": "optimizer steps (overrides --epochs)",
    "batch_size": "windows per optimizer step",
    "block_size": "window length for the datastore, training and evaluation (strides become half of it)",
    "samples": "test-set prompts continued in the report",
    "task_items": "items per lm-eval task scored for every system: factual recall (names and numbers of --test also "
                  "in the training text) and general ability (--general); preset: quick 0 (CPU: opt in), full 500; 0 skips",
    "device": "auto, cpu or cuda",
    "text_field": "JSONL / dataset field that holds the text",
    "baselines": "also train dapt (full fine-tuning), lora and ce-decoder (alpha=0) on the same tokens and budget, "
                 "and report them",
    "general": "general-text corpus on which every system is also scored (forgetting); 'none' to skip",
    "general_tokens": "score the first N tokens of --general (default: --test-tokens)",
    "lora_r": f"--baselines: LoRA rank (default {LORA_R})",
    "lora_lr": f"--baselines: LoRA's peak learning rate (default {LORA_LR_SCALE:g} x --lr)",
    "transfer_from": "the train stage transfers this memory decoder (a checkpoint for another base model, e.g. "
                     "another tokenizer) to --model instead of training one from the base (`memdec transfer`)",
    "transfer_budget": f"--transfer-from: train for this fraction of the source decoder's training tokens "
                       f"(default {TRANSFER_BUDGET:g}; --max-steps instead sets the steps)",
    "transfer_init": "--transfer-from: the new embedding and LM-head rows, 'mapped' (from the source's rows of each "
                     "token's pieces) or 'random' (the ablation)",
    "overwrite": "replace the run in --out (a memdec adapt run folder) when its --model, --corpus, --text-field, "
                 "--valid, --test or --general differ: its files are deleted first; a run of the same inputs resumes",
}

# the inputs that define what a run is: another value makes another run, refused in the same --out
# without --overwrite. Every other setting (token budgets, the preset, training and task options)
# only redoes the stages it changes, and keeps the rest.
RUN_IDENTITY = {"model": "--model", "corpus": "--corpus", "text_field": "--text-field", "valid": "--valid",
                "test": "--test", "general": "--general"}
# what memdec adapt writes in a run folder: all that --overwrite deletes
RUN_ENTRIES = ("stages.json", "settings.json", "datastore", "memdec", "candidates", "baselines", "eval.json",
               "lambda.png", "tasks", "tasks.json", "samples.json", "report.json", "report.md", "training.png")


@dataclass
class Settings:
    """The resolved settings of a run: the preset's values with the user's overrides on top."""

    model: str
    corpus: str
    valid: str
    test: str
    train_tokens: int | None
    valid_tokens: int | None
    test_tokens: int | None
    k: int
    knn_temp: float
    ds_block_size: int
    ds_stride: int
    init: str | None
    init_layers: int | None
    alpha: list[float]
    teacher_base_weight: list[float]
    two_phase: list[float]
    train_budget: float | None
    lr: float
    epochs: float
    max_steps: int | None
    batch_size: int
    train_block_size: int
    eval_every: int
    eval_block_size: int
    eval_stride: int
    samples: int
    sample_tokens: int
    task_items: int
    text_field: str
    baselines: bool
    general: str | None
    general_tokens: int | None
    lora_r: int
    lora_lr: float
    transfer_from: str | None = None
    transfer_budget: float | None = None
    transfer_init: str = "mapped"


def resolve_settings(cfg: AdaptConfig) -> Settings:
    if cfg.preset not in PRESETS:
        raise MemdecError(f"unknown --preset '{cfg.preset}' (choose from: {', '.join(PRESETS)})")
    values = dict(PRESETS[cfg.preset])
    for f in dataclasses.fields(Settings):
        given = getattr(cfg, f.name, None)
        if given is not None:
            values[f.name] = given
        values.setdefault(f.name, None)
    if cfg.block_size is not None:
        b = cfg.block_size
        values.update(ds_block_size=b, ds_stride=max(b // 2, 1), eval_block_size=b, eval_stride=max(b // 2, 1),
                      train_block_size=min(values["train_block_size"], b))
    if values["teacher_base_weight"] is None:
        values["teacher_base_weight"] = [0.0]
    if values["two_phase"] is None:
        values["two_phase"] = []
    if values["train_tokens"] == 0:
        values["train_tokens"] = None
    if str(values["general"]).lower() in ("", "none"):
        values["general"] = None
    values["baselines"] = bool(values["baselines"])
    if values["general_tokens"] is None:
        values["general_tokens"] = values["test_tokens"]
    if values["lora_r"] is None:
        values["lora_r"] = LORA_R
    if values["lora_lr"] is None:
        values["lora_lr"] = LORA_LR_SCALE * values["lr"]
    if values["transfer_from"] is not None and values["transfer_budget"] is None and values["max_steps"] is None:
        values["transfer_budget"] = TRANSFER_BUDGET
    for split in ("valid", "test"):
        if values[split] == values["corpus"]:
            raise MemdecError(f"--{split} is the training corpus; held-out text must not be trained on")
    return Settings(**{f.name: values[f.name] for f in dataclasses.fields(Settings)})


def check_settings(s: Settings) -> None:
    """Every resolved setting checked, one clear line each: before any model loads or file is written."""
    for flag, value in (("--train-tokens", s.train_tokens), ("--valid-tokens", s.valid_tokens),
                        ("--test-tokens", s.test_tokens), ("--general-tokens", s.general_tokens)):
        if value is not None and (not isinstance(value, int) or value < 2):
            raise MemdecError(f"{flag} must be at least 2, got {value}")
    for flag, value in (("--k", s.k), ("--batch-size", s.batch_size), ("--block-size", s.train_block_size),
                        ("--block-size", s.ds_block_size), ("--block-size", s.eval_block_size), ("--lora-r", s.lora_r)):
        check_positive_int(value, flag)
    if s.max_steps is not None:
        check_positive_int(s.max_steps, "--max-steps")
    if s.init_layers is not None:
        check_positive_int(s.init_layers, "--init-layers")
    if s.init is not None and s.init_layers is not None:
        raise MemdecError("give --init or --init-layers, not both")
    if s.samples < 0:
        raise MemdecError(f"--samples must be 0 or more, got {s.samples}")
    if not isinstance(s.task_items, int) or s.task_items < 0:
        raise MemdecError(f"--task-items must be 0 or more, got {s.task_items}")
    check_temperature(s.knn_temp, "--knn-temp")
    check_positive(s.lr, "--lr")
    check_positive(s.lora_lr, "--lora-lr")
    check_positive(s.epochs, "--epochs")
    if s.train_budget is not None:
        check_non_negative(s.train_budget, "--train-budget")
    if not s.alpha:
        raise MemdecError("--alpha needs at least one value in [0, 1]")
    for a in s.alpha:
        check_unit_interval(a, "--alpha")
    for b in s.teacher_base_weight:
        check_unit_interval(b, "--teacher-base-weight")
    for a in s.two_phase:
        if check_unit_interval(a, "--two-phase") == 0:
            raise MemdecError("--two-phase 0 is cross-entropy in both phases: give an alpha above 0")
    if s.two_phase and s.max_steps is not None and s.max_steps < 2:
        raise MemdecError(f"--two-phase splits the steps in two: --max-steps must be at least 2, got {s.max_steps}")
    check_transfer_settings(s)


def check_transfer_settings(s: Settings) -> None:
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


def check_inputs(s: Settings, run: Path) -> None:
    """The model spec resolves, every corpus reads, and ``run`` is new, empty or an adapt run:
    all before anything is loaded or written."""
    resolve_model_spec(s.model)
    if s.init is not None:
        resolve_model_spec(s.init)
    if s.transfer_from is not None:
        try:
            check_source(s.transfer_from)
        except MemdecError as exc:
            raise MemdecError(f"--transfer-from: {exc}") from None
    for flag, spec in (("--corpus", s.corpus), ("--valid", s.valid), ("--test", s.test), ("--general", s.general)):
        if spec is not None:
            try:
                read_corpus(spec, s.text_field)
            except CorpusError as exc:
                raise CorpusError(f"{flag}: {exc}") from None
    check_own_folder(run, "stages.json")


def identity_changes(s: Settings, run: Path) -> list[str]:
    """``--flag OLD -> NEW`` for each input of RUN_IDENTITY in which ``s`` differs from the run recorded in
    ``run/settings.json`` (none if there is no record). A ``--general`` added to a run that had none only
    adds work, and is no change."""
    record = run / "settings.json"
    if not (run / "stages.json").is_file() or not record.is_file():
        return []
    old = read_json_object(record, "run settings")
    changes = []
    for key, flag in RUN_IDENTITY.items():
        if key in old and old[key] is not None and old[key] != getattr(s, key):
            changes.append(f"{flag} {old[key]} -> {getattr(s, key) or 'none'}")
    return changes


def check_run_identity(s: Settings, run: Path, overwrite: bool) -> bool:
    """Whether ``run`` holds another run (other RUN_IDENTITY inputs) that ``overwrite`` lets this call
    replace; raises MemdecError, naming each differing input, when it holds one and ``overwrite`` is off."""
    changes = identity_changes(s, run)
    if changes and not overwrite:
        raise MemdecError(f"--out {run} holds another run ({'; '.join(changes)}): rerunning would replace its "
                          f"datastore, decoders and report; choose a new --out, or give --overwrite to replace it")
    return bool(changes)


def clear_run(run: Path) -> None:
    """Delete what memdec adapt wrote in ``run`` (RUN_ENTRIES and their temporary files); anything else in
    the folder stays. The stage record is emptied first, so an interruption never leaves a stage recorded
    as done without its files; the emptied record keeps the folder marked as a run."""
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


def candidate_name(alpha: float, beta: float) -> str:
    """The candidate's folder under RUN/candidates: ``alpha-0.25`` or ``alpha-0.5-base-0.5``."""
    return f"alpha-{alpha:g}" + (f"-base-{beta:g}" if beta else "")


TWO_PHASE_PREFIX = "two-phase-"
PHASE_ONE = "two-phase-ce"  # the shared first phase of the two-phase candidates, under RUN/candidates


def two_phase_name(alpha: float) -> str:
    """The two-phase candidate's folder under RUN/candidates: ``two-phase-0.5``."""
    return f"{TWO_PHASE_PREFIX}{alpha:g}"


def candidate_label(name: str) -> str:
    """``alpha-0.5-base-0.5`` -> ``α=0.5, β=0.5`` (β: the base model's weight in the teacher);
    ``two-phase-0.5`` -> ``CE, then α=0.5``."""
    if name.startswith(TWO_PHASE_PREFIX):
        return f"CE, then α={name[len(TWO_PHASE_PREFIX):]}"
    return name.replace("alpha-", "α=").replace("-base-", ", β=")


def _fingerprint(payload: dict) -> str:
    return hashlib.sha256(json.dumps(payload, sort_keys=True, default=str).encode()).hexdigest()[:12]


def stage_inputs(s: Settings) -> dict[str, dict]:
    """The settings each stage depends on, its upstream stages' included."""
    datastore = dict(model=s.model, corpus=s.corpus, train_tokens=s.train_tokens, block_size=s.ds_block_size,
                     stride=s.ds_stride, text_field=s.text_field, k=s.k, knn_temp=s.knn_temp)
    train = dict(datastore=datastore, init=s.init, init_layers=s.init_layers, alpha=s.alpha, lr=s.lr, epochs=s.epochs,
                 max_steps=s.max_steps, batch_size=s.batch_size, block_size=s.train_block_size, valid=s.valid,
                 valid_tokens=s.valid_tokens, eval_every=s.eval_every)
    if s.teacher_base_weight != [0.0]:  # only when used, so that earlier runs keep their fingerprint
        train["teacher_base_weight"] = s.teacher_base_weight
    if s.train_budget is not None:
        train["train_budget"] = s.train_budget
    if s.transfer_from is not None:  # only when used, so that earlier runs keep their fingerprint
        train["transfer"] = dict(source=source_fingerprint(s.transfer_from), budget=s.transfer_budget, init=s.transfer_init)
    if s.two_phase:  # likewise
        train["two_phase"] = s.two_phase
    # the baselines: the memory decoder's budget (tokens, steps, batch, windows, schedule, validation), alpha=0
    budget = {k: v for k, v in train.items()
              if k not in ("init", "init_layers", "alpha", "teacher_base_weight", "train_budget", "transfer", "two_phase")}
    baselines = {m.name: dict(budget, **m.adapt_inputs(s)) for m in methods()}
    evaluation = dict(train=train, test=s.test, test_tokens=s.test_tokens, valid_tokens=s.valid_tokens,
                      block_size=s.eval_block_size, stride=s.eval_stride, recurring="datastore")
    if s.general:
        evaluation.update(general=s.general, general_tokens=s.general_tokens)
    if s.baselines:
        evaluation["baselines"] = baselines
    samples = dict(eval=evaluation, test=s.test, samples=s.samples, sample_tokens=s.sample_tokens, sampling=SAMPLING)
    tasks = dict(eval=evaluation, test=s.test, heldout_tokens=task_heldout_tokens(s), general=s.general,
                 items=s.task_items, seed=TASK_SEED, context_tokens=FACTS_CONTEXT_TOKENS,
                 context_words=GENERAL_CONTEXT_WORDS, n_choices=TASK_CHOICES)  # text_field: in eval
    return {"datastore": datastore, "train": train, **baselines, "eval": evaluation, "samples": samples, "tasks": tasks}


class StageBook:
    """``RUN/stages.json``: which stages are done, with which settings, in how long; it owns the
    caching. ``begin`` says whether a stage is cached (same settings, done) or what changed;
    ``run`` does a stage's work between a ``running`` and a ``done`` record."""

    def __init__(self, run: Path, plan: list[str] | None = None):
        self.path = run / "stages.json"
        self.plan = plan or []
        self.stages: dict = read_json_object(self.path, "stage record") if self.path.is_file() else {}

    def save(self) -> None:
        atomic_write_json(self.path, self.stages)

    def is_done(self, name: str, inputs: dict) -> bool:
        entry = self.stages.get(name)
        return bool(entry and entry.get("status") == "done" and entry.get("fingerprint") == _fingerprint(inputs))

    def changed(self, name: str, inputs: dict) -> list[str]:
        """Which top-level settings differ from the recorded run of this stage (empty if none was)."""
        entry = self.stages.get(name)
        if not entry or entry.get("fingerprint") == _fingerprint(inputs):
            return []
        old = entry.get("inputs", {})
        return [k for k in sorted(set(old) | set(inputs)) if old.get(k) != inputs.get(k)] or ["settings"]

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


def _say(msg: str) -> None:
    print(msg, flush=True)


@dataclass
class Job:
    """One ``memdec adapt`` call: the run folder, its settings, the stages' inputs and their record."""

    run: Path
    s: Settings
    device: str
    book: StageBook
    inputs: dict

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
    check_settings(s)
    check_device(cfg.device)
    check_inputs(s, run)
    if check_run_identity(s, run, cfg.overwrite):
        clear_run(run)
    with_tasks = bool(s.task_items) and lm_eval_available()
    plan = ["datastore", "train", *(method_names() if s.baselines else ()), "eval", *(["tasks"] if with_tasks else []), "samples"]
    book = StageBook(run, plan)  # read (and checked) before anything is written
    run.mkdir(parents=True, exist_ok=True)
    book.save()  # first: stages.json marks the folder as this run's
    atomic_write_json(run / "settings.json", asdict(s))
    job = Job(run, s, cfg.device, book, stage_inputs(s))
    t_run = time.perf_counter()
    datastore_stage(job)
    train_cfg = train_stage(job)
    baseline_dirs = [baseline_stage(job, get_method(name), train_cfg) for name in plan if name in method_names()]
    eval_stage(job, baseline_dirs)
    if with_tasks:
        tasks_stage(job)
    samples_stage(job)
    write_report(run, s, book, time.perf_counter() - t_run)
    return run


def _remove(*paths: Path) -> None:
    """Delete what an earlier call of this run made (a symlink, or a folder under the run)."""
    for p in paths:
        if p.is_symlink():
            p.unlink()
        elif p.exists():
            shutil.rmtree(p)


def datastore_stage(job: Job) -> None:
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


def train_config(job: Job) -> TrainConfig:
    """The memory decoder's TrainConfig (its first teacher candidate); the baselines share its budget."""
    s = job.s
    return TrainConfig(datastore=str(job.datastore), out=str(job.ckpt), init=s.init, init_layers=s.init_layers,
                       alpha=s.alpha[0], lr=s.lr, epochs=s.epochs, max_steps=s.max_steps, batch_size=s.batch_size,
                       block_size=s.train_block_size, valid=s.valid, valid_max_tokens=s.valid_tokens,
                       eval_every=s.eval_every, save_every=s.eval_every, device=job.device, warmup=2)


def train_stage(job: Job) -> TrainConfig:
    """2. One memory decoder per teacher candidate (α, β); the best on --valid becomes ``RUN/memdec``.
    Returns the chosen candidate's TrainConfig."""
    s, book = job.s, job.book
    names = [candidate_name(a, b) for a, b in teacher_candidates(s.alpha, s.teacher_base_weight)]
    names += [two_phase_name(a) for a in s.two_phase]
    init = f"{s.init_layers} blocks" if s.init_layers else (s.init or "full copy of the base")
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


def train_candidates(job: Job) -> dict:
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


def train_phase_one(job: Job, base_cfg: TrainConfig) -> tuple[Path, int]:
    """The first phase of the two-phase candidates, shared by all of them: cross-entropy for the first
    half of the CE-only candidate's steps, in ``RUN/candidates/two-phase-ce``. Returns its folder and
    the steps left for phase two."""
    total = planned_steps(base_cfg, int(read_manifest(job.datastore)["n_keys"]))
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


def baseline_stage(job: Job, method: Method, train_cfg: TrainConfig) -> str:
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
    if method.reuses_alpha0_decoder and s.transfer_from is None and (reusable / MEMDEC_JSON).is_file():
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


def eval_stage(job: Job, baseline_dirs: list[str]) -> None:
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


def wilson_interval(correct: int, n: int, z: float = 1.959963984540054) -> tuple[float, float]:
    """The Wilson score interval of a binomial proportion ``correct / n`` (95% by default); (0, 1) when n is 0."""
    if n <= 0:
        return 0.0, 1.0
    if not 0 <= correct <= n:
        raise ValueError(f"correct must be in [0, n], got {correct} of {n}")
    p, z2 = correct / n, z * z
    centre = (p + z2 / (2 * n)) / (1 + z2 / n)
    half = z / (1 + z2 / n) * math.sqrt(p * (1 - p) / n + z2 / (4 * n * n))
    return (0.0 if correct == 0 else max(0.0, centre - half)), (1.0 if correct == n else min(1.0, centre + half))


def accuracy_entry(acc: float, n: int) -> dict:
    """One system's accuracy on one task: ``acc``, ``n``, ``correct`` and the 95% Wilson interval."""
    correct = int(round(acc * n))
    lo, hi = wilson_interval(correct, n)
    return {"acc": round(acc, 6), "n": n, "correct": correct, "ci95": [round(lo, 6), round(hi, 6)]}


def write_tasks(job: Job) -> tuple[dict, dict]:
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


def task_systems(job: Job) -> list[dict]:
    """Each row of ``RUN/eval.json`` as the memdec lm-eval model's arguments, at the λ (and kNN temperature)
    the eval stage chose."""
    out = []
    for r in read_json_object(job.run / "eval.json", "eval report")["results"]:
        system, args = r["system"], {"base": job.s.model, "device": job.device}
        if system == "memdec":
            args.update(memdec=str(job.ckpt), lmbda=r["lambda"])
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


def tasks_stage(job: Job) -> None:
    """3b. The factual-recall and general-ability tasks (``memdec.tasks``) written into ``RUN/tasks``, every
    system of the eval stage scored on them through lm-eval at its chosen λ: ``RUN/tasks.json``."""
    s, book, inputs = job.s, job.book, job.inputs["tasks"]
    done, _ = book.begin("tasks", inputs, f"factual recall ({s.test}) and general ability "
                         f"({s.general or 'skipped'}) through lm-eval, {s.task_items} items each, every system")
    if done:
        return

    def work() -> dict:
        _remove(job.run / "tasks.json")
        written, skipped = write_tasks(job)
        rows = []
        for system in task_systems(job):
            t0 = time.perf_counter()
            scores = score_tasks(system.pop("args"), job.run / "tasks", written) if written else {}
            rows.append({**system, "tasks": scores, "seconds": round(time.perf_counter() - t0, 1)})
            _say(f"tasks: {system['system']}: " + ", ".join(f"{t} {e['acc']:.3f} (n={e['n']})" for t, e in scores.items()))
        atomic_write_json(job.run / "tasks.json", {"items": s.task_items, "seed": TASK_SEED, "tasks": written,
                                                   "skipped": skipped, "results": rows})
        return {"tasks": {t: w["items"] for t, w in written.items()}, "skipped": list(skipped)}

    book.run("tasks", inputs, work)


def samples_stage(job: Job) -> None:
    """4. Continuations of a few test prompts, base beside joint, in ``RUN/samples.json``."""
    s, book = job.s, job.book
    done, _ = book.begin("samples", job.inputs["samples"], f"{s.samples} continuations of {s.test} prompts, base beside joint")
    if done:
        return

    def work() -> None:
        lmbda = next(r["lambda"] for r in read_json_object(job.run / "eval.json", "eval report")["results"]
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


# --------------------------------------------------------------------------------------------
# The report


def _plot_training(run: Path) -> str | None:
    """Training loss and validation curves of every decoder trained (each α candidate), one colour each."""
    candidates = sorted((run / "candidates").glob("alpha-*/log.jsonl")) or [run / "memdec" / "log.jsonl"]
    logs = {p.parent.name if p.parent.name.startswith("alpha-") else "memdec": p for p in candidates if p.is_file()}
    if not logs:
        return None
    import matplotlib  # optional and heavy: only for the plot

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    chosen = (run / "memdec").resolve().name
    fig, (ax1, ax2) = plt.subplots(1, 2, figsize=(10, 3.6), dpi=110)
    base = None
    for i, (name, log) in enumerate(logs.items()):
        records = [r for r in read_jsonl(log) if "step" in r]
        label = candidate_label(name) + (" (chosen)" if name == chosen and len(logs) > 1 else "")
        color = f"C{i}"
        ax1.plot([r["step"] for r in records], [r["loss"] for r in records], color=color, label=f"{label}: loss")
        ax1.plot([r["step"] for r in records], [r["ce"] for r in records], color=color, ls=":", label=f"{label}: CE")
        val = [r for r in records if "best_ppl" in r]
        if val:
            steps = [r["step"] for r in val]
            ax2.plot(steps, [r["best_ppl"] for r in val], "-o", color=color, label=f"{label}: joint, best λ")
            ax2.plot(steps, [r["valid_ppl_memdec"] for r in val], "--", color=color, label=f"{label}: decoder alone")
            base = val[0]["valid_ppl_base"]
    ax1.set_xlabel("optimizer step"), ax1.set_ylabel("nats"), ax1.set_title("training loss"), ax1.grid(alpha=0.3)
    ax1.legend(fontsize=7)
    if base is not None:
        ax2.axhline(base, color="gray", ls=":", label="base")
        ax2.set_xlabel("optimizer step"), ax2.set_ylabel("validation perplexity"), ax2.set_title("validation")
        ax2.grid(alpha=0.3), ax2.legend(fontsize=7)
    fig.tight_layout()
    fig.savefig(run / "training.png")
    plt.close(fig)
    return "training.png"


def _folder_bytes(path: Path, pattern: str = "*") -> int:
    return sum(p.stat().st_size for p in path.rglob(pattern) if p.is_file())


def write_report(run: Path, s: Settings, book: StageBook, wall_s: float) -> None:
    """Write RUN/report.json, then RUN/report.md, from the stages' outputs."""
    report = report_json(run, s, book, wall_s)
    atomic_write_json(run / "report.json", report, ensure_ascii=False)
    atomic_write_text(run / "report.md", "\n".join(report_markdown(run, s, report, _plot_training(run))))


def report_json(run: Path, s: Settings, book: StageBook, wall_s: float) -> dict:
    """Everything the report shows, as one JSON object."""
    ev = read_json_object(run / "eval.json", "eval report")
    samples_file = run / "samples.json"
    samples = read_json(samples_file, "samples") if samples_file.is_file() else []
    tasks_file = run / "tasks.json"
    tasks = read_json_object(tasks_file, "tasks report") if s.task_items and tasks_file.is_file() else None
    info = read_memdec_json(run / "memdec")
    manifest = read_manifest(run / "datastore")
    sizes = {"datastore_keys": manifest["n_keys"], "datastore_bytes": _folder_bytes(run / "datastore"),
             "memdec_parameters": info.get("n_parameters"), "memdec_init": info.get("init"),
             "memdec_bytes": sum(p.stat().st_size for p in (run / "memdec").glob("*.safetensors")),
             "memdec_transfer": info.get("transfer")}
    return {"model": s.model, "train_corpus": s.corpus, "valid_corpus": s.valid, "tokens": ev["tokens"],
            "corpus": ev["corpus"], "results": ev["results"], "sweep": ev.get("sweep"), "general": ev.get("general"),
            "recurring": ev.get("recurring"), "sizes": sizes,
            "stage_seconds": {name: e.get("seconds") for name, e in book.stages.items()},
            "wall_seconds_this_call": round(wall_s, 1), "settings": asdict(s), "samples": samples, "tasks": tasks,
            "alpha_choice": book.summary("train").get("valid_joint_ppl"), "skipped": book.summary("train").get("skipped"),
            "candidate_seconds": book.summary("train").get("train_seconds"),
            "ce_decoder_reused_from": book.summary("ce-decoder").get("reused_from")}


def report_markdown(run: Path, s: Settings, report: dict, training_png: str | None) -> list[str]:
    """The lines of RUN/report.md."""
    lines = [f"# memdec report: {s.model} adapted to {s.corpus}", "",
             f"Run folder `{run}`; wall time of this call {report['wall_seconds_this_call'] / 60:.1f} min.", "",
             f"Test: {report['tokens']} tokens of {report['corpus']}; λ of each system chosen on {s.valid} "
             f"({s.valid_tokens or 'all'} tokens). The test text is never used in training or in choosing λ.", ""]
    lines += results_table(report["results"], report["general"], report["recurring"], report.get("tasks"))
    lines += _teacher_lines(s, report)
    if s.baselines:
        lines += ["", f"Baselines (`memdec baseline`) trained on the datastore's token stream with the memory decoder's "
                      f"budget: the same windows of {s.train_block_size} tokens, batch {s.batch_size}, "
                      f"{'max_steps ' + str(s.max_steps) if s.max_steps else f'{s.epochs:g} epoch(s)'}, the same warm-up "
                      f"and cosine schedule, peak lr {s.lr:g} (LoRA: {s.lora_lr:g}, rank {s.lora_r}), next-token "
                      f"cross-entropy only. dapt and lora are scored alone (LoRA merged into the base); ce-decoder is the "
                      f"memory decoder's recipe with alpha=0, mixed with the base at its own λ."]
        if report["ce_decoder_reused_from"]:
            lines.append(f"The ce-decoder is `{report['ce_decoder_reused_from']}`, the α=0 teacher candidate: the same "
                         f"recipe on the same tokens, so it was not trained twice.")
    sizes = report["sizes"]
    lines += ["", "## Sizes", "",
              f"- datastore: {sizes['datastore_keys']:,} keys, {sizes['datastore_bytes'] / 2**20:.1f} MiB on disk",
              f"- memory decoder: {(sizes['memdec_parameters'] or 0) / 1e6:.1f} M parameters, "
              f"{sizes['memdec_bytes'] / 2**20:.1f} MiB ({sizes['memdec_init']})", *_origin_lines(sizes.get("memdec_transfer")), "",
              "## Stage times", ""]
    lines += render_table(["stage", "seconds"], [[k, str(v)] for k, v in report["stage_seconds"].items()])
    lines += ["", "## Plots", ""]
    if training_png:
        lines.append(f"![training curves]({training_png})")
    if (run / "lambda.png").is_file():
        lines.append("![perplexity against λ](lambda.png)")
    lines += _sample_lines(report["samples"])
    lines += ["", "Load the adapted model in one line (its λ is the one chosen above):", "", "```python",
              "from memdec import MemoryDecoderModel",
              f"model = MemoryDecoderModel.from_pretrained(\"{s.model}\", \"{run / 'memdec'}\")", "```", ""]
    return lines


def _origin_lines(origin: dict | None) -> list[str]:
    """Where a transferred decoder comes from (``memdec.json``'s ``transfer`` record)."""
    if not origin:
        return []
    cov = origin.get("mapping") or {}
    return [f"- origin: transferred from `{origin.get('source_decoder')}` (a decoder for "
            f"`{origin.get('source_base_model')}`, tokenizer {origin.get('source_tokenizer_hash')}), {origin.get('init')} "
            f"embedding and LM-head rows; the mapping covers {100 * cov.get('coverage', 0):.1f}% of the "
            f"{cov.get('tokens', '?')} tokens ({cov.get('single_piece', '?')} as one source piece, "
            f"{cov.get('fallback', '?')} given the mean row)"]


def _teacher_lines(s: Settings, report: dict) -> list[str]:
    choice = report["alpha_choice"] or {}
    if len(choice) < 2:
        return []
    ranked = sorted(choice.items(), key=lambda kv: kv[1])
    label = (lambda n: candidate_label(n if n.startswith(("alpha-", TWO_PHASE_PREFIX)) else f"alpha-{n}"))  # older runs: keys were α
    secs = report.get("candidate_seconds") or {}
    took = lambda n: f", {secs[n]:.0f} s" if secs.get(n) is not None else ""  # noqa: E731 - wall time of its training
    lines = ["", f"Teacher chosen on {s.valid} (α: weight of the kNN distillation term; β: the base model's share "
                 f"of the teacher; every candidate trained for the same steps): **{label(ranked[0][0])}** "
                 f"(joint valid ppl {ranked[0][1]:.2f}{took(ranked[0][0])}); runner-up "
                 + ", ".join(f"{label(a)} ({p:.2f}{took(a)})" for a, p in ranked[1:])
                 + (". α=0 is next-token cross-entropy only: at this scale the kNN targets did not beat plain "
                    "cross-entropy as a teacher." if label(ranked[0][0]) == "α=0" else ".")]
    if report.get("skipped"):
        lines.append(f"Not trained (training budget spent): {', '.join(candidate_label(n) for n in report['skipped'])}.")
    return lines


def _sample_lines(samples: list[dict]) -> list[str]:
    if not samples:
        return []
    how = ", ".join(f"{k.replace('_', '-')} {v}" for k, v in SAMPLING.items() if k != "do_sample")
    lines = ["", f"## Samples (sampled: {how}; the same seed for both)", ""]
    for smp in samples:
        lines += [f"**Prompt:** …{smp['prompt'][-200:]}", "", f"- **base:** {smp['base']}",
                  f"- **memdec (λ={smp['lambda']:.2f}):** {smp['memdec']}", ""]
    return lines


def _pct(x: float | None, ref: float | None) -> str:
    return "" if x is None or not ref else f"{(x / ref - 1) * 100:+.1f}%"


def _params(n: int | None) -> str:
    if n is None:
        return "-"
    return "0" if n == 0 else f"{n / 1e6:.2f} M"


def _train_time(r: dict) -> str:
    t = r.get("train_seconds")
    if r["system"] == "base":
        return "-"
    text = "-" if t is None else f"{t:.0f} s"
    if r.get("datastore_seconds") is not None:
        text += f" (+ {r['datastore_seconds']:.0f} s datastore)"
    return text


def task_cell(entry: dict | None) -> str:
    """``0.62 ± 0.09 (n=100)``: the accuracy, half the width of its 95% Wilson interval, the items."""
    if not entry:
        return "-"
    lo, hi = entry["ci95"]
    return f"{entry['acc']:.2f} ± {(hi - lo) / 2:.2f} (n={entry['n']})"


def task_columns(tasks: dict | None) -> dict[str, str]:
    """{task: column} of the tasks that tasks.json scored."""
    written = (tasks or {}).get("tasks") or {}
    return {task: column for task, column in TASK_COLUMNS.items() if task in written}


def results_table(rows: list[dict], general: dict | None, recurring: dict | None = None,
                  tasks: dict | None = None) -> list[str]:
    """The report's Markdown table: test, recurring-token and general perplexity, the lm-eval tasks'
    accuracies (``RUN/tasks.json``), and each system's budget."""
    base = next(r for r in rows if r["system"] == "base")
    recurring = recurring if recurring and any(r.get("recurring_ppl") is not None for r in rows) else None
    columns = task_columns(tasks)
    by_system = {r["system"]: r["tasks"] for r in (tasks or {}).get("results", [])}
    head = ["system", "λ", "test ppl", "vs base"] + (["recurring ppl", "vs base"] if recurring else []) + \
        (["general ppl", "vs base"] if general else []) + list(columns.values()) + \
        ["trainable params", "train time", "tokens/s", "inference time vs base"]
    body = []
    for r in rows:
        lam = "-" if r.get("lambda") is None else f"{r['lambda']:.2f}"
        ratio = r.get("inference_ratio") or (base["tokens_per_s"] / r["tokens_per_s"])
        cells = [r["system"], lam, f"{r['ppl']:.2f}", _pct(r["ppl"], base["ppl"]) if r is not base else ""]
        for key, on in (("recurring_ppl", recurring), ("general_ppl", general)):
            if on:
                v = r.get(key)
                cells += ["-" if v is None else f"{v:.2f}", _pct(v, base.get(key)) if r is not base else ""]
        cells += [task_cell(by_system.get(r["system"], {}).get(task)) for task in columns]
        cells += [_params(r.get("trainable_parameters")), _train_time(r), f"{r['tokens_per_s']:.1f}", f"{ratio:.2f}×"]
        body.append(cells)
    lines = render_table(head, body)
    lines += ["", "Every row is scored on the same tokens. *trainable params*: parameters that training changes "
              "(kNN-LM trains none; its cost is building the datastore's keys and index, shown as its train time). "
              "*train time*: wall time of the training loop, validation included; the memory decoder also needs the "
              "datastore with its kNN targets, shown beside it. *inference time vs base*: the base model's tokens/s over "
              "the system's, measured in this evaluation (a mixture runs the base and its second model)."]
    if recurring:
        lines += ["", f"*recurring ppl*: the {recurring['tokens']} test tokens that belong to names and numbers also found in "
                  f"the datastore's text (`memdec.knowledge`): the facts a memory is for."]
    lines += _task_notes(tasks, columns)
    if general:
        lines += ["", f"*general ppl*: {general['tokens']} tokens of `{general['corpus']}`, general text far from the "
                  f"training domain, scored by every system at the λ chosen above: a rise over the base is forgetting."]
    return lines


def _task_notes(tasks: dict | None, columns: dict[str, str]) -> list[str]:
    if not tasks:
        return []
    written = tasks.get("tasks") or {}
    lines = []
    if FACTS_TASK in columns:
        w = written[FACTS_TASK]
        lines += ["", f"*facts acc*: factual recall, {w['items']} multiple-choice item(s) ({TASK_CHOICES} options) from "
                      f"`{w['heldout']}`: a name or number of the test text that also occurs in the training text, "
                      f"after the {FACTS_CONTEXT_TOKENS} tokens before it; the distractors are other names or numbers "
                      f"of the training text (lm-eval task `{FACTS_TASK}` in `tasks/`)."]
    if f"{GENERAL_TASK}_cloze" in columns:
        w = written[f"{GENERAL_TASK}_cloze"]
        lines += ["", f"*general acc*: general ability, {w['items']} passages of `{w['corpus']}`, the last word of each "
                      f"to pick among {TASK_CHOICES} (`{GENERAL_TASK}_cloze`); a drop against the base is forgetting. "
                      f"The LAMBADA-style exact match of the same words (`{GENERAL_TASK}_lambada`) is in report.json."]
    if columns:
        lines += ["", "Accuracies: each system through lm-evaluation-harness (the `memdec` model) at the λ chosen "
                      "above; ± is half the width of the 95% Wilson interval, n the number of items."]
    for kind, why in (tasks.get("skipped") or {}).items():
        lines += ["", f"No {kind} task: {why}."]
    return lines


def format_summary(run: Path) -> str:
    """The report's table, for the terminal."""
    report = read_json_object(Path(run) / "report.json", "report")
    rows = report["results"]
    base = next(r for r in rows if r["system"] == "base")
    general = base.get("general_ppl") is not None
    columns = task_columns(report.get("tasks"))
    by_system = {r["system"]: r["tasks"] for r in (report.get("tasks") or {}).get("results", [])}
    header = ["system", "lambda", "ppl", "vs base"] + (["general", "vs base"] if general else []) + \
        [c.replace(" acc", "") for c in columns.values()] + ["tok/s", "trainable", "train s"]
    body = []
    for r in rows:
        cells = ["-" if r.get("lambda") is None else f"{r['lambda']:.2f}", f"{r['ppl']:.3f}",
                 f"{(r['ppl'] / base['ppl'] - 1) * 100:+.1f}%"]
        if general:
            g = r.get("general_ppl")
            cells += ["-" if g is None else f"{g:.3f}", _pct(g, base["general_ppl"]) if g is not None else ""]
        cells += [task_cell(by_system.get(r["system"], {}).get(task)) for task in columns]
        t = r.get("train_seconds")
        cells += [f"{r['tokens_per_s']:.1f}", _params(r.get("trainable_parameters")), "-" if t is None else f"{t:.0f}"]
        body.append([r["system"], *cells])
    out = [f"{report['tokens']} test tokens of {report['corpus']}", *render_table(header, body, "text")]
    out.append("stage seconds: " + ", ".join(f"{k} {v}" for k, v in report["stage_seconds"].items()))
    out.append(f"report: {Path(run) / 'report.md'}")
    return "\n".join(out)
