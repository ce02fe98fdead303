"""Building, loading and searching the index over datastore keys.

Distances are **squared L2** everywhere: what faiss's L2 indexes return, and what kNN-LM puts
in its softmax, p ∝ exp(-d²/T).

Three kinds of index:

- ``flat``: ``faiss.IndexFlatL2``, exact. Used below ``flat_threshold`` keys (``auto``).
- ``ivfpq``: an inverted file of ``nlist`` lists with product-quantised codes (``pq_m`` bytes
  a vector) for the candidate search, then an exact re-ranking of ``refine × k`` candidates on
  fp16 copies of the keys (``faiss.IndexRefine`` over ``IndexScalarQuantizer(fp16)``). The
  returned distances are therefore exact up to fp16 rounding of the keys, which the keys on
  disk have anyway; ``refine=0`` gives plain IVF-PQ with approximate (PQ) distances.
- ``ivfpq-disk``: the same IVF-PQ (trained on a sample of the keys), its inverted lists on disk
  (``index.ivfdata`` beside ``index.faiss``): the keys are added shard by shard into small
  in-memory IVF files, merged by faiss's ``merge_ondisk`` into ``faiss.OnDiskInvertedLists``, and
  the lists are memory-mapped at search time, so neither the keys nor the codes are ever in memory
  together. No re-ranking (the lists hold codes only): distances are PQ approximations.
- ``torch``: ``TorchFlatIndex``, exact search with torch matmuls, on CUDA where there is one. It
  needs no faiss: ``auto`` picks it where faiss is not installed, and where CUDA is there but faiss
  cannot use it (pip only has faiss-cpu) while the keys fit in half the free GPU memory. On disk
  it is a small JSON file that points at the datastore's ``keys.npy`` beside it.

faiss is imported lazily (``_faiss``), so memdec imports and works without it. faiss searches on
all cores (``set_num_threads``); a GPU is used where faiss has one.
"""

from __future__ import annotations

import json
import math
import os
import sys
from contextlib import contextmanager
from dataclasses import asdict, dataclass
from pathlib import Path

import numpy as np
import torch

from .errors import DatastoreError
from .files import atomic_write, atomic_write_text, read_json

INDEX_KINDS = ("auto", "flat", "ivfpq", "ivfpq-disk", "torch")
IVFDATA_SUFFIX = ".ivfdata"  # an ivfpq-disk index's inverted lists, beside its index file
DISK_SHARD_KEYS = 1 << 20  # ivfpq-disk: keys added per shard file before the merge
FLAT_THRESHOLD = 100_000  # auto: exact search up to this many keys on CPU (N² d work)
FLAT_THRESHOLD_GPU = 2_000_000
GPU_MAX_K = 2048  # faiss GPU indexes return at most this many neighbours
TORCH_FORMAT = "memdec-torch-flat"  # the "format" of a torch index's JSON file
TORCH_DIST_BYTES = 2**31  # a TorchFlatIndex search holds at most this much of [queries, N] distances


@dataclass
class IndexParams:
    """The choices behind an index; stored in the manifest."""

    kind: str  # "flat" | "ivfpq" | "ivfpq-disk" | "torch"
    nlist: int | None = None
    pq_m: int | None = None
    pq_bits: int | None = None
    refine: int | None = None  # re-rank refine*k candidates exactly; 0 = none
    nprobe: int | None = None  # default lists probed; search() may raise it for large k
    train_size: int | None = None
    seed: int = 0

    def to_json(self) -> dict:
        return {k: v for k, v in asdict(self).items() if v is not None}


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


def torch_keys_fit_gpu(n: int, d: int) -> bool:
    """Whether N fp32 keys of dimension d take at most half of the free CUDA memory."""
    if not torch.cuda.is_available():
        return False
    free, _ = torch.cuda.mem_get_info()
    return 4 * n * d <= free // 2


