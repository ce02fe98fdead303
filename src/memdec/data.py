"""Corpora: readers, tokenization and sliding windows.

A *corpus spec* is one string:

- ``austen:train``, ``austen:valid``, ``austen:test``, ``austen:within`` (the built-in demo
  corpus: the first 90% of four novels, Northanger Abbey, Persuasion, and the last 10% of the
  four training novels: held-out text that shares their characters and places), ``general:test`` (general modern
  English, CIA World Factbook backgrounds, for measuring forgetting) and
  ``general:train`` (other essays of the same Factbook, disjoint from ``general:test`` by document: text to train on);
- ``stdlib:train``, ``stdlib:valid``, ``stdlib:test``: the running Python's standard library source,
  one document per ``.py`` file, split 90/5/5 by module (``stdlib_split``); ``stdlib-notest:*``
  leaves out the test code;
- a plain-text file (one document), a ``.jsonl`` file (one document per line, read from
  ``text_field``), a folder (every ``.txt``/``.md``/``.jsonl`` file below it, sorted), a glob, or
  a folder saved by ``datasets.Dataset.save_to_disk`` (needs the ``datasets`` package).

Every way to name a corpus reads it in bounded pieces: a text file ``READ_BYTES`` at a time, a JSONL
file a line at a time (a line longer than ``JSONL_MAX_LINE`` is refused), and a document longer than
``PIECE_CHARS`` characters comes as pieces (``Document.continues``), each cut before a space between
two non-space characters near the bound: a boundary of the usual pre-tokenizers, so its tokens are
those of the whole text (a piece continuing a document is tokenized after the end of the one before).
A document of ``PIECE_CHARS`` or less, which is every document of the built-in corpora, is one piece,
as read. A corpus must be a regular file or a folder: a device or a FIFO is refused, since a corpus is
read more than once (checked, tokenized, hashed to resume).

Documents are tokenized in batches by the fast tokenizer and joined with EOS between them into
one token stream. Sliding windows then cover that stream so that every position is scored
(or stored) exactly once, with as much left context as the window allows.
"""

from __future__ import annotations

import codecs
import dataclasses
import glob as globlib
import hashlib
import itertools
import json
import lzma
import platform
import re
import sysconfig
from dataclasses import dataclass
from importlib import resources
from pathlib import Path, PurePosixPath
from typing import Iterable, Iterator

import numpy as np

from .errors import CorpusError, MemdecError
from .files import NpyAppender, parse_json

# Built-in corpora: name -> documents under the package's ``corpora/<prefix>/`` folder. Each is
# ``<stem>.txt.xz`` (one document) or ``<stem>.jsonl.xz`` (one document per line, its "text" field).
# ``<stem>[a:b]`` keeps the fraction a..b of a text document, cut at paragraph boundaries.
AUSTEN_TRAIN_NOVELS = ["emma", "mansfieldpark", "prideprejudice", "sensesensibility"]
WITHIN_HOLDOUT = 0.9  # the last 10% of each training novel is held out as austen:within
BUILTIN_CORPORA: dict[str, list[str]] = {
    "austen:train": [f"{n}[0:{WITHIN_HOLDOUT}]" for n in AUSTEN_TRAIN_NOVELS],
    "austen:valid": ["northangerabbey"],
    "austen:test": ["persuasion"],
    "austen:within": [f"{n}[{WITHIN_HOLDOUT}:1]" for n in AUSTEN_TRAIN_NOVELS],
    # general modern English, to measure forgetting: the background essay of every entry of the CIA World
    # Factbook (public domain; corpora/general/SOURCE.md says where it came from and how it was built)
    "general:test": ["factbook"],
    # general text to train on (a router's general rows): other essays of the same Factbook entries (economy,
    # demographics, disputes, environment, geography notes), disjoint from general:test by document
    "general:train": ["factbook-train"],
}

