"""Step 1, the keys: every rank computes the FFN-input keys of its shard of the window chunks
(from the base or ``--key-model``), written in place into the rows of the one preallocated
``keys.npy``; progress per chunk in the manifest (one process) or ``.keys-shard-i.json``."""

from __future__ import annotations

import os
import time
from pathlib import Path

import numpy as np
import torch
from tqdm.auto import tqdm

from ..data import sliding_windows, window_batches
from ..errors import DatastoreError
from ..files import atomic_write_json, check_npy
from ..models import check_block_size, load_model
from ..store import (FFNInputCapture, KeysStep, Manifest, Steps, forward_ffn_inputs, key_model_text, window_keys,
                     write_manifest)
from .config import DatastoreConfig, say
from .progress import KeysProgress, read_progress
from .ranks import Ranks, shard_bounds, sync


def _key_shard_file(out: Path, shard: int) -> Path:
    return out / f".keys-shard-{shard}.json"


def _finished_key_chunks(out: Path, step: KeysStep) -> tuple[int, int]:
    """(chunks finished in a row from chunk 0, chunks finished in all) of a keys step run by any
    number of processes (``shards``: their chunk ranges, each with its own progress file)."""
    if not step.shards:
        done = step.chunks_done or 0
        return done, done
    prefix, total, in_row = step.chunks_done or 0, step.chunks_done or 0, True
    for i, (a, b) in enumerate(step.shards):
        path = _key_shard_file(out, i)
        done = read_progress(KeysProgress, path, "keys shard progress").chunks_done if path.is_file() else 0
        total += done
        if in_row:
            prefix, in_row = a + done, a + done == b
    return prefix, total


def _plan_keys(out: Path, manifest: Manifest, n_chunks: int, world: int, cfg: DatastoreConfig) -> None:
    """Rank 0: split the chunks still to do among ``world`` processes and record the plan.

    A run resumed with the number of processes it began with keeps each shard's progress; with
    another number, the chunks finished in a row from the start are kept and the rest is split
    anew. The keys file is (re)allocated only when no chunk is finished.
    """
    step, n, dim = manifest.steps.keys, manifest.n_keys, manifest.dim
    prefix, finished = _finished_key_chunks(out, step)
    shards = step.shards
    if not (shards and len(shards) == world):
        if shards:
            say(cfg, f"the keys were begun by {len(shards)} processes, resumed by {world}: "
                      f"redoing from chunk {prefix} on")
        for i in range(len(shards or [])):
            _key_shard_file(out, i).unlink(missing_ok=True)
        step.drop("shards")
        step.chunks_done = prefix
        if world > 1:
            step.shards = shard_bounds(prefix, n_chunks, world)
            for i in range(world):
                atomic_write_json(_key_shard_file(out, i), KeysProgress().to_json())
        finished = prefix
    keys_path = out / "keys.npy"
    if finished == 0:  # nothing recorded yet: (re)allocate the keys file
        tmp = out / ".keys.npy.tmp"
        np.lib.format.open_memmap(tmp, mode="w+", dtype=np.float16, shape=(n, dim)).flush()
        os.replace(tmp, keys_path)
    else:
        check_npy(keys_path, np.float16, (n, dim), "keys")
        say(cfg, f"resuming keys: {finished}/{n_chunks} chunks are done")
    step.update(status="running", chunks_total=n_chunks)
    write_manifest(out, manifest)


def _pwrite_all(fd: int, data: bytes, offset: int) -> None:
    """Write all of ``data`` at ``offset`` (positioned writes: ranks never share a buffered page)."""
    view = memoryview(data)
    while view:
        written = os.pwrite(fd, view, offset)
        view, offset = view[written:], offset + written


def _restart_keys(out: Path, manifest: Manifest, cfg: DatastoreConfig, key_model: dict | None) -> None:
    """Another key model than the recorded one: the keys, the index and the targets start over."""
    say(cfg, f"rebuilding the keys (and then the index and the targets): key model "
              f"{key_model_text(manifest.steps.keys.key_model)} -> {key_model_text(key_model)}")
    manifest.update(layer=None, dim=None)
    manifest.steps = Steps()
    write_manifest(out, manifest)


