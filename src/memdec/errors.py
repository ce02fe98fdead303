"""Errors that the CLI turns into one clear line instead of a traceback."""


class MemdecError(Exception):
    """Base class: bad input or a state the user can fix. The message is shown as is."""


class ModelSpecError(MemdecError):
    """A model spec that cannot be resolved or loaded."""


class CorpusError(MemdecError):
    """A corpus that is missing, empty or unreadable."""


class TokenizerMismatchError(MemdecError):
    """Two artefacts built with different tokenizers were joined."""


class DatastoreError(MemdecError):
    """A datastore that is incomplete, corrupt or built from other inputs."""


def one_line(exc: BaseException) -> str:
    """``Type: first line of the message`` of any exception, for a one-line error."""
    text = str(exc).strip().splitlines()
    return f"{type(exc).__name__}: {text[0]}" if text else type(exc).__name__
