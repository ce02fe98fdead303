"""The whole build: ``build_datastore`` runs the three steps in order on every rank of a launch."""

from __future__ import annotations

from pathlib import Path
from typing import Callable

import numpy as np

from ..models import check_block_size, load_config, load_tokenizer, resolve_device
from ..store import MANIFEST, write_manifest
from .config import DatastoreConfig, check_config
from .index_step import drop_keys, index_step
from .keys import keys_step
from .prepare import prepare, resolve_key_model, with_target_defaults
from .ranks import launched_ranks, sync
from .targets_step import targets_step


def build_datastore(cfg: DatastoreConfig, on_chunk: Callable[[str, int], None] | None = None) -> Path:
    """Build (or resume, or update) the datastore ``cfg.out``; returns its path.

    Under ``accelerate launch`` / ``torchrun`` every process runs this: rank 0 tokenizes the corpus
    and builds the index; the keys and the targets are split among the ranks (``keys_step``,
    ``targets_step``), and rank 0 records each step once every rank is done.
    ``on_chunk(step, chunk_index)`` is called after each chunk of the keys and targets steps has
    been written and recorded (used by tests to simulate an interruption).
    Raises DatastoreError on bad input, before anything already written is touched.
    """
    check_config(cfg)
    out = Path(cfg.out).expanduser()
    cfg = with_target_defaults(cfg, out)
    ranks = launched_ranks(resolve_device(cfg.device))
    tokenizer = load_tokenizer(cfg.model)
    check_block_size(load_config(cfg.model), cfg.block_size, cfg.model)  # before anything is written
    key_model = resolve_key_model(cfg, tokenizer)
    manifest = sync(out, prepare(out, cfg, tokenizer) if ranks.main else None, ranks)
    tokens = np.load(out / "tokens.npy", mmap_mode="r")
    manifest = keys_step(out, manifest, cfg, tokens, on_chunk, ranks, key_model)
    if ranks.main:
        index_step(out, manifest, cfg)
    manifest = sync(out, manifest, ranks)
    manifest = targets_step(out, manifest, cfg, on_chunk, ranks)
    if ranks.main:
        drop_keys(out, manifest, cfg)
        n = manifest.n_keys
        files = {str(p.relative_to(out)): p.stat().st_size for p in sorted(out.rglob("*"))
                 if p.is_file() and not p.name.startswith(".") and p.name != MANIFEST}
        manifest.disk = {"files": files, "bytes_per_token": round(sum(files.values()) / n, 2)}
        write_manifest(out, manifest)
    ranks.barrier()
    return out
