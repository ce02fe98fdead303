"""The kNN datastore: keys and values of a corpus, their faiss index, and sparse kNN targets.

``build_datastore(cfg)`` runs three resumable steps and records each in ``manifest.json``:

1. **keys**: the base model reads the corpus in the same sliding windows as evaluation. For each
   position p (a token that has a successor) a forward pre-hook captures the input of the last
   transformer block's feed-forward layer, the kNN-LM key; the value is ``tokens[p+1]``. With
   ``--key-model`` another model of the same tokenizer (a domain-adapted one) reads the same
   windows and gives the keys; the manifest records it (spec and weights hash), and a change of
   key model rebuilds keys, index and targets. Only
   the model body runs, and the hook stops the forward right after the capture, so neither the
   last FFN, the final norm nor the LM head is computed. Keys are written chunk by chunk (one
   batch of windows) into a preallocated fp16 memmap; the manifest records each finished chunk.
2. **index**: a faiss index over the keys (``memdec.index``), written to ``index.faiss``; or, with
   ``--index torch`` (``auto`` where faiss is missing or has no GPU but torch has CUDA), exact
   torch search, whose ``index.faiss`` is a small JSON file naming ``keys.npy``.
3. **targets**: every key searches its k+1 nearest keys, drops its own entry by id, and turns the
   rest into a sparse distribution over next tokens (``memdec.targets``), appended to CSR files.
   With a torch index the whole batch (search, values, distributions) runs on its device.

Folder layout (N keys of dimension d)::

    manifest.json          identity of the inputs, and the state of each step
    tokens.npy             int32 [N+1]  the token stream
    keys.npy               float16 [N, d]  keys[p] = FFN input at position p
    values.npy             int32 [N]    values[p] = tokens[p+1]
    index.faiss
    targets/offsets.npy    int64 [N+1]
    targets/token_ids.npy  int32 [nnz]
    targets/probs.npy      float16 [nnz], or uint8 log codes with --target-dtype uint8

``--index ivfpq-disk`` adds ``index.ivfdata`` (its inverted lists, memory-mapped). ``--no-keep-keys``
deletes ``keys.npy`` once the targets are written (the manifest's keys step says ``dropped``): the
index must then hold its own vectors or codes (not ``--index torch``), and the index and targets
can no longer be rebuilt.

A rerun with the same inputs skips finished steps and resumes a running one from its last
finished chunk; changing k, T or top-m redoes only the targets, changing the index redoes the
index and the targets. A folder built from another model, tokenizer, corpus or windowing is
never touched: that is an error.

The corpus streams in: documents are read and tokenized a batch at a time straight into
``tokens.npy`` (``data.stream_tokens_to_file``); the token stream (4 bytes a token) is the one
array that exists whole, and it is memory-mapped.

**Several processes** (``accelerate launch --num_processes P -m memdec.cli datastore ...`` or
``torchrun``; gloo on CPU, one GPU a rank): rank 0 tokenizes and builds the index; the keys and
the targets are split among the ranks, and rank 0 records a step once every rank is done
(barriers). Keys: each rank computes a contiguous range of window chunks and writes its rows in
place into the one preallocated ``keys.npy`` (positioned writes; the file's size is known from
the start, so there is nothing to merge), recording its progress in ``.keys-shard-i.json``: a
killed rank resumes from its last finished chunk. Targets: each rank searches a range of
positions (bounds at multiples of 64, so every query meets the search blocks one process would
give it) into its own CSR folder ``targets/shard-i`` (its size is known only once searched);
rank 0 then appends the shards, in order, to ``targets/`` with shifted offsets, deleting each once
it is recorded. The files are those of one process, byte for byte, with an exact index, and
every reader stays as it is. A run resumed by another number of processes keeps the key chunks
finished in a row from the start, and starts the targets again.
"""

from __future__ import annotations

import dataclasses
import datetime
import os
import shutil
import sys
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Callable

import numpy as np
import torch
from accelerate import PartialState
from tqdm.auto import tqdm

from .checks import (NON_NEGATIVE, OWN_MARKER, SCORE, WHOLE, check_device, check_own_folder, check_temperature,
                     check_threads, mark_own_folder)
