"""``memdec datastore``'s options: ``DatastoreConfig``, each declared once with its help (``DATASTORE_HELP``: the
help by name), their one check (``check_config``), the output folder's check, and the build's progress lines
(``say``)."""

from __future__ import annotations

import sys
from dataclasses import dataclass
from pathlib import Path

from ..checks import check_device, check_own_folder, check_temperature, check_threads
from ..errors import DatastoreError
from ..index import kind_names, kinds_help, named_kind, or_list
from ..options import help_of, option
from ..store import DEFAULT_K, DEFAULT_KNN_TEMP, read_manifest
from ..targets import PROB_DTYPES

SEARCH_BLOCK = 64  # the targets search this many positions per call, at aligned offsets: the
# distances (and so the files) are then the same whatever --search-batch, since BLAS rounding
# depends on how many queries a call holds


@dataclass
class DatastoreConfig:
    """The options of one ``memdec datastore`` build, one flag per field, each declared once (``option``);
    ``DATASTORE_HELP`` is their help by name."""

    model: str = option("base model spec: alias (smollm2-135m), local HF folder, .gguf file, or hub id")
    corpus: str = option("corpus spec: austen:train|valid|test, stdlib:train|valid|test, a text/JSONL file, a folder "
                         "or a glob")
    out: str = option("datastore folder (created; an interrupted build resumes here)")
    key_model: str | None = option(  # None: the keys come from the base model itself
        "take the keys from this model (same tokenizer as --model), e.g. a domain-adapted one: a CE-trained decoder "
        "or a dapt baseline; windows, values and tokens stay the base's (default: the base itself)", None)
    k: int | None = option("neighbours per position (the position itself excluded)", None,
                           note=f"the folder's, else {DEFAULT_K}")  # None: the folder's k, or DEFAULT_K for a new one
    knn_temp: float | None = option("temperature T of softmax(-d/T) over squared L2 distances", None,
                                    note=f"the folder's, else {DEFAULT_KNN_TEMP:g}")
    top_m: int | None = option("keep only the M most probable tokens of each target row (default: all)", None)
    index: str = option(kinds_help(), "auto")
    block_size: int = option("window length in tokens", 1024)
    stride: int = option("new positions stored per window; the rest is context", 512)
    max_tokens: int | None = option("use only the first N tokens of the corpus", None)
    batch_size: int | None = option("windows per forward pass (default: 1 on CPU, 8 on GPU)", None)
    device: str = option("auto, cpu or cuda", "auto")
    text_field: str = option("JSONL / dataset field that holds the text", "text")
    nlist: int | None = option("ivfpq: inverted lists (default ~4*sqrt(N))", None)
    pq_m: int | None = option("ivfpq: PQ code bytes per key (must divide d)", None)
    nprobe: int | None = option("ivfpq: lists probed per search (default: enough for k)", None)
    refine: int | None = option("ivfpq: re-rank refine*k candidates on exact keys (0: plain PQ distances)", None)
    flat_threshold: int | None = option("auto: exact search up to this many keys (default 100000 on CPU)", None)
    search_batch: int = option(f"positions per target chunk written and recorded (a multiple of {SEARCH_BLOCK})", 1024)
    threads: int | None = option("faiss threads (default: every core)", None)
    target_dtype: str = option("how target probabilities are stored: float16 (2 bytes) or uint8 (1 byte: log codes, "
                               "±3.2%)", "float16")
    keep_keys: bool = option("keep keys.npy once the targets are written (--no-keep-keys deletes it; not with --index "
                             "torch, and the index and targets can then never be rebuilt)", True)
    progress: bool = option("show progress bars", True)


DATASTORE_HELP = help_of(DatastoreConfig)  # each option's help, by field name (declared once, on DatastoreConfig)


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
