"""Benchmark the memdec lm-eval model's log-likelihood batching (``memdec.tasks``).

Writes the facts task (austen:train against austen:test) and the general tasks (general:test), N items
each, then scores them with the base model alone through ``lm_eval.simple_evaluate`` in each mode of
``--modes``, in one process on the same task files (so a busy machine slows all alike as far as it
can), and prints the seconds, items/s, accuracies and the largest difference of any per-choice
log-likelihood between modes. Modes: ``shared-B`` (the adapter as it is: B rows per forward, requests
with the same inputs sharing a row), ``unshared-B`` (B requests per forward, one row each) and
``single`` (one request per forward, as the adapter scored before batching).

usage: .venv/bin/python bench/tasks_batching.py [N] [--model smollm2-135m] [--modes M,M,...] [--out DIR]
       [--json FILE]
"""

from __future__ import annotations

import argparse
import json
import time

from lm_eval import simple_evaluate
from lm_eval.tasks import TaskManager

from memdec.models import load_tokenizer
from memdec.tasks import memdec_lm_class, write_facts_task, write_general_task

TASKS = ["memdec_facts", "memdec_general_lambada", "memdec_general_cloze"]


def per_choice(res: dict) -> list[float]:
    return [float(x[0]) for t in TASKS for s in sorted(res["samples"][t], key=lambda s: s["doc_id"])
            for x in s["filtered_resps"]]


def unshared(lm, batch_size: int):
    """The adapter's log-likelihoods with one row per request (no sharing of equal inputs)."""

    def loglikelihood_tokens(requests, disable_tqdm: bool = False, **kwargs):
        prepared = [lm._request(ctx, cont) for _, ctx, cont in requests]
        order = sorted(range(len(prepared)), key=lambda i: -len(prepared[i][0]))
        out = [None] * len(prepared)
        for start in range(0, len(order), batch_size):
            chunk = order[start:start + batch_size]
            for i, res in zip(chunk, lm._score_batch([(prepared[i][0], [prepared[i][1]]) for i in chunk])):
                out[i] = res[0]
        return out

    return loglikelihood_tokens


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("n", type=int, nargs="?", default=12)
    ap.add_argument("--model", default="smollm2-135m")
    ap.add_argument("--out", default="/tmp/memdec-bench-tasks")
    ap.add_argument(
        "--modes", default="unshared-16,shared-16,single,shared-16", help="comma-separated, run in this order"
    )
    ap.add_argument("--json")
    a = ap.parse_args()
    write_facts_task("austen:train", "austen:test", a.out, load_tokenizer(a.model), a.n, 0, 64, 4,
                     max_tokens=24000, heldout_max_tokens=200 * a.n)
    write_general_task("general:test", a.out, a.n, 0, 60, 4)
    lm = memdec_lm_class()(base=a.model, device="cpu")
    runs, lls = [], {}
    shared_method = lm._loglikelihood_tokens
    for mode in a.modes.split(","):
        kind, _, size = mode.partition("-")
        lm.batch_size = int(size or 1)
        lm._loglikelihood_tokens = shared_method if kind == "shared" else unshared(lm, lm.batch_size)
        t0 = time.perf_counter()
        res = simple_evaluate(model=lm, tasks=TASKS, bootstrap_iters=0, log_samples=True,
                              task_manager=TaskManager(include_path=[a.out], include_defaults=False))
        dt = time.perf_counter() - t0
        lls.setdefault(mode, per_choice(res))
        runs.append({"mode": mode, "seconds": round(dt, 1), "items_per_s": round(a.n / dt, 4),
                     "acc": {t: res["results"][t]["acc,none"] for t in TASKS}})
        print(json.dumps(runs[-1]), flush=True)
    modes = list(lls)
    diff = max(abs(x - y) for m in modes[1:] for x, y in zip(lls[modes[0]], lls[m]))
    print(f"max |loglik difference| between modes {modes} = {diff:.3g}")
    if a.json:
        with open(a.json, "w") as f:
            json.dump({"n": a.n, "model": a.model, "runs": runs, "max_abs_diff": diff}, f, indent=1)


if __name__ == "__main__":
    main()
