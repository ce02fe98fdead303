"""memdec: adapt any causal LM to a domain with a Memory Decoder.

The pipeline, one module per stage: ``data`` → ``datastore`` → ``index`` → ``targets`` →
``train`` → ``joint`` / ``knnlm`` → ``evaluate`` → ``adapt``. See docs/architecture.md.
"""

__version__ = "0.1.0"

from .errors import CorpusError, DatastoreError, MemdecError, ModelSpecError, TokenizerMismatchError  # noqa: F401
