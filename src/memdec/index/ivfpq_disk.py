"""``ivfpq-disk``: the IVF-PQ of ``ivfpq`` (trained on a sample of the keys), its inverted lists on
disk (``index.ivfdata`` beside ``index.faiss``): the keys are added shard by shard into small
in-memory IVF files, merged by faiss's ``merge_ondisk`` into ``faiss.OnDiskInvertedLists``, and
the lists are memory-mapped at search time, so neither the keys nor the codes are ever in memory
together. No re-ranking (the lists hold codes only): distances are PQ approximations.
"""

from __future__ import annotations

import json
import os
from pathlib import Path

import numpy as np
from tqdm.auto import tqdm

from ..errors import DatastoreError
from ..files import atomic_write_text, read_json
from .base import IndexParams, as_f32, iter_batches, register
from .faiss_common import FaissKind, _faiss, _faiss_prints_to_stderr, _write_faiss, ivf, on_disk
from .ivfpq import ivfpq_params, train_ivfpq

IVFDATA_SUFFIX = ".ivfdata"  # an ivfpq-disk index's inverted lists, beside its index file
DISK_SHARD_KEYS = 1 << 20  # ivfpq-disk: keys added per shard file before the merge


def ivfdata_path(path: str | os.PathLike) -> Path:
    """Where the inverted lists of the ivfpq-disk index file ``path`` live: ``index.ivfdata``."""
    return Path(path).with_suffix(IVFDATA_SUFFIX)


def _shard_files(trained, keys: np.ndarray, folder: Path, shard_keys: int, add_batch: int, progress: bool) -> list[str]:
    """One IVF file per ``shard_keys`` keys (global ids), each holding only its shard's codes;
    a file already there (an interrupted build) is kept. Returns the file names in key order."""
    faiss, n = _faiss(), len(keys)
    names = []
    with tqdm(total=n, desc="index shards", unit="key", disable=not progress, leave=False) as bar:
        for s, (i, j) in enumerate(iter_batches(n, shard_keys)):
            name = folder / f"shard-{s:05d}.faiss"
            names.append(str(name))
            if not name.is_file():
                shard = faiss.clone_index(trained)
                for a, b in iter_batches(j - i, add_batch):
                    shard.add_with_ids(as_f32(keys[i + a : i + b]), np.arange(i + a, i + b, dtype=np.int64))
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
    faiss, path = _faiss(), Path(path)
    from faiss.contrib.ondisk import merge_ondisk  # after _faiss(): a missing faiss is its one line

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
    faiss.downcast_InvertedLists(ivf(trained).invlists).filename = data.name  # read back from the index's folder
    _write_faiss(trained, path)
    del trained
    os.replace(tmp_data, data)
    for old in folder.iterdir():
        old.unlink()
    folder.rmdir()
    return path.stat().st_size + data.stat().st_size


class IvfpqDiskKind(FaissKind):
    name = "ivfpq-disk"
    description = "ivfpq with its lists on disk, memory-mapped: the keys are never in memory together"

    def choose(self, n: int, d: int, *, nlist: int | None = None, pq_m: int | None = None,
               nprobe: int | None = None, refine: int | None = None, train_size: int | None = None,
               seed: int = 0) -> IndexParams:
        """The choices of ``ivfpq`` but refine, always 0 (its lists hold codes only)."""
        if refine:
            raise DatastoreError(f"--refine {refine}: an ivfpq-disk index re-ranks nothing (its lists on disk hold "
                                 f"PQ codes only); leave --refine out, or use --index ivfpq")
        return ivfpq_params(self.name, n, d, nlist=nlist, pq_m=pq_m, nprobe=nprobe, refine=0,
                            train_size=train_size, seed=seed)

    def build(self, keys: np.ndarray, params: IndexParams, *, add_batch: int = 65_536, progress: bool = False):
        raise DatastoreError("an ivfpq-disk index is built on disk: call build_ondisk_index")

    def write(self, keys: np.ndarray, path: Path, params: IndexParams, *, progress: bool = False) -> None:
        build_ondisk_index(keys, path, params, progress=progress)

    def matches(self, index) -> bool:
        return on_disk(index)

    def extra_files(self, path: Path) -> tuple[Path, ...]:
        return (ivfdata_path(path),)

    def to_gpu(self, index):
        return index  # its lists stay memory-mapped


IVFPQ_DISK = register(IvfpqDiskKind())
