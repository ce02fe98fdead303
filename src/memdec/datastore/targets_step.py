"""Step 3, the kNN targets: every position's target row appended chunk by chunk to the CSR files
in ``targets/``, resumable; with several processes each searches its range of positions into its own
shard ``targets/shard-i``, which rank 0 then merges into the files one process writes, byte for
byte. At the end, statistics of the rows (``support_stats``)."""

from __future__ import annotations

import os
import shutil
import sys
import time
from pathlib import Path

import numpy as np
from tqdm.auto import tqdm

from ..files import NpyAppender, atomic_write_json, check_npy
from ..index import auto_nprobe, kind_of, load_index, set_num_threads
from ..store import Manifest, TargetsStep, write_manifest
from ..targets import TARGETS_DIR
from .config import SEARCH_BLOCK, DatastoreConfig, say
from .index_step import need_keys
from .progress import TargetsProgress, read_progress
from .ranks import Ranks, default_threads, shard_bounds, sync
from .target_rows import blockwise, log_u8_rows, numpy_batch_targets, torch_batch_targets


def _target_shard_dir(out: Path, shard: int) -> Path:
    return out / TARGETS_DIR / f"shard-{shard}"


def _same_targets(step: TargetsStep, want: dict) -> bool:
    """The recorded targets step was made with ``want`` (a step from before --target-dtype is float16)."""
    return all((getattr(step, key) if step.has(key) else "float16" if key == "prob_dtype" else None) == value
               for key, value in want.items())


def _plan_targets(out: Path, manifest: Manifest, cfg: DatastoreConfig, want: dict, index, world: int) -> None:
    """Rank 0: keep a running targets step begun with the same settings and process count, or
    start afresh (with ``world`` > 1: one range of positions per process, each with its own CSR
    folder ``targets/shard-i`` and progress file, merged in order at the end)."""
    n, step = manifest.n_keys, manifest.steps.targets
    same = _same_targets(step, want)
    if step.status in ("done", "running") and not same:
        changed = ", ".join(f"{key} {getattr(step, key)!r} -> {value!r}" for key, value in want.items()
                            if getattr(step, key) != value)
        say(cfg, f"rebuilding the kNN targets: {changed}")
    # aligned: the same search blocks as one process
    plan = shard_bounds(0, n, world, SEARCH_BLOCK) if world > 1 else None
    if step.status == "running" and same and step.shards == plan:
        return
    if step.status == "running" and same:
        say(cfg, f"the targets were begun by {len(step.shards or [0])} processes, resumed by {world}: "
                  f"starting them again")
    for old in (out / TARGETS_DIR).glob("shard-*"):
        shutil.rmtree(old)
    step = TargetsStep(status="running")
    step.update(**want, nprobe=cfg.nprobe or auto_nprobe(index, cfg.k + 1) or None, search_batch=cfg.search_batch,
                **TargetsProgress().to_json())
    if plan:
        step.update(shards=plan, merged=0)
        for i in range(world):
            _target_shard_dir(out, i).mkdir(parents=True)
            atomic_write_json(_target_shard_dir(out, i) / "progress.json", TargetsProgress().to_json())
    manifest.steps.targets = step
    write_manifest(out, manifest)


def targets_step(out: Path, manifest: Manifest, cfg: DatastoreConfig, on_chunk, ranks: Ranks) -> Manifest:
    """Step 3: every position's kNN target row, appended chunk by chunk to the CSR files, resumable.
    Each rank searches its range of positions into its own CSR shard; rank 0 then merges them into
    the one CSR a single process writes, byte for byte. Returns the manifest every rank holds."""
    n = manifest.n_keys
    want = {"k": cfg.k, "temperature": cfg.knn_temp, "top_m": cfg.top_m, "index": manifest.steps.index.params,
            "prob_dtype": cfg.target_dtype}
    step = manifest.steps.targets
    folder = out / TARGETS_DIR
    if step.status == "done" and _same_targets(step, want):
        check_npy(folder / "offsets.npy", np.int64, (n + 1,), "target offsets")
        check_npy(folder / "token_ids.npy", np.int32, (step.nnz,), "target token ids")
        check_npy(folder / "probs.npy", cfg.target_dtype, (step.nnz,), "target probabilities")
        return manifest
    need_keys(out, manifest, "rebuild the kNN targets")
    set_num_threads(default_threads(cfg.threads, ranks))
    index = load_index(out / "index.faiss")
    if ranks.main:
        _plan_targets(out, manifest, cfg, want, index, ranks.world)
    manifest = sync(out, manifest, ranks)
    step = manifest.steps.targets
    keys, values = np.load(out / "keys.npy", mmap_mode="r"), np.load(out / "values.npy")
    if kind_of(index).device_search:
        target_rows = blockwise(torch_batch_targets(index, keys, values, cfg))
    else:
        target_rows = blockwise(numpy_batch_targets(index, keys, values, step.nprobe, cfg))
    if cfg.target_dtype == "uint8":
        target_rows = log_u8_rows(target_rows)
    batch, show = step.search_batch, cfg.progress and ranks.main
    t0 = time.perf_counter()
    if ranks.world == 1:
        first = step.rows_done
        _append_target_rows(folder, step, (0, n), batch, target_rows, lambda: write_manifest(out, manifest), on_chunk,
                            show, cfg.target_dtype)
    elif ranks.rank >= (step.merged or 0):  # a merged shard is done
        shard = _target_shard_dir(out, ranks.rank)
        record = read_progress(TargetsProgress, shard / "progress.json", "targets shard progress")
        _append_target_rows(shard, record, tuple(step.shards[ranks.rank]), batch, target_rows,
                            lambda: atomic_write_json(shard / "progress.json", record.to_json()), on_chunk, show,
                            cfg.target_dtype)
    manifest = sync(out, manifest, ranks)
    if ranks.main:
        if ranks.world > 1:
            first = 0
            _merge_target_shards(out, manifest, cfg)
        _finish_targets(out, manifest, n - first, time.perf_counter() - t0)
    return manifest


