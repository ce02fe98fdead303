"""Building, loading and searching the faiss index over datastore keys.

Distances are **squared L2** everywhere: what faiss's L2 indexes return, and what kNN-LM puts
in its softmax, p ∝ exp(-d²/T).

Two kinds of index:

- ``flat``: ``faiss.IndexFlatL2``, exact. Used below ``flat_threshold`` keys (``auto``).
- ``ivfpq``: an inverted file of ``nlist`` lists with product-quantised codes (``pq_m`` bytes
  a vector) for the candidate search, then an exact re-ranking of ``refine × k`` candidates on
  fp16 copies of the keys (``faiss.IndexRefine`` over ``IndexScalarQuantizer(fp16)``). The
  returned distances are therefore exact up to fp16 rounding of the keys, which the keys on
  disk have anyway; ``refine=0`` gives plain IVF-PQ with approximate (PQ) distances.

faiss searches on all cores (``set_num_threads``); a GPU is used where faiss has one.
"""

from __future__ import annotations

import math
import os
from dataclasses import asdict, dataclass
from pathlib import Path

import faiss
import numpy as np

from .errors import DatastoreError

INDEX_KINDS = ("auto", "flat", "ivfpq")
FLAT_THRESHOLD = 100_000  # auto: exact search up to this many keys on CPU (N² d work)
FLAT_THRESHOLD_GPU = 2_000_000
GPU_MAX_K = 2048  # faiss GPU indexes return at most this many neighbours


@dataclass
class IndexParams:
    """The choices behind an index; stored in the manifest."""

    kind: str  # "flat" | "ivfpq"
    nlist: int | None = None
    pq_m: int | None = None
    pq_bits: int | None = None
    refine: int | None = None  # re-rank refine*k candidates exactly; 0 = none
    nprobe: int | None = None  # default lists probed; search() may raise it for large k
    train_size: int | None = None
    seed: int = 0

    def to_json(self) -> dict:
        return {k: v for k, v in asdict(self).items() if v is not None}


def set_num_threads(n: int | None = None) -> int:
    """Let faiss use ``n`` threads (default: every core). Returns the number set."""
    n = n or os.cpu_count() or 1
    faiss.omp_set_num_threads(n)
    return n


def gpu_available() -> bool:
    return hasattr(faiss, "get_num_gpus") and faiss.get_num_gpus() > 0


def _largest_divisor_at_most(d: int, target: int) -> int:
    return max(m for m in range(1, min(d, max(target, 1)) + 1) if d % m == 0)


