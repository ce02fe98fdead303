"""Issue 14's table: Gemma 3 270M as the base; its kNN-LM and reference decoder against a SmolLM2
memory decoder moved across tokenizers (mapped embeddings) and the random-embeddings ablation.

    python bench/transfer_gemma.py --smollm2 smollm2-135m --gemma gemma3-270m --out runs/transfer \
        [--train-tokens 300000] [--eval-tokens 32768] [--fractions 0.1 0.25] [--preset full]

1. ``memdec adapt`` on SmolLM2 (the source decoder, and its own gain on SmolLM2);
2. ``memdec adapt`` on Gemma 3 (base, kNN-LM over Gemma's datastore, and the reference decoder:
   a full copy of Gemma 3 trained with the usual recipe, chosen on valid);
3. ``memdec transfer`` of the SmolLM2 decoder onto Gemma's datastore, for each init (mapped,
   random) and each fraction of the reference decoder's optimizer steps, with the reference's
   teacher (α) and schedule;
4. ``memdec eval --sweep`` of each transferred decoder: test perplexity at λ chosen on valid.

Every number comes from the run folders; ``OUT/table.md`` and ``OUT/table.json`` hold the table.
A rerun resumes (adapt skips finished stages, transfer resumes, finished evals are kept).
"""

from __future__ import annotations

import argparse
import dataclasses
import gc
import json
import time
from pathlib import Path

import torch

from memdec import cli
from memdec.train import TrainConfig
from memdec.transfer import TransferConfig, transfer

CORPORA = ["--corpus", "austen:train", "--valid", "austen:valid", "--test", "austen:test"]


def memdec(*args: str) -> None:
    """Run one memdec command in this process (one start-up, one model conversion for all)."""
    t0 = time.perf_counter()
    print("$ memdec " + " ".join(args), flush=True)
    if cli.main(list(args)) != 0:
        raise SystemExit(f"memdec {args[0]} failed")
    free_memory()
    print(f"  ({time.perf_counter() - t0:.1f} s)", flush=True)


def free_memory() -> None:
    gc.collect()
    if torch.cuda.is_available():
        torch.cuda.empty_cache()


def adapt(model: str, out: Path, a) -> dict:
    if not (out / "report.json").exists():
        memdec("adapt", "--model", model, *CORPORA, "--out", str(out), "--preset", a.preset,
               "--train-tokens", str(a.train_tokens), "--valid-tokens", str(a.eval_tokens),
               "--test-tokens", str(a.eval_tokens), "--samples", "0", "--task-items", "0", "--general", "none",
               *a.adapt_args)
    return json.loads((out / "report.json").read_text())


def transfer_config(source: Path, reference: Path, gemma: str, out: Path, init: str, fraction: float) -> dict:
    """The reference decoder's own training config, shortened to ``fraction`` of its steps."""
    ref = json.loads((reference / "memdec.json").read_text())
    cfg = dict(ref["train_config"])
    steps = max(1, round(fraction * ref["train_stats"]["step"]))
    cfg.update(decoder=str(source), model=gemma, out=str(out), init=init, init_layers=None, max_steps=steps,
               budget=None, alpha=ref["alpha"], teacher_base_weight=ref.get("teacher_base_weight", 0.0))
    return cfg


def run_transfer(cfg: dict) -> None:
    """``memdec transfer`` through the Python API: every field of the reference's TrainConfig carries over."""
    fields = {f.name for f in dataclasses.fields(TransferConfig)} | {f.name for f in dataclasses.fields(TrainConfig)}
    t0 = time.perf_counter()
    print(f"$ transfer init={cfg['init']} steps={cfg['max_steps']} -> {cfg['out']}", flush=True)
    transfer(TransferConfig.from_flat(**{k: v for k, v in cfg.items() if k in fields}))
    free_memory()
    print(f"  ({time.perf_counter() - t0:.1f} s)", flush=True)


def evaluate(gemma: str, ckpt: Path, settings: dict, a) -> dict:
    """Test perplexity of base + ``ckpt`` at λ chosen on valid, in the adapt run's windows."""
    out = ckpt.parent / f"{ckpt.name}.eval.json"
    if not out.exists():
        memdec("eval", "--model", gemma, "--corpus", "austen:test", "--max-tokens", str(a.eval_tokens),
               "--block-size", str(settings["eval_block_size"]), "--stride", str(settings["eval_stride"]),
               "--valid", "austen:valid", "--valid-max-tokens", str(a.eval_tokens), "--sweep",
               "--memdec", str(ckpt), "--batch-size", str(a.eval_batch), "--json", str(out))
    return json.loads(out.read_text())


def row_of(results: list[dict], system: str) -> dict:
    return next(r for r in results if r["system"] == system)