# The Python standard library's own source, a code domain on every machine (``stdlib:SPLIT``; ``stdlib-notest:SPLIT``
# leaves out the test code). Split by module, never by line: each file's *unit* (its top-level module or package;
# inside the big ``test`` package, its second-level module or package) falls in train / valid / test by a hash of
# the unit's name, so the split is the same on every machine whose Python has the same files.
STDLIB_PREFIXES = ("stdlib", "stdlib-notest")
STDLIB_SPLITS = {"train": (0, 90), "valid": (90, 95), "test": (95, 100)}  # percent of units, by name hash
STDLIB_SKIP_DIRS = {"site-packages", "dist-packages", "__pycache__"}  # third-party packages, bytecode
STDLIB_TEST_DIRS = {"test", "tests", "idle_test"}

TEXT_SUFFIXES = {".txt", ".md", ".text"}
JSONL_SUFFIXES = {".jsonl", ".json", ".ndjson"}


@dataclass(frozen=True)
class Document:
    source: str  # file name, or file:line for JSONL
    text: str
    continues: bool = False  # a piece of a long document that goes on from the previous one: no EOS between


PIECE_CHARS = 1 << 20  # a document longer than this comes in pieces of at most this many characters
CUT_WINDOW = 1 << 16  # a piece ends at the last space between two non-spaces in its last CUT_WINDOW characters
READ_BYTES = 1 << 20  # a text file is read this many bytes at a time
JSONL_MAX_LINE = 64 << 20  # a JSONL line is one JSON record, read whole: longer lines are refused


def _cut_at(text: str, lo: int, hi: int) -> int:
    """The last offset in (lo, hi] of a space between two non-space characters (``hi`` < len(text)), or
    ``hi`` where there is none: a piece ends there and the next one begins with the space."""
    at = hi + 1
    while (at := text.rfind(" ", lo + 1, at)) > 0:
        if not text[at - 1].isspace() and not text[at + 1].isspace():
            return at
    return hi


def _pieces(source: str, chunks: Iterable[str], continues: bool = False) -> Iterator[Document]:
    """The document ``source`` whose text arrives in ``chunks``, as pieces of at most ``PIECE_CHARS``
    characters (``_cut_at``); every piece after the first ``continues`` it. A text of ``PIECE_CHARS``
    or less is one piece, exactly as read. Holds at most one chunk and one piece at a time."""
    carry = ""
    for chunk in chunks:
        text, start = carry + chunk, 0
        while len(text) - start > PIECE_CHARS:
            cut = _cut_at(text, max(start, start + PIECE_CHARS - CUT_WINDOW), start + PIECE_CHARS)
            yield Document(source, text[start:cut], continues)
            start, continues = cut, True
        carry = text[start:]
    if carry or not continues:
        yield Document(source, carry, continues)


def _bounded(docs: Iterable[Document]) -> Iterator[Document]:
    """``docs`` with each document longer than ``PIECE_CHARS`` in pieces (``_pieces``)."""
    for doc in docs:
        if len(doc.text) > PIECE_CHARS:
            yield from _pieces(doc.source, [doc.text], doc.continues)
        else:
            yield doc


def _decode(data: bytes, source: str) -> str:
    try:
        return data.decode("utf-8")
    except UnicodeDecodeError as exc:
        raise CorpusError(
            f"{source}: not UTF-8 text (invalid byte 0x{data[exc.start]:02x} at byte offset {exc.start})"
        ) from None


def paragraph_cut(text: str, fraction: float) -> int:
    """Offset of the first paragraph start ("\n\n" boundary) at or after ``fraction`` of ``text``."""
    if fraction <= 0:
        return 0
    if fraction >= 1:
        return len(text)
    at = text.find("\n\n", int(len(text) * fraction))
    return len(text) if at < 0 else at + 2


def _parse_part(entry: str) -> tuple[str, float, float]:
    """``stem`` or ``stem[a:b]`` -> (stem, a, b)."""
    m = re.fullmatch(r"([\w-]+)(?:\[([\d.]+):([\d.]+)\])?", entry)
    if m is None:
        raise CorpusError(f"bad built-in corpus entry '{entry}'")
    return m[1], float(m[2] or 0.0), float(m[3] or 1.0)


