"""Issue 33's table: memdec on a spread of domains, each decoder shape against DAPT, LoRA and kNN-LM.

    PYTHONPATH=src .venv/bin/python bench/spread_domains.py --out runs/domains --hpo ... --licences ...  # once
    PYTHONPATH=src .venv/bin/python bench/spread.py --domains austen stdlib pydocs hpo licences \
        --shapes copy lora:16 --table runs/spread/table.md

For each domain (``--data/NAME/domain.json``, written by ``bench/spread_domains.py``) and each decoder shape
(``--shapes``: any spec of ``memdec.decoders``), one ``memdec adapt --preset quick --decoder SHAPE`` run (with
``--baselines`` for the ``--baselines-on`` shape only, the first by default: DAPT and LoRA do not depend on the
decoder's shape, so the other shapes' rows show that run's) on the domain's train, valid and test splits,
``general:test`` as the general text, in ``OUT/DOMAIN/SHAPE``
(``lora:16`` -> ``lora-16``). A run whose ``report.json`` holds the settings this call would run with is finished
and skipped; any other is handed to ``memdec adapt``, which resumes it (its finished stages are kept). ``--budget-s``
starts no new run after that many seconds. A run that fails says so in one line; the others go on (exit status 1).

Then ONE table (Markdown, to stdout and ``--table``; its numbers as JSON in ``--json``), a row per domain and
shape, every number read from the run's ``report.json``: the base's test perplexity; memdec's (the ``memdec`` row,
at the λ chosen on valid) and its change against the base and against DAPT; DAPT's, the LoRA baseline's and
kNN-LM's; the ``memdec+router`` row where the router stage kept a router; the general-text perplexity of memdec
and of the base (forgetting); the chosen λ and teacher α; the decoder's bytes on disk (``disk_bytes.memdec``: the
chosen decoder's folder); and the shape's gap to the copy on the same domain (its memdec perplexity over the
``copy`` run's). A row with no finished run shows "—".

``OUT/.memdec-folder.json`` marks the folder; ``OUT/spread-bench.json`` records the sha256 of each domain's
splits: a domain rebuilt with other text is refused in that folder (its runs would mix texts), before anything
loads.
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path

from memdec.adapt import AdaptConfig, Settings, adapt, check_config, check_run_identity, resolve_settings
from memdec.checks import check_device, check_non_negative, check_own_folder, check_writable_path, mark_own_folder
from memdec.errors import MemdecError
from memdec.files import atomic_write_json, atomic_write_text, read_json_object
from memdec.models import DEFAULT_MODEL
from memdec.report import candidate_label
from memdec.tables import render_table
from memdec.train import check_decoder_shape

sys.path.insert(0, str(Path(__file__).resolve().parent))  # its sibling, which owns the domains' format
from spread_domains import OneLineParser, load_domain  # noqa: E402

GENERAL = "general:test"
SHAPES = ["copy", "lora:16"]
MARKER = "spread-bench.json"
MISSING = "—"
SYSTEMS = {"base": "base", "memdec": "memdec", "dapt": "dapt", "lora": "lora", "knn": "knn-lm",  # key: eval row
           "router": "memdec+router"}


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    p = OneLineParser(prog="spread", description=__doc__.split("\n\n")[0])
    p.add_argument("--domains", nargs="+", required=True, help="domain names under --data (bench/spread_domains.py)")
    p.add_argument("--shapes", nargs="+", default=SHAPES, help=f"decoder specs (default: {' '.join(SHAPES)})")
    p.add_argument("--baselines-on", default=None,
                   help="the shape whose run also trains the baselines (default: the first of --shapes)")
    p.add_argument("--data", default="runs/domains", help="the domains' folder (default: runs/domains)")
    p.add_argument("--out", default="runs/spread", help="the runs' folder (default: runs/spread)")
    p.add_argument("--table", default=None, help="also write the Markdown table here (default: OUT/table.md)")
    p.add_argument("--json", default=None, help="the table's numbers as JSON (default: OUT/table.json)")
    p.add_argument("--model", default=DEFAULT_MODEL, help=f"base model spec (default: {DEFAULT_MODEL})")
    p.add_argument("--device", default="auto", help="auto, cpu or cuda (default: auto)")
    p.add_argument("--budget-s", type=float, default=None, help="start no new run after this many seconds")
    p.add_argument("--threads", type=int, default=None, help="torch CPU threads (default: torch's)")
    p.add_argument("--train-tokens", type=int, default=None, help="override the preset's training tokens")
    p.add_argument("--valid-tokens", type=int, default=None, help="override the preset's validation tokens")
    p.add_argument("--test-tokens", type=int, default=None, help="override the preset's test (and general) tokens")
    p.add_argument("--block-size", type=int, default=None, help="override the preset's windows (tiny models)")
    p.add_argument("--router-tokens", type=int, default=None, help="override the preset's router tokens")
    return p.parse_args(argv)


# --------------------------------------------------------------------------------------------
# One run: its folder, its settings, whether it is finished


def run_folder(out: Path, domain: str, shape: str) -> Path:
    return out / domain / shape.replace(":", "-")


def adapt_config(args: argparse.Namespace, specs: dict, shape: str, run: Path) -> AdaptConfig:
    """The quick preset's ``memdec adapt --baselines`` of one domain and shape, with the token overrides."""
    return AdaptConfig(model=args.model, corpus=specs["train"], valid=specs["valid"], test=specs["test"],
                       general=GENERAL, out=str(run), preset="quick", device=args.device, decoder=shape,
                       baselines=shape == args.baselines_on,
                       train_tokens=args.train_tokens, valid_tokens=args.valid_tokens, test_tokens=args.test_tokens,
                       block_size=args.block_size, router_tokens=args.router_tokens)


