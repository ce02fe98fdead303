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

The package, one concern a module (each imports only those listed after it):

    build.py         build_datastore: the steps in order, on every rank
    targets_step.py  step 3: plan, resume, the CSR files, the shards' merge, support_stats
    keys.py          step 1: the keys of each rank's window chunks, written in place
    index_step.py    step 2: the index, kept or rebuilt; --no-keep-keys
    prepare.py       the token stream, values.npy and the manifest, checked or started
    target_rows.py   one chunk's target rows: search, drop self, distributions (numpy, or the index's device)
    ranks.py         Ranks, launched_ranks, sync, shard_bounds
    progress.py      KeysProgress, TargetsProgress: a rank's share of a step
    config.py        DatastoreConfig, DATASTORE_HELP, check_config
"""

from .build import build_datastore
from .config import DATASTORE_HELP, SEARCH_BLOCK, TOKENS_TMP, DatastoreConfig, check_config
from .prepare import COPY_CHUNK
from .progress import KeysProgress, TargetsProgress
from .ranks import BARRIER_TIMEOUT, Ranks, is_main_process, launched_ranks, shard_bounds
from .target_rows import blockwise, numpy_batch_targets, torch_batch_targets
from .targets_step import MERGE_ROWS, SUPPORT_PERCENTILES, support_stats

__all__ = [
    "BARRIER_TIMEOUT", "COPY_CHUNK", "DATASTORE_HELP", "MERGE_ROWS", "SEARCH_BLOCK", "SUPPORT_PERCENTILES",
    "TOKENS_TMP",
    "DatastoreConfig", "KeysProgress", "Ranks", "TargetsProgress", "blockwise", "build_datastore", "check_config",
    "is_main_process", "launched_ranks", "numpy_batch_targets", "shard_bounds", "support_stats",
    "torch_batch_targets",
]