def _read_builtin(name: str) -> list[Document]:
    folder = resources.files("memdec") / "corpora" / name.split(":")[0]
    docs = []
    for entry in BUILTIN_CORPORA[name]:
        stem, start, end = _parse_part(entry)
        jsonl = folder / f"{stem}.jsonl.xz"
        if jsonl.is_file():
            text = _decode(lzma.decompress(jsonl.read_bytes()), stem)
            docs += [Document(f"{name}/{stem}:{i}", json.loads(line)["text"])
                     for i, line in enumerate(text.splitlines(), 1) if line.strip()]
        else:
            text = _decode(lzma.decompress((folder / f"{stem}.txt.xz").read_bytes()), stem)
            docs.append(Document(f"{name}/{entry}", text[paragraph_cut(text, start) : paragraph_cut(text, end)]))
    return docs


def stdlib_root() -> Path:
    """The standard library's folder of this Python (``sysconfig.get_paths()["stdlib"]``)."""
    return Path(sysconfig.get_paths()["stdlib"])


def stdlib_unit(rel: PurePosixPath) -> str:
    """The split unit of a stdlib file (path relative to the stdlib root): ``email/parser.py`` ->
    ``email``, ``json.py`` -> ``json``, ``test/test_os.py`` -> ``test.test_os``,
    ``test/test_asyncio/test_events.py`` -> ``test.test_asyncio``."""
    parts = rel.with_suffix("").parts
    return f"test.{parts[1]}" if parts[0] == "test" and len(parts) > 1 else parts[0]


def stdlib_split(unit: str) -> str:
    """``train``, ``valid`` or ``test``: a pure function of the unit's name (sha256, mod 100)."""
    bucket = int(hashlib.sha256(unit.encode("utf-8")).hexdigest()[:8], 16) % 100
    return next(name for name, (lo, hi) in STDLIB_SPLITS.items() if lo <= bucket < hi)


def _is_stdlib_source(rel: PurePosixPath, with_tests: bool) -> bool:
    """A ``.py`` file of the library itself: not third-party, not build-specific (``config-*``,
    ``_sysconfigdata_*``, which hold the build's paths), and, without tests, no test code."""
    if rel.suffix != ".py" or STDLIB_SKIP_DIRS & set(rel.parts) or rel.parts[0].startswith("config-"):
        return False
    if rel.name.startswith("_sysconfigdata_"):
        return False
    return with_tests or not (STDLIB_TEST_DIRS & set(rel.parts[:-1]) or rel.name.startswith("test_"))


def stdlib_files(split: str, with_tests: bool = True, root: Path | None = None) -> list[PurePosixPath]:
    """The stdlib files of ``split``, relative to the root, sorted by path (posix)."""
    root = root or stdlib_root()
    if not root.is_dir():
        raise CorpusError(f"the Python standard library's source is not at {root}")
    rels = (PurePosixPath(p.relative_to(root).as_posix()) for p in root.rglob("*.py") if p.is_file())
    return sorted(r for r in rels if _is_stdlib_source(r, with_tests) and stdlib_split(stdlib_unit(r)) == split)


def _parse_stdlib_spec(spec: str) -> tuple[str, bool] | None:
    """(split, with_tests) of a ``stdlib:SPLIT`` / ``stdlib-notest:SPLIT`` spec; None for other specs."""
    prefix, _, split = spec.partition(":")
    if prefix not in STDLIB_PREFIXES or Path(spec).exists():
        return None
    if split not in STDLIB_SPLITS:
        raise CorpusError(f"unknown corpus '{spec}'; choose one of: "
                          + ", ".join(f"{p}:{s}" for p in STDLIB_PREFIXES for s in STDLIB_SPLITS))
    return split, prefix == "stdlib"


