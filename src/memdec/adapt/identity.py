"""What a run is: the inputs that define it (``RUN_IDENTITY``) and its corpora's text hashes, checked
against the run recorded in ``RUN/settings.json`` (``check_run_identity``) before anything loads;
``check_inputs`` (model, corpora, the folder) and ``clear_run`` for ``--overwrite``."""

from __future__ import annotations

import dataclasses
import json
import shutil
from pathlib import Path

from ..checks import check_own_folder
from ..data import corpus_text_hash
from ..errors import CorpusError, MemdecError
from ..files import atomic_write_json, read_json_object
from ..models import resolve_model_spec
from ..train import check_decoder_shape
from ..transfer import check_source
from .options import RunInputs
from .presets import Settings
from .stagebook import ADAPT_STAGES, FINGERPRINT, STAGE_STATUSES, say

# the inputs that define what a run is: another value makes another run, refused in the same --out
# without --overwrite. Every other setting (token budgets, the preset, training and task options)
# only redoes the stages it changes, and keeps the rest.
RUN_IDENTITY = {f.name: "--" + f.name.replace("_", "-") for f in dataclasses.fields(RunInputs)}
# what memdec adapt writes in a run folder: all that --overwrite deletes
RUN_ENTRIES = ("stages.json", "settings.json", "datastore", "memdec", "candidates", "baselines", "eval.json",
               "lambda.png", "tasks", "tasks.json", "samples.json", "report.json", "report.md", "training.png",
               "router", "router_lambda.png")


CORPUS_FLAGS = {"corpus": "--corpus", "valid": "--valid", "test": "--test", "general": "--general"}
CORPUS_HASHES = "corpus_hashes"  # in RUN/settings.json: {corpus, valid, test, general: the text's hash or None}


def check_inputs(s: Settings, run: Path) -> dict[str, str | None]:
    """The model spec resolves, every corpus reads, and ``run`` is new, empty or an adapt run:
    all before anything is loaded or written. Returns each corpus's text hash (``corpus_text_hash``,
    taken by the one pass that checks it; None for a built-in corpus and for no --general)."""
    check_own_folder(run, "adapt-run", legacy=is_stage_record)
    resolve_model_spec(s.model)
    check_decoder_shape(s.decoder, s.model, s.init, s.init_layers)
    if s.init is not None:
        resolve_model_spec(s.init)
    if s.transfer_from is not None:
        try:
            check_source(s.transfer_from)
        except MemdecError as exc:
            raise MemdecError(f"--transfer-from: {exc}") from None
    hashes = {}
    for key, flag in CORPUS_FLAGS.items():
        try:
            hashes[key] = None if getattr(s, key) is None else corpus_text_hash(getattr(s, key), s.text_field)
        except CorpusError as exc:
            raise CorpusError(f"{flag}: {exc}") from None
    return hashes


def is_stage_record(run: Path) -> bool:
    """Whether ``run`` is an adapt run made before folder markers (no ``OWN_MARKER``): its ``stages.json``
    is a stage record of memdec adapt: a JSON object of at least one of its stages (and no other key),
    each with a status and a fingerprint it writes. A file of that name alone says nothing."""
    try:
        stages = json.loads((run / "stages.json").read_text())
    except (OSError, UnicodeDecodeError, ValueError):
        return False
    return (isinstance(stages, dict) and bool(stages) and set(stages) <= set(ADAPT_STAGES)
            and all(isinstance(e, dict) and e.get("status") in STAGE_STATUSES and FINGERPRINT.test(e.get("fingerprint"))
                    for e in stages.values()))


def identity_changes(s: Settings, run: Path, hashes: dict[str, str | None] | None = None) -> list[str]:
    """``--flag OLD -> NEW`` for each input of RUN_IDENTITY in which ``s`` differs from the run recorded in
    ``run/settings.json`` (none if there is no record), and ``--flag SPEC: its text changed`` for each
    corpus of the same spec whose text hash (``hashes``, from ``check_inputs``) differs from the one
    recorded. A ``--general`` added to a run that had none only adds work, and is no change."""
    record = run / "settings.json"
    if not (run / "stages.json").is_file() or not record.is_file():
        return []
    old = read_json_object(record, "run settings")
    changes = []
    for key, flag in RUN_IDENTITY.items():
        if key in old and old[key] is not None and old[key] != getattr(s, key):
            changes.append(f"{flag} {old[key]} -> {getattr(s, key) or 'none'}")
    recorded = old.get(CORPUS_HASHES) if isinstance(old.get(CORPUS_HASHES), dict) else {}
    for key, flag in CORPUS_FLAGS.items():
        before, now = recorded.get(key), (hashes or {}).get(key)
        if old.get(key) == getattr(s, key) and before is not None and now is not None and before != now:
            changes.append(f"{flag} {getattr(s, key)}: its text changed since the run was made "
                           f"(hash {before} -> {now})")
    return changes


def check_run_identity(s: Settings, run: Path, overwrite: bool, hashes: dict[str, str | None] | None = None) -> bool:
    """Whether ``run`` holds another run (other RUN_IDENTITY inputs, or a corpus whose text changed) that
    ``overwrite`` lets this call replace; raises MemdecError, naming each differing input, when it holds
    one and ``overwrite`` is off."""
    changes = identity_changes(s, run, hashes)
    if changes and not overwrite:
        raise MemdecError(f"--out {run} holds another run ({'; '.join(changes)}): rerunning would replace its "
                          f"datastore, decoders and report; choose a new --out, or give --overwrite to replace it")
    return bool(changes)


def clear_run(run: Path) -> None:
    """Delete what memdec adapt wrote in ``run`` (RUN_ENTRIES and their temporary files); anything else in
    the folder stays. The stage record is emptied first, so an interruption never leaves a stage recorded
    as done without its files; the folder's marker (``OWN_MARKER``) stays."""
    say(f"--overwrite: replacing the run in {run}")
    atomic_write_json(run / "stages.json", {})
    for name in RUN_ENTRIES:
        if name == "stages.json":
            continue
        for p in (run / name, run / f".{name}.tmp"):
            if p.is_symlink() or p.is_file():
                p.unlink()
            elif p.is_dir():
                shutil.rmtree(p)
