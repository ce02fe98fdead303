"""``memdec train``'s options: ``TrainConfig``, their help (``TRAIN_HELP``) and their checks.

``check_config`` rejects every bad setting with one clear line before anything loads;
``check_decoder_shape`` checks ``--decoder`` against the base model's config on a weightless
skeleton. ``SAVE_DTYPES``: the dtypes ``--save-dtype`` names.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field

import torch
from transformers import AutoModelForCausalLM

from ..checks import (check_device, check_non_negative, check_positive, check_positive_int, check_seed,
                      check_unit_interval)
from ..decoders import FULL_COPY, SHAPES, DecoderShape, parse_shape
from ..errors import MemdecError
from ..models import load_config


@dataclass
class TrainConfig:
    """The options of one ``memdec train`` run, one flag per field (help: ``TRAIN_HELP``)."""

    datastore: str
    out: str
    init: str | None = None  # any causal LM spec with the same tokenizer; default: a full copy of the base
    init_layers: int | None = None  # or: a shortened copy of the base with this many blocks
    layer_selection: str = "first"  # "first" N blocks or "spread" (evenly spaced)
    alpha: float = 0.5
    teacher_base_weight: float = 0.0  # β: the teacher is (1−β)·p_kNN + β·p_base
    epochs: float = 1.0
    max_steps: int | None = None
    lr: float = 1e-4
    min_lr_ratio: float = 0.1
    warmup: int = 10
    weight_decay: float = 0.0
    max_grad_norm: float = 1.0
    batch_size: int = 2
    grad_accum: int = 1
    block_size: int = 512
    valid: str | None = None
    valid_max_tokens: int = 4096
    lambdas: list[float] = field(default_factory=lambda: [0.1, 0.2, 0.3, 0.4, 0.5, 0.6, 0.7, 0.8, 0.9, 0.95])
    eval_every: int = 50
    patience: int | None = None  # early stopping: stop after this many validations without a better score
    save_every: int = 50
    log_every: int = 1
    seed: int = 0
    device: str = "auto"
    resume: bool = True
    decoder: str = FULL_COPY  # the decoder's shape (memdec.decoders): copy, fork:K, ...
    keep_trainer_state: bool = False  # keep CKPT/trainer_state/ once the run finishes (to extend it later)
    save_dtype: str = "float32"  # the dtype of the decoder's weights in CKPT/ (trainer steps stay float32)


SAVE_DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}


def _shapes_help() -> str:
    """The registered decoder shapes, each with its one-line ``summary``."""
    return "; ".join(f"{cls.summary}" for _, cls in sorted(SHAPES.items()))


TRAIN_HELP = {
    "datastore": "datastore folder built by `memdec datastore` (its targets step must be done)",
    "out": "checkpoint folder: the best checkpoint, plus trainer_state/ for resume",
    "init": "initialise from this model spec (same tokenizer as the base): a memory decoder checkpoint, a dapt "
            "baseline or any model folder, e.g. a CE-trained decoder for a second, kNN phase (fresh optimizer and "
            "schedule; its weights' hash is part of the run, so resume starts from the same ones); "
            "default: a full copy of the base",
    "init_layers": "initialise from a shortened copy of the base model with N blocks",
    "layer_selection": "with --init-layers: 'first' N blocks or 'spread' (evenly spaced)",
    "alpha": "weight of KL(p_kNN || p_mem); 1-alpha weighs next-token cross-entropy",
    "teacher_base_weight": "mix the base model's distribution into the kNN teacher: (1-b)*p_kNN + b*p_base "
                           "(costs a frozen base forward per step)",
    "epochs": "passes over the datastore's windows (ignored if --max-steps is set)",
    "max_steps": "optimizer steps to run",
    "lr": "peak learning rate (AdamW) of a full copy; a shape's own scale multiplies it (lora: 10x)",
    "min_lr_ratio": "cosine decay ends at lr * this",
    "warmup": "linear warm-up steps",
    "weight_decay": "AdamW weight decay of the matrices (norms and biases get none)",
    "max_grad_norm": "clip the global gradient norm to this value",
    "log_every": "write a line to CKPT/log.jsonl every K optimizer steps",
    "seed": "random seed (window order, initialisation of new parameters)",
    "device": "auto, cpu or cuda",
    "batch_size": "windows per micro-batch",
    "grad_accum": "micro-batches per optimizer step",
    "block_size": "window length in tokens",
    "valid": "validation corpus spec; chooses lambda and the best checkpoint",
    "valid_max_tokens": "validate on the first N tokens of --valid",
    "lambdas": "interpolation weights tried at validation",
    "eval_every": "validate every K optimizer steps",
    "patience": "with --valid: stop early once this many validations in a row found no better checkpoint "
                "(the schedule stays that of the full run; default: never stop early)",
    "save_every": "save a resumable checkpoint every K optimizer steps",
    "resume": "continue from CKPT/trainer_state if it exists; --no-resume starts the same run over (a checkpoint of "
              "another run in --out is refused either way)",
    "decoder": f"the memory decoder's shape, built from the base ({_shapes_help()}). A shape other than copy "
               f"shares the base's frozen trunk and saves only its own tensors; it trains from the base "
               f"(no --init or --init-layers)",
    "keep_trainer_state": "keep CKPT/trainer_state/ (optimizer state, for resume) once the run finishes; an "
                          "interrupted run always keeps it. Without it a finished run cannot be extended (e.g. "
                          "rerun with a larger --patience)",
    "save_dtype": f"dtype of the decoder's weights in the final checkpoint ({', '.join(SAVE_DTYPES)}; bfloat16 "
                  f"halves the file); trainer steps stay float32 so that resume is exact; loading casts to the "
                  f"base model's dtype",
}


def check_config(cfg: TrainConfig) -> None:
    """Reject every bad setting with one clear line, before anything is loaded or written."""
    check_unit_interval(cfg.alpha, "--alpha")
    check_unit_interval(cfg.teacher_base_weight, "--teacher-base-weight")
    if not cfg.lambdas:
        raise MemdecError("--lambdas needs at least one value in [0, 1]")
    for lam in cfg.lambdas:
        check_unit_interval(lam, "--lambdas")
    check_non_negative(cfg.lr, "--lr")
    check_unit_interval(cfg.min_lr_ratio, "--min-lr-ratio")
    check_positive(cfg.max_grad_norm, "--max-grad-norm")
    check_non_negative(cfg.weight_decay, "--weight-decay")
    check_non_negative(cfg.warmup, "--warmup")
    if cfg.max_steps is None and not (math.isfinite(cfg.epochs) and cfg.epochs > 0):
        raise MemdecError(f"--epochs must be a positive number, got {cfg.epochs}: the schedule has no steps")
    for flag, value in (("--max-steps", cfg.max_steps), ("--batch-size", cfg.batch_size),
                        ("--grad-accum", cfg.grad_accum), ("--block-size", cfg.block_size),
                        ("--eval-every", cfg.eval_every), ("--save-every", cfg.save_every),
                        ("--log-every", cfg.log_every), ("--patience", cfg.patience)):
        if value is not None:
            check_positive_int(value, flag)
    if cfg.patience is not None and not cfg.valid:
        raise MemdecError("--patience stops on the validation score: give --valid CORPUS")
    if cfg.valid_max_tokens < 2:
        raise MemdecError(f"--valid-max-tokens must be at least 2, got {cfg.valid_max_tokens}")
    if cfg.init is not None and cfg.init_layers is not None:
        raise MemdecError("give --init or --init-layers, not both")
    if cfg.init_layers is not None:
        check_positive_int(cfg.init_layers, "--init-layers")
    if cfg.layer_selection not in ("first", "spread"):
        raise MemdecError(f"unknown --layer-selection '{cfg.layer_selection}' (first or spread)")
    if cfg.save_dtype not in SAVE_DTYPES:
        raise MemdecError(f"unknown --save-dtype '{cfg.save_dtype}' ({', '.join(SAVE_DTYPES)})")
    check_seed(cfg.seed)
    check_device(cfg.device)


def check_decoder_shape(spec: str, model_spec: str, init: str | None = None,
                        init_layers: int | None = None) -> DecoderShape:
    """The shape ``--decoder spec`` names, checked against the base ``model_spec``'s config (its number
    of blocks...) on a weightless skeleton: one MemdecError line before any weights load. A shape
    other than copy is built from the base itself, so ``--init`` and ``--init-layers`` are refused."""
    try:
        shape = parse_shape(spec)
    except MemdecError as exc:
        raise MemdecError(f"--decoder: {exc}") from None
    if shape.full_model:
        return shape
    if init is not None or init_layers is not None:
        raise MemdecError(f"--decoder {spec} is built from the base model itself (its trunk is shared): "
                          f"--init and --init-layers apply to --decoder copy only")
    config = load_config(model_spec)  # first: reading it may convert or fetch the model, never under "meta"
    with torch.device("meta"):  # the architecture without any weights
        skeleton = AutoModelForCausalLM.from_config(config)
    try:
        shape.check(skeleton)
    except MemdecError as exc:
        raise MemdecError(f"--decoder: {exc}") from None
    return shape

