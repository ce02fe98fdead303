"""The joint model's cache (``JointCache``: one KV cache per model, moved together) and the helpers
both ways in share (``position_ids_from_mask``)."""

from __future__ import annotations

import inspect

import torch
from transformers.cache_utils import Cache


def _accepts(model, name: str) -> bool:
    return name in inspect.signature(model.forward).parameters


def position_ids_from_mask(attention_mask: torch.Tensor | None, length: int, device=None) -> torch.Tensor:
    """Positions [B, L] (or [1, L]) that skip left padding, as ``generate`` makes them."""
    if attention_mask is None:
        return torch.arange(length, device=device)[None]
    pos = attention_mask.long().cumsum(-1) - 1
    return pos.masked_fill(attention_mask == 0, 0)


# --------------------------------------------------------------------------------------------
# The cache: one per model


class JointCache(Cache):
    """Two KV caches, the base model's and the memory decoder's, moved together.

    ``generate`` sees one Cache: lengths and masks come from the base model's cache; beam-search
    reordering, cropping and batch selection apply to both.
    """

    def __init__(self, base: Cache, memdec: Cache):  # noqa: D107 (no Cache.__init__: the inner caches own the layers)
        self.base = base
        self.memdec = memdec
        self.offloading = False

    @property
    def layers(self):
        return self.base.layers

    def __repr__(self) -> str:
        return f"JointCache(base={self.base!r}, memdec={self.memdec!r})"

    def __len__(self) -> int:
        return len(self.base)

    def update(self, *args, **kwargs):
        raise TypeError("JointCache is not a per-layer cache: pass .base or .memdec to a model")

    def get_seq_length(self, layer_idx: int = 0) -> int:
        return self.base.get_seq_length(layer_idx)

    def get_max_length(self, layer_idx: int | None = None) -> int:
        return self.base.get_max_length(layer_idx)

    def get_mask_sizes(self, query_length: int, layer_idx: int) -> tuple[int, int]:
        return self.base.get_mask_sizes(query_length, layer_idx)

    def _both(self, method: str, *args) -> None:
        getattr(self.base, method)(*args)
        getattr(self.memdec, method)(*args)

    def reset(self) -> None:
        self._both("reset")

    def reorder_cache(self, beam_idx: torch.LongTensor) -> None:
        self._both("reorder_cache", beam_idx)

    def crop(self, tokens_to_remove: int) -> None:
        self.base.crop(tokens_to_remove)
        for layer in self.memdec.layers:  # a shared trunk leaves the decoder's lower layers empty:
            if layer.is_initialized:  # a sliding-window layer cannot crop what it never held
                layer.crop(tokens_to_remove)

    def batch_repeat_interleave(self, repeats: int) -> None:
        self._both("batch_repeat_interleave", repeats)

    def batch_select_indices(self, indices: torch.Tensor) -> None:
        self._both("batch_select_indices", indices)

    def activate_past_recording(self) -> None:
        self._both("activate_past_recording")

    @property
    def batch_size(self) -> int:
        return self.base.batch_size

    @property
    def is_compileable(self) -> bool:
        return False  # dynamic caches only

    @property
    def is_initialized(self) -> bool:
        return self.base.is_initialized and self.memdec.is_initialized

    @property
    def is_croppable(self) -> bool:
        return self.base.is_croppable and self.memdec.is_croppable

    @property
    def is_sliding(self) -> list[bool]:
        return self.base.is_sliding

    @property
    def is_linear(self) -> list[bool]:
        return self.base.is_linear

    @property
    def is_dummy(self) -> list[bool]:
        return self.base.is_dummy

