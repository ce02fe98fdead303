"""Step 2, the index over the keys (rank 0), kept where it was built with the same parameters; and
``--no-keep-keys``, which deletes the keys once the index and the targets no longer need them."""

from __future__ import annotations

import time
from pathlib import Path

import numpy as np

from ..errors import DatastoreError
from ..index import IndexParams, choose_params, get_kind, set_num_threads
from ..store import IndexStep, Manifest, TargetsStep, write_manifest
from .config import DatastoreConfig, say


def _index_params(cfg: DatastoreConfig, n: int, dim: int) -> IndexParams:
    """The index ``cfg`` asks for over N keys of dimension ``dim`` (``auto`` resolved)."""
    return choose_params(n, dim, cfg.index, nlist=cfg.nlist, pq_m=cfg.pq_m, nprobe=cfg.nprobe,
                         refine=cfg.refine, flat_threshold=cfg.flat_threshold)


def need_keys(out: Path, manifest: Manifest, what: str) -> None:
    """DatastoreError where keys.npy was deleted (--no-keep-keys) and ``what`` needs it."""
    if manifest.steps.keys.dropped:
        raise DatastoreError(f"{out}: cannot {what}: keys.npy was deleted after the build (--no-keep-keys); "
                             f"rerun with the options it was built with, or rebuild it in a new --out")


def drop_keys(out: Path, manifest: Manifest, cfg: DatastoreConfig) -> None:
    """--no-keep-keys: delete keys.npy once the index and targets are done (a torch index needs it)."""
    step = manifest.steps.keys
    if cfg.keep_keys or step.dropped:
        return
    kind = manifest.steps.index.type
    if get_kind(kind).needs_keys_at_search:
        raise DatastoreError(f"{out}: --no-keep-keys: the {kind} index searches keys.npy itself; keys kept")
    step.dropped = True  # recorded first: a crash leaves a datastore that knows its keys may be gone
    write_manifest(out, manifest)
    (out / "keys.npy").unlink(missing_ok=True)
    say(cfg, "deleted keys.npy (--no-keep-keys)")


def _extra_bytes_field(data: Path) -> str:
    """The index step's manifest field for the size of a file of the index's (``ivfdata_bytes``)."""
    return f"{data.suffix.lstrip('.')}_bytes"


def _missing_extra_file(path: Path, step: IndexStep, kind: str) -> Path | None:
    """The first file beside the index (an ivfpq-disk index's lists) that the manifest records and
    is gone; None where all are there. DatastoreError where one is there with another size."""
    for data in get_kind(kind).extra_files(path):
        field = _extra_bytes_field(data)
        if not step.has(field):
            continue
        if data.is_file() and data.stat().st_size != step.get_extra(field):
            raise DatastoreError(f"{data}: {data.stat().st_size} bytes, the manifest says {step.get_extra(field)} "
                                 f"(truncated or corrupt); delete it to rebuild the index")
        if not data.is_file():
            return data
    return None


def index_step(out: Path, manifest: Manifest, cfg: DatastoreConfig) -> None:
    """Step 2: the index over the keys, kept where it was built with the same parameters."""
    n, dim = manifest.n_keys, manifest.dim
    params = _index_params(cfg, n, dim)
    step = manifest.steps.index
    path = out / "index.faiss"
    if step.status == "done" and step.params == params.to_json():
        if path.is_file() and path.stat().st_size == step.bytes:
            missing = _missing_extra_file(path, step, params.kind)
            if missing is None:
                return
            say(cfg, f"{missing.name} is missing: rebuilding the index")
        elif path.exists():
            raise DatastoreError(f"{path}: {path.stat().st_size} bytes, the manifest says {step.bytes} "
                                 f"(truncated or corrupt); delete it to rebuild the index")
        else:
            say(cfg, f"{path.name} is missing: rebuilding the index")
    if step.status in ("done", "running") and step.params != params.to_json():
        say(cfg, f"rebuilding the index (and then the targets): {step.params} -> {params.to_json()}")
    need_keys(out, manifest, "rebuild the index")
    manifest.steps.index = step = IndexStep(status="running", type=params.kind, params=params.to_json())
    manifest.steps.targets = TargetsStep()  # targets depend on the index
    write_manifest(out, manifest)
    set_num_threads(cfg.threads)
    keys = np.load(out / "keys.npy", mmap_mode="r")
    t0 = time.perf_counter()
    kind = get_kind(params.kind)
    kind.write(keys, path, params, progress=cfg.progress)
    for data in kind.extra_files(path):
        step.set_extra(_extra_bytes_field(data), data.stat().st_size)
    step.update(status="done", bytes=path.stat().st_size, seconds=round(time.perf_counter() - t0, 3))
    write_manifest(out, manifest)
