"""What every decoder shape shares: ``DecoderShape`` (build from a base, save, load, its ``memdec.json``
record), the registry ``SHAPES`` and ``register`` (which also registers the shape's record check in
``memdec.checkpoint.DECODER_RECORDS``), ``parse_shape`` (a spec -> a shape, or one MemdecError line) and
the copy shape's name in one place (``FULL_COPY``, ``is_full_copy``, ``recorded_shape_name``)."""

from __future__ import annotations

from collections.abc import Callable
from pathlib import Path
from typing import ClassVar


from ..checkpoint import DECODER_RECORDS, DecoderRecord
from ..errors import MemdecError
from ..registry import Registry

OWN_WEIGHTS = "decoder.safetensors"  # a shape's own tensors (fork, lora), beside memdec.json
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

