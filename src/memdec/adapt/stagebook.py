"""``RUN/stages.json`` and the one class that owns it, ``StageBook``: which stages are done, with
which inputs (a fingerprint of them), in how long, and with which summary; each record checked
before it is used (``stage_entry_problem``). ``say`` prints a run's progress lines."""

from __future__ import annotations

import json
import math
import time
from pathlib import Path
from typing import Callable

from ..baselines import method_names
from ..checks import BOOL, NON_NEGATIVE, OBJECT, TEXT, UNIT, Kind, check_fields as check_record
from ..errors import MemdecError
from ..files import atomic_write_json, read_json_object
from ..options import fingerprint

ADAPT_STAGES = ("datastore", "train", *method_names(), "eval", "router", "tasks", "samples")
STAGE_STATUSES = ("running", "done", "stale")
FINGERPRINT = Kind("a stage fingerprint", lambda v: isinstance(v, str) and len(v) == 12 and
                   all(c in "0123456789abcdef" for c in v))


def _fingerprint(payload: dict) -> str:
    """A stage's fingerprint: 12 hex digits of the sha256 of its inputs as sorted JSON (``memdec.options.fingerprint``:
    the entries added later were left out at their earlier value as each stage's inputs were made, ``stage_inputs``)."""
    return fingerprint(payload, length=12)


_ENTRY_FIELDS: dict[str, Kind] = {"status": Kind(f"one of {', '.join(STAGE_STATUSES)}", lambda v: v in STAGE_STATUSES),
                                  "fingerprint": FINGERPRINT, "inputs": OBJECT}
_DONE_FIELDS: dict[str, Kind] = {"seconds": NON_NEGATIVE, "summary": OBJECT}
_TEXTS = Kind("a list of strings", lambda v: isinstance(v, list) and all(isinstance(x, str) for x in v))
_SCORES = Kind("a JSON object of numbers", lambda v: isinstance(v, dict) and all(
    isinstance(x, (int, float)) and not isinstance(x, bool) and not math.isnan(x) for x in v.values()))
_SECONDS = Kind("a JSON object of numbers or nulls", lambda v: isinstance(v, dict) and all(
    x is None or NON_NEGATIVE.test(x) for x in v.values()))
SUMMARY_FIELDS: dict[str, dict[str, Kind]] = {  # what later stages and the report read of a stage's summary
    "datastore": {"describe": TEXT},
    "train": {"chosen": TEXT, "chosen_alpha": UNIT, "valid_joint_ppl": _SCORES, "train_seconds": _SECONDS,
              "skipped": _TEXTS, "keep_candidates": BOOL, "weights_removed": _TEXTS},
    **{name: {"reused_from": TEXT} for name in method_names()},
    "router": {"kept": BOOL, "why": TEXT},
    "tasks": {"systems": _TEXTS},
}


def stage_entry_problem(name: str, entry) -> str | None:
    """Why the record ``entry`` of the stage ``name`` in ``stages.json`` cannot be used (a field missing or
    of another type, where this module or the report reads it); None if it can."""
    where = f"stage {name}"
    if not isinstance(entry, dict):
        return f"{where}: must be a JSON object, got {json.dumps(entry)[:40]}"
    try:
        check_record(entry, where, _ENTRY_FIELDS)
        if entry["status"] == "done":
            check_record(entry, where, _DONE_FIELDS)
            check_record(entry["summary"], f"{where}: summary", SUMMARY_FIELDS.get(name, {}), optional=True)
    except MemdecError as exc:
        return str(exc)
    return None


