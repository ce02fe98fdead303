"""``fork:K``: a *shared trunk*. The decoder is a full causal LM whose embeddings, first L−K blocks, rotary
tables and LM head ARE the base's modules (the same objects, frozen), and whose last K blocks and final norm
are its own, trainable copies; on disk, ``decoder.safetensors`` holds only those. ``trunk_hash``: a sha256 of
everything the decoder takes from its base; ``shared_split``: where a decoder shares its base's trunk, so
that ``MemoryDecoderModel`` runs it once for both models; ``blocks_and_norm``: the layout every shape needs."""

from __future__ import annotations

import copy
import hashlib
import re
from pathlib import Path

import torch
from safetensors import SafetensorError
from safetensors.torch import load_file, save_file

from ..checkpoint import check_weights
from ..errors import MemdecError, one_line
from ..files import atomic_write
from ..models import load_model
from .base import OWN_WEIGHTS, _POSITIVE, DecoderShape, _is_count, _size, register

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

