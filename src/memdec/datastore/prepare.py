"""Before the steps (rank 0): the corpus streamed into ``tokens.npy``, checked against the folder's
manifest or starting a new one, ``values.npy`` beside it; the ``--key-model`` and the target
settings a rerun keeps."""

from __future__ import annotations

import dataclasses
import os
from pathlib import Path

import numpy as np

from ..checks import OWN_MARKER, mark_own_folder
from ..data import corpus_source, stream_tokens_to_file, token_stream_hash
from ..errors import DatastoreError
from ..files import NpyAppender, atomic_write, check_npy
from ..models import base_fingerprint, bos_prefix, check_same_tokenizer, model_fingerprint, tokenizer_fingerprint
from ..store import (DEFAULT_K, DEFAULT_KNN_TEMP, IDENTITY_FIELDS, MANIFEST, Manifest, TargetsStep, read_manifest,
                     write_manifest)
from .config import TOKENS_TMP, DatastoreConfig, check_out_folder

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
    new_tokens = writable and not (out / "tokens.npy").exists()  # the stream prepare just hashed
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


def with_target_defaults(cfg: DatastoreConfig, out: Path) -> DatastoreConfig:
    """``--k`` and ``--knn-temp`` left out keep the folder's values (else the defaults), so a rerun
    without them never rebuilds the targets."""
    recorded = read_manifest(out).steps.targets if (out / MANIFEST).is_file() else TargetsStep()
    k = cfg.k if cfg.k is not None else recorded.k or DEFAULT_K
    temp = cfg.knn_temp if cfg.knn_temp is not None else float(recorded.temperature or DEFAULT_KNN_TEMP)
    return dataclasses.replace(cfg, k=k, knn_temp=temp)



def resolve_key_model(cfg: DatastoreConfig, tokenizer) -> dict | None:
    """``{spec, hash}`` of ``--key-model`` (None when it is the base itself), its tokenizer
    checked against the base's before any weights load."""
    if cfg.key_model is None or cfg.key_model == cfg.model:
        return None
    check_same_tokenizer(cfg.key_model, tokenizer_fingerprint(tokenizer),
                         f"--key-model {cfg.key_model}: the base model",
                         made_with=cfg.model)
    return {"spec": cfg.key_model, "hash": model_fingerprint(cfg.key_model)}


def prepare(out: Path, cfg: DatastoreConfig, tokenizer) -> Manifest:
    """Rank 0: stream the corpus's tokens into the folder, check them against (or start) the manifest."""
    check_out_folder(out)
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
    # recorded only where there is one: other manifests stay as they were
    if (prefix := bos_prefix(tokenizer)) is not None:
        identity["prefix_token"] = prefix
    del tokens
    manifest = _open_manifest(out, identity, out / TOKENS_TMP)
    if (source := corpus_source(cfg.corpus)) is not None and manifest.corpus_source != source:
        manifest.corpus_source = source  # what the stdlib spec read here; the token stream's hash is the identity
        write_manifest(out, manifest)
    return manifest