def _auto_kind(n: int, d: int, flat_threshold: int | None) -> str:
    """``torch`` without faiss, or with CUDA that faiss cannot use and room for the keys; else
    ``flat`` up to ``flat_threshold`` keys and ``ivfpq`` above."""
    if not faiss_available() or (not gpu_available() and torch_keys_fit_gpu(n, d)):
        return "torch"
    if flat_threshold is None:
        flat_threshold = FLAT_THRESHOLD_GPU if gpu_available() else FLAT_THRESHOLD
    return "flat" if n <= flat_threshold else "ivfpq"


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

    ``auto`` chooses ``torch`` where faiss is missing, or where CUDA is there, faiss has no GPU
    and the fp32 keys fit in half the free GPU memory; otherwise ``flat`` up to
    ``flat_threshold`` keys (100k on CPU, 2M on a faiss GPU) and ``ivfpq`` above.
    - nlist ≈ 4·√N, a power of two, with at least 39 training points per list;
    - pq_m: the largest divisor of d not above min(64, d/8) (≥ 8 dimensions per code byte);
    - pq_bits: 8, fewer only where the sample is too small to train 256 centroids;
    - train_size: max(64·nlist, 256·64) points, at most N;
    - refine 4 (PQ alone ranks too coarsely: recall ≈0.8 with 2, ≈0.97 with 4 on clustered data),
      nprobe max(16, nlist/64).
    ``ivfpq-disk`` takes the same choices except refine, which is always 0 (its lists hold codes only).
    """
    if kind not in INDEX_KINDS:
        raise DatastoreError(f"unknown index type '{kind}'; choose one of: {', '.join(INDEX_KINDS)}")
    if kind == "auto":
        kind = _auto_kind(n, d, flat_threshold)
    if kind in ("flat", "torch"):
        return IndexParams(kind, seed=seed)
    if kind == "ivfpq-disk" and refine:
        raise DatastoreError(f"--refine {refine}: an ivfpq-disk index re-ranks nothing (its lists on disk hold PQ "
                             f"codes only); leave --refine out, or use --index ivfpq")
    if n < 2 * 39:
        raise DatastoreError(f"an {kind} index needs at least 78 keys, the datastore has {n}; use --index flat")
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
    refine = 0 if kind == "ivfpq-disk" else 4 if refine is None else refine
    nprobe = nprobe or max(16, nlist // 64)
    return IndexParams(kind, nlist, pq_m, pq_bits, refine, min(nprobe, nlist), train_size, seed)


def auto_nprobe(index, k: int, base: int | None = None) -> int:
    """Lists to probe so that the probed lists hold about 4× the ``refine·k`` candidates needed.

    Large k (kNN-LM uses 1024) needs many more lists than the usual nprobe≈32 on small stores.
    """
    ivf = _ivf(index)
    if ivf is None:
        return 0
    factor = max(1, int(getattr(_faiss().downcast_index(index), "k_factor", 1)))
    per_list = max(ivf.ntotal / ivf.nlist, 1.0)
    needed = math.ceil(4 * factor * k / per_list)
    return int(min(ivf.nlist, max(base or ivf.nprobe, needed)))


def _ivf(index):
    if isinstance(index, TorchFlatIndex):
        return None
    try:
        return _faiss().extract_index_ivf(index)
    except RuntimeError:
        return None


def _iter_batches(n: int, batch: int):
    for i in range(0, n, batch):
        yield i, min(i + batch, n)


def _as_f32(x) -> np.ndarray:
    return np.ascontiguousarray(x, dtype=np.float32)


# --- the torch index -------------------------------------------------------------------------


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
        for i, j in _iter_batches(n, upload_batch):
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
            for i, j in _iter_batches(len(queries), query_chunk_rows(self.ntotal)):
                dist = squared_l2(queries[i:j], self.keys, self.key_sq_norms)
                dists[i:j], ids[i:j] = torch.topk(dist, k, dim=1, largest=False, sorted=True)
        return dists, ids

    def search(self, queries: np.ndarray, k: int) -> tuple[np.ndarray, np.ndarray]:
        """faiss's ``search``: queries float32 [B, d] -> (dists float32 [B, k], ids int64 [B, k])."""
        dists, ids = self.search_torch(torch.from_numpy(_as_f32(queries)), k)
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


# --- building, saving, loading, searching ----------------------------------------------------


