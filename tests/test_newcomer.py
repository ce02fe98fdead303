"""The newcomer's main path: an empty model cache (``MEMDEC_HOME``) on the real default model.

Round three's default decoder was checked on a weightless skeleton built under ``torch.device("meta")``;
on an empty cache the GGUF conversion ran inside that context, failed, and ``adapt`` fell back to a full copy
without a word. These tests start from an empty ``MEMDEC_HOME`` as a new user does."""

from __future__ import annotations

import json

import pytest

from memdec import adapt as adapt_module
from memdec.adapt import DEFAULT_DECODER, AdaptConfig, resolve_settings
from memdec.cli import build_parser
from memdec.decoders import parse_shape
from memdec.train import check_decoder_shape


def _adapt_help() -> str:
    parser = build_parser()
    sub = next(a for a in parser._actions if a.dest == "command")  # noqa: SLF001 (argparse keeps its subparsers here)
    return " ".join(sub.choices["adapt"].format_help().split())


def test_adapt_trains_the_default_its_help_names(default_model_available, tmp_path, monkeypatch):
    monkeypatch.setenv("MEMDEC_HOME", str(tmp_path / "home"))
    assert f"(default: {DEFAULT_DECODER}," in _adapt_help()
    settings = resolve_settings(AdaptConfig())  # no --decoder: what `make demo` runs
    assert settings.decoder == DEFAULT_DECODER == "copy"
    assert json.loads(json.dumps(settings.flat()))["decoder"] == DEFAULT_DECODER  # RUN/settings.json says so too
    assert not hasattr(adapt_module, "supported_default_decoder")  # nothing replaces a default behind the user's back


def test_a_compact_shape_is_checked_on_an_empty_cache(default_model_available, tmp_path, monkeypatch):
    """The check converts the GGUF first (outside the meta device) and then checks the shape on a skeleton."""
    home = tmp_path / "home"
    monkeypatch.setenv("MEMDEC_HOME", str(home))
    assert check_decoder_shape("lora:16", "smollm2-135m") == parse_shape("lora:16")
    assert (home / "models" / "smollm2-135m" / "config.json").is_file()
    assert check_decoder_shape("fork:8", "smollm2-135m") == parse_shape("fork:8")  # and again on the warm cache


def test_a_shape_the_base_cannot_take_is_one_line(tiny_gpt2_dir):
    from memdec.errors import MemdecError

    with pytest.raises(MemdecError, match="--decoder"):
        check_decoder_shape("lora:4", str(tiny_gpt2_dir))
