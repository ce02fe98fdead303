"""A run's plan: its windows and steps (``RunPlan``, ``planned_steps``) and its identity (``run_fingerprint``).

What makes two runs the same run is everything but budget-free knobs; a resume, and ``memdec adapt``'s
cache, take up a run only where its fingerprint matches.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import numpy as np

from ..errors import MemdecError
from ..options import fingerprint, fingerprint_fields
from .config import TrainConfig
from .windows import window_starts


def planned_steps(cfg: TrainConfig, n_positions: int, world: int = 1) -> int:
    """Optimizer steps of a run over ``n_positions`` training positions: ``--max-steps``, else
    ``--epochs`` passes over its windows (what a budget of "the same steps" means)."""
    if cfg.max_steps is not None:
        return cfg.max_steps
    n_windows = len(window_starts(n_positions, min(cfg.block_size, n_positions)))
    return math.ceil(cfg.epochs * n_windows / (cfg.batch_size * cfg.grad_accum * world))


LATER_ENTRIES = {"init_hash": None, "lr_scale": 1.0}  # entries added after the first version, and their value before


def run_fingerprint(cfg: TrainConfig, manifest_hash: str, init_hash: str | None = None, lr_scale: float = 1.0,
                    options: dict | None = None) -> str:
    """What makes two training runs the same run: every option that makes another run (``TrainConfig``'s
    fields but those declared ``identity=False``: the folder, the device, save and log intervals...),
    the data's hash, ``init_hash`` (the ``model_fingerprint`` of ``--init``, so that a resume starts from
    the very weights the run began with) and ``lr_scale`` (the decoder shape's own, lora's); ``options``:
    a recipe's own (``Recipe.run_options``: a transfer's source), over the fields of the same name. One
    versioned rule (``memdec.options.fingerprint``) keeps the fingerprints of runs made before an entry
    existed: it enters only when it differs from its value before (``before`` beside each field,
    ``LATER_ENTRIES`` here)."""
    payload = {**fingerprint_fields(cfg), **(options or {}), "init_hash": init_hash, "lr_scale": lr_scale,
               "datastore_manifest_hash": manifest_hash}
    return fingerprint(payload, before=LATER_ENTRIES)


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
