"""memdec: adapt any causal LM to a domain with a Memory Decoder.

The pipeline, one module per stage: ``data`` → ``datastore`` → ``index`` → ``targets`` →
``train`` → ``joint`` / ``knnlm`` → ``evaluate`` → ``adapt``. See docs/architecture.md.
"""

__version__ = "0.1.0"

from .errors import CorpusError, DatastoreError, MemdecError, ModelSpecError, TokenizerMismatchError  # noqa: F401

_LAZY = {"MemoryDecoderModel": "joint", "MemoryDecoderLogitsProcessor": "joint"}


def __getattr__(name: str):
    """Heavy classes load on first use, so ``import memdec`` stays light."""
    if name in _LAZY:
        import importlib

        return getattr(importlib.import_module(f".{_LAZY[name]}", __name__), name)
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