def _read_stdlib(split: str, with_tests: bool) -> Iterator[Document]:
    """One document per file, in path order, read one file at a time; files that are not UTF-8
    (a few deliberately mis-encoded test inputs) are left out, the same on every machine."""
    root = stdlib_root()
    for rel in stdlib_files(split, with_tests, root):
        try:
            text = (root / rel).read_bytes().decode("utf-8")
        except UnicodeDecodeError:
            continue
        if text.strip():
            yield Document(str(rel), text)


def corpus_source(spec: str) -> dict | None:
    """What a stdlib spec read on this machine (Python version, files, bytes, a sha256 of every
    path and content, 16 hex digits), to record beside the token stream's hash; None for other specs."""
    parsed = _parse_stdlib_spec(spec)
    if parsed is None:
        return None
    digest, files, chars = hashlib.sha256(), 0, 0
    for d in _read_stdlib(*parsed):
        digest.update(f"{d.source}\0{len(d.text)}\0".encode())
        digest.update(d.text.encode("utf-8"))
        files, chars = files + 1, chars + len(d.text)
    return {"python": platform.python_version(), "files": files, "chars": chars, "sha256": digest.hexdigest()[:16]}


def corpus_text_hash(spec: str, text_field: str = "text") -> str | None:
    """sha256 (16 hex digits) of a corpus's documents as read (each text with its length), streamed one
    document at a time, which checks it as ``read_corpus`` does (CorpusError); None for a built-in corpus
    (fixed package data: its name is its identity, and nothing is read)."""
    if spec in BUILTIN_CORPORA:
        return None
    digest = hashlib.sha256()
    for doc in iter_corpus(spec, text_field):
        data = doc.text.encode("utf-8")
        digest.update(f"{len(data)}\0".encode())
        digest.update(data)
    return digest.hexdigest()[:16]


def _read_text_file(path: Path) -> Iterator[Document]:
    """A text file as one document, in pieces (``_pieces``): never held whole, whatever its lines."""
    yield from _pieces(str(path), _decoded_chunks(path))


def _decoded_chunks(path: Path) -> Iterator[str]:
    """The UTF-8 text of ``path``, ``READ_BYTES`` at a time; CorpusError naming the first invalid byte."""
    decoder = codecs.getincrementaldecoder("utf-8")()
    offset = 0
    with open(path, "rb") as f:
        while True:
            data = f.read(READ_BYTES)
            try:
                yield decoder.decode(data, final=not data)
            except UnicodeDecodeError as exc:  # exc.object: the bytes the decoder held back, then ``data``
                at = offset - (len(exc.object) - len(data)) + exc.start
                raise CorpusError(f"{path}: not UTF-8 text (invalid byte 0x{exc.object[exc.start]:02x} at byte offset "
                                  f"{at})") from None
            if not data:
                return
            offset += len(data)


def _read_jsonl(path: Path, text_field: str) -> Iterator[Document]:
    """The documents of a JSON-lines file, read one line (of at most ``JSONL_MAX_LINE`` bytes) at a time."""
    with open(path, "rb") as f:
        offset = 0
        for lineno in itertools.count(1):
            raw = f.readline(JSONL_MAX_LINE + 1)
            if not raw:
                return
            if len(raw) > JSONL_MAX_LINE and not raw.endswith(b"\n"):
                raise CorpusError(f"{path}:{lineno}: a line longer than {JSONL_MAX_LINE >> 20} MiB; a JSONL record is "
                                  f"read whole: give so long a document as a text file (read in pieces)")
            try:
                line = raw.decode("utf-8")
            except UnicodeDecodeError as exc:
                raise CorpusError(f"{path}: not UTF-8 text (invalid byte 0x{raw[exc.start]:02x} at byte offset "
                                  f"{offset + exc.start})") from None
            offset += len(raw)
            if not line.strip():
                continue
            try:
                record = parse_json(line)
            except json.JSONDecodeError as exc:
                raise CorpusError(f"{path}:{lineno}: not valid JSON ({exc.msg})") from None
            if not isinstance(record, dict) or text_field not in record:
                raise CorpusError(f"{path}:{lineno}: no field '{text_field}' (set it with --text-field)")
            value = record[text_field]
            if not isinstance(value, str):
                raise CorpusError(f"{path}:{lineno}: field '{text_field}' is not a string")
            yield Document(f"{path}:{lineno}", value)


