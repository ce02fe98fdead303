"""3c. The tasks stage: the factual-recall and general-ability tasks written into ``RUN/tasks``, every
system of the eval stage scored on them through lm-evaluation-harness (an optional extra)."""

from __future__ import annotations

import importlib.util
import time
from pathlib import Path

from ...baselines import method_of_row
from ...errors import MemdecError
from ...evaluate import ROUTER_ROW, read_eval_json
from ...files import atomic_write_json
from ...models import load_tokenizer
from ...report import FACTS_CONTEXT_TOKENS, FACTS_TASK, GENERAL_CONTEXT_WORDS, GENERAL_TASK, TASK_CHOICES, TASK_SEED
from ...tables import accuracy_entry
from ...tasks import memdec_lm_class, write_facts_task, write_general_task
from ..inputs import task_heldout_tokens
from ..job import AdaptRun, remove
from ..stagebook import say


def lm_eval_available() -> bool:
    """Whether lm-evaluation-harness is installed (the optional extra ``memdec[eval]``); says so when not."""
    if importlib.util.find_spec("lm_eval") is not None:
        return True
    say("tasks: lm-eval is not installed (pip install 'memdec[eval]'): no facts or general accuracy this run")
    return False


def write_tasks(job: AdaptRun) -> tuple[dict, dict]:
    """Write the facts and general tasks into ``RUN/tasks``: ({task: {corpus, items}}, {kind: why it was skipped})."""
    s, out = job.s, job.run / "tasks"
    remove(out)
    written, skipped = {}, {}
    try:
        write_facts_task(str(job.datastore), s.test, out, load_tokenizer(s.model), s.task_items, TASK_SEED,
                         FACTS_CONTEXT_TOKENS, TASK_CHOICES, heldout_max_tokens=task_heldout_tokens(s), name=FACTS_TASK,
                         text_field=s.text_field)
        written[FACTS_TASK] = {"corpus": s.corpus, "heldout": s.test,
                               "items": _count_lines(out / f"{FACTS_TASK}.jsonl")}
    except MemdecError as exc:
        skipped["facts"] = str(exc)
    if s.general is None:
        skipped["general"] = "--general none"
    else:
        try:
            write_general_task(s.general, out, s.task_items, TASK_SEED, GENERAL_CONTEXT_WORDS, TASK_CHOICES,
                               GENERAL_TASK, s.text_field)
            n = _count_lines(out / f"{GENERAL_TASK}.jsonl")
            written.update({f"{GENERAL_TASK}_{kind}": {"corpus": s.general, "items": n}
                            for kind in ("lambada", "cloze")})
        except MemdecError as exc:
            skipped["general"] = str(exc)
    for kind, why in skipped.items():
        say(f"tasks: no {kind} task: {why}")
    return written, skipped


def _count_lines(path: Path) -> int:
    with open(path, encoding="utf-8") as f:
        return sum(1 for line in f if line.strip())


def task_systems(job: AdaptRun) -> list[dict]:
    """Each row of ``RUN/eval.json`` as the memdec lm-eval model's arguments, at the λ (and kNN temperature)
    the eval stage chose."""
    out = []
    for r in read_eval_json(job.run / "eval.json")["results"]:
        system, args = r["system"], {"base": job.s.model, "device": job.device}
        if system == "memdec":
            args.update(memdec=str(job.ckpt), lmbda=r["lambda"])
        elif system == ROUTER_ROW:  # the router stage kept a router: RUN/memdec holds it
            args.update(memdec=str(job.ckpt), router=str(job.ckpt))
        elif system == "knn-lm":
            args.update(knn=str(job.datastore), lmbda=r["lambda"], knn_temp=r.get("knn_temperature"), knn_k=r.get("k"))
        elif (method := method_of_row(system)) is not None:
            args.update(baseline=str(job.run / "baselines" / method.name), lmbda=r.get("lambda"))
        elif system != "base":
            continue
        out.append({"system": system, "lambda": r.get("lambda"), "knn_temperature": r.get("knn_temperature"),
                    "args": args})
    return out


def score_tasks(args: dict, tasks_dir: Path, tasks: dict[str, dict]) -> dict:
    """One system on the tasks of ``tasks_dir`` through lm-eval: {task: accuracy entry}."""
    from lm_eval import simple_evaluate  # optional and heavy: only for this stage
    from lm_eval.tasks import TaskManager

    lm = memdec_lm_class()(**args)
    try:
        res = simple_evaluate(model=lm, tasks=list(tasks), task_manager=TaskManager(include_path=[str(tasks_dir)],
                              include_defaults=False), log_samples=False, bootstrap_iters=0, batch_size=1)
    finally:
        lm.system.close()
    out = {}
    for task in tasks:
        n = (res.get("n-samples") or {}).get(task, {}).get("effective", tasks[task]["items"])
        out[task] = accuracy_entry(float(res["results"][task]["acc,none"]), int(n))
        if "perplexity,none" in res["results"][task]:
            out[task]["perplexity"] = round(float(res["results"][task]["perplexity,none"]), 4)
    return out


def tasks_stage(job: AdaptRun) -> None:
    """3b. The factual-recall and general-ability tasks (``memdec.tasks``) written into ``RUN/tasks``, every
    system of the eval stage scored on them through lm-eval at its chosen λ: ``RUN/tasks.json``."""
    s, book, inputs = job.s, job.book, job.inputs["tasks"]
    systems = task_systems(job)
    names = [x["system"] for x in systems]
    recorded = book.summary("tasks").get("systems")  # None: a run of an earlier version
    if book.is_done("tasks", inputs) and recorded is not None and recorded != names:
        say(f"tasks: the systems changed ({', '.join(recorded)} -> {', '.join(names)}); redoing this stage")
        book.invalidate("tasks")
    done, _ = book.begin("tasks", inputs, f"factual recall ({s.test}) and general ability "
                         f"({s.general or 'skipped'}) through lm-eval, {s.task_items} items each, every system")
    if done:
        return

    def work() -> dict:
        remove(job.run / "tasks.json")
        written, skipped = write_tasks(job)
        rows = []
        for system in systems:
            t0 = time.perf_counter()
            scores = score_tasks(system.pop("args"), job.run / "tasks", written) if written else {}
            rows.append({**system, "tasks": scores, "seconds": round(time.perf_counter() - t0, 1)})
            say(f"tasks: {system['system']}: "
                + ", ".join(f"{t} {e['acc']:.3f} (n={e['n']})" for t, e in scores.items()))
        atomic_write_json(job.run / "tasks.json", {"items": s.task_items, "seed": TASK_SEED, "tasks": written,
                                                   "skipped": skipped, "results": rows})
        return {"tasks": {t: w["items"] for t, w in written.items()}, "skipped": list(skipped), "systems": names}

    book.run("tasks", inputs, work)
