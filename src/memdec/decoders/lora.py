"""``lora:R[@K]``: a fork (a subclass) whose top K blocks (all by default) are new module objects holding the
base's own weight tensors, frozen, with peft LoRA adapters of rank R on the attention and MLP projections; the
norm is the base's too. ``decoder.safetensors`` holds the adapters only; ``memdec.json`` records ``rank``,
``blocks``, ``alpha``, ``targets`` and the hash of the whole base. Against another base it loads as that base's
copy with the deltas merged (``LoraShape.materialise``). Trained at ``LR_SCALE`` x ``--lr``."""

from __future__ import annotations

import copy
import re
from pathlib import Path

import torch

from ..errors import MemdecError
from .base import OWN_WEIGHTS, _POSITIVE, _is_count, _size, register
from .fork import ForkShape, _hash_tensors, _memo_outside, _prefixes_of, _read_safetensors, _split, blocks_and_norm

LORA_SCALE_RANGE = (1e-3, 1e3)  # a LoRA record's alpha / rank, the adapters' scale (memdec writes alpha = rank: 1)
LR_SCALE = 30.0
"""A LoRA decoder trains at ``LR_SCALE`` x ``--lr`` (``DecoderShape.lr_scale``; a full copy's is 1): LoRA's few,
zero-started matrices want a larger step than full fine-tuning. Measured at the quick preset (12 steps), lora:16's
test ppl at 1 x / 10 x / 30 x the copy's lr, against the copy's: Austen 31.76 / 29.46 / 29.34 (29.25); the Human
Phenotype Ontology 3.708 at 10 x, 3.359 at 30 x (3.355); Python's reference topics 10.50 / 10.14 (10.03); code
7.11 / 7.11 (7.10) (docs/decoders.md, docs/domains.md; round three's 10 x was chosen on Austen alone). memdec
writes alpha = rank (the adapters' scale 1), so the adapted weights move by about 30 x a full copy's step; the
LoRA *baseline* trains at its own scale (``memdec.baselines.lora.LR_SCALE``)."""

LORA_TARGETS = ("q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj")  # Llama, Gemma 3, Qwen
_LORA_TENSOR = re.compile(r"\.lora_[AB]\.")  # a LoRA matrix's state-dict name: "...q_proj.lora_A.default.weight"
_ADAPTER = "default"  # peft's adapter name; part of the tensor names in decoder.safetensors


