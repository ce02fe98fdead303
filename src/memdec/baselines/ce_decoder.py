"""``ce-decoder``: the memory decoder's own recipe with α=0 (next-token cross-entropy only, no kNN
targets), interpolated with the base at the λ chosen on validation: the ablation that shows what
the kNN distillation adds. It honours ``--init``/``--init-layers`` like ``memdec train``; its folder
is a memory decoder checkpoint (``memdec.json`` beside ``baseline.json``)."""

from __future__ import annotations

from pathlib import Path

from ..joint import MemoryDecoderModel
from .base import Method, register


class CeDecoder(Method):
    name = "ce-decoder"
    description = "the memory decoder's recipe with alpha=0 (cross-entropy only), interpolated with the base"
    order = 10
    alone = False
    takes_init = True
    reuses_alpha0_decoder = True

    def load(self, path: Path, base_spec: str, base_model, tokenizer) -> MemoryDecoderModel:
        return MemoryDecoderModel.from_pretrained(base_model, str(path), tokenizer=tokenizer)


register(CeDecoder())
