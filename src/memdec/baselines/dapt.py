"""``dapt``: full fine-tuning of a copy of the base model (domain-adaptive pre-training), scored
on its own, as in the paper. Its folder is a Hugging Face model folder."""

from __future__ import annotations

from pathlib import Path

from ..checkpoint import load_model_folder
from .base import Method, register


class Dapt(Method):
    name = "dapt"
    description = "full fine-tuning of the base model"
    order = 20

    def load(self, path: Path, base_spec: str, base_model, tokenizer):
        return load_model_folder(path, "the dapt baseline", base_model.dtype).to(base_model.device).eval()


register(Dapt())
