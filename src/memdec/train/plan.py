"""A run's plan: its windows and steps (``RunPlan``, ``planned_steps``) and its identity (``run_fingerprint``).

What makes two runs the same run is everything but budget-free knobs; a resume, and ``memdec adapt``'s
cache, take up a run only where its fingerprint matches.
"""

from __future__ import annotations

import hashlib
import json
import math
from dataclasses import asdict, dataclass

import numpy as np

from ..decoders import is_full_copy
from ..errors import MemdecError
from .config import TrainConfig
from .windows import window_starts


def planned_steps(cfg: TrainConfig, n_positions: int, world: int = 1) -> int:
    """Optimizer steps of a run over ``n_positions`` training positions: ``--max-steps``, else
    ``--epochs`` passes over its windows (what a budget of "the same steps" means)."""
    if cfg.max_steps is not None:
        return cfg.max_steps
    n_windows = len(window_starts(n_positions, min(cfg.block_size, n_positions)))
    return math.ceil(cfg.epochs * n_windows / (cfg.batch_size * cfg.grad_accum * world))


def run_fingerprint(cfg: TrainConfig, manifest_hash: str, init_hash: str | None = None, lr_scale: float = 1.0) -> str:
    """What makes two training runs the same run: everything but budget-free knobs.

    ``init_hash``: the ``model_fingerprint`` of ``--init``, so that a resume starts from the very
    weights the run began with (a folder retrained in place is another run).
    """
    keep = asdict(cfg)
    for k in ("out", "device", "resume", "log_every", "eval_every", "save_every", "patience", "keep_trainer_state",
              "save_dtype"):
        keep.pop(k)
    if is_full_copy(keep["decoder"]):  # added later: copy runs keep their fingerprint
        keep.pop("decoder")
    if not keep["teacher_base_weight"]:  # added later: runs without it keep their fingerprint
        keep.pop("teacher_base_weight")
    if init_hash is not None:  # only with --init: other runs keep their fingerprint
        keep["init_hash"] = init_hash
    if lr_scale != 1.0:  # the decoder shape's own lr scale (lora): another run
        keep["lr_scale"] = lr_scale
    keep["datastore_manifest_hash"] = manifest_hash
    return hashlib.sha256(json.dumps(keep, sort_keys=True).encode()).hexdigest()[:16]


@dataclass(frozen=True)
class RunPlan:
    """The windows of a run over ``n_positions`` training positions and its optimizer steps."""

    block: int  # the window length: --block-size, or the whole stream where it is shorter
    starts: np.ndarray  # int64 [n_windows]: ``windows.window_starts``
    windows_per_step: int  # batch_size × grad_accum × processes
    total_steps: int

    @classmethod
    def of(cls, cfg: TrainConfig, n_positions: int, world: int = 1) -> RunPlan:
        """The plan of ``cfg`` on ``world`` processes; MemdecError (one line) where it has no steps."""
        block = min(cfg.block_size, n_positions)
        plan = cls(block=block, starts=window_starts(n_positions, block),
                   windows_per_step=cfg.batch_size * cfg.grad_accum * world,
                   total_steps=planned_steps(cfg, n_positions, world))
        if plan.total_steps < 1:
            raise MemdecError(f"the schedule has no steps: {len(plan.starts)} windows of {block} tokens, "
                              f"{plan.windows_per_step} per step, epochs={cfg.epochs}, max_steps={cfg.max_steps}")
        return plan