from .data import corpus_source, sliding_windows, stream_tokens_to_file, token_stream_hash, window_batches
from .errors import DatastoreError
from .index import (
    TorchFlatIndex,
    auto_nprobe,
    check_kind,
    choose_params,
    get_kind,
    kind_names,
    kinds_help,
    load_index,
    or_list,
    search,
    set_num_threads,
)
from .models import (base_fingerprint, bos_prefix, check_block_size, check_same_tokenizer, load_config, load_model,
                     load_tokenizer, model_fingerprint, resolve_device, tokenizer_fingerprint)
from .files import NpyAppender, atomic_write, atomic_write_json, check_npy, read_json_object
from .store import (DEFAULT_K, DEFAULT_KNN_TEMP, IDENTITY_FIELDS, MANIFEST, FFNInputCapture, IndexStep, KeysStep,
                    Manifest, Record, Steps, TargetsStep, forward_ffn_inputs, key_model_text, read_manifest, typed,
                    window_keys, write_manifest)
from .targets import (
    PROB_DTYPES,
    TARGETS_DIR,
    drop_self,
    drop_self_torch,
    encode_log_u8,
    knn_distribution,
    knn_distribution_torch,
    lookup_values,
)
SEARCH_BLOCK = 64  # the targets search this many positions per call, at aligned offsets: the
# distances (and so the files) are then the same whatever --search-batch, since BLAS rounding
# depends on how many queries a call holds


@dataclass
class DatastoreConfig:
    model: str
    corpus: str
    out: str
    key_model: str | None = None  # None: the keys come from the base model itself
    k: int | None = None  # None: the folder's k, or DEFAULT_K for a new datastore
    knn_temp: float | None = None  # None: the folder's temperature, or DEFAULT_KNN_TEMP
    top_m: int | None = None
    index: str = "auto"
    block_size: int = 1024
    stride: int = 512
    max_tokens: int | None = None
    batch_size: int | None = None
    device: str = "auto"
    text_field: str = "text"
    nlist: int | None = None
    pq_m: int | None = None
    nprobe: int | None = None
    refine: int | None = None
    flat_threshold: int | None = None
    search_batch: int = 1024
    threads: int | None = None
    target_dtype: str = "float16"
    keep_keys: bool = True
    progress: bool = True


DATASTORE_HELP = {
    "model": "base model spec: alias (smollm2-135m), local HF folder, .gguf file, or hub id",
    "corpus": "corpus spec: austen:train|valid|test, stdlib:train|valid|test, a text/JSONL file, a folder or a glob",
    "out": "datastore folder (created; an interrupted build resumes here)",
    "key_model": "take the keys from this model (same tokenizer as --model), e.g. a domain-adapted one: a CE-trained "
                 "decoder or a dapt baseline; windows, values and tokens stay the base's (default: the base itself)",
    "k": f"neighbours per position (the position itself excluded); default: the folder's, else {DEFAULT_K}",
    "knn_temp": f"temperature T of softmax(-d/T) over squared L2 distances; default: the folder's, else {DEFAULT_KNN_TEMP:g}",
    "top_m": "keep only the M most probable tokens of each target row (default: all)",
    "index": kinds_help(),
    "block_size": "window length in tokens",
    "stride": "new positions stored per window; the rest is context",
    "max_tokens": "use only the first N tokens of the corpus",
    "batch_size": "windows per forward pass (default: 1 on CPU, 8 on GPU)",
    "device": "auto, cpu or cuda",
    "text_field": "JSONL / dataset field that holds the text",
    "nlist": "ivfpq: inverted lists (default ~4*sqrt(N))",
    "pq_m": "ivfpq: PQ code bytes per key (must divide d)",
    "nprobe": "ivfpq: lists probed per search (default: enough for k)",
    "refine": "ivfpq: re-rank refine*k candidates on exact keys (0: plain PQ distances)",
    "flat_threshold": "auto: exact search up to this many keys (default 100000 on CPU)",
    "search_batch": "positions per target chunk written and recorded (a multiple of 64)",
    "threads": "faiss threads (default: every core)",
    "target_dtype": "how target probabilities are stored: float16 (2 bytes) or uint8 (1 byte: log codes, ±3.2%)",
    "keep_keys": "keep keys.npy once the targets are written (--no-keep-keys deletes it; not with --index torch, "
                 "and the index and targets can then never be rebuilt)",
    "progress": "show progress bars",
}


