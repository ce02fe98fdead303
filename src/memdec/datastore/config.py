"""``memdec datastore``'s options: ``DatastoreConfig``, their help (``DATASTORE_HELP``) and their one
check (``check_config``), the output folder's check, and the build's progress lines (``say``)."""

from __future__ import annotations

import sys
from dataclasses import dataclass
from pathlib import Path

from ..checks import check_device, check_own_folder, check_temperature, check_threads
from ..errors import DatastoreError
from ..index import kind_names, kinds_help, named_kind, or_list
from ..store import DEFAULT_K, DEFAULT_KNN_TEMP, read_manifest
from ..targets import PROB_DTYPES

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
    "knn_temp": f"temperature T of softmax(-d/T) over squared L2 distances; default: the folder's, "
                f"else {DEFAULT_KNN_TEMP:g}",
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


def say(cfg: DatastoreConfig, msg: str) -> None:
    """One line of the build's progress on stderr (not with ``--no-progress``)."""
    if cfg.progress:
        print(f"memdec datastore: {msg}", file=sys.stderr, flush=True)


def check_config(cfg: DatastoreConfig) -> None:
    """DatastoreError (one line, naming the flag) for any bad setting of ``cfg``: called before any model
    loads or any file is written, as every command's ``check_config``."""
    kind = named_kind(cfg.index)  # None: auto
    if cfg.k is not None and (not isinstance(cfg.k, int) or cfg.k < 1):
        raise DatastoreError(f"--k must be a whole number >= 1, got {cfg.k}")
    if cfg.knn_temp is not None:
        check_temperature(cfg.knn_temp, "--knn-temp", DatastoreError)
    if cfg.top_m is not None and cfg.top_m < 1:
        raise DatastoreError(f"--top-m must be at least 1, got {cfg.top_m}")
    if cfg.block_size < 1 or cfg.stride < 1 or cfg.stride > cfg.block_size:
        raise DatastoreError(f"need 1 <= --stride <= --block-size, got stride {cfg.stride}, "
                             f"block size {cfg.block_size}")
    if cfg.batch_size is not None and cfg.batch_size < 1:
        raise DatastoreError(f"--batch-size must be positive, got {cfg.batch_size}")
    if cfg.target_dtype not in PROB_DTYPES:
        raise DatastoreError(f"--target-dtype must be one of {', '.join(PROB_DTYPES)}, got {cfg.target_dtype!r}")
    if not cfg.keep_keys and kind is not None and kind.needs_keys_at_search:
        own = or_list(k for k in kind_names() if not named_kind(k).needs_keys_at_search)
        raise DatastoreError(f"--no-keep-keys: a {cfg.index} index searches keys.npy itself; choose --index {own}, "
                             f"or keep the keys")
    if cfg.search_batch < 1 or cfg.search_batch % SEARCH_BLOCK:
        raise DatastoreError(f"--search-batch must be a positive multiple of {SEARCH_BLOCK}, got {cfg.search_batch}")
    check_threads(cfg.threads)
    check_device(cfg.device)
    check_out_folder(Path(cfg.out).expanduser())


TOKENS_TMP = ".tokens.npy.tmp"  # the token stream as it is tokenized, before it is checked


def check_out_folder(out: Path) -> None:
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