@register
class LoraShape(ForkShape):
    """``lora:R[@K]``: a fork whose top K blocks (all L by default) are new module objects holding the
    base's OWN weight tensors (shared, frozen), with peft LoRA adapters of rank R on the attention
    and MLP projections (``LORA_TARGETS``); the final norm, the embeddings and the head are the
    base's. Only the adapters train and are saved. ``trunk_hash`` covers the whole base: every base
    tensor is used. Against another base, ``load`` gives a separate full model: the recorded base
    with the adapters' deltas merged into its weights (``materialise``)."""

    name = "lora"
    summary = (f"lora:R[@K]: LoRA adapters of rank R on the base's top K blocks (all by default), trained at "
               f"{LR_SCALE:g}x --lr")
    lr_scale = LR_SCALE
    record_fields = {  # the trunk (hashed) is the whole base
        **ForkShape.record_fields,
        "rank": _is_count,
        "alpha": lambda v: isinstance(v, (int, float)) and not isinstance(v, bool) and 0 < v < float("inf"),
        "targets": lambda v: isinstance(v, list) and len(v) > 0 and len(set(v)) == len(v)
        and all(isinstance(t, str) and t.isidentifier() for t in v),
    }

    @classmethod
    def check_record(cls, record: dict, file: Path) -> None:
        """``DecoderShape.check_record``, and the adapters' scale alpha / rank within ``LORA_SCALE_RANGE``."""
        super().check_record(record, file)
        scale, (low, high) = record["alpha"] / record["rank"], LORA_SCALE_RANGE
        if not low <= scale <= high:
            raise MemdecError(f"{file}: decoder.alpha {record['alpha']:g} over decoder.rank {record['rank']} scales "
                              f"the adapters by {scale:g}, outside [{low:g}, {high:g}] (memdec trains at alpha = rank)")

    def __init__(self, rank: int, blocks: int | None = None, alpha: float | None = None,
                 targets: tuple[str, ...] = LORA_TARGETS):
        super().__init__(blocks)
        self.rank, self.targets = rank, tuple(targets)
        self.alpha = rank if alpha is None else alpha

    @classmethod
    def parse(cls, arg: str | None, spec: str) -> "LoraShape":
        match = re.fullmatch(rf"({_POSITIVE})(?:@({_POSITIVE}))?", arg or "")
        if match is None:
            raise MemdecError(f"decoder shape {spec!r}: give the LoRA rank and, after '@', the number of adapted "
                              f"top blocks (default all), positive integers, as in 'lora:16' or 'lora:16@8'")
        _peft()  # before any model loads
        return cls(_size(match[1], spec), None if match[2] is None else _size(match[2], spec))

    @classmethod
    def from_record(cls, record: dict) -> "LoraShape":
        return cls(record["rank"], record["blocks"], record["alpha"], tuple(record["targets"]))

    @classmethod
    def recognise(cls, base, decoder, split: int | None) -> "LoraShape | None":
        """The shape of a fork of ``base`` whose own blocks hold LoRA layers (read off the first one)."""
        if split is None:
            return None
        layers, _ = blocks_and_norm(decoder)
        found = {name.rsplit(".", 1)[-1]: m for name, m in layers[split].named_modules() if _is_lora_layer(m)}
        if not found:
            return None
        first = next(iter(found.values()))
        targets = sorted(found, key=lambda t: (LORA_TARGETS.index(t) if t in LORA_TARGETS else len(LORA_TARGETS), t))
        return cls(first.r[_ADAPTER], len(layers) - split, first.lora_alpha[_ADAPTER], tuple(targets))

    @property
    def spec(self) -> str:
        return f"{self.name}:{self.rank}" + ("" if self.blocks is None else f"@{self.blocks}")

    def __eq__(self, other) -> bool:
        return super().__eq__(other) and (other.alpha, other.targets) == (self.alpha, self.targets)

    def __hash__(self) -> int:
        return hash((self.spec, self.alpha, self.targets))

    def _top(self, model) -> int:
        """L − K for ``model`` (K: the adapted blocks, all L where the spec names none); MemdecError if bad."""
        n = len(blocks_and_norm(model)[0])
        return _split(model, n if self.blocks is None else self.blocks, self.spec)

    def check(self, base) -> None:
        """K within 1..L, every target a ``torch.nn.Linear`` in each adapted block, and R no larger than the
        widest of them (a delta B·A of an in×out layer has rank min(in, out) at most: a larger R adds
        nothing to any layer); peft installed. Runs on a weightless skeleton too, before any allocation."""
        layers, _ = blocks_and_norm(base)
        widest = 0
        for i in range(self._top(base), len(layers)):
            modules = {name.rsplit(".", 1)[-1]: m for name, m in layers[i].named_modules()}
            for target in self.targets:
                layer = modules.get(target)
                if not isinstance(layer, torch.nn.Linear):
                    linear = sorted(n for n, m in modules.items() if isinstance(m, torch.nn.Linear))
                    raise MemdecError(f"decoder shape {self.spec!r}: block {i} of the base model has no linear layer "
                                      f"{target!r} (its linear layers: {', '.join(linear)})")
                widest = max(widest, min(layer.in_features, layer.out_features))
        if self.rank > widest:
            raise MemdecError(f"decoder shape {self.spec!r}: rank {self.rank} exceeds the width of every adapted layer "
                              f"of the base model (at most {widest}: an in×out layer's LoRA delta has rank "
                              f"min(in, out) at most); give a rank in 1..{widest}")
        _peft()

    def build(self, base):
        """The base's modules, shared, but for new top-K block objects whose frozen weight tensors are
        the base's own (a deepcopy memo maps them to themselves), with LoRA injected by peft (A random,
        B = 0: the decoder starts as the base). Trainable: the LoRA matrices only."""
        self.check(base)
        layers, _ = blocks_and_norm(base)
        split = self._top(base)
        memo = _memo_outside(base, _prefixes_of(base, list(layers[split:])))
        memo.update({id(t): t for block in layers[split:] for t in [*block.parameters(), *block.buffers()]})
        decoder = copy.deepcopy(base, memo)
        config = _peft().LoraConfig(r=self.rank, lora_alpha=self.alpha, lora_dropout=0.0,
                                    target_modules=list(self.targets), bias="none")
        _peft().inject_adapter_in_model(config, blocks_and_norm(decoder)[0][split:], adapter_name=_ADAPTER)
        for name, param in decoder.named_parameters():
            param.requires_grad_(_LORA_TENSOR.search(name) is not None)
        return decoder

    def describe_own(self) -> str:
        where = "every block" if self.blocks is None else f"its top {self.blocks} blocks"
        return f"the adapters of a {self.spec} decoder (rank {self.rank} on {', '.join(self.targets)} of {where})"

    def check_own(self, own: dict[str, torch.Tensor], file: Path) -> None:
        """``ForkShape.check_own``, and each LoRA matrix of the recorded rank (A: R×in, B: out×R)."""
        super().check_own(own, file)
        for name, tensor in own.items():
            side = _LORA_TENSOR.search(name)
            rank = None if side is None or tensor.dim() != 2 else tensor.shape[0 if side[0] == ".lora_A." else 1]
            if side is not None and rank != self.rank:
                raise MemdecError(f"{file}: {name} has shape {tuple(tensor.shape)}, not that of a LoRA matrix of "
                                  f"memdec.json's decoder.rank {self.rank}: the record does not describe these weights")

    def own_tensors(self, decoder) -> dict[str, torch.Tensor]:
        """The LoRA matrices, by state-dict name (``model.layers.i.self_attn.q_proj.lora_A.default.weight``)."""
        return {k: v for k, v in decoder.state_dict().items() if _LORA_TENSOR.search(k)}

    def record(self, decoder) -> dict:
        return {"shape": self.name, "rank": self.rank, "blocks": len(blocks_and_norm(decoder)[0]) - self._top(decoder),
                "alpha": self.alpha, "targets": list(self.targets), "trunk_hash": self.hash_trunk(decoder),
                "trunk_dtype": str(decoder.dtype).removeprefix("torch.")}

    def hash_trunk(self, model) -> str:
        """``trunk_hash`` of the whole base: ``model``'s state dict without LoRA matrices, each peft
        ``base_layer`` under the name it has in the base (a base and its LoRA decoder hash alike)."""
        blocks_and_norm(model)  # one line for an architecture no LoRA decoder is built on
        return _hash_tensors((k.replace(".base_layer.", "."), v) for k, v in model.state_dict().items()
                             if not _LORA_TENSOR.search(k))

    def load(self, folder: str | Path, info: dict, base):
        """On ``base`` where its weights are the recorded ones (shared); else a separate full model: the
        base named in ``memdec.json`` with the deltas merged. Safetensors only: nothing is unpickled."""
        file = Path(folder).expanduser() / OWN_WEIGHTS
        own = _read_safetensors(file, "a lora memory decoder keeps its adapters there")
        self.check_own(own, file)
        source = self._trunk_source(info, base, file)
        decoder = self.build(source)
        self._load_own(decoder, own, file)
        if source is not base:  # nothing else holds the recorded base: merge into its own weights
            decoder = _merge_lora(decoder)
        return decoder.eval()

    def materialise(self, decoder):
        """A separate full model equal to ``decoder``: a copy of its base with each adapted weight
        W + (alpha / R)·B·A, and no adapters (a plain Hugging Face model)."""
        return _merge_lora(copy.deepcopy(decoder)).eval()


def _peft():
    """The peft package, or one MemdecError line."""
    try:
        import peft
    except ImportError:
        raise MemdecError("decoder shape 'lora' needs the peft package: pip install 'memdec[baselines]'") from None
    return peft


def _is_lora_layer(module) -> bool:
    """Whether ``module`` is a peft LoRA layer holding this module's adapter (no peft import needed)."""
    lora_a = getattr(module, "lora_A", None)
    return isinstance(lora_a, torch.nn.ModuleDict) and _ADAPTER in lora_a and hasattr(module, "get_base_layer")


def _merge_lora(decoder):
    """``decoder`` with every LoRA layer replaced, in place, by its base layer whose weight (a tensor
    ``decoder`` may share: give it a decoder nothing else uses) gains the layer's delta scale·B·A."""
    for parent in list(decoder.modules()):
        for name, child in list(parent.named_children()):
            if not _is_lora_layer(child):
                continue
            layer = child.get_base_layer()
            a, b = child.lora_A[_ADAPTER].weight, child.lora_B[_ADAPTER].weight
            with torch.no_grad():
                delta = (b.float() @ a.float()) * child.scaling[_ADAPTER]
                layer.weight.add_(delta.to(layer.weight.dtype))
            setattr(parent, name, layer)
    return decoder