# --- the progress of one process's share (several processes) ---------------------------------


@dataclass
class KeysProgress(Record):
    """``.keys-shard-i.json``: the keys chunks one process has finished (``KeysStep``'s counters)."""

    chunks_done: int = typed(WHOLE, required=True, default=0)
    seconds: float = typed(NON_NEGATIVE, required=True, default=0.0)
    positions_done: int | None = typed(WHOLE)
    positions: int | None = typed(WHOLE)
    tokens_per_s: float | None = typed(NON_NEGATIVE)


@dataclass
class TargetsProgress(Record):
    """``targets/shard-i/progress.json``: the target rows one process has searched (``TargetsStep``'s counters)."""

    rows_done: int = typed(WHOLE, required=True, default=0)
    nnz: int = typed(WHOLE, required=True, default=0)
    kl_sum: float = typed(SCORE, required=True, default=0.0)
    self_missing: int = typed(WHOLE, required=True, default=0)
    empty_slots: int = typed(WHOLE, required=True, default=0)
    seconds: float = typed(NON_NEGATIVE, required=True, default=0.0)
    rows_per_s: float | None = typed(NON_NEGATIVE)


def _read_progress(cls, path: Path, what: str):
    """A shard's progress file (a ``KeysProgress`` or ``TargetsProgress``)."""
    return cls.from_json(read_json_object(path, what, DatastoreError), path)


def _say(cfg: DatastoreConfig, msg: str) -> None:
    if cfg.progress:
        print(f"memdec datastore: {msg}", file=sys.stderr, flush=True)


def check_config(cfg: DatastoreConfig) -> None:
    """DatastoreError (one line, naming the flag) for any bad setting of ``cfg``: called before any model
    loads or any file is written, as every command's ``check_config``."""
    check_kind(cfg.index)
    if cfg.k is not None and (not isinstance(cfg.k, int) or cfg.k < 1):
        raise DatastoreError(f"--k must be a whole number >= 1, got {cfg.k}")
    if cfg.knn_temp is not None:
        check_temperature(cfg.knn_temp, "--knn-temp", DatastoreError)
    if cfg.top_m is not None and cfg.top_m < 1:
        raise DatastoreError(f"--top-m must be at least 1, got {cfg.top_m}")
    if cfg.block_size < 1 or cfg.stride < 1 or cfg.stride > cfg.block_size:
        raise DatastoreError(f"need 1 <= --stride <= --block-size, got stride {cfg.stride}, block size {cfg.block_size}")
    if cfg.batch_size is not None and cfg.batch_size < 1:
        raise DatastoreError(f"--batch-size must be positive, got {cfg.batch_size}")
    if cfg.target_dtype not in PROB_DTYPES:
        raise DatastoreError(f"--target-dtype must be one of {', '.join(PROB_DTYPES)}, got {cfg.target_dtype!r}")
    if not cfg.keep_keys and cfg.index != "auto" and get_kind(cfg.index).needs_keys_at_search:
        own = or_list(k for k in kind_names() if not get_kind(k).needs_keys_at_search)
        raise DatastoreError(f"--no-keep-keys: a {cfg.index} index searches keys.npy itself; choose --index {own}, "
                             f"or keep the keys")
    if cfg.search_batch < 1 or cfg.search_batch % SEARCH_BLOCK:
        raise DatastoreError(f"--search-batch must be a positive multiple of {SEARCH_BLOCK}, got {cfg.search_batch}")
    check_threads(cfg.threads)
    check_device(cfg.device)
    _check_out_folder(Path(cfg.out).expanduser())


TOKENS_TMP = ".tokens.npy.tmp"  # the token stream as it is tokenized, before it is checked


def _check_out_folder(out: Path) -> None:
    """DatastoreError unless ``out`` is new, empty, or a datastore memdec made (``checks.check_own_folder``)."""
    check_own_folder(out, "datastore", legacy=_is_unmarked_datastore, error=DatastoreError)


def _is_unmarked_datastore(out: Path) -> bool:
    """Whether ``out`` is a datastore memdec made before folder markers: a manifest it reads, or nothing but
    the token stream of an interrupted first tokenization."""
    if all(p.name == TOKENS_TMP for p in out.iterdir()):
        return True
    try:
        read_manifest(out)
    except DatastoreError:
        return False
    return True


