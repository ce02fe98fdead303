"""Scale curves for the kNN teacher: does α > 0 beat cross-entropy alone, and where?

One process runs the whole grid with the library's own stages, in priority order, and writes a
line per finished run, so a run cut short by its time budget still reports what it finished:

1. a datastore of the first N tokens of ``--corpus`` for each size in ``--sizes`` (``all`` = the
   whole split): keys, index (exact torch search on a GPU without faiss-GPU), kNN targets;
2. for each run of ``--runs`` (``size:alpha[:beta[:layers]]``), ``memdec.train`` at the same
   budget (``--epochs`` passes of ``--batch-size``×``--block-size`` windows, lr ``--lr``), the
   checkpoint and λ chosen on ``--valid``;
3. ``memdec.evaluate`` on each test corpus (``--tests``) at the chosen λ, with the perplexity of
   the names and numbers that recur between the datastore and the test text (``memdec.knowledge``);
4. kNN-LM (real retrieval, T and λ chosen on ``--valid``) for the largest datastore.

    python bench/scale.py --out runs/scale                     # the grid, on a GPU
    python bench/scale.py --smoke --out /tmp/scale-smoke       # the same code on a tiny model, CPU

Output: ``OUT/scale.jsonl`` (one JSON line per run), ``OUT/scale.md`` (the tables).
"""

from __future__ import annotations

import argparse
import json
import math
import shutil
import sys
import time
from pathlib import Path

import torch

from memdec.datastore import DatastoreConfig, build_datastore

from memdec.store import DEFAULT_K, read_manifest
from memdec.evaluate import EvalConfig, run_eval_report
from memdec.train import TrainConfig, train

DEFAULT_RUNS = [  # priority order: the decisive pairs first
    "all:0", "all:0.5", "all:0.5:0.5", "24000:0", "24000:0.5", "all:0.25",
    "175000:0", "175000:0.5", "all:0:0:10", "all:0.5:0:10",
]


def parse_run(spec: str) -> dict:
    """``size:alpha[:beta[:layers]]`` -> {size, alpha, beta, layers, name}."""
    parts = spec.split(":")
    size, alpha = parts[0], float(parts[1])
    beta = float(parts[2]) if len(parts) > 2 else 0.0
    layers = int(parts[3]) if len(parts) > 3 and parts[3] else None
    name = f"n{size}-a{alpha:g}" + (f"-b{beta:g}" if beta else "") + (f"-L{layers}" if layers else "")
    return {"size": size, "alpha": alpha, "beta": beta, "layers": layers, "name": name}


def say(out: Path, msg: str) -> None:
    line = f"[{time.strftime('%H:%M:%S')}] {msg}"
    print(line, flush=True)
    with open(out / "log.txt", "a") as f:
        f.write(line + "\n")


def build_store(args, out: Path, size: str) -> Path:
    path = Path(args.work) / "stores" / f"n{size}"
    t0 = time.perf_counter()
    build_datastore(DatastoreConfig(model=args.model, corpus=args.corpus, out=str(path), k=args.k,
                                    knn_temp=args.knn_temp, index=args.index, block_size=args.block_size,
                                    stride=args.block_size * 3 // 4,
                                    max_tokens=None if size == "all" else int(size), progress=False))
    m = read_manifest(path)
    say(out, f"datastore n{size}: {m.n_keys} keys, {time.perf_counter() - t0:.1f} s "
             f"(keys {m.steps.keys.seconds} s, targets {m.steps.targets.seconds} s, "
             f"index {m.steps.index.type}, mean support {m.steps.targets.mean_support})")
    return path


