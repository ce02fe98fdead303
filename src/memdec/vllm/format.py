"""The joint folder's record: what ``memdec export vllm`` writes into ``config.json`` and vLLM's model class reads.

A joint folder is the base model's folder seen by vLLM as one model: the base's ``config.json`` with
``architectures = ["MemdecJointForCausalLM"]`` and a ``"memdec"`` record (this module owns it), the base's weight
files linked, ``memdec-decoder.safetensors`` (the decoder's own tensors under ``memdec.``) and one
``model.safetensors.index.json`` naming every tensor's file. Imports nothing but the standard library and
``memdec.errors``: it runs inside vLLM's processes, beside vLLM's own transformers.

The record (format 1)::

    {"format": 1, "lambda": 0.75, "temperature": 1.0,
     "shape": "copy" | "fork",          # copy: a whole model of its own; fork: the base's trunk below `split`
     "split": null | S,                 # fork: the decoder's own blocks are the base's S..L-1 (lora@K: S = L - K)
     "decoder_config": null | {...},    # copy: the decoder's own config.json (its sizes may differ from the base's)
     "router": null | "router",         # a token router's folder inside the joint folder (memdec.router's format)
     "source": {"memdec": ..., "base": ..., "decoder": "lora:16"}}   # where it came from, for people

The decoder's block ``j`` (its own numbering: 0..L'-1 for a copy, S..L-1 for a fork) is vLLM's attention layer
``memdec.layers.{L + j}``: vLLM needs one integer per layer name, unique across both stacks.
"""

from __future__ import annotations

import math
from dataclasses import asdict, dataclass, field

from ..errors import MemdecError

ARCHITECTURE = "MemdecJointForCausalLM"
FORMAT = 1
DECODER_WEIGHTS = "memdec-decoder.safetensors"
INDEX = "model.safetensors.index.json"
PREFIX = "memdec."  # the decoder's tensors in DECODER_WEIGHTS
SHAPES = ("copy", "fork")
MODEL_TYPES = ("llama",)  # the bases (and copy decoders) whose blocks vLLM's Llama layers run


@dataclass(frozen=True)
class JointRecord:
    """config.json's ``memdec`` record of a joint folder (format above)."""

    lmbda: float
    temperature: float
    shape: str
    split: int | None = None
    decoder_config: dict | None = None
    router: str | None = None
    source: dict = field(default_factory=dict)

    def to_json(self) -> dict:
        d = asdict(self)
        return {"format": FORMAT, "lambda": d.pop("lmbda"), **d}

    @classmethod
    def from_json(cls, record: object, where: str) -> "JointRecord":
        """The record, checked: MemdecError naming ``where`` and the field."""
        if not isinstance(record, dict):
            raise MemdecError(f"{where}: no memdec record (a folder `memdec export vllm` did not write?)")
        if record.get("format") != FORMAT:
            raise MemdecError(f"{where}: memdec record format {record.get('format')!r}; this memdec reads {FORMAT}")
        unknown = set(record) - {"format", "lambda", *cls.__dataclass_fields__} | ({"lmbda"} & set(record))
        if unknown:
            raise MemdecError(f"{where}: memdec.{sorted(unknown)[0]} is not a field of the record")
        out = cls(lmbda=record.get("lambda"), **{k: v for k, v in record.items() if k not in ("format", "lambda")})
        out.check(where)
        return out

    def check(self, where: str) -> None:
        def bad(name: str, value) -> MemdecError:
            return MemdecError(f"{where}: memdec.{name} is missing or invalid ({value!r})")

        if not _number(self.lmbda) or not 0.0 <= self.lmbda <= 1.0:
            raise bad("lambda", self.lmbda)
        if not _number(self.temperature) or not self.temperature > 0:
            raise bad("temperature", self.temperature)
        if self.shape not in SHAPES:
            raise bad("shape", self.shape)
        if self.shape == "fork" and not (isinstance(self.split, int) and not isinstance(self.split, bool)
                                         and self.split >= 0):
            raise bad("split", self.split)
        if self.shape == "copy" and (self.split is not None or not isinstance(self.decoder_config, dict)):
            raise bad("decoder_config" if self.split is None else "split", self.decoder_config)
        if self.router is not None and (not isinstance(self.router, str) or "/" in self.router
                                        or self.router.startswith(".")):
            raise bad("router", self.router)


def _number(x) -> bool:
    return isinstance(x, (int, float)) and not isinstance(x, bool) and math.isfinite(x)


def decoder_layer(n_base_layers: int, j: int) -> int:
    """vLLM's layer number of the decoder's block ``j`` (its own numbering) beside a base of ``n_base_layers``."""
    return n_base_layers + j
