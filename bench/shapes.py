"""Issue 26's table: what each decoder shape costs and gains, at the quick preset's budget.

For each domain (``austen``: austen:train/valid/test; ``stdlib``: stdlib:train/valid/test), each decoder
shape (``--shapes``: any spec of ``memdec.decoders``) and each teacher candidate (``--alphas``), one row:
the decoder trained with the quick preset's recipe (``memdec adapt --preset quick``'s settings, resolved
by ``memdec.adapt`` itself: the same tokens, windows, steps and lr for every row), then scored by
``memdec eval``'s functions, λ chosen on the preset's valid tokens, on the preset's test tokens and on
``general:test`` (the preset's test-token count), the same windows for every row.

    PYTHONPATH=src .venv/bin/python bench/shapes.py --domains austen --out runs/shapes --json runs/shapes/rows.jsonl

Layout under ``--out`` (a folder this script made: ``shapes-bench.json`` marks it and records the settings):
``DOMAIN/datastore`` (built once per domain, resumable) and ``DOMAIN/SHAPE-aALPHA`` (one checkpoint per row;
``train`` resumes an interrupted one and does nothing for a finished one). Each finished row is appended to
``--json`` (one JSON object a line); a rerun skips rows already there (same settings), so an interrupted
run continues where it stopped. ``--budget-s`` stops starting new rows after that many seconds.

Timing ratios (joint/base scoring and decoding) are not measured here: ``bench/inference.py --decoder``
does that, on a quiet machine.
"""

from __future__ import annotations

import argparse
import dataclasses
import hashlib
import json
import sys
import time
from dataclasses import dataclass
from pathlib import Path

import torch

from memdec.adapt import AdaptConfig, AdaptRun, check_config, resolve_settings, train_config
from memdec.checks import (
    check_non_negative,
    check_own_folder,
    check_positive,
    check_unit_interval,
    check_writable_path,
    mark_own_folder,
)
from memdec.checkpoint import read_memdec_json
from memdec.datastore import DatastoreConfig, build_datastore
from memdec.decoders import parse_shape
from memdec.errors import MemdecError
from memdec.evaluate import EvalConfig, Scored, build_rows, load_inputs, prepare_config, score_systems
from memdec.evaluate import _score_memdec as score_memdec  # the eval's scoring of one memory decoder
from memdec.files import append_jsonl, atomic_write_json, atomic_write_text, read_json_object, read_jsonl
from memdec.joint import MemoryDecoderModel
from memdec.models import DEFAULT_MODEL
from memdec.tables import render_table
from memdec.train import TrainConfig, check_decoder_shape, train

DOMAINS = {"austen": ("austen:train", "austen:valid", "austen:test"),
           "stdlib": ("stdlib:train", "stdlib:valid", "stdlib:test")}
GENERAL = "general:test"
SHAPES = ["copy", "fork:8", "fork:15", "lora:16", "lora:64", "lora:16@8"]
ALPHAS = [0.0, 0.25]
MARKER = "shapes-bench.json"  # marks --out as this script's, with the settings its rows were made with
TIMING_NOTE = ("joint/base scoring and decoding (batch 1) are not measured here: run bench/inference.py "
               "--decoder SPEC ... on a quiet machine (docs/decoders.md, Speed)")


@dataclass
class Row:
    """One (domain, shape, α) to train and score."""

    domain: str
    shape: str
    alpha: float
    lr: float
    lr_scale: float = 1.0

    @property
    def effective_lr(self) -> float:
        """The trainer's peak lr: ``lr`` (the preset's, times ``--lr-scale``) times the shape's own scale."""
        return self.lr * parse_shape(self.shape).lr_scale

    @property
    def folder(self) -> str:
        """The checkpoint's folder name under ``--out/DOMAIN``: ``fork-8-a0.25`` (``lora-16-a0-lrx10`` where
        the effective lr is 10x the preset's)."""
        scale = self.lr_scale * parse_shape(self.shape).lr_scale
        return f"{self.shape.replace(':', '-')}-a{self.alpha:g}" + ("" if scale == 1 else f"-lrx{scale:g}")

    @property
    def key(self) -> tuple[str, str, float, float]:
        return self.domain, self.shape, self.alpha, round(self.effective_lr, 12)


def record_key(r: dict) -> tuple[str, str, float, float]:
    """A rows-file record's ``Row.key``: a shape at another lr is another row."""
    return r["domain"], r["decoder"], r["alpha"], round(r["lr"], 12)