COPY_CHUNK = 1 << 24  # elements copied at a time between .npy files


def _copy_npy(src: np.ndarray, path: Path, dtype) -> None:
    """Write the 1-D ``src`` (a memmap) to ``path`` chunk by chunk, atomically."""

    def write(tmp: Path) -> None:
        out = NpyAppender(tmp, dtype)
        for i in range(0, len(src), COPY_CHUNK):
            out.append(src[i : i + COPY_CHUNK])
        out.close()

    atomic_write(path, write)


def _same_npy(a: np.ndarray, b: np.ndarray) -> bool:
    """Whether the 1-D arrays ``a`` and ``b`` (memmaps) are equal, compared chunk by chunk."""
    return len(a) == len(b) and all(np.array_equal(a[i : i + COPY_CHUNK], b[i : i + COPY_CHUNK])
                                    for i in range(0, len(a), COPY_CHUNK))


def _open_manifest(out: Path, identity: dict, tokens_tmp: Path) -> Manifest:
    """Load and check the manifest of ``out``, or start a new datastore there; ``tokens_tmp`` (the
    streamed token stream) becomes ``tokens.npy`` where there is none yet, and is removed."""
    if (out / MANIFEST).exists():
        manifest = read_manifest(out)
        diffs = [f"{f}: {getattr(manifest, f)!r} in the folder, {identity.get(f)!r} requested"
                 for f in IDENTITY_FIELDS if getattr(manifest, f) != identity.get(f)]
        if manifest.corpus_hash != identity["corpus_hash"]:
            diffs.append(f"corpus: {manifest.corpus!r} (max_tokens {manifest.max_tokens}) in the folder, "
                         f"{identity['corpus']!r} (max_tokens {identity['max_tokens']}) requested")
        if diffs:
            tokens_tmp.unlink(missing_ok=True)
            raise DatastoreError(
                f"{out} holds a datastore built from other inputs ({'; '.join(diffs)}); "
                f"choose another --out, or delete {out} to rebuild it"
            )
    else:
        manifest = Manifest(**identity)
        write_manifest(out, manifest)
    n = identity["n_keys"]
    writable = manifest.steps.keys.status != "done"
    new_tokens = writable and not (out / "tokens.npy").exists()  # the stream _prepare just hashed
    if new_tokens:
        os.replace(tokens_tmp, out / "tokens.npy")
    tokens_tmp.unlink(missing_ok=True)
    check_npy(out / "tokens.npy", np.int32, (n + 1,), "token stream")
    stored = np.load(out / "tokens.npy", mmap_mode="r")
    new_values = writable and not (out / "values.npy").exists()
    if new_values:
        _copy_npy(stored[1:], out / "values.npy", np.int32)
    check_npy(out / "values.npy", np.int32, (n,), "values")
    if ((not new_tokens and token_stream_hash(stored) != identity["corpus_hash"])
            or (not new_values and not _same_npy(np.load(out / "values.npy", mmap_mode="r"), stored[1:]))):
        raise DatastoreError(f"{out}: tokens.npy / values.npy do not match the manifest's corpus hash (corrupt); "
                             f"delete {out} to rebuild it")
    return manifest


# --- processes: one, or several under accelerate launch / torchrun ----------------------------


@dataclass
class Ranks:
    """This process's place in a launch: ``rank`` of ``world`` processes, and the device it runs on.

    Alone (no ``WORLD_SIZE`` above 1 in the environment) it is rank 0 of 1 and ``barrier`` does
    nothing; under ``accelerate launch`` or ``torchrun`` accelerate's ``PartialState`` joins the
    process group (gloo on CPU, NCCL on GPUs; each rank takes its own GPU), as training does.
    """

    rank: int = 0
    world: int = 1
    device: str = "cpu"
    state: PartialState | None = None

    @property
    def main(self) -> bool:
        return self.rank == 0

    def barrier(self) -> None:
        """Wait until every process gets here."""
        if self.state is not None:
            self.state.wait_for_everyone()


BARRIER_TIMEOUT = datetime.timedelta(days=7)  # the other ranks wait while rank 0 tokenizes, builds the index
# or merges the targets: hours at a billion tokens, far past torch's default of 30 minutes


