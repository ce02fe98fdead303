"""memdec: adapt any causal LM to a domain with a Memory Decoder.

Data flows one way through layers: files → models, data → scoring → datastore, index, targets →
checkpoint → train, knnlm, joint → baselines → evaluate, generate → adapt → cli. See
docs/architecture.md; ``lint-imports`` (import-linter) checks the layers.
"""

__version__ = "0.1.0"

import importlib  # noqa: E402

from .errors import CorpusError, DatastoreError, MemdecError, ModelSpecError, TokenizerMismatchError  # noqa: F401

_LAZY = {"MemoryDecoderModel": "joint", "MemoryDecoderLogitsProcessor": "joint"}


def __getattr__(name: str):
    """The joint model's names, imported on first use: ``import memdec.vllm`` (vLLM's plugin, which may run
    beside another transformers) must not import the joint model's stack."""
    if name in _LAZY:
        return getattr(importlib.import_module(f".{_LAZY[name]}", __name__), name)
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