def jsonable(s: Settings) -> dict:
    """The settings as ``report.json`` holds them."""
    return json.loads(json.dumps(s.flat(), default=str))


def finished(run: Path, s: Settings) -> dict | None:
    """The run's report where it was written with these settings (the run is finished), else None."""
    file = run / "report.json"
    if not file.is_file():
        return None
    report = read_json_object(file, "adapt report")
    return report if report.get("settings") == jsonable(s) else None


# --------------------------------------------------------------------------------------------
# Checks: every argument before any model loads or any file is written


def check_args(args: argparse.Namespace) -> dict[str, dict]:
    """Every argument checked, one line each; returns each domain's specs."""
    args.baselines_on = args.baselines_on or args.shapes[0]
    if args.baselines_on not in args.shapes:
        raise MemdecError(f"--baselines-on {args.baselines_on} is not one of --shapes ({' '.join(args.shapes)})")
    for flag, values in (("--domains", args.domains), ("--shapes", args.shapes)):
        if len(set(values)) != len(values):
            raise MemdecError(f"{flag} must not repeat a value")
    if args.budget_s is not None:
        check_non_negative(args.budget_s, "--budget-s")
    if args.threads is not None and args.threads < 1:
        raise MemdecError(f"--threads must be at least 1, got {args.threads}")
    check_device(args.device)
    for shape in args.shapes:
        try:
            check_decoder_shape(shape, args.model)
        except MemdecError as exc:
            raise MemdecError(f"--shapes: {str(exc).removeprefix('--decoder: ')}") from None
    domains = {name: load_domain(Path(args.data), name) for name in args.domains}
    out = Path(args.out)
    for name, specs in domains.items():
        for shape in args.shapes:
            run = run_folder(out, name, shape)
            s = resolve_settings(adapt_config(args, specs, shape, run))
            check_config(s)
            check_own_folder(run, "adapt-run")
            check_run_identity(s, run, overwrite=False)
    check_writable_path(args.table, "--table")
    check_writable_path(args.json, "--json")
    check_own_folder(out, "bench")
    check_fingerprints(out, domains)
    return domains


