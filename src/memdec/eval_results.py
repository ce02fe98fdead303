"""The result rows of ``memdec eval`` and their formats: ``ResultRow`` (one system on one corpus), ``make_row``
(from per-token NLLs, refusing a non-finite perplexity), ``EvalReport`` and the eval JSON contract
(``write_report_json``, ``check_eval_json``, ``read_eval_json``: every number finite, every field typed), and the
terminal table (``format_table``). ``memdec.evaluate`` builds the rows; the report and adapt read them."""

from __future__ import annotations

import math
import os
from dataclasses import dataclass, field
from typing import Callable

import numpy as np

from .checks import COUNT, NON_NEGATIVE, OBJECT, POSITIVE, SCORE, TEXT, UNIT, WHOLE, Kind, check_fields, check_items
from .errors import MemdecError
from .files import atomic_write_json, read_json_object
from .scoring import mean_ppl
from .tables import Column, render_columns


@dataclass
class ResultRow:
    """One system's score on one corpus; the JSON contract of ``memdec eval``."""

    system: str  # "base" | "knn-lm" | "memdec" | baselines
    model: str
    nll: float
    ppl: float
    tokens_per_s: float
    extra: dict = field(default_factory=dict)
    lmbda: float | None = None

    def to_json(self) -> dict:
        row = {"system": self.system, "model": self.model, "lambda": self.lmbda, "nll": round(self.nll, 6),
               "ppl": round(self.ppl, 4), "tokens_per_s": round(self.tokens_per_s, 2)}
        row.update(self.extra)
        return row


def make_row(system: str, model: str, nll: np.ndarray, seconds: float, lmbda: float | None = None,
             **extra) -> ResultRow:
    """A row from per-token NLLs [N] scored in ``seconds``; MemdecError naming the system where its
    perplexity is not a finite number (a kNN-LM at λ=1 that misses a target, an overflow)."""
    mean, ppl = float(np.mean(nll, dtype=np.float64)), mean_ppl(nll)
    if not math.isfinite(ppl):
        at = "" if lmbda is None else f" at λ={lmbda:g}"
        raise MemdecError(f"{system}{at}: the perplexity on the test corpus is not finite (mean NLL {mean:.4g}); "
                          f"no row is reported" + (" (choose a λ below 1)" if lmbda == 1 else ""))
    return ResultRow(system, model, mean, ppl, len(nll) / max(seconds, 1e-9), extra, lmbda)


@dataclass
class EvalReport:
    """What one ``memdec eval`` run found: the rows, plus the λ curves when a mixture was scored."""

    rows: list[ResultRow]
    n_tokens: int
    extra: dict = field(default_factory=dict)  # top-level JSON keys beside "results"

    def to_json(self, corpus: str) -> dict:
        """The report as JSON; MemdecError naming the key of any non-finite number (JSON has none)."""
        report = {"tokens": self.n_tokens, "corpus": corpus, **self.extra, "results": [r.to_json() for r in self.rows]}
        if (where := _non_finite_at(report)) is not None:
            raise MemdecError(f"the eval report would hold a non-finite number at {where}; nothing was written")
        return report


def _non_finite_at(value, where: str = "") -> str | None:
    """The path (``results[1].ppl``) of the first non-finite float in a JSON-like ``value``, or None."""
    if isinstance(value, float):
        return None if math.isfinite(value) else f"{where} ({value})"
    items = value.items() if isinstance(value, dict) else enumerate(value) if isinstance(value, (list, tuple)) else ()
    for key, item in items:
        found = _non_finite_at(item, f"{where}[{key}]" if isinstance(key, int) else f"{where}.{key}".lstrip("."))
        if found is not None:
            return found
    return None


def write_report_json(path: str | os.PathLike, corpus: str, n_tokens: int, rows: list[ResultRow], **extra) -> None:
    """Write the eval JSON atomically: {"tokens", "corpus", ..., "results": [...]}."""
    atomic_write_json(path, EvalReport(rows, n_tokens, extra).to_json(corpus))


