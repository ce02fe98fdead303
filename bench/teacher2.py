"""The kNN teacher, round two (issue 17): two phases, keys from an adapted model, long training.

For each ``--domain`` (``austen``: train on four novels, choose on Northanger Abbey, test on
Persuasion and on the held-out ends of the training novels; ``stdlib``: the Python standard
library split by module), one process trains and scores these rows, with the library's own
stages (``memdec.datastore``, ``memdec.train``, ``memdec.scoring``, ``memdec.evaluate``):

==================  ==========================================================  =================
row                 recipe                                                      keys from / budget
==================  ==========================================================  =================
ce                  CE only (α=0), best checkpoint on valid                     - / B
two-phase           CE for B/2, then α=0.5 for B/2 from its best checkpoint     base / B
two-phase-rekeyed   the same, phase two on keys re-extracted by the phase-one   the CE decoder /
                    decoder (``memdec datastore --key-model``)                  B + one keys pass
knn-lm-base         kNN-LM, real retrieval, T and λ chosen on valid             base / keys pass
knn-lm-adapted      kNN-LM on the re-keyed datastore (queries: the CE decoder)  CE decoder
a0.5, a0.25         the equal-budget mixtures of round one                      base / B
ce-3x               CE only, 3B steps, early stopping (``--patience``)          - / <= 3B
two-phase-rekeyed-  CE 1.5B, re-key, α=0.5 for 1.5B, both with early stopping   CE decoder /
3x                                                                              <= 3B + keys pass
==================  ==========================================================  =================

Round three (issue 28) varies the α rows (``ce``, ``a0.25``, ``a0.5``) two more ways:

- ``--decoder SPEC`` (repeatable; ``copy``, ``fork:K``, ``lora:R@K``: docs/decoders.md): each α row once
  per shape, the decoder built from the base by ``memdec.train`` (``TrainConfig.decoder``). A row of a
  shape other than ``copy`` is named ``ROW@SPEC`` (``a0.5@fork:8``).
- ``--key-model base dapt``: ``dapt`` first trains a DAPT baseline on the domain's training tokens
  (``memdec.baselines.train_baseline``, method ``dapt``, ``--dapt-steps``; its own row ``dapt-teacher``,
  the teacher alone), then builds the datastore's keys with it (``DatastoreConfig.key_model``) and trains
  the α > 0 rows on that datastore (``a0.5+dapt``, ``a0.5@fork:8+dapt``). ``ce`` is not repeated there:
  at α = 0 the kNN targets, hence the keys, play no part.

Every decoder row reports the joint model's valid and test perplexity at the λ chosen on valid
(``LAMBDA_GRID``; the base's per-token NLLs are scored once per domain), the decoder alone, the
steps run and the wall time of its training (both phases, and the keys pass where there is one).
Rows run in priority order: every domain's budget-B rows first, then the 3B rows, so a run cut
short (``--budget-s``, or killed) still holds the decisive comparisons. Each finished row is one
JSON line appended to ``--out-jsonl`` at once; the markdown table (``--out-md``) is rewritten after
every row. A second run with the same settings resumes: the rows already in ``--out-jsonl`` under a
set-up record of equal settings are kept, not run again, and the table holds them all (the rows of
other settings in the same file are ignored).

    python bench/teacher2.py --domain austen stdlib --out-jsonl runs/t2/rows.jsonl --work runs/t2
    python bench/teacher2.py --domain austen stdlib --rows ce a0.25 a0.5 --decoder copy --decoder fork:8 \
        --decoder lora:16@8 --key-model base dapt --work runs/t3 --budget-s 400       # round three
    python bench/teacher2.py --smoke --domain austen --rows ce a0.5 --decoder copy --decoder fork:1 \
        --key-model base dapt --work /tmp/t3                                          # the CPU check
"""

from __future__ import annotations

import argparse
import gc
import json
import math
import platform
import shutil
import sys
import time
import traceback
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import torch