def check_fingerprints(out: Path, domains: dict[str, dict]) -> dict:
    """The marker's record with these domains added; refuses a domain whose splits changed since its runs."""
    marker = out / MARKER
    recorded = read_json_object(marker, "spread record").get("domains", {}) if marker.is_file() else {}
    for name, specs in domains.items():
        if recorded.get(name, specs["fingerprint"]) != specs["fingerprint"]:
            raise MemdecError(f"--out {out}: its {name} runs were made from other {name} text (splits "
                              f"{recorded[name]}, now {specs['fingerprint']}); choose a new --out, or delete "
                              f"{out / name}")
    return {**recorded, **{name: specs["fingerprint"] for name, specs in domains.items()}}


# --------------------------------------------------------------------------------------------
# The runs


def run_all(args: argparse.Namespace, domains: dict[str, dict]) -> list[str]:
    """Every run not finished, in order (within --budget-s); returns the failures, one line each."""
    out, failed = Path(args.out), []
    deadline = None if args.budget_s is None else time.perf_counter() + args.budget_s
    for name, specs in domains.items():
        for shape in args.shapes:
            run = run_folder(out, name, shape)
            cfg = adapt_config(args, specs, shape, run)
            if finished(run, resolve_settings(cfg)) is not None:
                print(f"== {name} {shape}: finished ({run / 'report.json'}), skipped", flush=True)
                continue
            if deadline is not None and time.perf_counter() > deadline:
                print(f"--budget-s spent: {name} {shape} and later runs not started", flush=True)
                return failed
            flags = " --baselines" if cfg.baselines else ""
            print(f"== {name} {shape}: memdec adapt --preset quick{flags} --decoder {shape} --out {run}", flush=True)
            try:
                adapt(cfg)
            except MemdecError as exc:
                failed.append(f"{name} {shape}: {exc}")
                print(f"spread: {name} {shape} failed: {exc}", file=sys.stderr, flush=True)
    return failed


# --------------------------------------------------------------------------------------------
# The table


def system_row(report: dict, system: str) -> dict:
    return next((r for r in report["results"] if r.get("system") == system), {})


def chosen_alpha(report: dict) -> str | None:
    """The chosen teacher candidate (the lowest joint valid ppl, as the train stage chose it): ``0.25``."""
    choice = report.get("alpha_choice") or {}
    return candidate_label(min(choice, key=choice.get)).removeprefix("α=") if choice else None


def numbers(domain: str, shape: str, report: dict | None) -> dict:
    """One row's numbers, read from the run's report.json (None where the run is not finished)."""
    row = {"domain": domain, "shape": shape}
    if report is None:
        return row
    ppl = {key: system_row(report, system).get("ppl") for key, system in SYSTEMS.items()}
    memdec = system_row(report, "memdec")
    return {**row, **{f"{key}_ppl": value for key, value in ppl.items()},
            "base_general_ppl": system_row(report, "base").get("general_ppl"),
            "memdec_general_ppl": memdec.get("general_ppl"), "lambda": memdec.get("lambda"),
            "alpha": chosen_alpha(report), "decoder_bytes": (report.get("disk_bytes") or {}).get("memdec"),
            "decoder": (report.get("sizes") or {}).get("memdec_shape"), "test_tokens": report.get("tokens"),
            "general_tokens": (report.get("general") or {}).get("tokens")}


def add_baselines(rows: list[dict], baselines_on: str) -> list[dict]:
    """Each row's DAPT and LoRA perplexities from its domain's ``--baselines-on`` run (they do not depend on the
    decoder's shape)."""
    runs = {r["domain"]: r for r in rows if r["shape"] == baselines_on}
    for r in rows:
        ref = runs.get(r["domain"], {})
        for key in ("dapt_ppl", "lora_ppl"):
            if r.get(key) is None and r.get("memdec_ppl") is not None:
                r[key] = ref.get(key)
    return rows


def add_gaps(rows: list[dict]) -> list[dict]:
    """Each row's ``gap_to_copy``: its memdec ppl over the copy's on the same domain, minus one, in percent."""
    copy = {r["domain"]: r.get("memdec_ppl") for r in rows if r["shape"] == "copy"}
    for r in rows:
        ref, mine = copy.get(r["domain"]), r.get("memdec_ppl")
        r["gap_to_copy"] = None if ref is None or mine is None else round((mine / ref - 1) * 100, 4)
    return rows