def choose_params(
    n: int,
    d: int,
    kind: str = "auto",
    *,
    nlist: int | None = None,
    pq_m: int | None = None,
    nprobe: int | None = None,
    refine: int | None = None,
    train_size: int | None = None,
    flat_threshold: int | None = None,
    seed: int = 0,
) -> IndexParams:
    """Resolve ``kind`` and fill in the IVF-PQ parameters from N and d (any given value wins).

    - nlist ≈ 4·√N, a power of two, with at least 39 training points per list;
    - pq_m: the largest divisor of d not above min(64, d/8) (≥ 8 dimensions per code byte);
    - pq_bits: 8, fewer only where the sample is too small to train 256 centroids;
    - train_size: max(64·nlist, 256·64) points, at most N;
    - refine 4 (PQ alone ranks too coarsely: recall ≈0.8 with 2, ≈0.97 with 4 on clustered data),
      nprobe max(16, nlist/64).
    """
    if kind not in INDEX_KINDS:
        raise DatastoreError(f"unknown index type '{kind}'; choose one of: {', '.join(INDEX_KINDS)}")
    if kind == "auto":
        if flat_threshold is None:
            flat_threshold = FLAT_THRESHOLD_GPU if gpu_available() else FLAT_THRESHOLD
        kind = "flat" if n <= flat_threshold else "ivfpq"
    if kind == "flat":
        return IndexParams("flat", seed=seed)
    if n < 2 * 39:
        raise DatastoreError(f"an ivfpq index needs at least 78 keys, the datastore has {n}; use --index flat")
    if nlist is None:
        nlist = 2 ** round(math.log2(max(4 * math.sqrt(n), 1)))
        nlist = max(1, min(nlist, n // 39))
    if train_size is None:
        train_size = max(64 * nlist, 256 * 64)
    train_size = min(train_size, n)
    if train_size < 39 * nlist:
        raise DatastoreError(f"ivfpq: {train_size} training points are too few for nlist={nlist} (need {39 * nlist})")
    if pq_m is None:
        pq_m = _largest_divisor_at_most(d, min(64, max(d // 8, 1)))
    if d % pq_m:
        raise DatastoreError(f"ivfpq: pq_m={pq_m} must divide the key dimension {d}")
    pq_bits = max(1, min(8, int(math.log2(train_size / 39))))
    refine = 4 if refine is None else refine
    nprobe = nprobe or max(16, nlist // 64)
    return IndexParams("ivfpq", nlist, pq_m, pq_bits, refine, min(nprobe, nlist), train_size, seed)


def auto_nprobe(index, k: int, base: int | None = None) -> int:
    """Lists to probe so that the probed lists hold about 4× the ``refine·k`` candidates needed.

    Large k (kNN-LM uses 1024) needs many more lists than the usual nprobe≈32 on small stores.
    """
    ivf = _ivf(index)
    if ivf is None:
        return 0
    factor = max(1, int(getattr(faiss.downcast_index(index), "k_factor", 1)))
    per_list = max(ivf.ntotal / ivf.nlist, 1.0)
    needed = math.ceil(4 * factor * k / per_list)
    return int(min(ivf.nlist, max(base or ivf.nprobe, needed)))


def _ivf(index):
    try:
        return faiss.extract_index_ivf(index)
    except RuntimeError:
        return None


def _iter_batches(n: int, batch: int):
    for i in range(0, n, batch):
        yield i, min(i + batch, n)


def _as_f32(x) -> np.ndarray:
    return np.ascontiguousarray(x, dtype=np.float32)


def build_index(
    keys: np.ndarray,
    kind: str = "auto",
    *,
    params: IndexParams | None = None,
    add_batch: int = 65_536,
    progress: bool = False,
    **choose_kwargs,
) -> faiss.Index:
    """Build a CPU faiss index over ``keys`` (float16/32 [N, d], may be a memmap).

    ``kind`` is auto|flat|ivfpq; ``choose_kwargs`` (nlist, pq_m, nprobe, refine, train_size,
    flat_threshold, seed) override the automatic choices of ``choose_params``. Keys are added in
    batches, so a memmapped store is never copied to fp32 whole. Pass ``params`` (from
    ``choose_params``) to record exactly what was built.
    """
    from tqdm.auto import tqdm

    n, d = keys.shape
    params = params or choose_params(n, d, kind, **choose_kwargs)
    if params.kind == "flat":
        index = faiss.IndexFlatL2(d)
    else:
        base = faiss.IndexIVFPQ(faiss.IndexFlatL2(d), d, params.nlist, params.pq_m, params.pq_bits)
        base.cp.seed = params.seed
        base.pq.cp.seed = params.seed
        if params.refine:
            index = faiss.IndexRefine(base, faiss.IndexScalarQuantizer(d, faiss.ScalarQuantizer.QT_fp16))
            index.k_factor = float(params.refine)
        else:
            index = base
        rng = np.random.default_rng(params.seed)
        sample = np.sort(rng.choice(n, size=params.train_size, replace=False))
        index.train(_as_f32(keys[sample]))
        _ivf(index).nprobe = params.nprobe
    with tqdm(total=n, desc="index", unit="key", disable=not progress, leave=False) as bar:
        for i, j in _iter_batches(n, add_batch):
            index.add(_as_f32(keys[i:j]))
            bar.update(j - i)
    return index


def save_index(index, path: str | os.PathLike) -> int:
    """Write ``index`` (CPU or GPU) to ``path`` atomically. Returns the file's size in bytes."""
    path = Path(path)
    if gpu_available():  # pragma: no cover - needs faiss-gpu
        try:
            index = faiss.index_gpu_to_cpu(index)
        except RuntimeError:
            pass  # already a CPU index
    tmp = path.with_name(f".{path.name}.tmp")
    faiss.write_index(index, str(tmp))
    os.replace(tmp, path)
    return path.stat().st_size


def load_index(path: str | os.PathLike, nprobe: int | None = None, gpu: bool | None = None):
    """Read an index written by ``save_index``; on a GPU where faiss has one (``gpu=None``).

    Raises DatastoreError on a missing or unreadable file.
    """
    path = Path(path)
    if not path.is_file():
        raise DatastoreError(f"{path}: no such index file")
    try:
        index = faiss.read_index(str(path))
    except RuntimeError as exc:
        raise DatastoreError(f"{path}: cannot read the faiss index (corrupt or truncated?): {str(exc).splitlines()[0]}") from None
    if nprobe is not None and _ivf(index) is not None:
        _ivf(index).nprobe = nprobe
    if gpu is None:
        gpu = gpu_available()
    return to_gpu(index) if gpu else index


def to_gpu(index):
    """The index on every GPU faiss sees, or unchanged where it cannot move (CPU build, IndexRefine)."""
    if not gpu_available():
        return index
    try:  # pragma: no cover - needs faiss-gpu
        return faiss.index_cpu_to_all_gpus(index)
    except (RuntimeError, AttributeError):  # pragma: no cover
        return index


def search(index, queries, k: int, nprobe: int | None = None, batch_size: int = 4096) -> tuple[np.ndarray, np.ndarray]:
    """k nearest keys of each query, nearest first.

    queries: float [B, d]. Returns (dists float32 [B, k] squared L2, ids int64 [B, k]); an id
    of -1 (distance +inf) marks a slot an approximate index could not fill. ``nprobe`` sets the
    IVF lists probed (ignored by flat indexes). faiss parallelises each batch over all cores.
    """
    queries = _as_f32(queries)
    if queries.ndim != 2 or queries.shape[1] != index.d:
        raise DatastoreError(f"queries must have shape [B, {index.d}], got {list(queries.shape)}")
    if k > index.ntotal:
        raise DatastoreError(f"k={k} neighbours asked of an index that holds {index.ntotal} keys")
    if k > GPU_MAX_K and gpu_available():  # pragma: no cover - GPU indexes stop at 2048
        try:
            index = faiss.index_gpu_to_cpu(index)
        except RuntimeError:
            pass
    ivf = _ivf(index)
    if nprobe is not None and ivf is not None:
        ivf.nprobe = int(nprobe)
    b = len(queries)
    dists = np.empty((b, k), dtype=np.float32)
    ids = np.empty((b, k), dtype=np.int64)
    for i, j in _iter_batches(b, batch_size):
        dists[i:j], ids[i:j] = index.search(queries[i:j], k)
    dists[ids < 0] = np.inf
    return dists, ids


def index_kind(index) -> str:
    """``flat`` or ``ivfpq``, from the index itself."""
    return "ivfpq" if _ivf(index) is not None else "flat"