def keys_step(out: Path, manifest: Manifest, cfg: DatastoreConfig, tokens: np.ndarray, on_chunk, ranks: Ranks,
               key_model: dict | None = None) -> Manifest:
    """Step 1: every rank computes the keys of its shard of the window chunks, from the base or from
    ``key_model`` ({spec, hash}), written in place into the rows of ``keys.npy`` they belong to;
    rank 0 records the step once all are done. Returns the manifest as every rank then holds it."""
    step = manifest.steps.keys
    n = manifest.n_keys
    keys_path = out / "keys.npy"
    if step.key_model != key_model and step.status != "pending":
        if ranks.main:
            _restart_keys(out, manifest, cfg, key_model)
        manifest = sync(out, manifest, ranks)
        step = manifest.steps.keys
    if step.status == "done":
        if not step.dropped:
            check_npy(keys_path, np.float16, (n, manifest.dim), "keys")
        return manifest
    device = ranks.device
    spec = key_model["spec"] if key_model else cfg.model
    model, _ = load_model(spec, device=device)
    check_block_size(model, cfg.block_size, spec)
    capture = FFNInputCapture(model, stop=True)
    with capture:
        probe = torch.from_numpy(np.array(tokens[None, :2], dtype=np.int64)).to(device)
        dim = int(forward_ffn_inputs(model, probe, capture).shape[-1])
    for field, value in (("layer", capture.name), ("dim", dim)):
        if getattr(manifest, field) not in (None, value):
            raise DatastoreError(f"{out}: keys were started at {field} {getattr(manifest, field)!r}, this model gives "
                                 f"{value!r}; delete {out} to rebuild it")
    manifest.update(layer=capture.name, dim=dim)

    windows = sliding_windows(len(tokens), cfg.block_size, cfg.stride)
    batch_size = step.batch_size or cfg.batch_size or (1 if device == "cpu" else 8)
    chunks = window_batches(windows, batch_size)
    if ranks.main:
        step.batch_size = batch_size
        if key_model:  # recorded only where there is one: other manifests stay as they were
            step.key_model = key_model
        _plan_keys(out, manifest, len(chunks), ranks.world, cfg)
    manifest = sync(out, manifest, ranks)
    step = manifest.steps.keys
    if ranks.world == 1:
        record, first, end = step, step.chunks_done, len(chunks)
        save = lambda: write_manifest(out, manifest)  # noqa: E731
    else:
        shard_file = _key_shard_file(out, ranks.rank)
        (a, end), record = step.shards[ranks.rank], read_progress(KeysProgress, shard_file, "keys shard progress")
        first = a + record.chunks_done
        save = lambda: atomic_write_json(shard_file, record.to_json())  # noqa: E731
    t0 = time.perf_counter()
    _compute_keys(keys_path, chunks, (first, end), model, tokens, capture, record, save, on_chunk,
                  manifest.prefix_token, device, cfg.progress and ranks.main)
    manifest = sync(out, manifest, ranks)
    if ranks.main:
        _finish_keys(out, manifest, time.perf_counter() - t0)
    return manifest


def _compute_keys(keys_path: Path, chunks: list[np.ndarray], span: tuple[int, int], model, tokens: np.ndarray,
                  capture: FFNInputCapture, record: KeysStep | KeysProgress, save, on_chunk, prefix: int | None,
                  device: str,
                  progress: bool) -> None:
    """The keys loop over chunks ``span`` = [first, end): each chunk's keys written at their rows,
    synced, then counted in ``record`` (``chunks_done``, ``seconds``) and ``save()``d; at the end
    ``positions`` (computed in this run) and ``tokens_per_s``."""
    first, end = span
    done0, seconds, t0 = record.chunks_done, float(record.seconds or 0.0), time.perf_counter()
    keys = np.load(keys_path, mmap_mode="r")
    offset, row_bytes = keys.offset, keys.shape[1] * keys.dtype.itemsize
    del keys  # the rows are written through fd, not the memmap
    total = sum(int(c[-1, 1] - c[0, 2]) for c in chunks[first:end])
    fd = os.open(keys_path, os.O_RDWR)
    try:
        with capture, tqdm(total=total, desc="keys", unit="tok", disable=not progress, leave=False) as bar:
            for ci in range(first, end):
                batch = chunks[ci]
                p0, p1 = int(batch[0, 2]), int(batch[-1, 1])
                rows = window_keys(model, tokens, batch, capture, device, prefix)
                _pwrite_all(fd, rows.tobytes(), offset + p0 * row_bytes)
                os.fsync(fd)
                record.update(chunks_done=done0 + ci - first + 1, positions_done=p1,
                              seconds=round(seconds + time.perf_counter() - t0, 3))
                save()
                bar.update(p1 - p0)
                if on_chunk is not None:
                    on_chunk("keys", ci)
    finally:
        os.close(fd)
    record.update(positions=total, tokens_per_s=round(total / max(time.perf_counter() - t0, 1e-9), 1))
    save()


def _finish_keys(out: Path, manifest: Manifest, elapsed: float) -> None:
    """Rank 0, once every shard is done: the keys step recorded as done, shard progress removed.
    ``elapsed``: this run's wall time of the keys loop (all shards)."""
    step = manifest.steps.keys
    shards = step.shards
    step.drop("shards")
    if shards:
        records = [read_progress(KeysProgress, _key_shard_file(out, i), "keys shard progress")
                   for i in range(len(shards))]
        step.update(processes=len(shards), chunks_done=step.chunks_total,
                    shard_tokens_per_s=[r.tokens_per_s for r in records],
                    shard_positions=[r.positions or 0 for r in records],
                    tokens_per_s=round(sum(r.positions or 0 for r in records) / max(elapsed, 1e-9), 1),
                    seconds=round(float(step.seconds or 0.0) + elapsed, 3))
    step.status = "done"
    write_manifest(out, manifest)
    for i in range(len(shards or [])):
        _key_shard_file(out, i).unlink(missing_ok=True)
