"""Sparse kNN target distributions: from neighbours to CSR rows on disk.

For a position p with neighbours j = 1..k (its own entry excluded) at squared L2 distances d_j
holding value tokens v_j, the kNN-LM distribution is

    p_knn(v) = Σ_j softmax(-d / T)_j · [v_j = v]

Only the distinct tokens among the v_j have mass, so a row holds at most k entries. Rows are kept
in CSR form: ``offsets`` int64 [N+1], ``token_ids`` int32 [nnz], ``probs`` float16 [nnz]; row p
is ``token_ids[offsets[p]:offsets[p+1]]``, in increasing token id order: a canonical order, so the
files are byte-identical whatever the search batch.

Probabilities are stored as float16 (``prob_dtype`` "float16", the default) or as 8-bit codes
(``"uint8"``): code c = round(16·ln(p_max / p)) relative to the row's most probable entry (code 0),
entries past code 255 (p < e^-16·p_max) dropped; the reader decodes p ∝ e^(-c/16) and renormalises
each row. The relative error is at most ±e^(1/32)−1 ≈ 3.2% an entry, whatever the row's shape.

Truncation keeps the ``top_m`` most probable tokens of a row (all by default) and renormalises.
Entries that fp16 would store as 0 (p < 2^-25) are dropped as well. The KL lost to truncation is
reported as KL(p_M ‖ p) = -log Σ_{kept v} p(v), the divergence of the stored row p_M from the
full one (KL(p ‖ p_M) is infinite whenever a token is dropped).

Everything here is vectorised over rows: a sort of each row's values, run boundaries, and
``np.add.reduceat`` of the weights. Nothing vocabulary-sized is ever built. ``knn_distribution_torch``
and ``drop_self_torch`` do the same on torch tensors, on the GPU that searched the neighbours.
"""

from __future__ import annotations

import os
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch

from .checks import check_temperature
from .errors import DatastoreError
from .files import check_npy

FP16_ZERO = 2.0**-25  # probabilities below this round to 0 in float16
TARGETS_DIR = "targets"
PROB_DTYPES = ("float16", "uint8")  # how target probabilities are stored
LOG_CODE_STEPS = 16.0  # uint8 probabilities: codes per nat below the row's most probable entry


# --- neighbours -> distributions -------------------------------------------------------------