class StageBook:
    """``RUN/stages.json``: which stages are done, with which settings, in how long; it owns the
    caching. ``begin`` says whether a stage is cached (same settings, done) or what changed;
    ``run`` does a stage's work between a ``running`` and a ``done`` record."""

    def __init__(self, run: Path, plan: list[str] | None = None):
        self.path = run / "stages.json"
        self.plan = plan or []
        self.stages: dict = read_json_object(self.path, "stage record") if self.path.is_file() else {}
        self.unusable = {name: why for name, entry in self.stages.items() if (why := stage_entry_problem(name, entry))}
        if self.unusable:  # redone as a stage whose settings changed, with every stage after it
            names = ", ".join(self.unusable)
            say(f"warning: {self.path}: the record of {names} is unusable ({next(iter(self.unusable.values()))}); "
                 f"redoing {'it' if len(self.unusable) == 1 else 'them'} and the stages after")
            self.stages = {k: v for k, v in self.stages.items() if k not in self.unusable}
            for name in self.unusable:
                self.redo_after(name)

    def save(self) -> None:
        atomic_write_json(self.path, self.stages)

    def is_done(self, name: str, inputs: dict) -> bool:
        entry = self.stages.get(name)
        return bool(entry and entry.get("status") == "done" and entry.get("fingerprint") == _fingerprint(inputs))

    def changed(self, name: str, inputs: dict) -> list[str]:
        """Which top-level settings differ from the recorded run of this stage (empty if none was; ``its
        record`` where it was unusable)."""
        if name in self.unusable:
            return ["its record"]
        entry = self.stages.get(name)
        if not entry or entry.get("fingerprint") == _fingerprint(inputs):
            return []
        old = entry.get("inputs", {})
        return [k for k in sorted(set(old) | set(inputs)) if old.get(k) != inputs.get(k)] or ["settings"]

    def redo_after(self, name: str) -> None:
        """Mark every stage after ``name`` (in ``ADAPT_STAGES``' order) as to be redone: they read what it made."""
        later = ADAPT_STAGES[ADAPT_STAGES.index(name) + 1:] if name in ADAPT_STAGES else ()
        for stage in later:
            self.invalidate(stage)

    def invalidate(self, name: str) -> None:
        """Mark a done stage as to be redone (what it produced no longer matches), keeping its record."""
        if name in self.stages:
            self.stages[name]["status"] = "stale"

    def recorded_inputs(self, name: str) -> dict:
        return self.stages.get(name, {}).get("inputs", {})

    def summary(self, name: str) -> dict:
        return self.stages.get(name, {}).get("summary", {})

    def begin(self, name: str, inputs: dict, what: str) -> tuple[bool, list[str]]:
        """Announce a stage; returns (cached, the settings that changed since its last run)."""
        done, changed = self.is_done(name, inputs), self.changed(name, inputs)
        position = f"[{self.plan.index(name) + 1}/{len(self.plan)}] " if name in self.plan else ""
        head = f"{position}{name}: {what}"
        if done:
            say(f"{head} — cached ({self.stages[name]['seconds']:.0f} s when built)")
        elif name in self.unusable:
            say(f"{head} — its record was unusable; redoing this stage")
        elif changed:
            say(f"{head} — settings changed ({', '.join(changed)}); redoing this stage")
        else:
            say(head)
        return done, changed

    def run(self, name: str, inputs: dict, work: Callable[[], dict | None]) -> None:
        """Record ``name`` as running, call ``work()`` (which returns the stage's summary), record it done."""
        self.start(name, inputs)
        t0 = time.perf_counter()
        summary = work()
        self.finish(name, time.perf_counter() - t0, summary)

    def start(self, name: str, inputs: dict) -> None:
        self.stages[name] = {"status": "running", "fingerprint": _fingerprint(inputs), "inputs": inputs}
        self.save()

    def finish(self, name: str, seconds: float, summary: dict | None = None) -> None:
        self.stages[name].update(status="done", seconds=round(seconds, 1), summary=summary or {})
        self.save()

    def note(self, name: str, **fields) -> None:
        """Add ``fields`` to the summary of the done stage ``name`` (what a later step of this call decided)."""
        self.stages[name]["summary"].update(fields)
        self.save()


def say(msg: str) -> None:
    """One line of the run's progress, on stdout."""
    print(msg, flush=True)