# --------------------------------------------------------------------------------------------
# Settings: all checked before any model loads or any file is written


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--domains", nargs="+", default=["austen"], help=f"of {', '.join(DOMAINS)} (default: austen)")
    p.add_argument("--shapes", nargs="+", default=SHAPES, help=f"decoder specs (default: {' '.join(SHAPES)})")
    p.add_argument("--alphas", nargs="+", type=float, default=ALPHAS, help="teacher candidates α (default: 0 0.25)")
    p.add_argument("--model", default=DEFAULT_MODEL, help=f"base model spec (default: {DEFAULT_MODEL})")
    p.add_argument(
        "--out", default="runs/shapes", help="work folder: datastores and checkpoints (default: runs/shapes)"
    )
    p.add_argument("--json", default=None, help="rows, one JSON object a line (default: OUT/rows.jsonl)")
    p.add_argument("--lr-scale", action="append", default=[], metavar="SHAPE=X",
                   help="multiply the preset's lr by X for this shape, on top of the shape's own scale (lora: 10x; "
                        "repeatable; default: 1)")
    p.add_argument(
        "--budget-s", type=float, default=None, help="start no new row after this many seconds (default: none)"
    )
    p.add_argument("--threads", type=int, default=None, help="torch CPU threads (default: torch's)")
    p.add_argument("--device", default="auto", help="auto, cpu or cuda (default: auto)")
    p.add_argument("--train-tokens", type=int, default=None, help="override the preset's training tokens")
    p.add_argument("--valid-tokens", type=int, default=None, help="override the preset's validation tokens")
    p.add_argument("--test-tokens", type=int, default=None, help="override the preset's test (and general) tokens")
    p.add_argument("--block-size", type=int, default=None, help="override the preset's windows (tiny models)")
    return p.parse_args(argv)


def lr_scales(pairs: list[str], shapes: list[str]) -> dict[str, float]:
    """``--lr-scale SHAPE=X`` as {shape: X}; each SHAPE one of ``--shapes``."""
    scales = {}
    for pair in pairs:
        shape, sep, value = pair.partition("=")
        try:
            x = float(value)
        except ValueError:
            x = None
        if not sep or x is None:
            raise MemdecError(f"--lr-scale {pair!r}: give SHAPE=X, as in fork:8=3")
        if shape not in shapes:
            raise MemdecError(f"--lr-scale {pair!r}: {shape} is not one of --shapes ({' '.join(shapes)})")
        scales[shape] = check_positive(x, f"--lr-scale {shape}")
    return scales


def adapt_config(args: argparse.Namespace, domain: str, shape: str = "copy") -> AdaptConfig:
    """The quick preset's ``memdec adapt`` settings of one domain, with the token overrides."""
    corpus, valid, test = DOMAINS[domain]
    return AdaptConfig(model=args.model, corpus=corpus, valid=valid, test=test, general=GENERAL, preset="quick",
                       device=args.device, train_tokens=args.train_tokens, valid_tokens=args.valid_tokens,
                       test_tokens=args.test_tokens, block_size=args.block_size, decoder=shape)


def check_args(args: argparse.Namespace) -> dict[str, float]:
    """Every argument checked (one line each) before any model loads or file is written; the lr scales."""
    for domain in args.domains:
        if domain not in DOMAINS:
            raise MemdecError(f"--domains: unknown domain {domain!r} (one of {', '.join(DOMAINS)})")
    for alpha in args.alphas:
        check_unit_interval(alpha, "--alphas")
    if len(set(args.shapes)) != len(args.shapes) or len(set(args.alphas)) != len(args.alphas):
        raise MemdecError("--shapes and --alphas must not repeat a value")
    if args.budget_s is not None:
        check_non_negative(args.budget_s, "--budget-s")
    if args.threads is not None and args.threads < 1:
        raise MemdecError(f"--threads must be at least 1, got {args.threads}")
    scales = lr_scales(args.lr_scale, args.shapes)
    for shape in args.shapes:
        try:
            check_decoder_shape(shape, args.model)
        except MemdecError as exc:
            raise MemdecError(f"--shapes: {str(exc).removeprefix('--decoder: ')}") from None
    for domain in args.domains:
        check_config(resolve_settings(adapt_config(args, domain)))
    check_writable_path(args.json, "--json")
    check_own_folder(args.out, "bench")
    return scales


def bench_settings(args: argparse.Namespace) -> dict:
    """What a row's numbers depend on besides its shape and α: rows of other settings are not mixed."""
    return {"model": args.model, "train_tokens": args.train_tokens, "valid_tokens": args.valid_tokens,
            "test_tokens": args.test_tokens, "block_size": args.block_size, "preset": "quick"}


def settings_hash(settings: dict) -> str:
    return hashlib.sha256(json.dumps(settings, sort_keys=True).encode()).hexdigest()[:16]


