"""``flat``: ``faiss.IndexFlatL2``, exact. ``auto`` picks it up to ``flat_threshold`` keys."""

from __future__ import annotations

import numpy as np

from .base import IndexParams, register
from .faiss_common import FaissKind, _faiss, is_faiss, ivf


class FlatKind(FaissKind):
    name = "flat"
    description = "exact"

    def empty(self, keys: np.ndarray, params: IndexParams):
        return _faiss().IndexFlatL2(keys.shape[1])

    def matches(self, index) -> bool:
        return is_faiss(index) and ivf(index) is None


FLAT = register(FlatKind())
