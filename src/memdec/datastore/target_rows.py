"""The rows of the kNN targets: ``rows(r0, r1)`` searches the keys of positions [r0, r1), drops each
position's own entry and turns the rest into CSR distributions over next tokens, in numpy for any
index or on the device of an index that searches there (``IndexKind.device_search``); computed in
aligned blocks of ``SEARCH_BLOCK`` positions so that the files never depend on the chunk size."""

from __future__ import annotations

import numpy as np
import torch

from ..index import search
from ..targets import drop_self, drop_self_torch, encode_log_u8, knn_distribution, knn_distribution_torch, lookup_values
from .config import SEARCH_BLOCK, DatastoreConfig


def numpy_batch_targets(index, keys: np.ndarray, values: np.ndarray, nprobe: int | None, cfg: DatastoreConfig):
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


def torch_batch_targets(index, keys: np.ndarray, values: np.ndarray, cfg: DatastoreConfig):
    """``rows(r0, r1)`` as ``numpy_batch_targets`` returns, for an index that searches on its device
    (``IndexKind.device_search``: a ``TorchFlatIndex``): search, drop self, value lookup and the
    distributions all run on the index's device (the GPU)."""
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


def blockwise(rows):
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


def log_u8_rows(rows):
    """``rows(r0, r1)`` with its probabilities as uint8 log codes (``targets.encode_log_u8``): the
    entries past code 255 dropped, each row's kept mass scaled by what the codes keep."""

    def coded(r0: int, r1: int):
        (off, tok, prob, kept), self_missing, empty_slots = rows(r0, r1)
        off, tok, codes, kept_codes = encode_log_u8(off, tok, prob)
        return (off, tok, codes, kept * kept_codes), self_missing, empty_slots

    return coded
