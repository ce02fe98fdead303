"""Decoder shapes: how a memory decoder is made from its base model, saved and loaded.

A shape is named by a spec (``--decoder`` of train, adapt and baseline): ``copy``, ``fork:K`` or ``lora:R[@K]``. Each
shape registers
itself (``register``) in ``SHAPES`` (a ``memdec.registry.Registry``: name -> class) and its ``memdec.json``
record's check (``record_fields``, ``check_record``) in ``memdec.checkpoint.DECODER_RECORDS``; ``parse_shape(spec)``
gives an instance, or one MemdecError line. A new shape is one class here, registered, and its test.

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

import copy
import hashlib
import re
from collections.abc import Callable
from pathlib import Path
from typing import ClassVar

import torch
from safetensors import SafetensorError
from safetensors.torch import load_file, save_file

from .checkpoint import DECODER_RECORDS, DecoderRecord, check_decoder_record, check_weights, load_memory_decoder
from .errors import MemdecError, one_line
from .files import atomic_write
from .models import load_model
from .registry import Registry

OWN_WEIGHTS = "decoder.safetensors"  # a fork decoder's own tensors
LORA_SCALE_RANGE = (1e-3, 1e3)  # a LoRA record's alpha / rank, the adapters' scale (memdec writes alpha = rank: 1)
SHAPES: Registry[type["DecoderShape"]] = Registry(
    "decoder shape", unknown="unknown decoder shape {name!r}: one of {names} (e.g. 'fork:8')")


def register(cls: type["DecoderShape"]) -> type["DecoderShape"]:
    """Class decorator: make a shape known to ``parse_shape`` by its ``name``, and its ``memdec.json`` record
    (``check_record``) to ``memdec.checkpoint.read_memdec_json``."""
    SHAPES.register(cls)
    DECODER_RECORDS.register(DecoderRecord(cls.check_record, full_model=cls.full_model), name=cls.name)
    return cls


_POSITIVE = r"0*[1-9][0-9]*"  # a whole number >= 1 in a spec
FULL_COPY = "copy"  # the spec of the copy shape (CopyShape): a full, separate model, the default


def is_full_copy(spec: str) -> bool:
    """Whether the spec ``spec`` names the copy shape (a full, separate model) without parsing it."""
    return spec == FULL_COPY


def recorded_shape_name(info: dict) -> str:
    """The name of the shape a ``memdec.json`` records (``copy`` where it records none)."""
    return (info.get("decoder") or {}).get("shape", FULL_COPY)


def _is_count(v) -> bool:
    """A JSON whole number >= 1 (not a boolean)."""
    return isinstance(v, int) and not isinstance(v, bool) and v >= 1


def _size(text: str, spec: str) -> int:
    """A whole number of a spec (digits already matched); a number too long to be any model's size is one line
    (the base's sizes bound the others, in ``DecoderShape.check``)."""
    if len(text.lstrip("0")) > 100:  # int() of thousands of digits is refused, or slow
        raise MemdecError(f"decoder shape {spec[:40]!r}{'...' if len(spec) > 40 else ''}: {text[:12]}... "
                          f"({len(text)} digits) exceeds any model's size")
    return int(text)


def parse_shape(spec: str) -> "DecoderShape":
    """The shape named by ``spec`` (``copy``, ``fork:8``), or MemdecError."""
    if not isinstance(spec, str):
        raise MemdecError(f"decoder shape must be a string such as 'copy' or 'fork:8', got {spec!r}")
    name, _, arg = spec.partition(":")
    if name not in SHAPES:
        raise MemdecError(SHAPES.unknown_message(spec))
    return SHAPES.get(name).parse(arg if ":" in spec else None, spec)


class DecoderShape:
    """How a decoder is built from a base model, saved and loaded. Subclasses register themselves.

    ``lr_scale``: the trainer's peak lr is ``--lr`` (a full copy's) times this: LoRA's few, zero-started
    matrices want a larger step (measured: docs/decoders.md). ``full_model``: the decoder is a whole
    model of its own, sharing nothing with the base (the copy)."""

    name: ClassVar[str]
    summary: ClassVar[str]  # one line for --help: the spec and what the decoder is
    lr_scale: ClassVar[float] = 1.0
    full_model: ClassVar[bool] = False  # its folder is a whole Hugging Face model folder (copy)
    record_fields: ClassVar[dict[str, Callable[[object], bool]]] = {}  # memdec.json "decoder": fields but "shape"

    @classmethod
    def check_record(cls, record: dict, file: Path) -> None:
        """MemdecError naming ``file`` and the field unless ``record`` (``memdec.json``'s ``decoder``, its
        ``shape`` this one's) has exactly ``record_fields``, each valid."""
        for key in sorted(set(cls.record_fields) | set(record) - {"shape"}):
            if key not in cls.record_fields:
                raise MemdecError(f"{file}: decoder.{key} is not a field of a {record['shape']!r} decoder")
            if key not in record or not cls.record_fields[key](record[key]):
                raise MemdecError(f"{file}: decoder.{key} is missing or invalid ({record.get(key)!r})")

    @classmethod
    def parse(cls, arg: str | None, spec: str) -> "DecoderShape":
        """The shape for the spec's argument (the part after ':', or None); MemdecError if bad."""
        raise NotImplementedError

    @classmethod
    def from_record(cls, record: dict) -> "DecoderShape":
        """The shape described by a checked ``memdec.json`` ``decoder`` record."""
        raise NotImplementedError

    @classmethod
    def recognise(cls, base, decoder, split: int | None) -> "DecoderShape | None":
        """This kind of shape, as ``decoder`` (paired with ``base``; ``split``: ``shared_split(base,
        decoder)``) has it, or None. ``decoder_shape`` asks the shapes registered last first."""
        return None

    @property
    def spec(self) -> str:
        """The spec that parses back to this shape."""
        return self.name

    def check(self, base) -> None:
        """MemdecError (one line) unless this shape can be built from ``base``: before any work."""

    def build(self, base):
        """The decoder, initialised from ``base``, in ``base``'s mode, device and dtype."""
        raise NotImplementedError

    def save(self, decoder, folder: str | Path) -> dict:
        """Write the decoder's weights into ``folder``; return its ``memdec.json`` ``decoder`` record
        (the caller writes ``memdec.json`` last, with ``memdec.checkpoint.write_memdec_json``)."""
        raise NotImplementedError

    def load(self, folder: str | Path, info: dict, base):
        """The decoder saved in ``folder`` (``info``: its ``memdec.json``), for use with ``base``, in eval mode."""
        raise NotImplementedError

    def __repr__(self) -> str:
        return f"{type(self).__name__}({self.spec!r})"

    def __eq__(self, other) -> bool:
        return type(other) is type(self) and other.spec == self.spec

    def __hash__(self) -> int:
        return hash(self.spec)


# --------------------------------------------------------------------------------------------
# copy: a full, separate model


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


# --------------------------------------------------------------------------------------------
# fork:K: the base's trunk, shared; the last K blocks and the final norm, its own


def blocks_and_norm(model) -> tuple[torch.nn.ModuleList, torch.nn.Module]:
    """A causal LM's list of blocks (``model.model.layers``) and final norm (``model.model.norm``)."""
    inner = getattr(model, "model", None)
    layers, norm = getattr(inner, "layers", None), getattr(inner, "norm", None)
    if not isinstance(layers, torch.nn.ModuleList) or not isinstance(norm, torch.nn.Module):
        raise MemdecError(f"a fork decoder needs a model with model.layers and model.norm (Llama, Gemma 3...); "
                          f"a {type(model).__name__} has not")
    return layers, norm


def _own_prefixes(model, split: int) -> tuple[str, ...]:
    """Qualified-name prefixes ("model.layers.7.", "model.norm.") of the modules a fork owns."""
    layers, norm = blocks_and_norm(model)
    return _prefixes_of(model, [*layers[split:], norm])


def _prefixes_of(model, modules: list[torch.nn.Module]) -> tuple[str, ...]:
    """Qualified-name prefixes ("model.layers.7.") of ``modules`` inside ``model``."""
    own = {id(m) for m in modules}
    return tuple(f"{name}." for name, m in model.named_modules() if id(m) in own)


def _is_own(name: str, prefixes: tuple[str, ...]) -> bool:
    return name.startswith(prefixes)


def trunk_hash(model, blocks: int) -> str:
    """sha256 (hex) of what a fork with ``blocks`` own blocks takes from ``model``: the name, shape,
    dtype and bytes of every tensor of its state dict outside the last ``blocks`` blocks and the final
    norm (embeddings, the first L−K blocks, an untied head), each storage once. ~0.2 s per 100 MB."""
    prefixes = _own_prefixes(model, _split(model, blocks))
    return _hash_tensors((name, t) for name, t in model.state_dict().items() if not _is_own(name, prefixes))


def _hash_tensors(named) -> str:
    """sha256 (hex) of the name, shape, dtype and bytes of each (name, tensor), each storage once."""
    digest, seen = hashlib.sha256(), set()
    for name, tensor in named:
        key = (tensor.untyped_storage().data_ptr(), tensor.storage_offset(), tuple(tensor.shape))
        if key in seen:
            continue
        seen.add(key)
        digest.update(f"{name}\0{tuple(tensor.shape)}\0{tensor.dtype}\0".encode())
        digest.update(tensor.detach().cpu().contiguous().reshape(-1).view(torch.uint8).numpy())
    return digest.hexdigest()


def _split(model, blocks: int, spec: str | None = None) -> int:
    """L − K for a model of L blocks; MemdecError (naming ``spec``, default ``fork:K``) unless 1 <= K <= L."""
    n = len(blocks_and_norm(model)[0])
    if not 1 <= blocks <= n:
        raise MemdecError(f"decoder shape {spec or f'fork:{blocks}'!r}: the number of own blocks must lie in 1..{n} "
                          f"(the base model has {n} blocks)")
    return n - blocks


def _shared_memo(base, split: int) -> dict:
    """A ``copy.deepcopy`` memo that maps every module, parameter and buffer of ``base`` outside the
    fork's own modules (and their ancestors) to itself: deepcopy then shares them."""
    return _memo_outside(base, _own_prefixes(base, split))


def _memo_outside(base, prefixes: tuple[str, ...]) -> dict:
    """A ``copy.deepcopy`` memo that maps every module, parameter and buffer of ``base`` outside the
    modules named by ``prefixes`` (and their ancestors) to itself."""
    owned = [name[:-1] for name in prefixes]
    memo: dict[int, object] = {}
    for name, module in base.named_modules():
        inside = any(name == o or name.startswith(o + ".") for o in owned)
        ancestor = any(name == "" or o.startswith(name + ".") for o in owned)
        if inside:
            continue
        if not ancestor:
            memo[id(module)] = module
        else:  # a container of own modules: copied, but its own tensors (if any) are shared
            for tensor in [*module._parameters.values(), *module._buffers.values()]:
                if tensor is not None:
                    memo[id(tensor)] = tensor
    return memo


def shared_split(base, decoder) -> int | None:
    """L − K where ``decoder`` is a fork sharing ``base``'s embeddings and first L−K blocks (the same
    module objects), else None (a separate model)."""
    if decoder is base:
        return None
    try:
        b_layers, _ = blocks_and_norm(base)
        d_layers, d_norm = blocks_and_norm(decoder)
    except MemdecError:
        return None
    if len(b_layers) != len(d_layers) or base.get_input_embeddings() is not decoder.get_input_embeddings():
        return None
    split = 0
    while split < len(b_layers) and b_layers[split] is d_layers[split]:
        split += 1
    if split == len(b_layers) or any(d is b for d, b in zip(d_layers[split:], b_layers[split:])):
        return None
    return split


@register
class ForkShape(DecoderShape):
    """``fork:K``: the base's trunk, shared and frozen; its own last K blocks and final norm."""

    name = "fork"
    summary = "fork:K: the base's first L-K blocks shared, its own last K blocks and final norm"
    record_fields = {
        "blocks": _is_count,
        "trunk_hash": lambda v: isinstance(v, str) and re.fullmatch(r"[0-9a-f]{64}", v) is not None,
        "trunk_dtype": lambda v: isinstance(v, str) and v.isidentifier(),
    }

    def __init__(self, blocks: int):
        self.blocks = blocks

    @classmethod
    def parse(cls, arg: str | None, spec: str) -> "ForkShape":
        if arg is None or not re.fullmatch(_POSITIVE, arg):
            raise MemdecError(
                f"decoder shape {spec!r}: give the number of own blocks, a positive integer, as in 'fork:8'"
            )
        return cls(_size(arg, spec))

    @classmethod
    def from_record(cls, record: dict) -> "ForkShape":
        return cls(record["blocks"])

    @classmethod
    def recognise(cls, base, decoder, split: int | None) -> "ForkShape | None":
        return None if split is None else cls(len(blocks_and_norm(decoder)[0]) - split)

    @property
    def spec(self) -> str:
        return f"{self.name}:{self.blocks}"

    def check(self, base) -> None:
        _split(base, self.blocks)

    def build(self, base):
        """A causal LM whose trunk modules ARE ``base``'s (frozen: requires_grad is switched off on
        the base's tensors too) and whose last K blocks and final norm are deep copies (trainable)."""
        split = _split(base, self.blocks)
        decoder = copy.deepcopy(base, _shared_memo(base, split))
        prefixes = _own_prefixes(decoder, split)
        for name, param in decoder.named_parameters():
            param.requires_grad_(_is_own(name, prefixes))
        return decoder

    def describe_own(self) -> str:
        """What ``decoder.safetensors`` holds for a decoder of this shape, for messages."""
        return f"the own tensors of a {self.spec} decoder (its last {self.blocks} blocks and final norm)"

    def check_own(self, own: dict[str, torch.Tensor], file: Path) -> None:
        """MemdecError (one line naming ``file``) where the tensors read from it are whole blocks of another
        count than ``memdec.json``'s record says (an edited record, or another decoder's weights): before any
        base is used. A stray or missing tensor is left to ``_load_own``, which names it."""
        blocks: dict[str, frozenset[str]] = {}  # block index -> its tensors' names inside the block
        for name in own:
            if m := _LAYER.match(name):
                blocks[m[1]] = blocks.get(m[1], frozenset()) | {name[m.end():]}
        layers = sorted(blocks, key=lambda i: (len(i), i))
        if len(layers) != self.blocks and len(set(blocks.values())) <= 1:  # else _load_own names the odd tensor
            held = f"model.layers.{layers[0]}-{layers[-1]}" if layers else "none"
            raise MemdecError(f"{file}: holds tensors of {len(layers)} blocks ({held}), but memdec.json's "
                              f"decoder.blocks is {self.blocks}: the record does not describe these weights")

    def own_tensors(self, decoder) -> dict[str, torch.Tensor]:
        """The decoder's own tensors by state-dict name: the last K blocks' and the final norm's."""
        prefixes = _own_prefixes(decoder, _split(decoder, self.blocks))
        return {k: v for k, v in decoder.state_dict().items() if _is_own(k, prefixes)}

    def _load_own(self, decoder, own: dict[str, torch.Tensor], file: Path) -> None:
        """Copy ``own`` into the decoder's own tensors (cast to its dtype), after checking names and shapes."""
        expected = set(self.own_tensors(decoder))
        missing, extra = sorted(expected - set(own)), sorted(set(own) - expected)
        if missing or extra:
            what = f"lacks {missing[0]}" if missing else f"holds {extra[0]}"
            raise MemdecError(f"{file}: {what} ({len(missing)} missing, {len(extra)} unexpected tensors): it must hold "
                              f"exactly {self.describe_own()}")
        state = decoder.state_dict()
        for name, tensor in own.items():
            if tuple(tensor.shape) != tuple(state[name].shape):
                raise MemdecError(f"{file}: {name} has shape {tuple(tensor.shape)}, the model expects "
                                  f"{tuple(state[name].shape)}")
        decoder.load_state_dict(own, strict=False)

    def save(self, decoder, folder: str | Path) -> dict:
        """``decoder.safetensors`` (atomic): the own tensors only. The record names the trunk by its hash."""
        tensors = {k: v.detach().contiguous() for k, v in self.own_tensors(decoder).items()}
        atomic_write(Path(folder) / OWN_WEIGHTS, lambda tmp: save_file(tensors, str(tmp), metadata={"format": "pt"}))
        return self.record(decoder)

    def record(self, decoder) -> dict:
        """The ``memdec.json`` ``decoder`` record of ``decoder``, a decoder of this shape."""
        return {"shape": self.name, "blocks": self.blocks, "trunk_hash": self.hash_trunk(decoder),
                "trunk_dtype": str(decoder.dtype).removeprefix("torch.")}

    def hash_trunk(self, model) -> str:
        """``trunk_hash`` of what a decoder of this shape takes from ``model`` (a base, or such a decoder)."""
        return trunk_hash(model, self.blocks)

    def load(self, folder: str | Path, info: dict, base):
        """Build on ``base`` if its trunk is the recorded one, else on the base named in ``memdec.json``
        (loaded in ``base``'s dtype, on its device; shared with ``base`` after all if it equals it
        there), then load the own tensors. Safetensors only: nothing is unpickled."""
        file = Path(folder).expanduser() / OWN_WEIGHTS
        own = _read_safetensors(file)
        self.check_own(own, file)
        decoder = self.build(self._trunk_source(info, base, file))
        self._load_own(decoder, own, file)
        return decoder.eval()

    def _trunk_source(self, info: dict, base, file: Path):
        """``base``, or the recorded base model where ``base``'s trunk is another (or ``base`` has
        another shape: any base with the decoder's tokenizer takes a separate decoder)."""
        record = info["decoder"]
        try:
            mine = self.hash_trunk(base)
        except MemdecError:  # another architecture, or fewer blocks: certainly another trunk
            mine = None
        if mine == record["trunk_hash"]:
            return base
        recorded, _ = load_model(info["base_model"], device=str(base.device), dtype=base.dtype)
        self.check(recorded)
        theirs = self.hash_trunk(recorded)
        same_dtype = str(base.dtype).removeprefix("torch.") == record["trunk_dtype"]
        if same_dtype and theirs != record["trunk_hash"]:
            raise MemdecError(f"{file.parent}: the base model {info['base_model']!r} named in memdec.json no longer "
                              f"has the trunk this {self.name} decoder was trained on (decoder.trunk_hash "
                              f"{record['trunk_hash'][:16]}...): that base changed since, or memdec.json was edited")
        return base if theirs == mine else recorded


_LAYER = re.compile(r"model\.layers\.([0-9]+)\.")  # a block's tensor in a state dict (blocks_and_norm's layout)


def _read_safetensors(
    file: Path, what: str = "a fork memory decoder keeps its own blocks there"
) -> dict[str, torch.Tensor]:
    """All tensors of a safetensors file, on CPU, each finite and of a sane size (``check_weights``); one
    MemdecError line if missing, unreadable or not."""
    if not file.is_file():
        raise MemdecError(f"{file}: missing; {what}")
    try:
        tensors = load_file(str(file))
    except (SafetensorError, OSError, ValueError) as exc:
        raise MemdecError(f"{file}: unreadable ({one_line(exc)})") from None
    check_weights(tensors.items(), file)
    return tensors


# --------------------------------------------------------------------------------------------
# lora:R[@K]: the base whole, shared; LoRA adapters of rank R on its top K blocks, its own

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
    summary = "lora:R[@K]: LoRA adapters of rank R on the base's top K blocks (all by default), trained at 10x --lr"
    lr_scale = 10.0  # Austen, quick preset: lora:16 at 10x the copy's lr 29.46 test ppl, at 1x 31.76 (copy 29.25)
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


# --------------------------------------------------------------------------------------------
# Loading any shape


def shape_of(info: dict) -> DecoderShape:
    """The shape recorded in a checked ``memdec.json`` (``copy`` where it records none)."""
    record = info.get("decoder") or {"shape": FULL_COPY}
    return SHAPES.get(record["shape"]).from_record(record)


def decoder_shape(base, decoder) -> DecoderShape:
    """The shape ``decoder`` has, paired with ``base`` (``copy`` where it shares nothing with it): the
    first of the registered shapes, last registered first (a subclass before its parent), to
    recognise it. What ``MemoryDecoderModel.save_pretrained`` saves it as."""
    split = shared_split(base, decoder)
    for cls in reversed(SHAPES.values()):
        shape = cls.recognise(base, decoder, split)
        if shape is not None:
            return shape
    raise MemdecError(f"no decoder shape recognises a {type(decoder).__name__} paired with a {type(base).__name__}")


def load_decoder(folder: str | Path, info: dict, base):
    """The memory decoder saved in ``folder`` (``info``: its ``memdec.json``, read with
    ``memdec.checkpoint.read_memdec_json``), for use with ``base``, on its device and in its dtype."""
    check_decoder_record(info.get("decoder"), Path(folder) / "memdec.json")
    return shape_of(info).load(folder, info, base)