def drop_self(dists: np.ndarray, ids: np.ndarray, query_ids: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """Remove each query's own entry from its k+1 neighbours, by id (duplicate keys exist).

    dists [B, k+1], ids [B, k+1] int64, query_ids [B]. A row whose own id is not among its
    neighbours (approximate search, or many exact duplicates) loses its last, farthest entry
    instead. Returns (dists [B, k], ids [B, k]) in the original order.
    """
    b, k1 = ids.shape
    is_self = ids == np.asarray(query_ids, dtype=np.int64)[:, None]
    drop = np.where(is_self.any(axis=1), is_self.argmax(axis=1), k1 - 1)
    keep = np.ones((b, k1), dtype=bool)
    keep[np.arange(b), drop] = False
    return dists[keep].reshape(b, k1 - 1), ids[keep].reshape(b, k1 - 1)


def lookup_values(ids: np.ndarray, values: np.ndarray) -> np.ndarray:
    """values[ids] as int32, with -1 where the id is -1 (an empty slot). ids [B, k] -> [B, k]."""
    out = np.asarray(values)[np.clip(ids, 0, None)].astype(np.int32, copy=False)
    return np.where(ids >= 0, out, np.int32(-1))


def knn_weights(dists: np.ndarray, valid: np.ndarray, temperature: float) -> np.ndarray:
    """softmax(-d / T) over the valid entries of each row; float64 [B, k], 0 where invalid."""
    check_temperature(temperature, "the kNN temperature", DatastoreError)
    logits = np.where(valid, -np.asarray(dists, dtype=np.float64) / temperature, -np.inf)
    top = logits.max(axis=1, keepdims=True)
    top[~np.isfinite(top)] = 0.0
    w = np.exp(logits - top)
    total = w.sum(axis=1, keepdims=True)
    return np.divide(w, total, out=np.zeros_like(w), where=total > 0)


def aggregate_by_token(dists: np.ndarray, neighbour_values: np.ndarray, temperature: float):
    """Sum the softmax weights of each row per distinct value token.

    dists float [B, k] (squared L2), neighbour_values int [B, k] (-1 = empty slot).
    Returns (rows int64 [S], tokens int32 [S], probs float64 [S]) sorted by (row, token), one
    entry per distinct token of each row; each row's probs sum to 1.
    """
    values = np.asarray(neighbour_values)
    b, k = values.shape
    w = knn_weights(dists, values >= 0, temperature)
    order = np.argsort(values, axis=1, kind="stable")
    sv = np.take_along_axis(values, order, axis=1)
    sw = np.take_along_axis(w, order, axis=1)
    run_start = np.ones((b, k), dtype=bool)
    run_start[:, 1:] = sv[:, 1:] != sv[:, :-1]
    starts = np.flatnonzero(run_start)  # every row starts a run, so no run crosses rows
    probs = np.add.reduceat(sw.ravel(), starts)
    tokens = sv.ravel()[starts].astype(np.int32, copy=False)
    rows = starts // k
    keep = tokens >= 0
    return rows[keep], tokens[keep], probs[keep]


def knn_distribution(
    dists: np.ndarray,
    neighbour_values: np.ndarray,
    temperature: float,
    top_m: int | None = None,
    *,
    min_prob: float = FP16_ZERO,
    return_kept_mass: bool = False,
):
    """Sparse kNN distributions of a batch of rows, in CSR form.

    dists float [B, k] squared L2; neighbour_values int [B, k] (-1 = empty slot).
    Keeps each row's ``top_m`` most probable tokens (all if None) whose probability is at least
    ``min_prob``, renormalised. Returns (offsets int64 [B+1], token_ids int32 [nnz],
    probs float32 [nnz]), each row by token id; with ``return_kept_mass``, also the
    mass each row kept before renormalising, float64 [B] (KL lost = -log of it).
    """
    values = np.asarray(neighbour_values)
    b = values.shape[0]
    if top_m is not None and top_m < 1:
        raise DatastoreError(f"top-m must be at least 1, got {top_m}")
    rows, tokens, probs = aggregate_by_token(dists, values, temperature)
    order = np.lexsort((tokens, -probs, rows))  # by row, then probability desc, then token
    rows, tokens, probs = rows[order], tokens[order], probs[order]
    first = np.ones(len(rows), dtype=bool)
    first[1:] = rows[1:] != rows[:-1]
    keep = (probs >= min_prob) | first  # a row always keeps its most probable token
    if top_m is not None:
        row_first = np.searchsorted(rows, np.arange(b))
        rank = np.arange(len(rows)) - row_first[rows]
        keep &= rank < top_m
    rows, tokens, probs = rows[keep], tokens[keep], probs[keep]
    by_token = np.lexsort((tokens, rows))  # the stored order: by token id, whatever the search's rounding
    rows, tokens, probs = rows[by_token], tokens[by_token], probs[by_token]
    kept = np.bincount(rows, weights=probs, minlength=b)
    probs = probs / kept[rows]
    offsets = np.zeros(b + 1, dtype=np.int64)
    np.cumsum(np.bincount(rows, minlength=b), out=offsets[1:])
    out = (offsets, tokens.astype(np.int32, copy=False), probs.astype(np.float32))
    return (*out, kept) if return_kept_mass else out


def drop_self_torch(dists, ids, query_ids):
    """``drop_self`` on torch tensors (one device): dists [B, k+1], ids int64 [B, k+1],
    query_ids int64 [B] -> (dists [B, k], ids [B, k]), each row's own entry removed (its
    farthest where its own id is absent), order kept."""
    b, k1 = ids.shape
    pos = torch.arange(k1, device=ids.device)
    first_self = torch.where(ids == query_ids[:, None], pos, k1).amin(dim=1)
    drop = torch.where(first_self < k1, first_self, k1 - 1)
    keep = pos[None, :] != drop[:, None]
    return dists[keep].view(b, k1 - 1), ids[keep].view(b, k1 - 1)


def _segment_sums_torch(weights, run_start):
    """Inclusive sums of ``weights`` float64 [B, k] within runs (``run_start`` bool [B, k] marks
    each run's first entry): a log2(k)-step scan, so a run's last entry holds the run's sum.
    Deterministic on CUDA, unlike a float scatter_add (atomics), so reruns write equal bytes."""
    k = weights.shape[1]
    run_id = torch.cumsum(run_start, dim=1)
    sums, shift = weights.clone(), 1
    while shift < k:
        same = run_id[:, shift:] == run_id[:, :-shift]
        sums[:, shift:] = sums[:, shift:] + torch.where(same, sums[:, :-shift], 0.0)
        shift *= 2
    return sums


def knn_distribution_torch(
    dists,
    neighbour_values,
    temperature: float,
    top_m: int | None = None,
    *,
    min_prob: float = FP16_ZERO,
    return_kept_mass: bool = False,
):
    """``knn_distribution`` on torch tensors (any device), with the same CSR result in numpy.

    dists float [B, k] squared L2; neighbour_values int [B, k] (-1 = empty slot), on one device.
    Returns (offsets int64 [B+1], token_ids int32 [nnz], probs float32 [nnz]) and, with
    ``return_kept_mass``, kept float64 [B]; each row by token id. Weights are
    float64; each row's values are sorted, runs summed by ``_segment_sums_torch``, and the run
    totals sorted per row (stable, so ties stay in token order): no loop over rows.
    """
    if top_m is not None and top_m < 1:
        raise DatastoreError(f"top-m must be at least 1, got {top_m}")
    check_temperature(temperature, "the kNN temperature", DatastoreError)
    values = torch.as_tensor(neighbour_values, device=dists.device).long()
    b, k = values.shape
    valid = values >= 0
    w = torch.softmax((-dists.double() / temperature).masked_fill(~valid, float("-inf")), dim=1)
    w = torch.where(valid, w, 0.0)  # rows without a valid slot: 0, not NaN
    sv, order = torch.sort(values, dim=1, stable=True)
    run_start = torch.ones_like(sv, dtype=torch.bool)
    run_start[:, 1:] = sv[:, 1:] != sv[:, :-1]
    run_end = torch.ones_like(run_start)
    run_end[:, :-1] = run_start[:, 1:]
    sums = _segment_sums_torch(torch.gather(w, 1, order), run_start)
    totals = torch.where(run_end & (sv >= 0), sums, -1.0)  # one entry per distinct token, -1 elsewhere
    probs, by_prob = torch.sort(totals, dim=1, descending=True, stable=True)
    tokens = torch.gather(sv, 1, by_prob)
    rank = torch.arange(k, device=values.device)[None, :]
    keep = (probs >= 0) & ((probs >= min_prob) | (rank == 0))  # a row always keeps its most probable token
    if top_m is not None:
        keep &= rank < top_m
    kept = torch.where(keep, probs, 0.0).sum(dim=1)
    offsets = torch.zeros(b + 1, dtype=torch.int64, device=values.device)
    offsets[1:] = torch.cumsum(keep.sum(dim=1), dim=0)
    # the stored order: kept entries by token id (dropped ones sort last, after every real id)
    sort_key = torch.where(keep, tokens, torch.iinfo(torch.int64).max)
    sort_key, by_token = torch.sort(sort_key, dim=1, stable=True)
    tokens, probs, keep = sort_key, torch.gather(probs, 1, by_token), torch.gather(keep, 1, by_token)
    out = (offsets.cpu().numpy(), tokens[keep].int().cpu().numpy(),
           (probs / kept[:, None])[keep].float().cpu().numpy())
    return (*out, kept.cpu().numpy()) if return_kept_mass else out


def knn_target_logprob(dists, neighbour_values, targets, temperature: float):
    """log p_knn(target) of each row: log Σ_j softmax(-d/T)_j [v_j = target]; -inf if absent.

    dists [B, k] squared L2, neighbour_values [B, k] (-1 = empty slot), targets [B].
    Accepts numpy arrays (returns float32 numpy [B]) or torch tensors (returns float32 tensor
    [B] on their device).
    """
    check_temperature(temperature, "the kNN temperature", DatastoreError)
    if isinstance(dists, torch.Tensor):
        values = torch.as_tensor(neighbour_values, device=dists.device)
        valid = values >= 0
        logits = (-dists.double() / temperature).masked_fill(~valid, float("-inf"))
        logw = torch.log_softmax(logits, dim=-1)
        hit = values == torch.as_tensor(targets, device=dists.device).view(-1, 1)
        return torch.logsumexp(logw.masked_fill(~hit, float("-inf")), dim=-1).float()
    values = np.asarray(neighbour_values)
    valid = values >= 0
    logits = np.where(valid, -np.asarray(dists, dtype=np.float64) / temperature, -np.inf)
    top = logits.max(axis=1, keepdims=True)
    logw = logits - top - np.log(np.exp(logits - top).sum(axis=1, keepdims=True))
    hit = values == np.asarray(targets).reshape(-1, 1)
    masked = np.where(hit, logw, -np.inf)
    m = masked.max(axis=1, keepdims=True)
    m_safe = np.where(np.isfinite(m), m, 0.0)
    with np.errstate(divide="ignore"):
        out = np.log(np.exp(masked - m_safe).sum(axis=1)) + m_safe[:, 0]
    return out.astype(np.float32)


# --- 8-bit probabilities ---------------------------------------------------------------------


def _row_index(offsets: np.ndarray) -> np.ndarray:
    """The row of each CSR entry: int64 [nnz] from offsets int64 [B+1]."""
    offsets = np.asarray(offsets, dtype=np.int64)
    return np.repeat(np.arange(len(offsets) - 1, dtype=np.int64), np.diff(offsets))


def encode_log_u8(offsets: np.ndarray, token_ids: np.ndarray, probs: np.ndarray):
    """CSR rows with float probabilities -> the same rows with uint8 log codes.

    offsets int64 [B+1], token_ids int32 [nnz], probs float [nnz] (each non-empty row sums to 1).
    Code c = round(LOG_CODE_STEPS · ln(p_max / p)): 0 for the row's most probable entry; entries
    whose code would pass 255 are dropped. Returns (offsets int64 [B+1], token_ids int32 [nnz'],
    codes uint8 [nnz'], kept float64 [B]: the share of each row's mass the codes keep, 1 for an empty row).
    """
    offsets = np.asarray(offsets, dtype=np.int64)
    b, rows = len(offsets) - 1, _row_index(offsets)
    p = np.asarray(probs, dtype=np.float64)
    row_max = np.zeros(b)
    np.maximum.at(row_max, rows, p)
    with np.errstate(divide="ignore"):
        codes = np.rint(LOG_CODE_STEPS * (np.log(row_max[rows]) - np.log(p)))
    keep = codes <= 255
    total = np.bincount(rows, weights=p, minlength=b)
    kept = np.divide(np.bincount(rows[keep], weights=p[keep], minlength=b), total, out=np.ones(b), where=total > 0)
    new_offsets = np.zeros(b + 1, dtype=np.int64)
    np.cumsum(np.bincount(rows[keep], minlength=b), out=new_offsets[1:])
    return new_offsets, np.asarray(token_ids)[keep], codes[keep].astype(np.uint8), kept


def decode_log_u8(offsets: np.ndarray, codes: np.ndarray) -> np.ndarray:
    """uint8 log codes [nnz] of CSR rows (offsets int64 [B+1]) -> probabilities float32 [nnz],
    each non-empty row renormalised to sum to 1."""
    rows = _row_index(offsets)
    w = np.exp(-np.asarray(codes, dtype=np.float64) / LOG_CODE_STEPS)
    total = np.bincount(rows, weights=w, minlength=len(offsets) - 1)
    return (w / total[rows]).astype(np.float32)


# --- the CSR files ---------------------------------------------------------------------------

@dataclass
class KnnTargets:
    """The CSR kNN targets of a datastore, memory-mapped. Row p is the teacher for tokens[p+1]."""

    offsets: np.ndarray  # int64 [N+1]
    token_ids: np.ndarray  # int32 [nnz]
    probs: np.ndarray  # float16 [nnz], or uint8 log codes [nnz] (prob_dtype "uint8")
    k: int
    temperature: float
    top_m: int | None
    max_token_id: int = -1  # the largest stored token id (``validate_targets``)
    prob_dtype: str = "float16"

    def __len__(self) -> int:
        return len(self.offsets) - 1

    def _decoded(self, offsets: np.ndarray, stored: np.ndarray) -> np.ndarray:
        return decode_log_u8(offsets, stored) if self.prob_dtype == "uint8" else np.asarray(stored)

    def row(self, p: int) -> tuple[np.ndarray, np.ndarray]:
        """(token_ids int32 [n], probs [n]: float16, or float32 decoded from uint8) of position p."""
        a, b = int(self.offsets[p]), int(self.offsets[p + 1])
        return self.token_ids[a:b], self._decoded(np.array([0, b - a]), self.probs[a:b])

    def gather(self, positions) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
        """The rows of ``positions`` (int [P]) as one CSR batch: (offsets int64 [P+1],
        token_ids int32 [nnz], probs [nnz]: float16, or float32 decoded from uint8), gathered
        without a Python loop."""
        pos = np.asarray(positions, dtype=np.int64).ravel()
        starts, ends = self.offsets[pos], self.offsets[pos + 1]
        lens = ends - starts
        out = np.zeros(len(pos) + 1, dtype=np.int64)
        np.cumsum(lens, out=out[1:])
        idx = np.repeat(starts - out[:-1], lens) + np.arange(out[-1])
        return out, np.asarray(self.token_ids[idx]), self._decoded(out, self.probs[idx])

    def check_vocab(self, vocab_size: int, where: str) -> None:
        """DatastoreError unless every stored token id is below ``vocab_size`` (the model's logits)."""
        if self.max_token_id >= vocab_size:
            raise DatastoreError(f"{where}: the kNN targets hold token id {self.max_token_id}, but the model scores "
                                 f"only {vocab_size} tokens (corrupt targets, or another tokenizer)")


ROW_SUM_TOLERANCE = 2e-3  # fp16 storage: each entry is off by at most 2^-11 of itself
VALIDATE_ROWS = 1 << 20  # rows checked per chunk


def _check_u8_rows(off: np.ndarray, codes: np.ndarray, r0: int, where: str) -> None:
    """Each non-empty row of uint8 log codes must hold a 0, its most probable entry."""
    lens = np.diff(off)
    nonempty = lens > 0
    if nonempty.any():
        mins = np.minimum.reduceat(codes, (off[:-1] - off[0])[nonempty])
        if mins.any():
            row = r0 + int(np.flatnonzero(nonempty)[int(np.argmax(mins > 0))])
            raise DatastoreError(f"{where}: row {row} of the 8-bit kNN targets has no code 0 (its most probable "
                                 f"entry); the targets are corrupt: delete them and rerun memdec datastore")


def validate_targets(offsets: np.ndarray, token_ids: np.ndarray, probs: np.ndarray, where: str,
                     prob_dtype: str = "float16") -> int:
    """Check CSR targets chunk by chunk: offsets non-decreasing, token ids >= 0; float16
    probabilities finite and in [0, 1], every non-empty row summing to 1 within fp16 tolerance;
    uint8 codes with a 0 (the row's most probable entry) in every non-empty row.

    Returns the largest token id (-1 if none). Raises DatastoreError naming the first bad row.
    """
    n, max_id = len(offsets) - 1, -1
    for r0 in range(0, n, VALIDATE_ROWS):
        r1 = min(r0 + VALIDATE_ROWS, n)
        off = np.asarray(offsets[r0 : r1 + 1], dtype=np.int64)
        lens = np.diff(off)
        if (lens < 0).any():
            raise DatastoreError(f"{where}: target offsets decrease at row {r0 + int(np.argmax(lens < 0))} (corrupt)")
        ids = np.asarray(token_ids[off[0] : off[-1]])
        if ids.size and ids.min() < 0:
            raise DatastoreError(f"{where}: the kNN targets hold a negative token id (corrupt)")
        if ids.size:
            max_id = max(max_id, int(ids.max()))
        if prob_dtype == "uint8":
            _check_u8_rows(off, np.asarray(probs[off[0] : off[-1]]), r0, where)
            continue
        p = np.asarray(probs[off[0] : off[-1]], dtype=np.float32)
        bad = ~(np.isfinite(p) & (p >= 0) & (p <= 1))
        if bad.any():
            row = r0 + int(np.searchsorted(off, off[0] + int(np.argmax(bad)), side="right")) - 1
            raise DatastoreError(f"{where}: row {row} of the kNN targets holds a probability that is not in [0, 1] "
                                 f"({p[bad][0]}); the targets are corrupt: delete them and rerun memdec datastore")
        nonempty = lens > 0
        if nonempty.any():
            sums = np.add.reduceat(p, (off[:-1] - off[0])[nonempty])
            worst = int(np.argmax(np.abs(sums - 1)))
            if abs(sums[worst] - 1) > ROW_SUM_TOLERANCE:
                row = r0 + int(np.flatnonzero(nonempty)[worst])
                raise DatastoreError(f"{where}: row {row} of the kNN targets sums to {sums[worst]:.4f}, not 1; the "
                                     f"targets are corrupt: delete them and rerun memdec datastore")
    return max_id


def load_targets(datastore_path: str | os.PathLike, *, n_keys: int, status: str | None, nnz: int | None,
                 k: int | None, temperature: float | None, top_m: int | None = None,
                 prob_dtype: str | None = None) -> KnnTargets:
    """Memory-map a datastore's kNN targets, as its manifest records them (``store.open_targets`` passes
    the fields): ``n_keys`` positions, and its targets step's ``status``, ``nnz`` stored entries, ``k``,
    ``temperature``, ``top_m`` and ``prob_dtype`` (None: float16, a step from before uint8). Raises
    DatastoreError unless the step is done, the files match the manifest and the rows pass
    ``validate_targets``."""
    root = Path(datastore_path)
    if status != "done":
        raise DatastoreError(f"{root}: the kNN targets are not built (status: {status or 'missing'}); "
                             f"run memdec datastore with --out {root}")
    n, nnz = int(n_keys), int(nnz)
    prob_dtype = prob_dtype or "float16"
    if prob_dtype not in PROB_DTYPES:
        raise DatastoreError(f"{root}: the manifest's target prob_dtype {prob_dtype!r} is not one of "
                             f"{', '.join(PROB_DTYPES)}")
    folder = root / TARGETS_DIR
    check_npy(folder / "offsets.npy", np.int64, (n + 1,), "target offsets")
    check_npy(folder / "token_ids.npy", np.int32, (nnz,), "target token ids")
    check_npy(folder / "probs.npy", prob_dtype, (nnz,), "target probabilities")
    offsets = np.load(folder / "offsets.npy", mmap_mode="r")
    if offsets[0] != 0 or offsets[-1] != nnz:
        raise DatastoreError(f"{folder}/offsets.npy: does not span the {nnz} stored entries (corrupt)")
    token_ids = np.load(folder / "token_ids.npy", mmap_mode="r")
    probs = np.load(folder / "probs.npy", mmap_mode="r")
    return KnnTargets(
        offsets=offsets,
        token_ids=token_ids,
        probs=probs,
        k=int(k),
        temperature=float(temperature),
        top_m=top_m,
        max_token_id=validate_targets(offsets, token_ids, probs, str(folder), prob_dtype),
        prob_dtype=prob_dtype,
    )
