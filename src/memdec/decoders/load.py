"""Loading any decoder shape: the shape a ``memdec.json`` records (``shape_of``), the shape a decoder has beside
its base (``decoder_shape``, asked of every registered shape) and ``load_decoder``."""

from __future__ import annotations

from pathlib import Path


from ..checkpoint import check_decoder_record
from ..errors import MemdecError
from .base import FULL_COPY, SHAPES, DecoderShape
from .fork import shared_split

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
