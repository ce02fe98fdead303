"""Building, loading and searching the index over datastore keys.

Distances are **squared L2** everywhere: what faiss's L2 indexes return, and what kNN-LM puts
in its softmax, p ∝ exp(-d²/T).

Index kinds are plugins: each is an ``IndexKind`` (``base.py``) registered by its own module, and
the functions here only ask the registered kind. The built-in kinds, one module each:

- ``flat`` (``flat.py``): ``faiss.IndexFlatL2``, exact. Used below ``flat_threshold`` keys (``auto``).
- ``ivfpq`` (``ivfpq.py``): IVF-PQ candidates re-ranked exactly on fp16 keys (``IndexRefine``).
- ``ivfpq-disk`` (``ivfpq_disk.py``): the same IVF-PQ with its inverted lists memory-mapped from
  ``index.ivfdata`` beside ``index.faiss``; built shard by shard (``build_ondisk_index``).
- ``torch`` (``torch_flat.py``): ``TorchFlatIndex``, exact search with torch matmuls, on CUDA where
  there is one, without faiss; on disk a small JSON file naming the datastore's ``keys.npy``.

A new kind is one new module beside these (a subclass of ``IndexKind``, ``register``-ed at its end,
saying itself whether ``auto`` may pick it: ``auto_order``, ``picks_for``), found by ``registry.discover``
below, and its test. ``INDEX_KINDS`` lists ``auto`` and the built-in kinds;
``kind_names()`` every kind registered now.

faiss is imported lazily (``faiss_common._faiss``), so memdec imports and works without it.
"""

from __future__ import annotations

import os
from pathlib import Path

import numpy as np

from ..errors import DatastoreError
from ..registry import discover
from .base import (KINDS, IndexKind, IndexParams, Machine, as_f32, auto_pick, check_kind, get_kind, kind_names,
                   kind_of, kind_reading, iter_batches, named_kind, or_list, register, unregister)
from .faiss_common import GPU_MAX_K, faiss_available, gpu_available, set_num_threads
from .flat import FLAT_THRESHOLD, FLAT_THRESHOLD_GPU, FlatKind
from .ivfpq import IvfpqKind, auto_nprobe, train_ivfpq
from .ivfpq_disk import DISK_SHARD_KEYS, IVFDATA_SUFFIX, IvfpqDiskKind, build_ondisk_index, ivfdata_path
from .torch_flat import (TORCH_DIST_BYTES, TORCH_FORMAT, TorchFlatIndex, TorchKind, query_chunk_rows,
                         resolve_torch_device, squared_l2, torch_keys_fit_gpu)

__all__ = [
    "DISK_SHARD_KEYS", "FLAT_THRESHOLD", "FLAT_THRESHOLD_GPU", "FlatKind", "GPU_MAX_K", "INDEX_KINDS",
    "IVFDATA_SUFFIX", "IndexKind", "IndexParams", "IvfpqDiskKind", "IvfpqKind", "KINDS", "Machine",
    "TORCH_DIST_BYTES", "TORCH_FORMAT", "TorchFlatIndex", "TorchKind", "auto_kind", "auto_nprobe", "build_index",
    "build_ondisk_index", "check_kind", "choose_params", "faiss_available", "get_kind", "gpu_available",
    "index_kind", "ivfdata_path", "kind_names", "kind_of", "kinds_help", "load_index", "named_kind", "or_list",
    "query_chunk_rows", "register", "resolve_torch_device", "save_index", "search", "set_num_threads", "squared_l2",
    "to_gpu", "torch_keys_fit_gpu", "train_ivfpq", "unregister",
]

discover(__name__, __path__, skip=("base", "faiss_common"))  # every kind's module registers its kind
INDEX_KINDS = ("auto", *kind_names())  # the built-in kinds, "auto" first


def kinds_help() -> str:
    """``--index``'s help: ``auto`` and each registered kind with its description."""
    return or_list(["auto", *(f"{k} ({get_kind(k).description})" for k in kind_names())])


