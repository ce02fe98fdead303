"""What each step trains on: the windows of the token stream, their order, their batches, the lr.

Training windows are non-overlapping slices of the token stream (the last moved back to end at the
stream's end), aligned position for position with the datastore's CSR rows. The order of an epoch
is a pure function of (seed, epoch), so a resume needs nothing but the step count.
"""

from __future__ import annotations

import math

import numpy as np
import torch

from ..targets import KnnTargets


def window_starts(n_positions: int, block_size: int) -> np.ndarray:
    """Starts of non-overlapping training windows covering positions [0, n_positions).

    The last window is moved back to end at n_positions, so every position is trained on.
    Returns int64 [n_windows].
    """
    block = min(block_size, n_positions)
    starts = np.arange(0, n_positions - block + 1, block, dtype=np.int64)
    if starts[-1] + block < n_positions:
        starts = np.append(starts, n_positions - block)
    return starts


def collate(tokens: np.ndarray, targets: KnnTargets | None, starts: np.ndarray, block: int,
            need_targets: bool = True) -> dict:
    """One micro-batch of windows starting at ``starts``.

    Returns input_ids [B, T], labels [B, T] (the next tokens), and, when ``need_targets``,
    target_rows / target_ids / target_probs [nnz] indexing the flattened B*T positions.
    """
    positions = starts[:, None] + np.arange(block, dtype=np.int64)[None, :]  # [B, T]
    batch = {
        "input_ids": torch.from_numpy(tokens[positions].astype(np.int64)),
        "labels": torch.from_numpy(tokens[positions + 1].astype(np.int64)),
    }
    if need_targets:
        offsets, ids, probs = targets.gather(positions.reshape(-1))
        batch["target_rows"] = torch.from_numpy(np.repeat(np.arange(positions.size, dtype=np.int64), np.diff(offsets)))
        batch["target_ids"] = torch.from_numpy(ids.astype(np.int64))
        batch["target_probs"] = torch.from_numpy(probs.astype(np.float32))
    return batch


def epoch_order(n_windows: int, seed: int, epoch: int) -> np.ndarray:
    """The shuffled window order of one epoch; a pure function of (seed, epoch)."""
    return np.random.default_rng([seed, epoch]).permutation(n_windows)


def micro_batch_starts(starts: np.ndarray, seed: int, micro_index: int, batch_size: int, rank: int = 0,
                       world: int = 1) -> np.ndarray:
    """Window starts of global micro-batch ``micro_index`` for process ``rank`` of ``world``.

    Each global micro-batch holds batch_size*world windows in shuffled order; the epoch follows
    from the index, so a resume needs nothing but the step count.
    """
    per_global = batch_size * world
    per_epoch = max(len(starts) // per_global, 1)
    epoch, k = divmod(micro_index, per_epoch)
    order = epoch_order(len(starts), seed, epoch)
    picked = order[(k * per_global + np.arange(per_global)) % len(order)]
    return starts[picked[rank * batch_size : (rank + 1) * batch_size]]


def lr_at(step: int, total: int, warmup: int, min_ratio: float) -> float:
    """Multiplier of the peak lr at optimizer step ``step``: linear warm-up, then cosine decay."""
    if step < warmup:
        return (step + 1) / (warmup + 1)
    progress = min((step - warmup) / max(total - warmup, 1), 1.0)
    return min_ratio + (1 - min_ratio) * 0.5 * (1 + math.cos(math.pi * progress))