def drop_cut_line(path: Path) -> None:
    """Remove a last line that an interruption cut short (no newline) from the rows file, so that the
    next row appended starts a line of its own (``read_jsonl`` already skips such a line)."""
    if path.is_file() and (data := path.read_bytes()) and not data.endswith(b"\n"):
        atomic_write_text(path, data[: data.rfind(b"\n") + 1].decode("utf-8"))


def claim_out(out: Path, settings: dict) -> None:
    """Mark ``out`` as this script's (first), or refuse one made with other settings."""
    marker = out / MARKER
    if marker.is_file():
        old = read_json_object(marker, "shapes bench settings")
        if old != settings:
            changed = ", ".join(f"{k} {old.get(k)} -> {v}" for k, v in settings.items() if old.get(k) != v)
            raise MemdecError(f"--out {out} holds rows of other settings ({changed}); choose a new --out")
        return
    mark_own_folder(out, "bench")
    atomic_write_json(marker, settings)


# --------------------------------------------------------------------------------------------
# One domain: its datastore, its base scores, its rows


def build_domain_datastore(job: AdaptRun) -> None:
    """The quick preset's datastore of the domain in ``DOMAIN/datastore``, as ``memdec adapt``'s
    datastore stage builds it (build_datastore resumes an interrupted build, skips a finished one)."""
    s = job.s
    build_datastore(DatastoreConfig(model=s.model, corpus=s.corpus, out=str(job.datastore), k=s.k, knn_temp=s.knn_temp,
                                    block_size=s.ds_block_size, stride=s.ds_stride, max_tokens=s.train_tokens,
                                    device=job.device, text_field=s.text_field))


def eval_config(job: AdaptRun, ckpt: str) -> EvalConfig:
    """``memdec adapt``'s eval settings for one decoder: λ swept on valid, test and general tokens of the preset."""
    s = job.s
    return prepare_config(
        EvalConfig(
            model=s.model,
            corpus=s.test,
            max_tokens=s.test_tokens,
            block_size=s.eval_block_size,
            stride=s.eval_stride,
            device=job.device,
            memdec=ckpt,
            sweep=True,
            valid=s.valid,
            valid_max_tokens=s.valid_tokens,
            general=s.general,
            general_max_tokens=s.general_tokens,
        )
    )


def disk_bytes(folder: Path) -> int:
    """Bytes of the files of a checkpoint folder, ``trainer_state/`` left out."""
    return sum(f.stat().st_size for f in folder.rglob("*")
               if f.is_file() and "trainer_state" not in f.relative_to(folder).parts)


def train_row(job: AdaptRun, row: Row) -> tuple[Path, TrainConfig]:
    """Train (or resume, or find finished) one row's decoder with the preset's recipe."""
    ckpt = job.run / row.folder
    cfg = dataclasses.replace(train_config(job), decoder=row.shape, alpha=row.alpha, lr=row.lr, out=str(ckpt))
    train(cfg)
    return ckpt, cfg


def score_row(job: AdaptRun, inputs, base: Scored, ckpt: Path) -> dict:
    """The decoder scored as ``memdec eval --sweep`` scores it, against the base scored once per domain."""
    cfg = eval_config(job, str(ckpt))
    joint = MemoryDecoderModel.from_pretrained(inputs.model, str(ckpt), tokenizer=inputs.tokenizer)
    with_joint = dataclasses.replace(inputs, joint=joint)
    mix = score_memdec(cfg, with_joint, "memdec", str(ckpt), joint)
    report = build_rows(cfg, with_joint, Scored(base.base, base.seconds_base, [mix]))
    base_row, row = report.rows[0], report.rows[1]
    return {"lambda": row.lmbda, "test_ppl": round(row.ppl, 4), "general_ppl": row.extra.get("general_ppl"),
            "valid_ppl": row.extra.get("valid_ppl"), "alone_ppl": row.extra.get("alone_ppl"),
            "shares_trunk": joint.shares_trunk, "base_test_ppl": round(base_row.ppl, 4),
            "base_general_ppl": base_row.extra.get("general_ppl"), "base_valid_ppl": base_row.extra.get("valid_ppl"),
            "test_tokens": report.n_tokens}


