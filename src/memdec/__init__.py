"""memdec: adapt any causal LM to a domain with a Memory Decoder.

Data flows one way through layers: files → models, data → scoring → datastore, index, targets →
checkpoint → train, knnlm, joint → baselines → evaluate, generate → adapt → cli. See
docs/architecture.md; ``lint-imports`` (import-linter) checks the layers.
"""

__version__ = "0.1.0"

from .errors import CorpusError, DatastoreError, MemdecError, ModelSpecError, TokenizerMismatchError  # noqa: F401
from .joint import MemoryDecoderLogitsProcessor, MemoryDecoderModel  # noqa: F401