def evaluate(args, ckpt: Path | None, store: Path, knn: bool = False) -> dict:
    """{test corpus: {ppl, base_ppl, recurring_ppl, base_recurring_ppl, lambda, ...}}."""
    scores = {}
    for corpus in args.tests:
        cfg = EvalConfig(model=args.model, corpus=corpus, max_tokens=args.test_tokens, block_size=args.block_size,
                         memdec=str(ckpt) if ckpt else None, knn=str(store) if knn else None,
                         sweep=knn, valid=args.valid if knn else None, valid_max_tokens=args.valid_tokens,
                         recurring=str(store), batch_size=args.eval_batch)
        report = run_eval_report(cfg)
        base, mix = report.rows[0], report.rows[1]
        scores[corpus] = {"base_ppl": round(base.ppl, 3), "ppl": round(mix.ppl, 3), "lambda": mix.lmbda,
                          "base_recurring_ppl": base.extra.get("recurring_ppl"),
                          "recurring_ppl": mix.extra.get("recurring_ppl"),
                          "recurring_tokens": report.extra["recurring"]["tokens"], "tokens": report.n_tokens,
                          **({"knn_temperature": mix.extra.get("knn_temperature")} if knn else {})}
    return scores


def run_one(args, out: Path, store: Path, run: dict) -> dict:
    ckpt = Path(args.work) / "ckpt" / run["name"]
    n_keys = read_manifest(store).n_keys
    steps = max(1, math.ceil(args.epochs * n_keys / (args.batch_size * args.block_size)))
    cfg = TrainConfig(datastore=str(store), out=str(ckpt), alpha=run["alpha"], teacher_base_weight=run["beta"],
                      init_layers=run["layers"], max_steps=steps, lr=args.lr, warmup=max(1, steps // 20),
                      batch_size=args.batch_size, block_size=args.block_size, valid=args.valid,
                      valid_max_tokens=args.valid_tokens, eval_every=max(1, steps // args.evals),
                      save_every=10**9, log_every=10, resume=False)
    t0 = time.perf_counter()
    train(cfg)
    seconds = time.perf_counter() - t0
    info = json.loads((ckpt / "memdec.json").read_text())
    log = [json.loads(line) for line in (ckpt / "log.jsonl").read_text().splitlines()]
    curve = [(r["step"], round(r["best_ppl"], 3), round(r["valid_ppl_memdec"], 3)) for r in log if "best_ppl" in r]
    stats = info["train_stats"]
    record = {**run, "n_keys": n_keys, "steps": steps, "train_seconds": round(seconds, 1),
              "tokens_per_s": round(log[-1]["tokens_per_s"]), "best_step": stats["step"],
              "valid_joint_ppl": round(stats["best_ppl"], 3), "valid_alone_ppl": round(stats["valid_ppl_memdec"], 3),
              "valid_base_ppl": round(stats["valid_ppl_base"], 3), "lambda": stats["best_lambda"],
              "valid_curve": curve, "test": evaluate(args, ckpt, store)}
    shutil.rmtree(ckpt, ignore_errors=True)  # 0.5 GB each; the numbers are what we keep
    return record


def table(records: list[dict], tests: list[str]) -> str:
    head = "| run | keys | α | β | layers | steps | best step | valid joint | valid alone | λ | " + " | ".join(
        f"{t} ppl (base) | {t} recurring (base)" for t in tests) + " | train s |"
    lines = [head, "|" + " --- |" * (head.count("|") - 1)]
    for r in records:
        if r.get("kind") == "knn-lm":
            cells = [r["name"], str(r["n_keys"]), "-", "-", "-", "-", "-", "-", "-", "-"]
        else:
            cells = [r["name"], str(r["n_keys"]), f"{r['alpha']:g}", f"{r['beta']:g}", str(r["layers"] or "all"),
                     str(r["steps"]), str(r["best_step"]), f"{r['valid_joint_ppl']:.2f}", f"{r['valid_alone_ppl']:.2f}",
                     f"{r['lambda']:g}"]
        for t in tests:
            s = r["test"].get(t, {})
            cells.append(
                f"{s.get('ppl', float('nan')):.2f} ({s.get('base_ppl', float('nan')):.2f}) λ={s.get('lambda')}"
            )
            rec, base_rec = s.get("recurring_ppl"), s.get("base_recurring_ppl")
            cells.append(f"{rec:.2f} ({base_rec:.2f}), {s.get('recurring_tokens')} tok" if rec and base_rec else "-")
        cells.append(str(r.get("train_seconds", "-")))
        lines.append("| " + " | ".join(cells) + " |")
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--model", default="smollm2-135m")
    p.add_argument("--corpus", default="austen:train")
    p.add_argument("--valid", default="austen:valid")
    p.add_argument("--tests", nargs="+", default=["austen:test", "austen:within"])
    p.add_argument("--sizes-knn", default="all", help="the datastore size that also gets a kNN-LM row")
    p.add_argument("--runs", nargs="+", default=DEFAULT_RUNS, help="size:alpha[:beta[:layers]], in priority order")
    p.add_argument("--k", type=int, default=DEFAULT_K)
    p.add_argument("--knn-temp", type=float, default=1.0)
    p.add_argument("--index", default="auto")
    p.add_argument("--epochs", type=float, default=2.0)
    p.add_argument("--lr", type=float, default=1e-4)
    p.add_argument("--batch-size", type=int, default=8)
    p.add_argument("--block-size", type=int, default=1024)
    p.add_argument("--evals", type=int, default=8, help="validations per run")
    p.add_argument("--valid-tokens", type=int, default=32768)
    p.add_argument("--test-tokens", type=int, default=32768)
    p.add_argument("--eval-batch", type=int, default=8)
    p.add_argument("--budget-s", type=float, default=float("inf"), help="start no run after this many seconds")
    p.add_argument("--out", required=True, help="log.txt, scale.jsonl, scale.md")
    p.add_argument("--work", help="datastores and checkpoints (default: --out)")
    p.add_argument(
        "--smoke", action="store_true", help="a tiny random model and corpus slice, on CPU, to test the script"
    )
    args = p.parse_args(argv)
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    args.work = args.work or args.out
    if args.smoke:
        from memdec.testing import save_tiny_model, tiny_tokenizer

        args.model = str(save_tiny_model(Path(args.work) / "tiny", "llama", tiny_tokenizer(), seed=0))
        args.k, args.block_size, args.batch_size, args.valid_tokens, args.test_tokens = 16, 64, 2, 300, 300
        args.runs = (
            args.runs
            if "--runs" in (argv if argv is not None else sys.argv)
            else ["1200:0", "1200:0.5:0.5", "600:0.5:0:1"]
        )
        args.sizes_knn, args.eval_batch = "1200", 1
    t_start = time.perf_counter()
    say(out, f"torch {torch.__version__}, cuda {torch.cuda.is_available()}"
             f"{' (' + torch.cuda.get_device_name() + ')' if torch.cuda.is_available() else ''}; runs {args.runs}")
    runs = [parse_run(s) for s in args.runs]
    stores: dict[str, Path] = {}
    records = []
    results = out / "scale.jsonl"
    for run in runs:
        elapsed = time.perf_counter() - t_start
        if elapsed > args.budget_s:
            say(out, f"budget spent ({elapsed:.0f} s): skipping {run['name']}")
            continue
        if run["size"] not in stores:
            stores[run["size"]] = build_store(args, out, run["size"])
            if run["size"] == args.sizes_knn:
                t0 = time.perf_counter()
                knn = {"kind": "knn-lm", "name": f"n{run['size']}-knn-lm", "size": run["size"],
                       "n_keys": read_manifest(stores[run["size"]]).n_keys,
                       "test": evaluate(args, None, stores[run["size"]], knn=True)}
                records.append(knn)
                with open(results, "a") as f:
                    f.write(json.dumps(knn) + "\n")
                say(out, f"kNN-LM n{run['size']}: {json.dumps(knn['test'])} ({time.perf_counter() - t0:.0f} s)")
        try:
            record = run_one(args, out, stores[run["size"]], run)
        except Exception as exc:  # one failed run must not lose the others
            say(out, f"{run['name']} failed: {type(exc).__name__}: {exc}")
            continue
        records.append(record)
        with open(results, "a") as f:
            f.write(json.dumps(record) + "\n")
        say(
            out,
            f"{run['name']}: valid joint {record['valid_joint_ppl']} (alone {record['valid_alone_ppl']}, "
            f"step {record['best_step']}/{record['steps']}), {record['train_seconds']} s; test "
            f"{json.dumps(record['test'])}",
        )
        (out / "scale.md").write_text(table(records, args.tests) + "\n")
    say(out, f"done in {time.perf_counter() - t_start:.0f} s")


if __name__ == "__main__":
    sys.exit(main())