ARROW_BATCH = 1024  # rows of a saved dataset read at a time


def _read_arrow_dataset(path: Path, text_field: str) -> Iterator[Document]:
    try:
        from datasets import load_from_disk
    except ImportError:
        raise CorpusError(
            f"{path}: reading a saved Arrow dataset needs the 'datasets' package (pip install datasets)"
        ) from None
    ds = load_from_disk(str(path))
    if hasattr(ds, "keys") and not hasattr(ds, "column_names"):  # a DatasetDict: take its first split
        ds = ds[sorted(ds.keys())[0]]
    if text_field not in ds.column_names:
        raise CorpusError(f"{path}: no column '{text_field}' (columns: {', '.join(ds.column_names)}; set --text-field)")
    for start in range(0, len(ds), ARROW_BATCH):  # memory-mapped: only a batch of rows is read at a time
        texts = ds[start : start + ARROW_BATCH][text_field]
        yield from (Document(f"{path}#{start + i}", t) for i, t in enumerate(texts) if isinstance(t, str))


def _read_path(path: Path, text_field: str) -> Iterator[Document]:
    if path.is_dir():
        if (path / "dataset_info.json").is_file() or (path / "dataset_dict.json").is_file():
            yield from _read_arrow_dataset(path, text_field)
            return
        files = sorted(p for p in path.rglob("*") if p.is_file() and p.suffix.lower() in TEXT_SUFFIXES | JSONL_SUFFIXES)
        if not files:
            raise CorpusError(f"{path}: folder holds no .txt, .md or .jsonl files")
        for f in files:
            yield from _read_path(f, text_field)
    elif path.suffix.lower() in JSONL_SUFFIXES:
        yield from _read_jsonl(path, text_field)
    else:
        yield from _read_text_file(path)


def _corpus_paths(spec: str) -> list[Path]:
    """The files or folders a (non built-in) corpus spec names; CorpusError if there are none."""
    if ":" in spec and spec.split(":")[0] in {k.split(":")[0] for k in BUILTIN_CORPORA} and not Path(spec).exists():
        raise CorpusError(f"unknown built-in corpus '{spec}'; choose one of: {', '.join(BUILTIN_CORPORA)}")
    if any(ch in spec for ch in "*?[") and not Path(spec).exists():
        paths = sorted(Path(p) for p in globlib.glob(spec, recursive=True) if Path(p).is_file())
        if not paths:
            raise CorpusError(f"{spec}: the pattern matches no file")
        return paths
    path = Path(spec).expanduser()
    if not path.exists():
        raise CorpusError(f"{spec}: no such file or folder")
    if not path.is_file() and not path.is_dir():
        raise CorpusError(f"{spec}: not a regular file or folder (a device, FIFO or socket): a corpus is read more "
                          f"than once (checked, tokenized, hashed to resume); save the text to a file")
    return [path]