def _ppl(x) -> str:
    return MISSING if x is None else f"{x:.2f}"


def _pct(x, ref) -> str:
    return MISSING if x is None or not ref else f"{(x / ref - 1) * 100:+.1f}%"


def _bytes(n) -> str:
    if n is None:
        return MISSING
    for unit, size in (("GiB", 2**30), ("MiB", 2**20)):
        if n >= size:
            return f"{n / size:.1f} {unit}"
    return f"{n / 2**10:.0f} KiB"


HEADER = ["domain", "shape", "base ppl", "memdec ppl", "vs base", "vs DAPT", "DAPT", "LoRA", "kNN-LM", "memdec+router",
          "general: memdec", "general: base", "λ", "α", "decoder on disk", "gap to copy"]


def cells(r: dict) -> list[str]:
    gap = r.get("gap_to_copy")
    gap_cell = "ref" if r["shape"] == "copy" and gap is not None else (MISSING if gap is None else f"{gap:+.1f}%")
    return [r["domain"], r["shape"], _ppl(r.get("base_ppl")), _ppl(r.get("memdec_ppl")),
            _pct(r.get("memdec_ppl"), r.get("base_ppl")), _pct(r.get("memdec_ppl"), r.get("dapt_ppl")),
            _ppl(r.get("dapt_ppl")), _ppl(r.get("lora_ppl")), _ppl(r.get("knn_ppl")), _ppl(r.get("router_ppl")),
            _ppl(r.get("memdec_general_ppl")), _ppl(r.get("base_general_ppl")),
            MISSING if r.get("lambda") is None else f"{r['lambda']:.2f}", r.get("alpha") or MISSING,
            _bytes(r.get("decoder_bytes")), gap_cell]


def format_table(rows: list[dict], args: argparse.Namespace) -> str:
    done = [r for r in rows if r.get("memdec_ppl") is not None]
    tokens = ", ".join(sorted({f"{r['test_tokens']} test tokens" for r in done})) or "no run finished"
    notes = [
        "", f"Each row: `memdec adapt --preset quick --decoder SHAPE` on the domain's splits "
            f"({args.model}; {tokens}; `{args.out}/DOMAIN/SHAPE`; `--baselines` in the {args.baselines_on} run). "
            f"Perplexities from the run's report.json: "
            f"memdec at the λ chosen on valid, *vs base* and *vs DAPT* its change against those rows; DAPT and "
            f"LoRA (the baselines, same tokens and budget) scored alone; kNN-LM at its own λ; *memdec+router* only "
            f"where the router stage kept a router. *general*: `{GENERAL}` (forgetting), memdec at its λ. "
            f"*α*: the teacher chosen on valid. *decoder on disk*: the chosen decoder's folder. *gap to copy*: "
            f"memdec ppl against the `copy` run's on the same domain. {MISSING}: no finished run."]
    return "\n".join(render_table(HEADER, [cells(r) for r in rows]) + notes)


def collect(args: argparse.Namespace, domains: dict[str, dict]) -> list[dict]:
    rows = []
    for name, specs in domains.items():
        for shape in args.shapes:
            run = run_folder(Path(args.out), name, shape)
            rows.append(numbers(name, shape, finished(run, resolve_settings(adapt_config(args, specs, shape, run)))))
    return add_gaps(add_baselines(rows, args.baselines_on))


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    args.table = args.table or str(Path(args.out) / "table.md")
    args.json = args.json or str(Path(args.out) / "table.json")
    try:
        domains = check_args(args)
        out = Path(args.out)
        mark_own_folder(out, "bench")  # first
        atomic_write_json(out / MARKER, {"domains": check_fingerprints(out, domains)})
        if args.threads:
            import torch

            torch.set_num_threads(args.threads)
        failed = run_all(args, domains)
        rows = collect(args, domains)
        table = format_table(rows, args)
        atomic_write_text(args.table, table + "\n")
        atomic_write_json(args.json, {"model": args.model, "general": GENERAL, "rows": rows}, ensure_ascii=False)
    except MemdecError as exc:
        print(f"spread: error: {exc}", file=sys.stderr)
        return 2
    print(table)
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main())