PPL = Kind("a number > 0", lambda v: SCORE.test(v) and v > 0)  # a perplexity: may overflow to Infinity, never NaN
_REPORT_FIELDS: dict[str, Kind] = {"tokens": COUNT, "corpus": TEXT}
_REPORT_OPTIONAL: dict[str, Kind] = {"general.tokens": WHOLE, "general.corpus": TEXT, "recurring.tokens": WHOLE,
                                     "sweep": OBJECT}
_ROW_FIELDS: dict[str, Kind] = {"system": TEXT, "ppl": PPL, "tokens_per_s": POSITIVE}
_ROW_OPTIONAL: dict[str, Kind] = {
    "model": TEXT, "lambda": UNIT, "nll": SCORE, "general_ppl": PPL, "recurring_ppl": PPL, "valid_ppl": PPL,
    "alone_ppl": PPL, "trainable_parameters": WHOLE, "train_seconds": NON_NEGATIVE, "datastore_seconds": NON_NEGATIVE,
    "inference_ratio": POSITIVE, "knn_temperature": POSITIVE, "k": COUNT, "tokens": WHOLE,
}  # absent or null where a row has none


def check_eval_json(report: dict, where, systems: tuple[str, ...] = ("base",)) -> dict:
    """``report``, an eval JSON object read from ``where`` (``memdec eval --json``, ``RUN/eval.json``, the
    rows of ``RUN/report.json``), if every field its readers use has its type and a row of each of
    ``systems`` is there; one MemdecError line naming the file and the field otherwise."""
    check_fields(report, where, _REPORT_FIELDS)
    check_fields(report, where, _REPORT_OPTIONAL, optional=True)
    check_items(report, "results", where, _ROW_FIELDS, _ROW_OPTIONAL)
    missing = [s for s in systems if not any(r["system"] == s for r in report["results"])]
    if missing:
        raise MemdecError(f'{where}: no "{missing[0]}" row in field "results"')
    return report


def read_eval_json(file: str | os.PathLike, systems: tuple[str, ...] = ("base",)) -> dict:
    """An eval JSON file (``RUN/eval.json``), checked as ``check_eval_json`` says."""
    return check_eval_json(read_json_object(file, "eval report"), file, systems)


def _fmt(value, spec: str, missing: str = "-") -> str:
    return missing if value is None else format(value, spec)


def format_table(rows: list[ResultRow], n_tokens: int, corpus: str, general: str | None = None) -> str:
    """The rows as a terminal table; the general and recurring columns when any row has them."""
    with_general = any("general_ppl" in r.extra for r in rows)
    with_recurring = any("recurring_ppl" in r.extra for r in rows)

    def extra(key: str, spec: str) -> Callable[[ResultRow], str]:
        return lambda r: _fmt(r.extra.get(key), spec)

    columns = [Column("system", lambda r: r.system, "<"), Column("lambda", lambda r: _fmt(r.lmbda, ".2f")),
               Column("nll", lambda r: f"{r.nll:.4f}"), Column("ppl", lambda r: f"{r.ppl:.3f}")]
    columns += [Column("general ppl", extra("general_ppl", ".3f"))] if with_general else []
    columns += [Column("recurring", extra("recurring_ppl", ".3f"))] if with_recurring else []
    columns += [Column("tok/s", lambda r: f"{r.tokens_per_s:.1f}"), Column("x base", extra("inference_ratio", ".2f")),
                Column("trainable", extra("trainable_parameters", ",")),
                Column("train s", extra("train_seconds", ".1f")),
                Column("model", lambda r: r.model, "<")]
    title = f"{n_tokens} tokens of {corpus}" + (f"; general: {general}" if general and with_general else "")
    return "\n".join([title, *render_columns(rows, columns, "text")])