def build_index(
    keys: np.ndarray,
    kind: str = "auto",
    *,
    params: IndexParams | None = None,
    add_batch: int = 65_536,
    progress: bool = False,
    **choose_kwargs,
):
    """Build an index over ``keys`` (float16/32 [N, d], may be a memmap): a CPU faiss index, or
    a ``TorchFlatIndex`` for kind ``torch``.

    ``kind`` is auto|flat|ivfpq|torch; ``choose_kwargs`` (nlist, pq_m, nprobe, refine, train_size,
    flat_threshold, seed) override the automatic choices of ``choose_params``. Keys are added in
    batches, so a memmapped store is never copied to fp32 whole. Pass ``params`` (from
    ``choose_params``) to record exactly what was built.
    """
    from tqdm.auto import tqdm

    n, d = keys.shape
    params = params or choose_params(n, d, kind, **choose_kwargs)
    if params.kind == "torch":
        return TorchFlatIndex(keys, upload_batch=add_batch)
    if params.kind == "ivfpq-disk":
        raise DatastoreError("an ivfpq-disk index is built on disk: call build_ondisk_index")
    faiss = _faiss()
    index = faiss.IndexFlatL2(d) if params.kind == "flat" else train_ivfpq(keys, params)
    with tqdm(total=n, desc="index", unit="key", disable=not progress, leave=False) as bar:
        for i, j in _iter_batches(n, add_batch):
            index.add(_as_f32(keys[i:j]))
            bar.update(j - i)
    return index


def train_ivfpq(keys: np.ndarray, params: IndexParams):
    """An empty IVF-PQ index (``IndexRefine`` over fp16 keys where ``params.refine``), its coarse
    quantizer and PQ codebooks trained on ``params.train_size`` keys drawn with ``params.seed``.

    keys: float16/32 [N, d], may be a memmap (only the sample is read)."""
    faiss = _faiss()
    n, d = keys.shape
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
    return index


# --- the on-disk IVF-PQ index ----------------------------------------------------------------


def ivfdata_path(path: str | os.PathLike) -> Path:
    """Where the inverted lists of the ivfpq-disk index file ``path`` live: ``index.ivfdata``."""
    return Path(path).with_suffix(IVFDATA_SUFFIX)


@contextmanager
def _faiss_prints_to_stderr():
    """faiss's on-disk lists printf their resizes and moves to stdout; inside the block they go to
    stderr, so a command's stdout stays its own output."""
    import ctypes

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


def _shard_files(trained, keys: np.ndarray, folder: Path, shard_keys: int, add_batch: int, progress: bool) -> list[str]:
    """One IVF file per ``shard_keys`` keys (global ids), each holding only its shard's codes;
    a file already there (an interrupted build) is kept. Returns the file names in key order."""
    from tqdm.auto import tqdm

    faiss, n = _faiss(), len(keys)
    names = []
    with tqdm(total=n, desc="index shards", unit="key", disable=not progress, leave=False) as bar:
        for s, (i, j) in enumerate(_iter_batches(n, shard_keys)):
            name = folder / f"shard-{s:05d}.faiss"
            names.append(str(name))
            if not name.is_file():
                shard = faiss.clone_index(trained)
                for a, b in _iter_batches(j - i, add_batch):
                    shard.add_with_ids(_as_f32(keys[i + a : i + b]), np.arange(i + a, i + b, dtype=np.int64))
                _write_faiss(shard, name)
                del shard
            bar.update(j - i)
    return names


def build_ondisk_index(
    keys: np.ndarray,
    path: str | os.PathLike,
    params: IndexParams,
    *,
    shard_keys: int = DISK_SHARD_KEYS,
    add_batch: int = 65_536,
    progress: bool = False,
) -> int:
    """Build the ivfpq-disk index over ``keys`` (float16/32 [N, d], may be a memmap) at ``path``,
    with its inverted lists in ``ivfdata_path(path)``. Returns the bytes of both files.

    The trained index and the shard files wait in ``.PATH.shards/`` (removed at the end), so an
    interrupted build resumes at its first missing shard. Memory: one shard's codes
    (``shard_keys`` × pq_m bytes) and ``add_batch`` fp32 keys at a time.
    """
    from faiss.contrib.ondisk import merge_ondisk

    faiss, path = _faiss(), Path(path)
    if params.kind != "ivfpq-disk":
        raise DatastoreError(f"build_ondisk_index builds ivfpq-disk indexes, not {params.kind}")
    folder = path.with_name(f".{path.name}.shards")
    folder.mkdir(exist_ok=True)
    meta, wanted = folder / "params.json", {**params.to_json(), "shard_keys": shard_keys}
    if not meta.is_file() or read_json(meta, "index shard parameters", DatastoreError) != wanted:
        for old in folder.iterdir():  # shards of another build: start again
            old.unlink()
        _write_faiss(train_ivfpq(keys, params), folder / "trained.faiss")
        atomic_write_text(meta, json.dumps(wanted))
    trained = faiss.read_index(str(folder / "trained.faiss"))
    names = _shard_files(trained, keys, folder, shard_keys, add_batch, progress)
    data, tmp_data = ivfdata_path(path), folder / f"merged{IVFDATA_SUFFIX}"
    tmp_data.unlink(missing_ok=True)
    with _faiss_prints_to_stderr():
        merge_ondisk(trained, names, str(tmp_data))
    faiss.downcast_InvertedLists(_ivf(trained).invlists).filename = data.name  # read back from the index's folder
    _write_faiss(trained, path)
    del trained
    os.replace(tmp_data, data)
    for old in folder.iterdir():
        old.unlink()
    folder.rmdir()
    return path.stat().st_size + data.stat().st_size