from memdec.baselines import BaselineConfig, train_baseline
from memdec.checkpoint import load_model_folder, read_memdec_json
from memdec.data import load_token_stream
from memdec.datastore import DatastoreConfig, build_datastore
from memdec.decoders import load_decoder, parse_shape
from memdec.errors import MemdecError
from memdec.store import DEFAULT_K, read_manifest
from memdec.evaluate import EvalConfig, run_eval_report
from memdec.files import append_jsonl, atomic_write_text, read_jsonl
from memdec.models import bos_prefix, load_model, resolve_device
from memdec.scoring import LAMBDA_GRID, base_scorer, lambda_curve, mean_ppl, mix_nll, score_tokens
from memdec.train import TrainConfig, train

DOMAINS = {
    "austen": {"train": "austen:train", "valid": "austen:valid", "tests": ["austen:test", "austen:within"]},
    "stdlib": {"train": "stdlib:train", "valid": "stdlib:valid", "tests": ["stdlib:test"]},
}
ROWS_B = ["ce", "two-phase", "two-phase-rekeyed", "knn-lm-base", "knn-lm-adapted", "a0.5", "a0.25"]
ROWS_3B = ["ce-3x", "two-phase-rekeyed-3x"]
RECIPES = {  # row -> (recipe, keys from, budget), the table's first columns
    "ce": ("CE only (best checkpoint)", "-", "B"),
    "a0.25": ("α=0.25 mixture", "base", "B"),
    "a0.5": ("α=0.5 mixture", "base", "B"),
    "two-phase": ("CE B/2, then α=0.5 B/2", "base", "B"),
    "two-phase-rekeyed": ("CE B/2, then α=0.5 B/2", "the CE decoder (re-keyed)", "B + keys pass"),
    "two-phase-rekeyed-3x": (
        "CE 1.5B, then α=0.5 1.5B, early stopping",
        "the CE decoder (re-keyed)",
        "≤3B + keys pass",
    ),
    "ce-3x": ("CE only, 3B, early stopping", "-", "≤3B"),
    "knn-lm-base": ("kNN-LM", "base", "keys pass"),
    "knn-lm-adapted": ("kNN-LM", "the CE decoder (re-keyed)", "B/2 + keys pass"),
    "dapt-teacher": ("DAPT alone (the teacher of +dapt rows)", "-", "dapt steps"),
}
ALPHAS = {"ce": 0.0, "a0.25": 0.25, "a0.5": 0.5}  # the rows that --decoder and --key-model vary
KEY_MODELS = ("base", "dapt")
# The arguments a row's numbers depend on: rows are reused across runs only where all of them agree.
SETTINGS = ("model", "train_tokens", "steps", "batch_size", "block_size", "lr", "evals", "patience", "k", "index",
            "ds_block", "eval_block", "eval_batch", "valid_tokens", "test_tokens", "device", "dapt_steps")


def row_name(row: str, spec: str = "copy", keys: str = "base") -> str:
    """``a0.5`` with decoder ``fork:8`` and DAPT keys -> ``a0.5@fork:8+dapt``; copy and base keys add nothing."""
    return row + ("" if spec == "copy" else f"@{spec}") + ("" if keys == "base" else f"+{keys}")


def parse_row(name: str) -> tuple[str, str, str]:
    """(row, decoder spec, key model) of a row name (``row_name``'s inverse)."""
    name, _, keys = name.partition("+")
    row, _, spec = name.partition("@")
    return row, spec or "copy", keys or "base"


def plan_rows(args: argparse.Namespace) -> list[tuple[str, str]]:
    """(domain, row name) in priority order: the budget-B tier, then 3B; within a tier, each (key model,
    decoder) group on every domain before the next group, so a cut run holds whole comparisons. A shape or
    a key model varies only the α rows; ``ce`` is the same whatever the keys (α = 0 never reads them), and
    ``dapt-teacher`` comes first where a ``+dapt`` row needs it."""
    plan = []
    for tier in (ROWS_B, ROWS_3B):
        for keys in args.key_model:
            for spec in args.decoder:
                for name in args.domain:
                    if (
                        tier is ROWS_B
                        and keys == "dapt"
                        and spec == args.decoder[0]
                        and {"a0.25", "a0.5"} & set(args.rows)
                    ):
                        plan.append((name, "dapt-teacher"))
                    for row in tier:
                        varied = spec != "copy" or keys != "base"
                        if row not in args.rows or (varied and row not in ALPHAS) or (keys != "base" and row == "ce"):
                            continue
                        plan.append((name, row_name(row, spec, keys)))
    return list(dict.fromkeys(plan))


