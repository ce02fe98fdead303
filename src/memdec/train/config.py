"""``memdec train``'s options: ``TrainConfig``, each declared once with its help and check (``TRAIN_HELP``:
the help by name).

``check_config`` rejects every bad setting with one clear line before anything loads;
``check_decoder_shape`` checks ``--decoder`` against the base model's config on a weightless
skeleton. ``SAVE_DTYPES``: the dtypes ``--save-dtype`` names.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch
from transformers import AutoModelForCausalLM

from ..checks import (check_device, check_non_negative, check_positive, check_positive_int, check_seed,
                      check_unit_interval)
from ..decoders import FULL_COPY, SHAPES, DecoderShape, parse_shape
from ..errors import MemdecError
from ..models import load_config
from ..options import check_options, help_of, option


SAVE_DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}


def _shapes_help() -> str:
    """The registered decoder shapes, each with its one-line ``summary``."""
    return "; ".join(f"{cls.summary}" for _, cls in sorted(SHAPES.items()))


def _check_valid_tokens(value, what: str) -> int:
    if value < 2:
        raise MemdecError(f"{what} must be at least 2, got {value}")
    return value


def _check_layer_selection(value, what: str) -> str:
    if value not in ("first", "spread"):
        raise MemdecError(f"unknown {what} '{value}' (first or spread)")
    return value


def _check_save_dtype(value, what: str) -> str:
    if value not in SAVE_DTYPES:
        raise MemdecError(f"unknown {what} '{value}' ({', '.join(SAVE_DTYPES)})")
    return value


@dataclass
class TrainConfig:
    """The options of one ``memdec train`` run, one flag per field, each declared once (``option``: its
    help, check and place in the run's fingerprint); ``TRAIN_HELP`` is their help by name."""

    datastore: str = option("datastore folder built by `memdec datastore` (its targets step must be done)")
    out: str = option("checkpoint folder: the best checkpoint, plus trainer_state/ for resume", identity=False)
    init: str | None = option(
        "initialise from this model spec (same tokenizer as the base): a memory decoder checkpoint, a dapt "
        "baseline or any model folder, e.g. a CE-trained decoder for a second, kNN phase (fresh optimizer and "
        "schedule; its weights' hash is part of the run, so resume starts from the same ones); "
        "default: a full copy of the base", None)
    init_layers: int | None = option("initialise from a shortened copy of the base model with N blocks", None,
                                     check=check_positive_int)
    layer_selection: str = option("with --init-layers: 'first' N blocks or 'spread' (evenly spaced)", "first",
                                  check=_check_layer_selection)
    alpha: float = option("weight of KL(p_kNN || p_mem); 1-alpha weighs next-token cross-entropy", 0.5,
                          check=check_unit_interval)
    teacher_base_weight: float = option(  # β: the teacher is (1−β)·p_kNN + β·p_base
        "mix the base model's distribution into the kNN teacher: (1-b)*p_kNN + b*p_base "
        "(costs a frozen base forward per step)", 0.0, check=check_unit_interval, before=0.0)
    epochs: float = option("passes over the datastore's windows (ignored if --max-steps is set)", 1.0)
    max_steps: int | None = option("optimizer steps to run", None, check=check_positive_int)
    lr: float = option("peak learning rate (AdamW) of a full copy; a shape's own scale multiplies it (lora: 30x)", 1e-4,
                       check=check_non_negative)  # the scale: DecoderShape.lr_scale (memdec.decoders.lora.LR_SCALE)
    min_lr_ratio: float = option("cosine decay ends at lr * this", 0.1, check=check_unit_interval)
    warmup: int = option("linear warm-up steps", 10, check=check_non_negative)
    weight_decay: float = option("AdamW weight decay of the matrices (norms and biases get none)", 0.0,
                                 check=check_non_negative)
    max_grad_norm: float = option("clip the global gradient norm to this value", 1.0, check=check_positive)
    batch_size: int = option("windows per micro-batch", 2, check=check_positive_int)
    grad_accum: int = option("micro-batches per optimizer step", 1, check=check_positive_int)
    block_size: int = option("window length in tokens", 512, check=check_positive_int)
    valid: str | None = option("validation corpus spec; chooses lambda and the best checkpoint", None)
    valid_max_tokens: int = option("validate on the first N tokens of --valid", 4096, check=_check_valid_tokens)
    lambdas: list[float] = option("interpolation weights tried at validation", check=check_unit_interval, each=True,
                                  default_factory=lambda: [0.1, 0.2, 0.3, 0.4, 0.5, 0.6, 0.7, 0.8, 0.9, 0.95])
    eval_every: int = option("validate every K optimizer steps", 50, check=check_positive_int, identity=False)
    patience: int | None = option(
        "with --valid: stop early once this many validations in a row found no better checkpoint "
        "(the schedule stays that of the full run; default: never stop early)", None, check=check_positive_int,
        identity=False)
    save_every: int = option("save a resumable checkpoint every K optimizer steps", 50, check=check_positive_int,
                             identity=False)
    log_every: int = option("write a line to CKPT/log.jsonl every K optimizer steps", 1, check=check_positive_int,
                            identity=False)
    seed: int = option("random seed (window order, initialisation of new parameters)", 0, check=check_seed)
    device: str = option("auto, cpu or cuda", "auto", check=check_device, identity=False)
    resume: bool = option("continue from CKPT/trainer_state if it exists; --no-resume starts the same run over (a "
                          "checkpoint of another run in --out is refused either way)", True, identity=False)
    decoder: str = option(f"the memory decoder's shape, built from the base ({_shapes_help()}). A shape other than "
                          f"copy shares the base's frozen trunk and saves only its own tensors; it trains from the "
                          f"base (no --init or --init-layers)", FULL_COPY, before=FULL_COPY)
    keep_trainer_state: bool = option(
        "keep CKPT/trainer_state/ (optimizer state, for resume) once the run finishes; an interrupted run always "
        "keeps it. Without it a finished run cannot be extended (e.g. rerun with a larger --patience)", False,
        identity=False)
    save_dtype: str = option(f"dtype of the decoder's weights in the final checkpoint ({', '.join(SAVE_DTYPES)}; "
                             f"bfloat16 halves the file); trainer steps stay float32 so that resume is exact; loading "
                             f"casts to the base model's dtype", "float32", check=_check_save_dtype, identity=False)


TRAIN_HELP = help_of(TrainConfig)  # each option's help, by field name (declared once, on TrainConfig)


def check_config(cfg: TrainConfig) -> None:
    """Reject every bad setting with one clear line, before anything is loaded or written: each option
    through the check declared beside it (``check_options``), then what depends on several."""
    if not cfg.lambdas:
        raise MemdecError("--lambdas needs at least one value in [0, 1]")
    check_options(cfg)
    if cfg.max_steps is None and not (math.isfinite(cfg.epochs) and cfg.epochs > 0):
        raise MemdecError(f"--epochs must be a positive number, got {cfg.epochs}: the schedule has no steps")
    if cfg.patience is not None and not cfg.valid:
        raise MemdecError("--patience stops on the validation score: give --valid CORPUS")
    if cfg.init is not None and cfg.init_layers is not None:
        raise MemdecError("give --init or --init-layers, not both")


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