def save_index(index, path: str | os.PathLike) -> int:
    """Write ``index`` (CPU or GPU) to ``path`` atomically. Returns the file's size in bytes.

    A ``TorchFlatIndex`` is written as a small JSON file that names ``keys.npy`` beside ``path``
    (the datastore's keys, which must hold the index's N × d keys).
    """
    path = Path(path)
    if isinstance(index, TorchFlatIndex):
        _save_torch_index(index, path)
        return path.stat().st_size
    faiss = _faiss()
    if gpu_available():  # pragma: no cover - needs faiss-gpu
        try:
            index = faiss.index_gpu_to_cpu(index)
        except RuntimeError:
            pass  # already a CPU index
    _write_faiss(index, path)
    return path.stat().st_size


def _is_torch_index_file(path: Path) -> bool:
    """A torch index file is JSON; a faiss file never starts with '{'."""
    with open(path, "rb") as f:
        return f.read(1) == b"{"


def load_index(path: str | os.PathLike, nprobe: int | None = None, gpu: bool | None = None):
    """Read an index written by ``save_index``; on a GPU where faiss has one (``gpu=None``).

    A torch index goes to CUDA where its keys fit (``gpu=None``), to CUDA (True) or the CPU (False).
    Raises DatastoreError on a missing or unreadable file, or faiss missing for a faiss file.
    """
    path = Path(path)
    if not path.is_file():
        raise DatastoreError(f"{path}: no such index file")
    if _is_torch_index_file(path):
        return _load_torch_index(path, "auto" if gpu is None else ("cuda" if gpu else "cpu"))
    faiss = _faiss()
    try:  # an ivfpq-disk index finds its lists beside the file, wherever the folder has moved
        with _faiss_prints_to_stderr():
            index = faiss.read_index(str(path), faiss.IO_FLAG_ONDISK_SAME_DIR)
    except RuntimeError as exc:
        raise DatastoreError(f"{path}: cannot read the faiss index (corrupt or truncated?): {str(exc).splitlines()[0]}") from None
    if nprobe is not None and _ivf(index) is not None:
        _ivf(index).nprobe = nprobe
    if gpu is None:
        gpu = gpu_available()
    return to_gpu(index) if gpu else index


def to_gpu(index):
    """The index on every GPU faiss sees, or unchanged where it cannot move (CPU build, IndexRefine,
    a TorchFlatIndex)."""
    if isinstance(index, TorchFlatIndex) or not gpu_available() or _on_disk(index):
        return index
    try:  # pragma: no cover - needs faiss-gpu
        return _faiss().index_cpu_to_all_gpus(index)
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
    if k > GPU_MAX_K and not isinstance(index, TorchFlatIndex) and gpu_available():  # pragma: no cover
        try:  # faiss GPU indexes stop at 2048
            index = _faiss().index_gpu_to_cpu(index)
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


def _on_disk(index) -> bool:
    """Whether ``index`` is IVF with its inverted lists on disk (ivfpq-disk)."""
    ivf = _ivf(index)
    return ivf is not None and isinstance(_faiss().downcast_InvertedLists(ivf.invlists), _faiss().OnDiskInvertedLists)


def index_kind(index) -> str:
    """``flat``, ``ivfpq``, ``ivfpq-disk`` or ``torch``, from the index itself."""
    if isinstance(index, TorchFlatIndex):
        return "torch"
    if _ivf(index) is None:
        return "flat"
    return "ivfpq-disk" if _on_disk(index) else "ivfpq"
