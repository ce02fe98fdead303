"""``torch``: ``TorchFlatIndex``, exact search with torch matmuls, on CUDA where there is one. It
needs no faiss: ``auto`` picks it where faiss is not installed, and where CUDA is there but faiss
cannot use it (pip only has faiss-cpu) while the keys fit in half the free GPU memory. On disk it
is a small JSON file that points at the datastore's ``keys.npy`` beside it, so it needs those keys
at search time (``needs_keys_at_search``).
"""

from __future__ import annotations

import json
from contextlib import contextmanager
from pathlib import Path

import numpy as np
import torch

from ..errors import DatastoreError
from ..files import atomic_write_text, read_json
from .base import IndexKind, IndexParams, Machine, as_f32, iter_batches, register

TORCH_FORMAT = "memdec-torch-flat"  # the "format" of a torch index's JSON file
TORCH_DIST_BYTES = 2**31  # a TorchFlatIndex search holds at most this much of [queries, N] distances


def torch_keys_fit_gpu(n: int, d: int) -> bool:
    """Whether N fp32 keys of dimension d take at most half of the free CUDA memory."""
    if not torch.cuda.is_available():
        return False
    free, _ = torch.cuda.mem_get_info()
    return 4 * n * d <= free // 2


def resolve_torch_device(device: str, n: int, d: int) -> torch.device:
    """``auto``: CUDA where the fp32 keys fit in half its free memory, else the CPU."""
    if device == "auto":
        device = "cuda" if torch_keys_fit_gpu(n, d) else "cpu"
    return torch.device(device)


@contextmanager
def _exact_fp32_matmul():
    """fp32 matmuls at full precision (no TF32 / bf16 passes) inside the block."""
    previous = torch.get_float32_matmul_precision()
    torch.set_float32_matmul_precision("highest")
    try:
        yield
    finally:
        torch.set_float32_matmul_precision(previous)