def iter_corpus(spec: str, text_field: str = "text") -> Iterator[Document]:
    """The non-blank documents of a corpus spec, read lazily: a piece of a text file, one JSONL line or
    one batch of dataset rows at a time, so a corpus larger than memory streams through, and a document
    longer than ``PIECE_CHARS`` comes in pieces (``Document.continues``; a blank first piece is dropped
    and the next one starts the document). A bad spec raises CorpusError at once; a bad file when it is
    reached. Raises CorpusError at the end if no document had text."""
    stdlib = None if spec in BUILTIN_CORPORA else _parse_stdlib_spec(spec)
    paths = None if spec in BUILTIN_CORPORA or stdlib else _corpus_paths(spec)

    def documents() -> Iterator[Document]:
        found = False
        if paths is not None:
            sources = (d for p in paths for d in _read_path(p, text_field))
        else:
            sources = _read_stdlib(*stdlib) if stdlib else iter(_read_builtin(spec))
        kept = False  # whether the document the next piece may continue was kept
        for doc in _bounded(sources):
            if doc.continues and kept:
                yield doc
            elif doc.text.strip():
                found = kept = True
                yield dataclasses.replace(doc, continues=False) if doc.continues else doc
            else:
                kept = False
        if not found:
            raise CorpusError(f"{spec}: the corpus is empty (no non-blank text)")

    return documents()


def read_corpus(spec: str, text_field: str = "text") -> list[Document]:
    """Read a corpus spec into documents (``iter_corpus``'s, a long one in pieces). Raises CorpusError on a
    missing, empty or non-UTF-8 corpus."""
    return list(iter_corpus(spec, text_field))


def check_corpus(spec: str, flag: str, text_field: str = "text") -> None:
    """A corpus spec that names something readable (its documents are read later): one MemdecError
    line naming ``flag``, before any model loads."""
    try:
        iter_corpus(spec, text_field)
    except MemdecError as exc:
        raise MemdecError(f"{flag}: {exc}") from None


def iter_token_pieces(tokenizer, docs: Iterable[Document], batch_size: int = 64,
                      max_tokens: int | None = None) -> Iterator[np.ndarray]:
    """The token stream of ``docs`` in pieces (int32 arrays), EOS between documents (none before a
    piece that ``continues`` one: it is tokenized after the end of the piece before, ``encode_after``).

    ``docs`` is consumed lazily, ``batch_size`` documents (at most ``BATCH_CHARS`` characters) at a
    time, so only one batch of text is held at once. With ``max_tokens``, reading and tokenization stop
    once that many tokens exist, and a long document is tokenized only as far as needed
    (``tokenize_prefix``): the pieces join to the whole stream cut to ``max_tokens``, without reading
    or tokenizing the rest.
    """
    eos = tokenizer.eos_token_id
    if eos is None:
        raise CorpusError("the tokenizer has no EOS token to separate documents")
    docs = iter(docs)
    pending: list[Document] = []  # documents read but not yet tokenized (at most one batch)
    total, first, before = 0, True, ""  # before: the end of the last text tokenized
    while max_tokens is None or total < max_tokens:
        need = None if max_tokens is None else PREFIX_CHARS_PER_TOKEN * (max_tokens - total)
        pending += _take(docs, batch_size - len(pending), min(BATCH_CHARS, need or BATCH_CHARS)
                         - sum(len(d.text) for d in pending))
        if not pending:
            return
        # a piece that continues a document, or one longer than what is still needed, is tokenized alone
        alone = next((j for j, d in enumerate(pending)
                      if d.continues or (need is not None and len(d.text) > need)), None)
        if alone == 0:
            batch = pending[:1]
            encoded = [_encode_alone(tokenizer, batch[0], before, None if max_tokens is None else max_tokens - total)]
        else:
            batch = pending[:alone]
            encoded = tokenizer([d.text for d in batch], add_special_tokens=False)["input_ids"]
        del pending[: len(batch)]
        before = batch[-1].text[-CONTEXT_CHARS:]
        for doc, ids in zip(batch, encoded):
            piece = np.asarray(ids if first or doc.continues else [eos, *ids], dtype=np.int32)
            first = False
            if max_tokens is not None:
                piece = piece[: max_tokens - total]
            total += len(piece)
            yield piece


BATCH_CHARS = 8 << 20  # the characters of one tokenizer batch, at most (but for a single document)
CONTEXT_CHARS = 256  # the end of the piece before, tokenized in front of a piece that continues it