def say(log: Path, msg: str) -> None:
    line = f"[{time.strftime('%H:%M:%S')}] {msg}"
    print(line, flush=True)
    with open(log, "a") as f:
        f.write(line + "\n")


@dataclass
class Domain:
    """One domain's shared state: the base model's scores, the datastores, the phase-one decoders."""

    name: str
    args: argparse.Namespace
    work: Path
    base: object = None
    prefix: int | None = None
    streams: dict = field(default_factory=dict)  # "valid" / test corpus -> int32 tokens
    base_nll: dict = field(default_factory=dict)  # the same keys -> float32 [N-1]
    stores: dict = field(default_factory=dict)  # "base" or a key model's path -> (datastore, seconds)
    phase_one: dict = field(default_factory=dict)  # (steps, patience) -> (checkpoint, train seconds, info)
    teacher: tuple | None = None  # the DAPT teacher: (folder, train seconds, steps run)

    @property
    def spec(self) -> dict:
        return DOMAINS[self.name]

    def setup(self, log: Path) -> dict:
        """Load the base once, tokenize valid and tests, score the base on them; build the base store."""
        a = self.args
        self.base, tokenizer = load_model(a.model, device=a.device)
        self.prefix = bos_prefix(tokenizer)
        corpora = {"valid": (self.spec["valid"], a.valid_tokens), **{t: (t, a.test_tokens) for t in self.spec["tests"]}}
        for key, (corpus, n) in corpora.items():
            self.streams[key] = load_token_stream(corpus, tokenizer, n)
            self.base_nll[key] = self.score(base_scorer(self.base), key)
        store, seconds = self.store(None)
        m = read_manifest(store)
        setup = {"domain": self.name, "row": "setup", "model": a.model, "train_corpus": self.spec["train"],
                 "n_keys": m.n_keys, "datastore_seconds": round(seconds, 1),
                 "keys_tokens_per_s": m.steps.keys.tokens_per_s, "index": m.steps.index.type,
                 "mean_support": m.steps.targets.mean_support, "corpus_source": m.corpus_source,
                 "base_valid_ppl": round(mean_ppl(self.base_nll["valid"]), 3),
                 "base_test_ppl": {t: round(mean_ppl(self.base_nll[t]), 3) for t in self.spec["tests"]},
                 "tokens": {k: len(v) for k, v in self.streams.items()}}
        say(log, f"{self.name}: {json.dumps(setup)}")
        return setup

    def score(self, scorer, key: str) -> np.ndarray:
        a = self.args
        nll, _ = score_tokens(scorer, self.streams[key], a.eval_block, a.eval_block // 2, a.eval_batch, a.device,
                              progress=False, prefix=self.prefix)
        return nll

    def store(self, key_model: str | None) -> tuple[Path, float]:
        """The datastore of the training split, keys from the base (None) or from ``key_model``, and the
        seconds its keys, index and targets took (from its manifest, so a store built by an earlier run
        counts what it cost then)."""
        name = "base" if key_model is None else key_model
        if name not in self.stores:
            a = self.args
            path = self.work / "stores" / (name if key_model is None else f"keys-{Path(key_model).name}")
            # a rerun's key model is a new folder (a retrained DAPT): the keys step says so and rebuilds
            build_datastore(
                DatastoreConfig(
                    model=a.model,
                    corpus=self.spec["train"],
                    out=str(path),
                    key_model=key_model,
                    k=a.k,
                    index=a.index,
                    block_size=a.ds_block,
                    stride=a.ds_block // 2,
                    max_tokens=a.train_tokens,
                    device=a.device,
                    progress=False,
                )
            )
            steps = read_manifest(path).steps  # the time that built it, in this run or in the one it resumes
            self.stores[name] = (path, sum(getattr(steps, s).seconds or 0.0 for s in ("keys", "index", "targets")))
        return self.stores[name]

    def train(self, name: str, store: Path, alpha: float, steps: int, init: str | None = None,
              patience: int | None = None, decoder: str = "copy") -> tuple[Path, float, dict]:
        """One ``memdec.train`` run of a decoder of shape ``decoder``: (checkpoint, wall seconds, its memdec.json)."""
        a = self.args
        ckpt = self.work / "ckpt" / name.replace(":", "-").replace("@", "-at-")
        shutil.rmtree(ckpt, ignore_errors=True)
        cfg = TrainConfig(datastore=str(store), out=str(ckpt), init=init, alpha=alpha, max_steps=steps, lr=a.lr,
                          warmup=max(1, steps // 20), batch_size=a.batch_size, block_size=a.block_size,
                          valid=self.spec["valid"], valid_max_tokens=a.valid_tokens,
                          eval_every=max(1, steps // a.evals), patience=patience, save_every=10**9, log_every=10,
                          device=a.device, resume=False, decoder=decoder)
        t0 = time.perf_counter()
        train(cfg)
        seconds = time.perf_counter() - t0
        shutil.rmtree(ckpt / "trainer_state", ignore_errors=True)  # 1.5 GB; the best checkpoint is CKPT/ itself
        return ckpt, seconds, read_memdec_json(ckpt)

    def phase_one_ckpt(self, steps: int, patience: int | None) -> tuple[Path, float, dict]:
        """The CE-only decoder of ``steps`` steps that starts the two-phase rows (trained once)."""
        if (steps, patience) not in self.phase_one:
            name = f"phase1-{steps}" + (f"-p{patience}" if patience else "")
            self.phase_one[steps, patience] = self.train(name, self.store(None)[0], 0.0, steps, patience=patience)
        return self.phase_one[steps, patience]

    def dapt_teacher(self) -> tuple[Path, float, int]:
        """The DAPT baseline trained on this domain's training tokens (the base datastore's), ``--dapt-steps``
        steps, best checkpoint on valid: (folder, train seconds, steps). Trained once: a resumed run takes the
        finished teacher of the run before (``dapt-teacher.json`` beside it records its steps and seconds)."""
        a = self.args
        out, done = self.work / "dapt-teacher", self.work / "dapt-teacher.json"
        if self.teacher is None and done.exists() and (out / "baseline.json").exists():
            info = json.loads(done.read_text())
            if info.get("steps") == a.dapt_steps:
                self.teacher = (out, info["train_s"], info["steps"])
        if self.teacher is None:
            done.unlink(missing_ok=True)
            shutil.rmtree(out, ignore_errors=True)
            cfg = BaselineConfig(
                method="dapt",
                datastore=str(self.store(None)[0]),
                out=str(out),
                max_steps=a.dapt_steps,
                lr=a.lr,
                warmup=max(1, a.dapt_steps // 20),
                batch_size=a.batch_size,
                block_size=a.block_size,
                valid=self.spec["valid"],
                valid_max_tokens=a.valid_tokens,
                eval_every=max(1, a.dapt_steps // a.evals),
                save_every=10**9,
                log_every=10,
                device=a.device,
                resume=False,
            )
            t0 = time.perf_counter()
            train_baseline(cfg)
            self.teacher = (out, time.perf_counter() - t0, a.dapt_steps)
            atomic_write_text(done, json.dumps({"steps": a.dapt_steps, "train_s": self.teacher[1]}))
        return self.teacher

    def evaluate_alone(self, folder: Path) -> dict:
        """A model folder scored on its own (the DAPT teacher): valid and test ppl."""
        model = load_model_folder(folder, "the dapt teacher", self.base.dtype).to(self.base.device).eval()
        nll = {key: self.score(base_scorer(model), key) for key in self.streams}
        del model
        return {"valid_alone_ppl": round(mean_ppl(nll["valid"]), 3),
                "test_alone_ppl": {t: round(mean_ppl(nll[t]), 3) for t in self.spec["tests"]}}

    def evaluate(self, ckpt: Path) -> dict:
        """The joint model at the λ chosen on valid: valid and test ppl, and the decoder alone (any shape:
        ``memdec.decoders.load_decoder`` rebuilds a fork or LoRA decoder on this base)."""
        dec = load_decoder(ckpt, read_memdec_json(ckpt), self.base).eval()
        nll = {key: self.score(base_scorer(dec), key) for key in self.streams}
        del dec
        curve = lambda_curve(self.base_nll["valid"], nll["valid"])
        lam = LAMBDA_GRID[int(np.argmin(curve))]
        return {
            "lambda": lam,
            "valid_ppl": round(float(curve.min()), 3),
            "valid_alone_ppl": round(mean_ppl(nll["valid"]), 3),
            "test_ppl": {t: round(mean_ppl(mix_nll(self.base_nll[t], nll[t], lam)), 3) for t in self.spec["tests"]},
            "test_alone_ppl": {t: round(mean_ppl(nll[t]), 3) for t in self.spec["tests"]},
        }

    def knn_lm(self, store: Path) -> dict:
        """kNN-LM through ``memdec eval --knn --sweep`` (T and λ on valid), per test corpus."""
        a, out = self.args, {"test_ppl": {}}
        for t in self.spec["tests"]:  # each call sweeps the same valid tokens, so T and λ agree across tests
            report = run_eval_report(
                EvalConfig(
                    model=a.model,
                    corpus=t,
                    max_tokens=a.test_tokens,
                    block_size=a.eval_block,
                    knn=str(store),
                    sweep=True,
                    valid=self.spec["valid"],
                    valid_max_tokens=a.valid_tokens,
                    batch_size=a.eval_batch,
                    device=a.device,
                )
            )
            row = report.rows[1]
            out["test_ppl"][t] = round(row.ppl, 3)
            out.update({"lambda": row.lmbda, "valid_ppl": row.extra.get("valid_ppl"),
                        "knn_temperature": row.extra.get("knn_temperature")})
        return out


def run_row(d: Domain, row: str) -> dict:
    """Train (where the row trains) and score one row; returns its record."""
    a, B = d.args, d.args.steps
    record = {"domain": d.name, "row": row}
    row, spec, keys = parse_row(row)
    if row == "dapt-teacher":
        folder, seconds, steps = d.dapt_teacher()
        return {**record, **d.evaluate_alone(folder), "steps": steps, "train_s": round(seconds, 1)}
    if row in ALPHAS:
        store, keys_s = d.store(None)[0], 0.0
        if keys == "dapt":
            teacher, teacher_s, teacher_steps = d.dapt_teacher()
            store, keys_s = d.store(str(teacher))
            record.update(
                teacher_steps=teacher_steps, teacher_train_s=round(teacher_s, 1), rekey_datastore_s=round(keys_s, 1)
            )
        ckpt, seconds, info = d.train(record["row"], store, ALPHAS[row], B, decoder=spec)
        record.update(
            decoder=spec, keys=keys, steps=B, train_s=round(seconds, 1), best_step=info["train_stats"]["step"]
        )
    elif row == "ce-3x":
        ckpt, seconds, info = d.train(row, d.store(None)[0], 0.0, 3 * B, patience=a.patience)
        record.update(
            steps=info.get("stopped_early_at") or 3 * B,
            train_s=round(seconds, 1),
            best_step=info["train_stats"]["step"],
        )
    elif row.startswith("two-phase"):
        long = row.endswith("-3x")
        total = 3 * B if long else B
        half, patience = total // 2, a.patience if long else None
        p1, p1_s, p1_info = d.phase_one_ckpt(half, patience)
        store, keys_s = d.store(str(p1)) if "rekeyed" in row else (d.store(None)[0], 0.0)
        ckpt, seconds, info = d.train(row, store, 0.5, total - half, init=str(p1), patience=patience)
        p1_steps = p1_info.get("stopped_early_at") or half
        p2_steps = info.get("stopped_early_at") or total - half
        record.update(steps=p1_steps + p2_steps, phase_steps=[p1_steps, p2_steps], train_s=round(p1_s + seconds, 1),
                      phase_one_best_step=p1_info["train_stats"]["step"], best_step=info["train_stats"]["step"],
                      **({"rekey_datastore_s": round(keys_s, 1)} if "rekeyed" in row else {}))
    elif row == "knn-lm-base":
        store, seconds = d.store(None)
        record.update(d.knn_lm(store), datastore_s=round(seconds, 1))
        return record
    elif row == "knn-lm-adapted":
        p1, p1_s, _ = d.phase_one_ckpt(B // 2, None)
        store, seconds = d.store(str(p1))
        record.update(d.knn_lm(store), datastore_s=round(seconds, 1), train_s=round(p1_s, 1))
        return record
    else:
        raise ValueError(f"unknown row {row}")
    record.update(d.evaluate(ckpt), loop_s=info.get("train_seconds"))
    if not a.keep:
        shutil.rmtree(ckpt, ignore_errors=True)  # 0.5 GB each; the numbers are what we keep
    return record


def run_settings(args: argparse.Namespace) -> dict:
    """The arguments of ``SETTINGS``, as JSON values (``--smoke``'s model path by its name)."""
    values = {k: getattr(args, k) for k in SETTINGS}
    values["model"] = Path(values["model"]).name if args.smoke else values["model"]
    return values


def prior_records(path: Path, settings: dict) -> list[dict]:
    """The records of ``path`` (a previous run's ``--out-jsonl``) measured with ``settings``: each
    record belongs to the set-up record of its domain before it in the file; a row measured twice
    keeps its last record."""
    if not path.exists():
        return []
    current: dict[str, bool] = {}  # domain -> whether its latest set-up had these settings
    kept: dict[tuple[str, str], dict] = {}
    for r in read_jsonl(path):
        domain, row = r.get("domain"), r.get("row")
        if row == "setup":
            current[domain] = r.get("settings") == settings
        if current.get(domain) and (domain, row) != (None, None):
            kept.pop((domain, row), None)
            kept[domain, row] = r
    return list(kept.values())


def table(records: list[dict]) -> str:
    """The issue's table: one block per domain."""
    lines = []
    for domain in dict.fromkeys(r["domain"] for r in records):
        order = {row: i for i, row in enumerate(["dapt-teacher", *ROWS_B, *ROWS_3B])}

        def rank(r: dict) -> tuple:
            row, spec, keys = parse_row(r["row"])
            return KEY_MODELS.index(keys), spec != "copy", spec, order[row]

        rows = sorted((r for r in records if r["domain"] == domain and r["row"] != "setup"), key=rank)
        setup = next((r for r in reversed(records) if r["domain"] == domain and r["row"] == "setup"), {})
        tests = DOMAINS[domain]["tests"]
        lines += [
            f"### {domain}: {setup.get('n_keys', '?')} keys of {DOMAINS[domain]['train']}; base valid "
            f"{setup.get('base_valid_ppl', '?')}, test "
            + ", ".join(f"{t} {v}" for t, v in setup.get("base_test_ppl", {}).items()),
            "",
            "| recipe | keys from | total budget | steps (best) | valid ppl | "
            + " | ".join(f"{t} ppl" for t in tests)
            + " | λ | alone valid | train (+ keys) s |",
            "|" + " --- |" * (8 + len(tests)),
        ]
        if setup:
            lines.append(
                "| "
                + " | ".join(
                    [
                        "base",
                        "-",
                        "0",
                        "-",
                        f"{setup['base_valid_ppl']:.2f}",
                        *(f"{setup['base_test_ppl'][t]:.2f}" for t in tests),
                        "-",
                        "-",
                        "-",
                    ]
                )
                + " |"
            )
        for r in rows:
            row, spec, key_model = parse_row(r["row"])
            recipe, keys, budget = RECIPES[row]
            recipe += "" if spec == "copy" else f", decoder {spec}"
            if key_model == "dapt":
                keys, budget = "the DAPT teacher", f"{budget} + teacher {r.get('teacher_steps')} steps + keys pass"
            steps = f"{r['steps']} ({r.get('best_step', '-')})" if "steps" in r else "-"
            if "phase_steps" in r:
                first, second = r["phase_steps"]
                steps = f"{first}+{second} ({r.get('phase_one_best_step')}, {r.get('best_step')})"
            secs = (
                r.get("train_s", 0)
                + r.get("rekey_datastore_s", 0)
                + r.get("datastore_s", 0)  # kNN-LM: its datastore
                + r.get("teacher_train_s", 0)
            )
            ppl = r.get("test_ppl") or r.get("test_alone_ppl", {})  # the teacher: alone
            tests_cells = [f"{ppl.get(t, float('nan')):.2f}" for t in tests]
            valid = f"{r['valid_ppl']:.2f}" if r.get("valid_ppl") is not None else "-"
            if row == "dapt-teacher":
                valid = f"{r['valid_alone_ppl']:.2f} (alone)"
            alone = f"{r['valid_alone_ppl']:.2f}" if r.get("valid_alone_ppl") is not None else "-"
            lines.append(
                "| "
                + " | ".join(
                    [
                        recipe,
                        keys,
                        budget,
                        steps,
                        valid,
                        *tests_cells,
                        f"{r.get('lambda', '-')}",
                        alone,
                        f"{secs:.1f}" if secs else "-",
                    ]
                )
                + " |"
            )
        lines.append("")
    return "\n".join(lines)


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--domain", nargs="+", choices=sorted(DOMAINS), default=["austen"])
    p.add_argument("--model", default="smollm2-135m")
    p.add_argument("--train-tokens", type=int, default=200_000, help="datastore / training tokens per domain")
    p.add_argument("--steps", type=int, default=40, help="B: the CE-only decoder's optimizer steps")
    p.add_argument("--batch-size", type=int, default=8)
    p.add_argument("--block-size", type=int, default=1024, help="training window")
    p.add_argument("--lr", type=float, default=1e-4)
    p.add_argument("--evals", type=int, default=4, help="validations per run (eval_every = steps // evals)")
    p.add_argument("--patience", type=int, default=2, help="early stopping of the 3B rows, in validations")
    p.add_argument("--k", type=int, default=DEFAULT_K)
    p.add_argument("--index", default="auto", help="auto, flat, ivfpq or torch (exact, CUDA, no faiss needed)")
    p.add_argument("--ds-block", type=int, default=1024, help="datastore window (stride: half)")
    p.add_argument("--eval-block", type=int, default=1024, help="scoring window (stride: half)")
    p.add_argument("--eval-batch", type=int, default=8)
    p.add_argument("--valid-tokens", type=int, default=16_384)
    p.add_argument("--test-tokens", type=int, default=16_384)
    p.add_argument("--rows", nargs="+", default=ROWS_B + ROWS_3B, help="which rows, kept in priority order")
    p.add_argument("--decoder", action="append", metavar="SPEC",
                   help="a decoder shape for the α rows (copy, fork:K, lora:R@K), repeatable: rows per shape "
                        "(default: copy)")
    p.add_argument("--key-model", nargs="+", choices=KEY_MODELS, default=["base"],
                   help="keys of the α rows' datastore: base, and/or dapt (a DAPT baseline trained on the "
                        "domain's training tokens first, --dapt-steps)")
    p.add_argument(
        "--dapt-steps", type=int, help="the DAPT teacher's optimizer steps (default: 3B, three times --steps)"
    )
    p.add_argument("--device", default="auto")
    p.add_argument("--budget-s", type=float, default=math.inf, help="start no row after this many seconds")
    p.add_argument("--work", required=True, help="datastores and checkpoints")
    p.add_argument(
        "--out-jsonl", help="one JSON line per finished row (default: WORK/rows.jsonl; the log beside it, .log)"
    )
    p.add_argument("--out-md", help="the table (default: next to --out-jsonl, .md)")
    p.add_argument("--keep", action="store_true", help="keep every checkpoint (0.5 GB each)")
    p.add_argument("--smoke", action="store_true", help="a tiny random model (memdec.testing) at a tiny scale: "
                                                       "the same code path in a minute on a CPU")
    args = p.parse_args(argv)
    if args.smoke:
        from memdec.testing import save_tiny_model, tiny_tokenizer

        args.model = str(save_tiny_model(Path(args.work) / "tiny-model", "llama", tiny_tokenizer(), seed=0))
        args.train_tokens, args.steps, args.batch_size, args.block_size, args.k = 1200, 4, 2, 32, 16
        args.ds_block = args.eval_block = 64
        args.valid_tokens = args.test_tokens = 300
        args.evals, args.patience, args.eval_batch = 2, 1, 2
    args.decoder = list(dict.fromkeys(args.decoder or ["copy"]))
    for spec in args.decoder:  # before any model loads
        try:
            parse_shape(spec)
        except MemdecError as exc:
            p.error(f"--decoder {spec}: {exc}")
    args.dapt_steps = args.dapt_steps or 3 * args.steps
    if args.dapt_steps < 1:
        p.error("--dapt-steps must be at least 1")
    args.device = resolve_device(args.device)
    unknown = [r for r in args.rows if r not in RECIPES or r == "dapt-teacher"]
    if unknown:
        p.error(f"unknown rows {unknown}; choose from {list(RECIPES)}")
    if args.steps < 2:
        p.error("--steps must be at least 2 (two phases of B/2)")
    args.out_jsonl = Path(args.out_jsonl or Path(args.work) / "rows.jsonl")
    args.out_md = Path(args.out_md or args.out_jsonl.with_suffix(".md"))
    return args


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    work = Path(args.work)
    work.mkdir(parents=True, exist_ok=True)
    args.out_jsonl.parent.mkdir(parents=True, exist_ok=True)
    log = args.out_jsonl.with_suffix(".log")
    gpu = f" ({torch.cuda.get_device_name()})" if args.device.startswith("cuda") else ""
    say(log, f"python {platform.python_version()}, torch {torch.__version__}, device {args.device}{gpu}; "
             f"{vars(args)}")
    t_start = time.perf_counter()
    domains = {name: Domain(name, args, work / name) for name in args.domain}
    records = [r for r in prior_records(args.out_jsonl, run_settings(args)) if r.get("domain") in args.domain]
    done = {(r["domain"], r["row"]) for r in records}
    if done - {(name, "setup") for name in args.domain}:
        say(log, f"resuming: {len(done)} records of {args.out_jsonl} have these settings; their rows are not run again")
    plan = [(name, row) for name, row in plan_rows(args) if (name, row) not in done]
    for name, row in plan:
        elapsed = time.perf_counter() - t_start
        if elapsed > args.budget_s:
            say(log, f"budget spent ({elapsed:.0f} s): skipping {name}/{row}")
            continue
        d = domains[name]
        try:
            if d.base is None:
                setup = d.setup(log)
                setup.update(python=platform.python_version(), settings=run_settings(args))
                records.append(setup)
                append_jsonl(args.out_jsonl, setup)
            t0 = time.perf_counter()
            record = run_row(d, row)
            record.update(
                row_wall_s=round(time.perf_counter() - t0, 1), elapsed_s=round(time.perf_counter() - t_start, 1)
            )
        except Exception as exc:  # one failed row must not lose the others
            say(log, f"{name}/{row} failed: {type(exc).__name__}: {exc}\n{traceback.format_exc()}")
            continue
        finally:
            gc.collect()  # the trainer's models and optimizer go with it, on the GPU too
            if torch.cuda.is_available():
                torch.cuda.empty_cache()
        records.append(record)
        append_jsonl(args.out_jsonl, record)
        atomic_write_text(args.out_md, table(records))
        say(log, f"{name}/{row}: {json.dumps(record)}")
    say(log, f"done in {time.perf_counter() - t_start:.0f} s")
    atomic_write_text(args.out_md, table(records))
    print(table(records))
    return 0


if __name__ == "__main__":
    sys.exit(main())