def query_chunk_rows(n_keys: int, max_bytes: int = TORCH_DIST_BYTES) -> int:
    """Queries per chunk so that the fp32 distances [rows, N] stay within ``max_bytes``."""
    return max(1, max_bytes // (4 * max(n_keys, 1)))


def squared_l2(queries: torch.Tensor, keys: torch.Tensor, key_sq_norms: torch.Tensor) -> torch.Tensor:
    """|q|² − 2 q·k + |k|², clamped at 0: float32 [B, N] from queries [B, d], keys [N, d] and
    key_sq_norms [N], all fp32 on one device. Call under ``_exact_fp32_matmul``."""
    dist = queries @ keys.T
    dist.mul_(-2.0).add_(queries.pow(2).sum(dim=1, keepdim=True)).add_(key_sq_norms)
    return dist.clamp_min_(0.0)


class TorchFlatIndex:
    """Exact squared-L2 search with torch, on CUDA where available: the faiss surface memdec uses.

    keys: float16/32 array [N, d] (may be a memmap), uploaded in chunks of ``upload_batch`` rows
    and kept on ``device`` as fp32 [N, d] with their squared norms [N]. ``.d``, ``.ntotal`` and
    ``.search(queries float32 [B, d], k) -> (dists float32 [B, k], ids int64 [B, k])`` behave as
    faiss's ``IndexFlatL2`` (nearest first, never an empty slot); ``search_torch`` does the same
    on tensors and returns tensors on ``device``. Memory: 4·N·d bytes of keys plus at most
    ``TORCH_DIST_BYTES`` of distances per query chunk.
    """

    def __init__(self, keys: np.ndarray, device: str = "auto", upload_batch: int = 65_536):
        n, d = keys.shape
        self.keys = torch.empty((n, d), dtype=torch.float32, device=resolve_torch_device(device, n, d))
        self.device = self.keys.device  # with its index: cuda:0, not cuda
        self.key_sq_norms = torch.empty(n, dtype=torch.float32, device=self.device)
        for i, j in iter_batches(n, upload_batch):
            chunk = torch.from_numpy(np.array(keys[i:j])).to(self.device).float()
            self.keys[i:j] = chunk
            self.key_sq_norms[i:j] = chunk.pow(2).sum(dim=1)

    @property
    def d(self) -> int:
        return int(self.keys.shape[1])

    @property
    def ntotal(self) -> int:
        return int(self.keys.shape[0])

    def search_torch(self, queries: torch.Tensor, k: int) -> tuple[torch.Tensor, torch.Tensor]:
        """k nearest keys of queries float [B, d] (any device): (dists float32 [B, k] squared L2,
        ids int64 [B, k]) on ``self.device``, nearest first."""
        if queries.ndim != 2 or queries.shape[1] != self.d:
            raise DatastoreError(f"queries must have shape [B, {self.d}], got {list(queries.shape)}")
        if not 0 < k <= self.ntotal:
            raise DatastoreError(f"k={k} neighbours asked of an index that holds {self.ntotal} keys")
        queries = queries.to(self.device, torch.float32)
        dists = torch.empty((len(queries), k), dtype=torch.float32, device=self.device)
        ids = torch.empty((len(queries), k), dtype=torch.int64, device=self.device)
        with _exact_fp32_matmul():
            for i, j in iter_batches(len(queries), query_chunk_rows(self.ntotal)):
                dist = squared_l2(queries[i:j], self.keys, self.key_sq_norms)
                dists[i:j], ids[i:j] = torch.topk(dist, k, dim=1, largest=False, sorted=True)
        return dists, ids

    def search(self, queries: np.ndarray, k: int) -> tuple[np.ndarray, np.ndarray]:
        """faiss's ``search``: queries float32 [B, d] -> (dists float32 [B, k], ids int64 [B, k])."""
        dists, ids = self.search_torch(torch.from_numpy(as_f32(queries)), k)
        return dists.cpu().numpy(), ids.cpu().numpy()


def _torch_index_json(index: TorchFlatIndex) -> str:
    return json.dumps({"format": TORCH_FORMAT, "keys": "keys.npy", "n": index.ntotal, "d": index.d}) + "\n"


def _open_npy_keys(path: Path, what: Path) -> np.ndarray:
    """Memory-map the keys a torch index file points at; DatastoreError naming ``what``."""
    try:
        return np.load(path, mmap_mode="r")
    except (OSError, ValueError) as exc:
        raise DatastoreError(f"{what}: cannot read its keys {path} (missing or truncated?): {exc}") from None


def _save_torch_index(index: TorchFlatIndex, path: Path) -> None:
    """Write the JSON that points at ``keys.npy`` beside ``path``, which must hold the index's keys."""
    keys = _open_npy_keys(path.parent / "keys.npy", path)
    if keys.shape != (index.ntotal, index.d):
        raise DatastoreError(f"{path}: a torch index is saved beside its keys, but {path.parent / 'keys.npy'} "
                             f"holds {list(keys.shape)}, not the index's [{index.ntotal}, {index.d}]")
    atomic_write_text(path, _torch_index_json(index))


def _torch_index_fields(meta) -> tuple[str, int, int] | None:
    """(keys file name beside the index, n, d) from a torch index's JSON; None if it is not one."""
    if not isinstance(meta, dict) or meta.get("format") != TORCH_FORMAT:
        return None
    name, n, d = meta.get("keys"), meta.get("n"), meta.get("d")
    if not (isinstance(name, str) and Path(name).name == name and isinstance(n, int) and isinstance(d, int)):
        return None
    return name, n, d


def _load_torch_index(path: Path, device: str) -> TorchFlatIndex:
    """A TorchFlatIndex from its JSON file and the keys it names, checked against each other."""
    fields = _torch_index_fields(read_json(path, "torch index file (delete it to rebuild the index)", DatastoreError))
    if fields is None:
        raise DatastoreError(f"{path}: not a {TORCH_FORMAT} index file (needs format, keys, n, d); "
                             f"delete it to rebuild the index")
    name, n, d = fields
    keys = _open_npy_keys(path.parent / name, path)
    if keys.shape != (n, d):
        raise DatastoreError(f"{path}: describes {n} keys of dimension {d}, but {path.parent / name} holds "
                             f"{list(keys.shape)}; delete {path} to rebuild the index")
    return TorchFlatIndex(keys, device)


class TorchKind(IndexKind):
    name = "torch"
    description = "exact, on CUDA; no faiss needed"
    needs_keys_at_search = True
    device_search = True
    auto_order = 0  # asked first: without faiss, nothing else can search

    def picks_for(self, n: int, d: int, machine: Machine) -> bool:
        """Without faiss; or with CUDA that faiss cannot use and room for the fp32 keys in half of
        its free memory."""
        return not machine.faiss or (not machine.faiss_gpu and torch_keys_fit_gpu(n, d))

    def build(self, keys: np.ndarray, params: IndexParams, *, add_batch: int = 65_536, progress: bool = False):
        return TorchFlatIndex(keys, upload_batch=add_batch)

    def save(self, index: TorchFlatIndex, path: Path) -> None:
        """The JSON that names ``keys.npy`` beside ``path`` (the datastore's keys, which must hold
        the index's N × d keys)."""
        _save_torch_index(index, path)

    def reads(self, head: bytes) -> bool:
        """A torch index file is JSON; a faiss file never starts with '{'."""
        return head[:1] == b"{"

    def load(self, path: Path, *, nprobe: int | None = None, gpu: bool | None = None) -> TorchFlatIndex:
        """On CUDA where its keys fit (``gpu=None``), on CUDA (True) or the CPU (False)."""
        return _load_torch_index(path, "auto" if gpu is None else ("cuda" if gpu else "cpu"))

    def matches(self, index) -> bool:
        return isinstance(index, TorchFlatIndex)


TORCH = register(TorchKind())