def table(smol: dict, gemma: dict, transfers: dict, ref_steps: int) -> tuple[str, list[dict]]:
    base = row_of(gemma["results"], "base")
    ref = row_of(gemma["results"], "memdec")
    gain_ref = base["ppl"] - ref["ppl"]
    rows = [
        dict(system="Gemma 3 270M base", budget="0", **_cells(base)),
        dict(system="kNN-LM over Gemma 3's datastore", budget="0", **_cells(row_of(gemma["results"], "knn-lm"))),
        dict(system="reference: full copy of Gemma 3, usual recipe", budget=f"100% ({ref_steps} steps)", **_cells(ref)),
    ]
    for (init, fraction), (report, steps) in transfers.items():
        name = "SmolLM2 decoder transferred (mapped embeddings)" if init == "mapped" else \
            "SmolLM2 body, random new embeddings (ablation)"
        rows.append(
            dict(system=name, budget=f"{fraction:.0%} ({steps} steps)", **_cells(row_of(report["results"], "memdec")))
        )
    for r in rows:
        r["gain_vs_reference"] = None if gain_ref <= 0 else round((base["ppl"] - r["test_ppl"]) / gain_ref, 3)
    s_base, s_mem = row_of(smol["results"], "base"), row_of(smol["results"], "memdec")
    rows.append(dict(system="(SmolLM2-135M base, on SmolLM2)", budget="0", **_cells(s_base), gain_vs_reference=None))
    rows.append(
        dict(system="(SmolLM2 decoder on SmolLM2: the source)", budget="100%", **_cells(s_mem), gain_vs_reference=None)
    )
    header = ["system", "budget", "λ", "valid ppl", "test ppl", "share of the reference's gain", "trainable params",
              "train s", "inference ratio"]
    lines = ["| " + " | ".join(header) + " |", "|" + " --- |" * len(header)]
    for r in rows:
        cells = [
            r["system"],
            r["budget"],
            _f(r["lambda"], ".2f"),
            _f(r["valid_ppl"], ".3f"),
            _f(r["test_ppl"], ".3f"),
            _f(r["gain_vs_reference"], ".0%"),
            f"{r['trainable_parameters'] / 1e6:.1f}M" if r["trainable_parameters"] else "0",
            _f(r["train_seconds"], ".1f"),
            _f(r["inference_ratio"], ".2f"),
        ]
        lines.append("| " + " | ".join(cells) + " |")
    return "\n".join(lines) + "\n", rows


def _cells(r: dict) -> dict:
    return {"lambda": r.get("lambda"), "test_ppl": r["ppl"], "valid_ppl": r.get("valid_ppl"),
            "trainable_parameters": r.get("trainable_parameters") or 0, "train_seconds": r.get("train_seconds"),
            "inference_ratio": r.get("inference_ratio"), "tokens": r.get("tokens")}


def _f(value, spec: str) -> str:
    return "–" if value is None else format(value, spec)


def main() -> None:
    p = argparse.ArgumentParser(
        description=__doc__.splitlines()[0], formatter_class=argparse.ArgumentDefaultsHelpFormatter
    )
    p.add_argument("--smollm2", default="smollm2-135m", help="the source base (model spec)")
    p.add_argument("--gemma", default="gemma3-270m", help="the new base (model spec)")
    p.add_argument("--out", default="runs/transfer", help="folder of the runs and the table")
    p.add_argument("--preset", default="full", help="memdec adapt's preset for both runs")
    p.add_argument("--train-tokens", type=int, default=300_000, help="training tokens of each adapt run")
    p.add_argument("--eval-tokens", type=int, default=32_768, help="valid and test tokens")
    p.add_argument("--eval-batch", type=int, default=8, help="windows per forward in memdec eval")
    p.add_argument("--fractions", type=float, nargs="+", default=[0.1, 0.25], help="transfer budgets")
    p.add_argument("--adapt-args", nargs=argparse.REMAINDER, default=[], help="passed to both adapt runs (last)")
    a = p.parse_args()
    out = Path(a.out)
    out.mkdir(parents=True, exist_ok=True)
    t0 = time.perf_counter()
    smol = adapt(a.smollm2, out / "smollm2", a)
    gemma = adapt(a.gemma, out / "gemma", a)
    reference = out / "gemma" / "memdec"
    ref_steps = json.loads((reference / "memdec.json").read_text())["train_stats"]["step"]
    transfers = {}
    for fraction in a.fractions:
        for init in ("mapped", "random"):
            ckpt = out / f"transfer-{init}-{fraction:g}"
            cfg = transfer_config(out / "smollm2" / "memdec", reference, a.gemma, ckpt, init, fraction)
            if not (ckpt / "memdec.json").exists():
                run_transfer(cfg)
            transfers[(init, fraction)] = (evaluate(a.gemma, ckpt, gemma["settings"], a), cfg["max_steps"])
            write_table(out, smol, gemma, transfers, ref_steps, a, t0)  # after each row: a cut-short run keeps its rows
    print((out / "table.md").read_text())


def write_table(out: Path, smol: dict, gemma: dict, transfers: dict, ref_steps: int, a, t0: float) -> None:
    md, rows = table(smol, gemma, transfers, ref_steps)
    records = {
        f"{init}-{fraction:g}": json.loads((out / f"transfer-{init}-{fraction:g}" / "memdec.json").read_text()).get(
            "transfer"
        )
        for init, fraction in transfers
    }
    (out / "table.json").write_text(json.dumps(dict(rows=rows, transfer=records, settings=vars(a),
                                                    seconds=round(time.perf_counter() - t0, 1)), indent=1))
    (out / "table.md").write_text(md)


if __name__ == "__main__":
    main()
