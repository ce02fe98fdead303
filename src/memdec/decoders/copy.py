"""``copy``: the decoder is a full, separate copy of the base (a Hugging Face model folder), the default."""

from __future__ import annotations

import copy
from pathlib import Path


from ..checkpoint import load_memory_decoder
from ..errors import MemdecError
from .base import FULL_COPY, DecoderShape, register

@register
class CopyShape(DecoderShape):
    """A full copy of the base: every block its own (today's decoder)."""

    name = FULL_COPY
    summary = "copy: a full copy of the base"
    full_model = True

    @classmethod
    def parse(cls, arg: str | None, spec: str) -> "CopyShape":
        if arg is not None:
            raise MemdecError(f"decoder shape {spec!r}: 'copy' takes no argument")
        return cls()

    @classmethod
    def from_record(cls, record: dict) -> "CopyShape":
        return cls()

    @classmethod
    def recognise(cls, base, decoder, split: int | None) -> "CopyShape | None":
        return cls() if split is None else None

    def build(self, base):
        decoder = copy.deepcopy(base)
        decoder.requires_grad_(True)
        return decoder

    def save(self, decoder, folder: str | Path) -> dict:
        decoder.save_pretrained(Path(folder))
        return {"shape": self.name}

    def load(self, folder: str | Path, info: dict, base):
        return load_memory_decoder(folder, device=base.device, dtype=base.dtype)[0]

