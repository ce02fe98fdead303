"""Decoder shapes: how a memory decoder is made from its base model, saved and loaded.

A shape is named by a spec (``--decoder`` of train, adapt and baseline): ``copy``, ``fork:K`` or ``lora:R[@K]``.
A package, one shape a file: ``base.py`` (``DecoderShape``, ``SHAPES``, ``register``, ``parse_shape``), ``copy.py``,
``fork.py``, ``lora.py``, and ``load.py`` (``shape_of``, ``decoder_shape``, ``load_decoder``). Each shape's module
registers it (``register``) in ``SHAPES`` (a ``memdec.registry.Registry``: name -> class) and its ``memdec.json``
record's check (``record_fields``, ``check_record``) in ``memdec.checkpoint.DECODER_RECORDS``; ``registry.discover``
below imports every shape module, as the baselines and the index kinds are found; ``parse_shape(spec)`` gives an
instance, or one MemdecError line. A new shape is one module here (a ``DecoderShape`` subclass, ``@register``-ed)
and its test.

- ``copy``: today's decoder, a full, separate copy of the base (a Hugging Face model folder).
- ``fork:K``: a *shared trunk*. The decoder is a full causal LM whose embeddings, first L−K blocks,
  rotary tables and LM head ARE the base's modules (the same objects, frozen), and whose last K
  blocks and final norm are its own, trainable copies. On disk it holds only those:
  ``decoder.safetensors`` (the tensors under ``model.layers.{L-K..L-1}.`` and ``model.norm.``) and,
  in ``memdec.json``, ``"decoder": {"shape": "fork", "blocks": K, "trunk_hash": ..., "trunk_dtype": ...}``
  (the format is ``memdec.checkpoint``'s). ``trunk_hash`` is a sha256 of everything the decoder takes
  from its base (``trunk_hash``). Loaded against a base with that trunk, the decoder shares it and
  ``MemoryDecoderModel`` runs the trunk once for both models (``shared_split``); against any other
  base with the same tokenizer, the base named in ``memdec.json`` is loaded and the decoder is built
  on it, as a separate model. Sharing never changes a result: a fork mixed with its own base gives
  what the same decoder gives as a separate full model.
- ``lora:R[@K]``: a fork (a subclass) whose top K blocks (all by default) are new module objects
  holding the base's own weight tensors, frozen, with peft LoRA adapters of rank R on the attention
  and MLP projections; the norm is the base's too. ``decoder.safetensors`` holds the adapters only;
  ``memdec.json`` records ``rank``, ``blocks``, ``alpha``, ``targets`` and the hash of the whole base.
  Against another base it loads as that base's copy with the deltas merged (``LoraShape.materialise``).

Architectures: those whose causal LM keeps its blocks in ``model.layers`` and its final norm in
``model.norm`` (Llama, SmolLM2, Gemma 3, Qwen, Mistral...); others get one line.
"""

from __future__ import annotations

from ..registry import discover
from .base import (FULL_COPY, OWN_WEIGHTS, SHAPES, DecoderShape, is_full_copy, parse_shape, recorded_shape_name,
                   register)
from .copy import CopyShape
from .fork import ForkShape, blocks_and_norm, shared_split, trunk_hash
from .load import decoder_shape, load_decoder, shape_of
from .lora import LORA_SCALE_RANGE, LORA_TARGETS, LR_SCALE, LoraShape

__all__ = [
    "FULL_COPY", "LORA_SCALE_RANGE", "LORA_TARGETS", "LR_SCALE", "OWN_WEIGHTS", "SHAPES", "CopyShape", "DecoderShape",
    "ForkShape", "LoraShape", "blocks_and_norm", "decoder_shape", "is_full_copy", "load_decoder", "parse_shape",
    "recorded_shape_name", "register", "shape_of", "shared_split", "trunk_hash",
]

discover(__name__, __path__, skip=("base", "load"))  # every shape's module registers its shape