def _take(docs: Iterator[Document], n: int, chars: int) -> list[Document]:
    """Up to ``n`` documents of ``docs``, stopping once they hold ``chars`` characters."""
    out: list[Document] = []
    while len(out) < n and chars > 0 and (doc := next(docs, None)) is not None:
        out.append(doc)
        chars -= len(doc.text)
    return out


def _encode_alone(tokenizer, doc: Document, before: str, n_tokens: int | None) -> list[int]:
    """The tokens of one document (after ``before`` where it continues one), its first ``n_tokens``
    only when given (``tokenize_prefix``)."""
    def encode(text: str) -> list[int]:
        return encode_after(tokenizer, before, text) if doc.continues else _encode(tokenizer, text)

    if n_tokens is None or len(doc.text) <= PREFIX_CHARS_PER_TOKEN * n_tokens:
        return encode(doc.text)
    return tokenize_prefix(tokenizer, doc.text, n_tokens, encode)


def _encode(tokenizer, text: str) -> list[int]:
    return tokenizer(text, add_special_tokens=False)["input_ids"]


def encode_after(tokenizer, before: str, text: str) -> list[int]:
    """The tokens of ``text`` where it follows ``before`` in one document: ``before + text`` tokenized,
    the tokens that start in ``text`` kept, so that a tokenizer that marks the start of a text (a
    SentencePiece prefix space) does not mark the cut. ``text`` alone where the tokenizer gives no
    offsets or a token spans the cut."""
    if not before or not getattr(tokenizer, "is_fast", False):
        return _encode(tokenizer, text)
    enc = tokenizer(before + text, add_special_tokens=False, return_offsets_mapping=True)
    cut = len(before)
    if any(a < cut < b for a, b in enc["offset_mapping"]):
        return _encode(tokenizer, text)
    return [i for i, (a, _) in zip(enc["input_ids"], enc["offset_mapping"]) if a >= cut]


def tokenize_documents(
    tokenizer, docs: Iterable[Document], batch_size: int = 64, max_tokens: int | None = None
) -> np.ndarray:
    """Tokenize documents in batches and join them with EOS between documents (``iter_token_pieces``).

    Returns: int32 array [n_tokens].
    """
    pieces = list(iter_token_pieces(tokenizer, docs, batch_size, max_tokens))
    return np.concatenate(pieces) if pieces else np.zeros(0, dtype=np.int32)


PREFIX_CHARS_PER_TOKEN = 8  # a first guess at the characters that hold one token (English: about 4)


def tokenize_prefix(tokenizer, text: str, n_tokens: int, encode=None) -> list[int]:
    """The first ``n_tokens`` tokens of ``tokenizer(text)`` (or of ``encode(text)``), tokenizing only a
    prefix of ``text``.

    Cutting the text can change the tokens near the cut only. Two prefixes, the second twice as
    long, are tokenized; the tokens they agree on (minus a margin) are those of the whole text.
    The prefix doubles until enough tokens agree, or until it is the whole text.
    """
    encode = encode or (lambda t: _encode(tokenizer, t))
    chars = max(1024, PREFIX_CHARS_PER_TOKEN * n_tokens)
    short = encode(text[:chars])
    while True:
        if 2 * chars >= len(text):
            return encode(text)[:n_tokens]
        long = encode(text[: 2 * chars])
        same = next((i for i, (a, b) in enumerate(zip(short, long)) if a != b), min(len(short), len(long)))
        if same - PREFIX_MARGIN_TOKENS >= n_tokens:
            return long[:n_tokens]
        short, chars = long, 2 * chars


PREFIX_MARGIN_TOKENS = 8


def _check_max_tokens(max_tokens: int | None) -> None:
    if max_tokens is not None and max_tokens < 2:
        raise CorpusError(f"--max-tokens must be at least 2, got {max_tokens}")


def _check_length(n: int, spec: str) -> None:
    if n < 2:
        raise CorpusError(f"{spec}: the corpus has fewer than 2 tokens, so nothing can be predicted")


