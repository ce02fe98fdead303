"""``flat``: ``faiss.IndexFlatL2``, exact. ``auto`` picks it up to ``flat_threshold`` keys."""

from __future__ import annotations

import numpy as np

from .base import IndexParams, Machine, register
from .faiss_common import FaissKind, _faiss, is_faiss, ivf

FLAT_THRESHOLD = 100_000  # auto: exact search up to this many keys on CPU (N² d work)
FLAT_THRESHOLD_GPU = 2_000_000


class FlatKind(FaissKind):
    name = "flat"
    description = "exact"
    auto_order = 1  # after torch

    def picks_for(self, n: int, d: int, machine: Machine) -> bool:
        """Up to ``--flat-threshold`` keys (default 100k on CPU, 2M on a faiss GPU)."""
        threshold = machine.flat_threshold
        if threshold is None:
            threshold = FLAT_THRESHOLD_GPU if machine.faiss_gpu else FLAT_THRESHOLD
        return n <= threshold

    def empty(self, keys: np.ndarray, params: IndexParams):
        return _faiss().IndexFlatL2(keys.shape[1])

    def matches(self, index) -> bool:
        return is_faiss(index) and ivf(index) is None


FLAT = register(FlatKind())