def run_domain(args, domain: str, rows: list[Row], done: set, json_path: Path, settings: dict, deadline: float | None):
    """Every pending row of one domain; returns False once the time budget stopped it."""
    s = resolve_settings(adapt_config(args, domain))
    job = AdaptRun(Path(args.out) / domain, s, args.device, book=None, inputs={})
    pending = [r for r in rows if r.key not in done]
    if not pending:
        return True
    print(f"== {domain}: datastore of {s.corpus} ({s.train_tokens} tokens)", flush=True)
    build_domain_datastore(job)
    inputs = scored = None
    for row in pending:
        if deadline is not None and time.perf_counter() > deadline:
            print(f"--budget-s spent: {row.domain} {row.shape} a={row.alpha:g} and later rows not started", flush=True)
            return False
        print(f"== {domain}: {row.shape}, alpha {row.alpha:g}, lr {row.effective_lr:g}", flush=True)
        ckpt, _ = train_row(job, row)
        if inputs is None:  # the base and the token streams, loaded and scored once per domain
            cfg = dataclasses.replace(eval_config(job, str(ckpt)), memdec=None)
            inputs = load_inputs(cfg)
            scored = score_systems(cfg, inputs)
        t0 = time.perf_counter()
        result = score_row(job, inputs, scored, ckpt)
        info = read_memdec_json(ckpt)
        record = {"domain": domain, "decoder": row.shape, "alpha": row.alpha, "lr": row.effective_lr,
                  "trainable_parameters": info.get("trainable_parameters"), "disk_bytes": disk_bytes(ckpt),
                  "train_seconds": info.get("train_seconds"), "eval_seconds": round(time.perf_counter() - t0, 1),
                  **result, "checkpoint": str(ckpt), "settings": settings_hash(settings)}
        append_jsonl(json_path, record)
        print(json.dumps(record), flush=True)
    return True


# --------------------------------------------------------------------------------------------
# The table


def _mb(n) -> str:
    return "-" if n is None else f"{n / 1e6:.1f} MB"


def _params(n) -> str:
    if n is None:
        return "-"
    return f"{n / 1e6:.2f}M" if n >= 1e6 else f"{n:,}"


def _ppl(x, base) -> str:
    if x is None:
        return "-"
    return f"{x:.2f}" + (f" ({(x / base - 1) * 100:+.1f}%)" if base else "")


def format_table(records: list[dict]) -> str:
    """Issue 26's table: per domain the base, then each row in the order run; one Markdown table."""
    header = ["domain", "decoder", "α", "lr", "trainable params", "on disk", "λ", "test ppl", "general ppl", "train s"]
    cells = []
    for domain in dict.fromkeys(r["domain"] for r in records):
        mine = [r for r in records if r["domain"] == domain]
        base_test, base_general = mine[0]["base_test_ppl"], mine[0]["base_general_ppl"]
        cells.append([domain, "base", "-", "-", "0", "0", "-", _ppl(base_test, None), _ppl(base_general, None), "-"])
        cells += [
            [
                domain,
                r["decoder"],
                f"{r['alpha']:g}",
                f"{r['lr']:g}",
                _params(r["trainable_parameters"]),
                _mb(r["disk_bytes"]),
                f"{r['lambda']:.2f}",
                _ppl(r["test_ppl"], base_test),
                _ppl(r["general_ppl"], base_general),
                "-" if r["train_seconds"] is None else f"{r['train_seconds']:.1f}",
            ]
            for r in mine
        ]
    return "\n".join(render_table(header, cells) + ["", f"Note: {TIMING_NOTE}."])


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    args.json = args.json or str(Path(args.out) / "rows.jsonl")
    try:
        scales = check_args(args)
        settings = bench_settings(args)
        lr = resolve_settings(adapt_config(args, args.domains[0])).lr
        rows = [Row(d, shape, alpha, lr * scales.get(shape, 1.0), scales.get(shape, 1.0)) for d in args.domains
                for shape in args.shapes for alpha in args.alphas]
        json_path = Path(args.json)
        previous = read_jsonl(json_path) if json_path.is_file() else []
        drop_cut_line(json_path)
        mine = [r for r in previous if r.get("settings") == settings_hash(settings)]
        done = {record_key(r) for r in mine}
        claim_out(Path(args.out), settings)
        if args.threads:
            torch.set_num_threads(args.threads)
        deadline = None if args.budget_s is None else time.perf_counter() + args.budget_s
        for domain in args.domains:
            if not run_domain(
                args, domain, [r for r in rows if r.domain == domain], done, json_path, settings, deadline
            ):
                break
        wanted = {r.key for r in rows}
        records = [r for r in read_jsonl(json_path) if r.get("settings") == settings_hash(settings)
                   and record_key(r) in wanted] if json_path.is_file() else []
    except MemdecError as exc:
        print(f"shapes: error: {exc}", file=sys.stderr)
        return 2
    print(format_table(records) if records else f"no rows yet. {TIMING_NOTE}.")
    return 0


if __name__ == "__main__":
    sys.exit(main())