def load_token_stream(spec: str, tokenizer, max_tokens: int | None = None, text_field: str = "text") -> np.ndarray:
    """Read, tokenize and (optionally) truncate a corpus to its first ``max_tokens`` tokens.

    Returns: int32 array [n_tokens], at least 2 tokens long.
    """
    _check_max_tokens(max_tokens)
    tokens = tokenize_documents(tokenizer, iter_corpus(spec, text_field), max_tokens=max_tokens)
    _check_length(len(tokens), spec)
    return tokens


def stream_tokens_to_file(spec: str, tokenizer, path: str | Path, max_tokens: int | None = None,
                          text_field: str = "text") -> np.ndarray:
    """``load_token_stream`` written straight to the .npy file ``path`` as it is tokenized: the
    documents stream through, one batch at a time, and only the int32 token stream (4 bytes a
    token) ever exists whole, on disk. Returns it memory-mapped, int32 [n_tokens]."""
    _check_max_tokens(max_tokens)
    sink = NpyAppender(path, np.int32)
    try:
        for piece in iter_token_pieces(tokenizer, iter_corpus(spec, text_field), max_tokens=max_tokens):
            sink.append(piece)
    finally:
        sink.close()
    _check_length(sink.n, spec)
    return np.load(path, mmap_mode="r")


HASH_CHUNK = 1 << 24  # tokens hashed at a time


def token_stream_hash(tokens: np.ndarray) -> str:
    """sha256 (16 hex digits) of a token stream, as int32 little-endian bytes (hashed in chunks,
    so a memory-mapped stream is never copied whole)."""
    digest = hashlib.sha256()
    for i in range(0, len(tokens), HASH_CHUNK):
        digest.update(np.ascontiguousarray(tokens[i : i + HASH_CHUNK], dtype="<i4").tobytes())
    return digest.hexdigest()[:16]


def sliding_windows(n_tokens: int, block_size: int, stride: int) -> np.ndarray:
    """Windows over a token stream such that every position is scored exactly once.

    A *position* p in [0, n_tokens-1) is an input token whose next token ``tokens[p+1]`` is
    predicted. Window j feeds inputs ``tokens[start:end]`` and scores positions
    ``[score_start, end)``: the ones no earlier window scored. Windows end every ``stride``
    positions and are ``block_size`` long where the stream allows, so every scored position has
    at least ``block_size - stride`` tokens of context (all of it, near the start).

    Returns: int64 array [n_windows, 3] of (start, end, score_start).
    """
    if block_size < 1 or stride < 1:
        raise ValueError("block_size and stride must be positive")
    if stride > block_size:
        raise ValueError(f"stride ({stride}) must not exceed block_size ({block_size})")
    n_positions = n_tokens - 1
    if n_positions < 1:
        return np.zeros((0, 3), dtype=np.int64)
    ends = np.arange(block_size, n_positions + stride, stride, dtype=np.int64)
    ends = np.unique(np.append(np.minimum(ends, n_positions), n_positions))
    starts = np.maximum(ends - block_size, 0)
    score_starts = np.concatenate([[0], ends[:-1]])
    return np.stack([starts, ends, score_starts], axis=1)


def window_batches(windows: np.ndarray, batch_size: int) -> list[np.ndarray]:
    """Group consecutive windows of equal (length, stored count) into batches of ``batch_size``.

    windows: int64 [W, 3] from ``sliding_windows``. Each batch [b, 3] stores one contiguous run
    of positions, ``[batch[0, 2], batch[-1, 1])``. The grouping is a pure function of its
    inputs, so a resumed build meets the same chunks.
    """
    out: list[np.ndarray] = []
    group: list[np.ndarray] = []
    for w in windows:
        shape = (w[1] - w[0], w[1] - w[2])
        if group and (len(group) == batch_size or (group[0][1] - group[0][0], group[0][1] - group[0][2]) != shape):
            out.append(np.stack(group))
            group = []
        group.append(w)
    if group:
        out.append(np.stack(group))
    return out