def _open_target_files(folder: Path, rows_done: int, nnz: int, rows: int, prob_dtype: str):
    """(offsets memmap [rows+1], token id appender, probability appender), cut back to ``rows_done``
    rows holding ``nnz`` entries."""
    folder.mkdir(exist_ok=True)
    offsets_path = folder / "offsets.npy"
    if rows_done == 0:
        tmp = folder / ".offsets.npy.tmp"
        np.lib.format.open_memmap(tmp, mode="w+", dtype=np.int64, shape=(rows + 1,)).flush()
        os.replace(tmp, offsets_path)
    else:
        check_npy(offsets_path, np.int64, (rows + 1,), "target offsets")
    return (np.load(offsets_path, mmap_mode="r+"), NpyAppender(folder / "token_ids.npy", np.int32, nnz),
            NpyAppender(folder / "probs.npy", prob_dtype, nnz))


def _append_target_rows(folder: Path, record: TargetsStep | TargetsProgress, span: tuple[int, int], batch: int,
                        target_rows, save, on_chunk, progress: bool, prob_dtype: str = "float16") -> None:
    """The targets loop over positions ``span`` = [a, b): each chunk of ``batch`` rows appended to
    the CSR files in ``folder`` (offsets relative to row a), flushed, then counted in ``record``
    (``rows_done`` from a, ``nnz``, sums of the statistics) and ``save()``d."""
    (a, b), seconds, t0 = span, float(record.seconds), time.perf_counter()
    offsets, token_ids, probs = _open_target_files(folder, record.rows_done, record.nnz, b - a, prob_dtype)
    if record.rows_done and progress:
        print(f"memdec datastore: resuming targets at position {a + record.rows_done}/{b}", file=sys.stderr, flush=True)
    nnz = record.nnz
    with tqdm(total=b - a, initial=record.rows_done, desc="targets", unit="tok", disable=not progress,
              leave=False) as bar:
        for r0 in range(a + record.rows_done, b, batch):
            r1 = min(r0 + batch, b)
            (off, tok, prob, kept), self_missing, empty_slots = target_rows(r0, r1)
            offsets[r0 - a + 1 : r1 - a + 1] = nnz + off[1:]
            offsets.flush()
            token_ids.append(tok)
            probs.append(prob)  # cast to the file's dtype: float16, or uint8 codes already
            token_ids.flush()
            probs.flush()
            nnz += len(tok)
            record.update(rows_done=r1 - a, nnz=nnz, kl_sum=record.kl_sum - float(np.log(kept).sum()),
                          self_missing=record.self_missing + self_missing,
                          empty_slots=record.empty_slots + empty_slots,
                          seconds=round(seconds + time.perf_counter() - t0, 3))
            save()
            bar.update(r1 - r0)
            if on_chunk is not None:
                on_chunk("targets", r0 // batch)
    token_ids.close()
    probs.close()
    record.rows_per_s = round((b - a) / max(float(record.seconds), 1e-9), 1)
    save()


MERGE_ROWS = 1 << 22  # rows (and entries) copied at a time when shards are merged


def _merge_target_shards(out: Path, manifest: Manifest, cfg: DatastoreConfig) -> None:
    """Rank 0: append the CSR shards, in order, to ``targets/``, shifting each shard's offsets by
    the entries before it. Each merged shard is recorded, then deleted, so a merge resumes where
    it stopped and the disk holds at most one shard twice."""
    n, step, folder = manifest.n_keys, manifest.steps.targets, out / TARGETS_DIR
    merged, nnz = step.merged, step.nnz
    say(cfg, f"merging {len(step.shards)} target shards")
    for i in range(merged):  # recorded as merged, but the run stopped before deleting it
        shutil.rmtree(_target_shard_dir(out, i), ignore_errors=True)
    prob_dtype = step.prob_dtype or "float16"
    offsets, token_ids, probs = _open_target_files(folder, merged, nnz, n, prob_dtype)
    for i in range(merged, len(step.shards)):
        (a, b), shard = step.shards[i], _target_shard_dir(out, i)
        record = read_progress(TargetsProgress, shard / "progress.json", "targets shard progress")
        check_npy(shard / "offsets.npy", np.int64, (b - a + 1,), "target offsets")
        local = np.load(shard / "offsets.npy", mmap_mode="r")
        for r0 in range(0, b - a, MERGE_ROWS):
            offsets[a + r0 + 1 : a + min(r0 + MERGE_ROWS, b - a) + 1] = nnz + local[r0 + 1 : r0 + MERGE_ROWS + 1]
        for name, sink, dtype in (("token_ids.npy", token_ids, np.int32), ("probs.npy", probs, prob_dtype)):
            check_npy(shard / name, dtype, (record.nnz,), f"target shard {i}")
            part = np.load(shard / name, mmap_mode="r")
            for e0 in range(0, len(part), MERGE_ROWS):
                sink.append(part[e0 : e0 + MERGE_ROWS])
        offsets.flush()
        token_ids.flush()
        probs.flush()
        nnz += record.nnz
        step.update(merged=i + 1, nnz=nnz, rows_done=b, kl_sum=step.kl_sum + record.kl_sum,
                    self_missing=step.self_missing + record.self_missing,
                    empty_slots=step.empty_slots + record.empty_slots)
        step.shard_rows_per_s = [*(step.shard_rows_per_s or []), record.rows_per_s]
        write_manifest(out, manifest)
        shutil.rmtree(shard)
    token_ids.close()
    probs.close()


SUPPORT_PERCENTILES = (0, 10, 50, 90, 99, 100)


def support_stats(offsets: np.ndarray, chunk: int = MERGE_ROWS) -> tuple[float, dict[str, float]]:
    """(mean, percentiles ``SUPPORT_PERCENTILES``) of the row lengths of CSR ``offsets`` [N+1],
    read chunk by chunk into a histogram: the values ``np.percentile`` gives (linear
    interpolation), without an N-sized array in memory."""
    n = len(offsets) - 1
    counts = np.zeros(1, dtype=np.int64)
    for r0 in range(0, n, chunk):
        part = np.bincount(np.diff(np.asarray(offsets[r0 : r0 + chunk + 1])))
        counts = np.pad(counts, (0, max(0, len(part) - len(counts))))
        counts[: len(part)] += part
    below = np.cumsum(counts)  # below[v]: rows of length <= v

    def value(i: int) -> int:  # the i-th smallest length
        return int(np.searchsorted(below, i, side="right"))

    def percentile(q: float) -> float:
        pos = q / 100 * (n - 1)
        lo = int(np.floor(pos))
        a, b = value(lo), value(min(lo + 1, n - 1))
        return float(a + (b - a) * (pos - lo))

    return float(offsets[-1] - offsets[0]) / n, {f"p{q}": percentile(q) for q in SUPPORT_PERCENTILES}


def _finish_targets(out: Path, manifest: Manifest, searched: int, elapsed: float) -> None:
    """Rank 0: the targets step recorded as done, with statistics of the rows (``searched``
    positions searched by this run in ``elapsed`` seconds)."""
    n, step, folder = manifest.n_keys, manifest.steps.targets, out / TARGETS_DIR
    mean_support, percentiles = support_stats(np.load(folder / "offsets.npy", mmap_mode="r"))
    target_bytes = sum((folder / f).stat().st_size for f in ("offsets.npy", "token_ids.npy", "probs.npy"))
    if shards := step.shards:
        step.drop("shards")
        step.update(processes=len(shards), seconds=round(step.seconds + elapsed, 3))
        step.drop("merged")
    step.update(status="done", mean_support=round(mean_support, 3), support_percentiles=percentiles,
                kl_truncation_mean=step.kl_sum / n, bytes_per_token=round(target_bytes / n, 2),
                rows_per_s=round(searched / max(elapsed, 1e-9), 1))
    write_manifest(out, manifest)
