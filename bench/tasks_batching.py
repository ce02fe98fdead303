"""Benchmark the memdec lm-eval model's log-likelihood batching (``memdec.tasks``).

Writes the facts task (austen:train against austen:test) and the general tasks (general:test), N items
each, then scores them with the base model alone through ``lm_eval.simple_evaluate`` at batch size 16,
1 and 16 again, in one process on the same task files (so a busy machine slows all alike as far as it
can), and prints the seconds, items/s, accuracies and the largest difference of any per-choice
log-likelihood between batch size 1 and 16.

usage: .venv/bin/python bench/tasks_batching.py [N] [--model smollm2-135m] [--out DIR] [--json FILE]
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


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("n", type=int, nargs="?", default=12)
    ap.add_argument("--model", default="smollm2-135m")
    ap.add_argument("--out", default="/tmp/memdec-bench-tasks")
    ap.add_argument("--json")
    a = ap.parse_args()
    write_facts_task("austen:train", "austen:test", a.out, load_tokenizer(a.model), a.n, 0, 64, 4,
                     max_tokens=24000, heldout_max_tokens=200 * a.n)
    write_general_task("general:test", a.out, a.n, 0, 60, 4)
    lm = memdec_lm_class()(base=a.model, device="cpu")
    runs, lls = [], {}
    for bs in (16, 1, 16):
        lm.batch_size = bs
        t0 = time.perf_counter()
        res = simple_evaluate(model=lm, tasks=TASKS, bootstrap_iters=0, log_samples=True,
                              task_manager=TaskManager(include_path=[a.out], include_defaults=False))
        dt = time.perf_counter() - t0
        lls.setdefault(bs, per_choice(res))
        runs.append({"batch_size": bs, "seconds": round(dt, 1), "items_per_s": round(a.n / dt, 4),
                     "acc": {t: res["results"][t]["acc,none"] for t in TASKS}})
        print(json.dumps(runs[-1]), flush=True)
    diff = max(abs(x - y) for x, y in zip(lls[1], lls[16]))
    print(f"max |loglik(batch 16) - loglik(batch 1)| = {diff:.3g}")
    if a.json:
        with open(a.json, "w") as f:
            json.dump({"n": a.n, "model": a.model, "runs": runs, "max_abs_diff": diff}, f, indent=1)


if __name__ == "__main__":
    main()