def auto_kind(n: int, d: int, flat_threshold: int | None = None) -> str:
    """The kind ``auto`` picks for N keys of dimension d on this machine: each kind says itself
    (``IndexKind.auto_order``, ``picks_for``); the built-in rule: ``torch`` without faiss, or with
    CUDA that faiss cannot use and room for the keys; else ``flat`` up to ``flat_threshold`` keys and
    ``ivfpq`` above."""
    return auto_pick(n, d, Machine(faiss_available(), gpu_available(), flat_threshold)).name


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
    """Resolve ``kind`` and ask it for its parameters from N and d (any given value wins).

    ``auto`` asks the kinds (``auto_kind``): ``torch`` where faiss is missing, or where CUDA is there,
    faiss has no GPU and the fp32 keys fit in half the free GPU memory; otherwise ``flat`` up to
    ``flat_threshold`` keys (100k on CPU, 2M on a faiss GPU) and ``ivfpq`` above. The IVF-PQ
    choices are ``ivfpq.ivfpq_params``'s; ``ivfpq-disk`` takes them with refine always 0 (its
    lists hold codes only); ``flat`` and ``torch`` take none.
    """
    if check_kind(kind) == "auto":
        kind = auto_kind(n, d, flat_threshold)
    return get_kind(kind).choose(n, d, nlist=nlist, pq_m=pq_m, nprobe=nprobe, refine=refine,
                                 train_size=train_size, seed=seed)


def build_index(
    keys: np.ndarray,
    kind: str = "auto",
    *,
    params: IndexParams | None = None,
    add_batch: int = 65_536,
    progress: bool = False,
    **choose_kwargs,
):
    """Build an index over ``keys`` (float16/32 [N, d], may be a memmap): a CPU faiss index, a
    ``TorchFlatIndex`` for kind ``torch``, or what another registered kind builds.

    ``kind`` is auto or a registered kind; ``choose_kwargs`` (nlist, pq_m, nprobe, refine,
    train_size, flat_threshold, seed) override the automatic choices of ``choose_params``. Keys are
    added in batches, so a memmapped store is never copied to fp32 whole. Pass ``params`` (from
    ``choose_params``) to record exactly what was built.
    """
    n, d = keys.shape
    params = params or choose_params(n, d, kind, **choose_kwargs)
    return get_kind(params.kind).build(keys, params, add_batch=add_batch, progress=progress)


def save_index(index, path: str | os.PathLike) -> int:
    """Write ``index`` (CPU or GPU) to ``path`` atomically, as its kind does. Returns the file's
    size in bytes.

    A ``TorchFlatIndex`` is written as a small JSON file that names ``keys.npy`` beside ``path``
    (the datastore's keys, which must hold the index's N × d keys).
    """
    path = Path(path)
    kind_of(index).save(index, path)
    return path.stat().st_size


def load_index(path: str | os.PathLike, nprobe: int | None = None, gpu: bool | None = None):
    """Read an index written by ``save_index``: the kind that reads its first bytes loads it; a faiss
    one on a GPU where faiss has one (``gpu=None``).

    A torch index goes to CUDA where its keys fit (``gpu=None``), to CUDA (True) or the CPU (False).
    Raises DatastoreError on a missing or unreadable file, or faiss missing for a faiss file.
    """
    path = Path(path)
    if not path.is_file():
        raise DatastoreError(f"{path}: no such index file")
    with open(path, "rb") as f:
        head = f.read(16)
    return kind_reading(head).load(path, nprobe=nprobe, gpu=gpu)


def to_gpu(index):
    """The index on every GPU faiss sees, or unchanged where it cannot move (CPU build, IndexRefine,
    ivfpq-disk, a TorchFlatIndex)."""
    return kind_of(index).to_gpu(index)


def search(index, queries, k: int, nprobe: int | None = None, batch_size: int = 4096) -> tuple[np.ndarray, np.ndarray]:
    """k nearest keys of each query, nearest first.

    queries: float [B, d]. Returns (dists float32 [B, k] squared L2, ids int64 [B, k]); an id
    of -1 (distance +inf) marks a slot an approximate index could not fill. ``nprobe`` sets the
    IVF lists probed (ignored by flat indexes). faiss parallelises each batch over all cores.
    """
    queries = as_f32(queries)
    if queries.ndim != 2 or queries.shape[1] != index.d:
        raise DatastoreError(f"queries must have shape [B, {index.d}], got {list(queries.shape)}")
    if k > index.ntotal:
        raise DatastoreError(f"k={k} neighbours asked of an index that holds {index.ntotal} keys")
    index = kind_of(index).for_search(index, k, nprobe)
    b = len(queries)
    dists = np.empty((b, k), dtype=np.float32)
    ids = np.empty((b, k), dtype=np.int64)
    for i, j in iter_batches(b, batch_size):
        dists[i:j], ids[i:j] = index.search(queries[i:j], k)
    dists[ids < 0] = np.inf
    return dists, ids


def index_kind(index) -> str:
    """The name of the registered kind of ``index`` (``flat``, ``ivfpq``, ``ivfpq-disk``, ``torch``,
    ...), from the index itself."""
    return kind_of(index).name