def launched_ranks(device: str) -> Ranks:
    """The ``Ranks`` of this process on ``device`` (cpu or cuda) under the launcher that started it."""
    if int(os.environ.get("WORLD_SIZE", "1")) <= 1:
        return Ranks(device=device)
    state = PartialState(cpu=not device.startswith("cuda"), timeout=BARRIER_TIMEOUT)
    return Ranks(state.process_index, state.num_processes, str(state.device) if device.startswith("cuda") else "cpu", state)


def is_main_process() -> bool:
    """Whether this process prints a launch's results (rank 0, or a process on its own)."""
    return os.environ.get("RANK", "0") == "0"


def _sync(out: Path, manifest: Manifest | None, ranks: Ranks) -> Manifest:
    """A barrier, after which every rank holds the manifest rank 0 wrote (rank 0 keeps its own)."""
    ranks.barrier()
    return manifest if ranks.main else read_manifest(out)


def shard_bounds(start: int, end: int, world: int, align: int = 1) -> list[list[int]]:
    """``world`` contiguous ranges ``[a, b)`` that tile ``[start, end)`` as evenly as ``align`` allows
    (every inner bound is ``start`` plus a multiple of ``align``)."""
    units = -(-(end - start) // align)
    cuts = [min(end, start + align * (units * i // world)) for i in range(world + 1)]
    return [[cuts[i], cuts[i + 1]] for i in range(world)]


def _default_threads(cfg: DatastoreConfig, ranks: Ranks) -> int:
    """--threads, else this machine's cores shared among the launch's processes on it."""
    local = int(os.environ.get("LOCAL_WORLD_SIZE", ranks.world))
    return cfg.threads or max(1, (os.cpu_count() or 1) // max(local, 1))


# --- step 1: keys and values -----------------------------------------------------------------


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
        done = _read_progress(KeysProgress, path, "keys shard progress").chunks_done if path.is_file() else 0
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
            _say(cfg, f"the keys were begun by {len(shards)} processes, resumed by {world}: "
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
        _say(cfg, f"resuming keys: {finished}/{n_chunks} chunks are done")
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
    _say(cfg, f"rebuilding the keys (and then the index and the targets): key model "
              f"{key_model_text(manifest.steps.keys.key_model)} -> {key_model_text(key_model)}")
    manifest.update(layer=None, dim=None)
    manifest.steps = Steps()
    write_manifest(out, manifest)


def _keys_step(out: Path, manifest: Manifest, cfg: DatastoreConfig, tokens: np.ndarray, on_chunk, ranks: Ranks,
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
        manifest = _sync(out, manifest, ranks)
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
        dim = int(forward_ffn_inputs(model, torch.from_numpy(np.array(tokens[None, :2], dtype=np.int64)).to(device), capture).shape[-1])
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
    manifest = _sync(out, manifest, ranks)
    step = manifest.steps.keys
    if ranks.world == 1:
        record, first, end = step, step.chunks_done, len(chunks)
        save = lambda: write_manifest(out, manifest)  # noqa: E731
    else:
        shard_file = _key_shard_file(out, ranks.rank)
        (a, end), record = step.shards[ranks.rank], _read_progress(KeysProgress, shard_file, "keys shard progress")
        first = a + record.chunks_done
        save = lambda: atomic_write_json(shard_file, record.to_json())  # noqa: E731
    t0 = time.perf_counter()
    _compute_keys(keys_path, chunks, (first, end), model, tokens, capture, record, save, on_chunk,
                  manifest.prefix_token, device, cfg.progress and ranks.main)
    manifest = _sync(out, manifest, ranks)
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
                _pwrite_all(fd, window_keys(model, tokens, batch, capture, device, prefix).tobytes(), offset + p0 * row_bytes)
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
        records = [_read_progress(KeysProgress, _key_shard_file(out, i), "keys shard progress")
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


# --- step 2: index ---------------------------------------------------------------------------


def _index_params(cfg: DatastoreConfig, n: int, dim: int):
    return choose_params(n, dim, cfg.index, nlist=cfg.nlist, pq_m=cfg.pq_m, nprobe=cfg.nprobe,
                         refine=cfg.refine, flat_threshold=cfg.flat_threshold)


def _need_keys(out: Path, manifest: Manifest, what: str) -> None:
    """DatastoreError where keys.npy was deleted (--no-keep-keys) and ``what`` needs it."""
    if manifest.steps.keys.dropped:
        raise DatastoreError(f"{out}: cannot {what}: keys.npy was deleted after the build (--no-keep-keys); "
                             f"rerun with the options it was built with, or rebuild it in a new --out")


def _drop_keys(out: Path, manifest: Manifest, cfg: DatastoreConfig) -> None:
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
    _say(cfg, "deleted keys.npy (--no-keep-keys)")


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


def _index_step(out: Path, manifest: Manifest, cfg: DatastoreConfig) -> None:
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
            _say(cfg, f"{missing.name} is missing: rebuilding the index")
        elif path.exists():
            raise DatastoreError(f"{path}: {path.stat().st_size} bytes, the manifest says {step.bytes} "
                                 f"(truncated or corrupt); delete it to rebuild the index")
        else:
            _say(cfg, f"{path.name} is missing: rebuilding the index")
    if step.status in ("done", "running") and step.params != params.to_json():
        _say(cfg, f"rebuilding the index (and then the targets): {step.params} -> {params.to_json()}")
    _need_keys(out, manifest, "rebuild the index")
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


# --- step 3: kNN targets ---------------------------------------------------------------------


def _numpy_batch_targets(index, keys: np.ndarray, values: np.ndarray, nprobe: int | None, cfg: DatastoreConfig):
    """``rows(r0, r1)`` for any index, in numpy: search, drop self, values, CSR rows.

    It returns ((offsets [b+1], token_ids [nnz], probs float32 [nnz], kept [b]), positions
    that missed their own entry, empty neighbour slots).
    """
    def rows(r0: int, r1: int):
        dists, ids = search(index, keys[r0:r1], cfg.k + 1, nprobe=nprobe)
        query_ids = np.arange(r0, r1)
        self_missing = int((~(ids == query_ids[:, None]).any(axis=1)).sum())
        dists, ids = drop_self(dists, ids, query_ids)
        csr = knn_distribution(dists, lookup_values(ids, values), cfg.knn_temp, cfg.top_m, return_kept_mass=True)
        return csr, self_missing, int((ids < 0).sum())

    return rows


def _torch_batch_targets(index, keys: np.ndarray, values: np.ndarray, cfg: DatastoreConfig):
    """``rows(r0, r1)`` as ``_numpy_batch_targets`` returns, for a TorchFlatIndex: search, drop
    self, value lookup and the distributions all run on the index's device (the GPU)."""
    values_dev = torch.from_numpy(np.asarray(values, dtype=np.int64)).to(index.device)

    def rows(r0: int, r1: int):
        queries = torch.from_numpy(np.asarray(keys[r0:r1], dtype=np.float32))
        dists, ids = index.search_torch(queries, cfg.k + 1)
        query_ids = torch.arange(r0, r1, device=ids.device)
        self_missing = int((~(ids == query_ids[:, None]).any(dim=1)).sum())
        dists, ids = drop_self_torch(dists, ids, query_ids)  # an exact index leaves no empty slot
        csr = knn_distribution_torch(dists, values_dev[ids], cfg.knn_temp, cfg.top_m, return_kept_mass=True)
        return csr, self_missing, 0

    return rows


def _blockwise(rows):
    """``rows(r0, r1)`` computed over aligned blocks of SEARCH_BLOCK positions and joined: each
    position is always searched beside the same others, so a chunk's size never changes a byte."""

    def joined(r0: int, r1: int):
        parts = [rows(b0, min(b0 + SEARCH_BLOCK, r1)) for b0 in range(r0, r1, SEARCH_BLOCK)]
        offsets = [np.zeros(1, dtype=np.int64)]
        for (off, tok, _, _), _, _ in parts:
            offsets.append(off[1:] + offsets[-1][-1])
        csr = (np.concatenate(offsets), *(np.concatenate([p[0][i] for p in parts]) for i in (1, 2, 3)))
        return csr, sum(p[1] for p in parts), sum(p[2] for p in parts)

    return joined


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
        _say(cfg, f"rebuilding the kNN targets: {changed}")
    plan = shard_bounds(0, n, world, SEARCH_BLOCK) if world > 1 else None  # aligned: the same search blocks as one process
    if step.status == "running" and same and step.shards == plan:
        return
    if step.status == "running" and same:
        _say(cfg, f"the targets were begun by {len(step.shards or [0])} processes, resumed by {world}: "
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


def _targets_step(out: Path, manifest: Manifest, cfg: DatastoreConfig, on_chunk, ranks: Ranks) -> Manifest:
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
    _need_keys(out, manifest, "rebuild the kNN targets")
    set_num_threads(_default_threads(cfg, ranks))
    index = load_index(out / "index.faiss")
    if ranks.main:
        _plan_targets(out, manifest, cfg, want, index, ranks.world)
    manifest = _sync(out, manifest, ranks)
    step = manifest.steps.targets
    keys, values = np.load(out / "keys.npy", mmap_mode="r"), np.load(out / "values.npy")
    if isinstance(index, TorchFlatIndex):
        target_rows = _blockwise(_torch_batch_targets(index, keys, values, cfg))
    else:
        target_rows = _blockwise(_numpy_batch_targets(index, keys, values, step.nprobe, cfg))
    if cfg.target_dtype == "uint8":
        target_rows = _log_u8_rows(target_rows)
    batch, show = step.search_batch, cfg.progress and ranks.main
    t0 = time.perf_counter()
    if ranks.world == 1:
        first = step.rows_done
        _append_target_rows(folder, step, (0, n), batch, target_rows, lambda: write_manifest(out, manifest), on_chunk, show,
                            cfg.target_dtype)
    elif ranks.rank >= (step.merged or 0):  # a merged shard is done
        shard = _target_shard_dir(out, ranks.rank)
        record = _read_progress(TargetsProgress, shard / "progress.json", "targets shard progress")
        _append_target_rows(shard, record, tuple(step.shards[ranks.rank]), batch, target_rows,
                            lambda: atomic_write_json(shard / "progress.json", record.to_json()), on_chunk, show,
                            cfg.target_dtype)
    manifest = _sync(out, manifest, ranks)
    if ranks.main:
        if ranks.world > 1:
            first = 0
            _merge_target_shards(out, manifest, cfg)
        _finish_targets(out, manifest, n - first, time.perf_counter() - t0)
    return manifest


def _log_u8_rows(rows):
    """``rows(r0, r1)`` with its probabilities as uint8 log codes (``targets.encode_log_u8``): the
    entries past code 255 dropped, each row's kept mass scaled by what the codes keep."""

    def coded(r0: int, r1: int):
        (off, tok, prob, kept), self_missing, empty_slots = rows(r0, r1)
        off, tok, codes, kept_codes = encode_log_u8(off, tok, prob)
        return (off, tok, codes, kept * kept_codes), self_missing, empty_slots

    return coded


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
    _say(cfg, f"merging {len(step.shards)} target shards")
    for i in range(merged):  # recorded as merged, but the run stopped before deleting it
        shutil.rmtree(_target_shard_dir(out, i), ignore_errors=True)
    prob_dtype = step.prob_dtype or "float16"
    offsets, token_ids, probs = _open_target_files(folder, merged, nnz, n, prob_dtype)
    for i in range(merged, len(step.shards)):
        (a, b), shard = step.shards[i], _target_shard_dir(out, i)
        record = _read_progress(TargetsProgress, shard / "progress.json", "targets shard progress")
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


# --- the whole build -------------------------------------------------------------------------


def _with_target_defaults(cfg: DatastoreConfig, out: Path) -> DatastoreConfig:
    """``--k`` and ``--knn-temp`` left out keep the folder's values (else the defaults), so a rerun
    without them never rebuilds the targets."""
    recorded = read_manifest(out).steps.targets if (out / MANIFEST).is_file() else TargetsStep()
    k = cfg.k if cfg.k is not None else recorded.k or DEFAULT_K
    temp = cfg.knn_temp if cfg.knn_temp is not None else float(recorded.temperature or DEFAULT_KNN_TEMP)
    return dataclasses.replace(cfg, k=k, knn_temp=temp)



def _key_model(cfg: DatastoreConfig, tokenizer) -> dict | None:
    """``{spec, hash}`` of ``--key-model`` (None when it is the base itself), its tokenizer
    checked against the base's before any weights load."""
    if cfg.key_model is None or cfg.key_model == cfg.model:
        return None
    check_same_tokenizer(cfg.key_model, tokenizer_fingerprint(tokenizer), f"--key-model {cfg.key_model}: the base model",
                         made_with=cfg.model)
    return {"spec": cfg.key_model, "hash": model_fingerprint(cfg.key_model)}


def _prepare(out: Path, cfg: DatastoreConfig, tokenizer) -> Manifest:
    """Rank 0: stream the corpus's tokens into the folder, check them against (or start) the manifest."""
    _check_out_folder(out)
    created = not out.exists()
    empty = created or not any(out.iterdir())
    mark_own_folder(out, "datastore")  # first: the marker says the folder is memdec's
    try:
        tokens = stream_tokens_to_file(cfg.corpus, tokenizer, out / TOKENS_TMP, cfg.max_tokens, cfg.text_field)
        n = len(tokens) - 1
        if cfg.k >= n:
            raise DatastoreError(f"--k {cfg.k} must be smaller than the number of keys N={n}: "
                                 f"each position needs k neighbours besides itself")
    except BaseException:  # bad input: leave the folder as it was
        (out / TOKENS_TMP).unlink(missing_ok=True)
        if empty:
            (out / OWN_MARKER).unlink(missing_ok=True)
        if created:
            out.rmdir()
        raise
    identity = {
        "model": cfg.model, "model_hash": base_fingerprint(cfg.model),
        "tokenizer_hash": tokenizer_fingerprint(tokenizer), "corpus": cfg.corpus,
        "corpus_hash": token_stream_hash(tokens), "text_field": cfg.text_field, "n_keys": n,
        "block_size": cfg.block_size, "stride": cfg.stride, "max_tokens": cfg.max_tokens,
    }
    if (prefix := bos_prefix(tokenizer)) is not None:  # recorded only where there is one: other manifests stay as they were
        identity["prefix_token"] = prefix
    del tokens
    manifest = _open_manifest(out, identity, out / TOKENS_TMP)
    if (source := corpus_source(cfg.corpus)) is not None and manifest.corpus_source != source:
        manifest.corpus_source = source  # what the stdlib spec read here; the token stream's hash is the identity
        write_manifest(out, manifest)
    return manifest


def build_datastore(cfg: DatastoreConfig, on_chunk: Callable[[str, int], None] | None = None) -> Path:
    """Build (or resume, or update) the datastore ``cfg.out``; returns its path.

    Under ``accelerate launch`` / ``torchrun`` every process runs this: rank 0 tokenizes the corpus
    and builds the index; the keys and the targets are split among the ranks (``_keys_step``,
    ``_targets_step``), and rank 0 records each step once every rank is done.
    ``on_chunk(step, chunk_index)`` is called after each chunk of the keys and targets steps has
    been written and recorded (used by tests to simulate an interruption).
    Raises DatastoreError on bad input, before anything already written is touched.
    """
    check_config(cfg)
    out = Path(cfg.out).expanduser()
    cfg = _with_target_defaults(cfg, out)
    ranks = launched_ranks(resolve_device(cfg.device))
    tokenizer = load_tokenizer(cfg.model)
    check_block_size(load_config(cfg.model), cfg.block_size, cfg.model)  # before anything is written
    key_model = _key_model(cfg, tokenizer)
    manifest = _sync(out, _prepare(out, cfg, tokenizer) if ranks.main else None, ranks)
    tokens = np.load(out / "tokens.npy", mmap_mode="r")
    manifest = _keys_step(out, manifest, cfg, tokens, on_chunk, ranks, key_model)
    if ranks.main:
        _index_step(out, manifest, cfg)
    manifest = _sync(out, manifest, ranks)
    manifest = _targets_step(out, manifest, cfg, on_chunk, ranks)
    if ranks.main:
        _drop_keys(out, manifest, cfg)
        n = manifest.n_keys
        files = {str(p.relative_to(out)): p.stat().st_size for p in sorted(out.rglob("*"))
                 if p.is_file() and not p.name.startswith(".") and p.name != MANIFEST}
        manifest.disk = {"files": files, "bytes_per_token": round(sum(files.values()) / n, 2)}
        write_manifest(out, manifest)
    ranks.barrier()
    return out
