"""What the faiss kinds (``flat``, ``ivfpq``, ``ivfpq-disk``) share: the lazy faiss import, threads
and GPUs, the faiss file (``FaissKind``: save, load, search settings, the move to a GPU).

faiss is imported lazily (``_faiss``), so memdec imports and works without it. faiss searches on
all cores (``set_num_threads``); a GPU is used where faiss has one.
"""

from __future__ import annotations

import ctypes
import os
import sys
from contextlib import contextmanager
from pathlib import Path

import numpy as np
from tqdm.auto import tqdm

from ..errors import DatastoreError
from ..files import atomic_write
from .base import IndexKind, IndexParams, as_f32, iter_batches, kind_of

GPU_MAX_K = 2048  # faiss GPU indexes return at most this many neighbours


def _faiss():
    """The faiss module; DatastoreError with the install command where it is missing."""
    try:
        import faiss
    except ImportError:
        raise DatastoreError("faiss is not installed: pip install faiss-cpu (or build with --index torch, "
                             "exact search with torch that needs no faiss)") from None
    return faiss


def faiss_available() -> bool:
    try:
        _faiss()
    except DatastoreError:
        return False
    return True


def set_num_threads(n: int | None = None) -> int:
    """Let faiss use ``n`` threads (default: every core; nothing to set without faiss). Returns n."""
    n = n or os.cpu_count() or 1
    if faiss_available():
        _faiss().omp_set_num_threads(n)
    return n


def gpu_available() -> bool:
    """Whether faiss has a GPU (faiss-gpu and a device); False without faiss."""
    if not faiss_available():
        return False
    faiss = _faiss()
    return hasattr(faiss, "get_num_gpus") and faiss.get_num_gpus() > 0


def is_faiss(index) -> bool:
    """Whether ``index`` is a faiss index (False without faiss)."""
    return faiss_available() and isinstance(index, _faiss().Index)


def ivf(index):
    """The IVF part of a faiss index (under an ``IndexRefine`` too); None for any other index."""
    if not is_faiss(index):
        return None
    try:
        return _faiss().extract_index_ivf(index)
    except RuntimeError:
        return None


def on_disk(index) -> bool:
    """Whether ``index`` is IVF with its inverted lists on disk (ivfpq-disk)."""
    lists = ivf(index)
    return lists is not None and isinstance(
        _faiss().downcast_InvertedLists(lists.invlists), _faiss().OnDiskInvertedLists
    )


@contextmanager
def _faiss_prints_to_stderr():
    """faiss's on-disk lists printf their resizes and moves to stdout; inside the block they go to
    stderr, so a command's stdout stays its own output."""
    sys.stdout.flush()
    saved = os.dup(1)
    try:
        os.dup2(2, 1)
        yield
    finally:
        ctypes.CDLL(None).fflush(None)
        os.dup2(saved, 1)
        os.close(saved)


def _write_faiss(index, path: Path) -> None:
    """``faiss.write_index`` through ``atomic_write``."""
    atomic_write(path, lambda tmp: _faiss().write_index(index, str(tmp)))


def add_keys(index, keys: np.ndarray, add_batch: int, progress: bool):
    """``index`` with ``keys`` (float16/32 [N, d], may be a memmap) added ``add_batch`` rows at a
    time, so a memmapped store is never copied to fp32 whole."""
    n = len(keys)
    with tqdm(total=n, desc="index", unit="key", disable=not progress, leave=False) as bar:
        for i, j in iter_batches(n, add_batch):
            index.add(as_f32(keys[i:j]))
            bar.update(j - i)
    return index


class FaissKind(IndexKind):
    """A kind stored as a faiss file (``faiss.write_index``), loaded by faiss wherever it is."""

    def build(self, keys: np.ndarray, params: IndexParams, *, add_batch: int = 65_536, progress: bool = False):
        return add_keys(self.empty(keys, params), keys, add_batch, progress)

    def empty(self, keys: np.ndarray, params: IndexParams):
        """The (trained) faiss index the keys are added to."""
        raise NotImplementedError

    def save(self, index, path: Path) -> None:
        faiss = _faiss()
        if gpu_available():  # pragma: no cover - needs faiss-gpu
            try:
                index = faiss.index_gpu_to_cpu(index)
            except RuntimeError:
                pass  # already a CPU index
        _write_faiss(index, path)

    def reads(self, head: bytes) -> bool:
        """Any file: faiss files share no prefix by which a corrupt one could be told apart, so a
        file no other kind reads goes to faiss, which names what is wrong with it."""
        return True

    def load(self, path: Path, *, nprobe: int | None = None, gpu: bool | None = None):
        """A faiss index from ``path``, on every GPU faiss has where ``gpu`` (None: where there is one)."""
        faiss = _faiss()
        try:  # an ivfpq-disk index finds its lists beside the file, wherever the folder has moved
            with _faiss_prints_to_stderr():
                index = faiss.read_index(str(path), faiss.IO_FLAG_ONDISK_SAME_DIR)
        except RuntimeError as exc:
            raise DatastoreError(f"{path}: cannot read the faiss index (corrupt or truncated?): "
                                 f"{str(exc).splitlines()[0]}") from None
        if nprobe is not None and ivf(index) is not None:
            ivf(index).nprobe = nprobe
        if gpu is None:
            gpu = gpu_available()
        return kind_of(index).to_gpu(index) if gpu else index

    def for_search(self, index, k: int, nprobe: int | None):
        if k > GPU_MAX_K and gpu_available():  # pragma: no cover - needs faiss-gpu
            try:  # faiss GPU indexes stop at 2048
                index = _faiss().index_gpu_to_cpu(index)
            except RuntimeError:
                pass
        lists = ivf(index)
        if nprobe is not None and lists is not None:
            lists.nprobe = int(nprobe)
        return index

    def to_gpu(self, index):
        """The index on every GPU faiss sees, or unchanged where it cannot (CPU build, IndexRefine)."""
        if not gpu_available():
            return index
        try:  # pragma: no cover - needs faiss-gpu
            return _faiss().index_cpu_to_all_gpus(index)
        except (RuntimeError, AttributeError):  # pragma: no cover
            return index
