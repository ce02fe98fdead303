"""``adapt``: the whole job, every stage in order, resumable; a done stage whose output is unusable is
redone with the stages after it (``redo_unusable_outputs``)."""

from __future__ import annotations

import time
from pathlib import Path
from typing import Callable

from ..baselines import get_method, method_names
from ..checks import check_device, mark_own_folder
from ..errors import MemdecError
from ..evaluate import read_eval_json
from ..files import atomic_write_json
from ..report import ROUTER_LAMBDA_JSON, read_router_lambdas, read_samples, read_tasks_json, write_report
from .identity import CORPUS_HASHES, check_inputs, check_run_identity, clear_run
from .inputs import stage_inputs
from .job import AdaptRun
from .options import AdaptConfig
from .presets import check_config, resolve_settings
from .stagebook import StageBook, say
from .stages.baselines import baseline_stage
from .stages.eval import eval_stage
from .stages.router import drop_router, router_stage
from .stages.samples import samples_stage
from .stages.tasks import lm_eval_available, tasks_stage
from .stages.train import datastore_stage, keeps_candidates, prune_candidates, train_stage


def adapt(cfg: AdaptConfig) -> Path:
    """Run (or resume) every stage; returns the run folder, which holds report.md and report.json."""
    s = resolve_settings(cfg)
    run = Path(cfg.out).expanduser()
    check_config(s)
    check_device(cfg.device)
    hashes = check_inputs(s, run)
    replace = check_run_identity(s, run, cfg.overwrite, hashes)
    mark_own_folder(run, "adapt-run")  # first: the marker says the folder is memdec's (a run of an earlier release too)
    if replace:
        clear_run(run)
    with_tasks = bool(s.task_items) and lm_eval_available()
    plan = ["datastore", "train", *(method_names() if s.baselines else ()), "eval",
            *(["router"] if s.router == "auto" else []), *(["tasks"] if with_tasks else []), "samples"]
    book = StageBook(run, plan)
    book.save()
    atomic_write_json(run / "settings.json", {**s.flat(), CORPUS_HASHES: hashes})
    job = AdaptRun(run, s, cfg.device, book, stage_inputs(s), cfg.keep_trainer_state, cfg.keep_candidates)
    redo_unusable_outputs(job)
    t_run = time.perf_counter()
    if s.router == "off" or not book.is_done("router", job.inputs["router"]):
        drop_router(job)  # never a router of another decoder, or of a stage not done, beside RUN/memdec
    datastore_stage(job)
    train_cfg = train_stage(job)
    baseline_dirs = [baseline_stage(job, get_method(name), train_cfg) for name in plan if name in method_names()]
    if not keeps_candidates(job, cfg.keep_candidates):  # after the baselines: the ce-decoder may reuse α=0's files
        prune_candidates(job)
    eval_stage(job, baseline_dirs)
    if s.router == "auto":
        router_stage(job)
    if with_tasks:
        tasks_stage(job)
    samples_stage(job)
    write_report(run, s.flat(), book.stages, time.perf_counter() - t_run)
    return run


STAGE_OUTPUTS: dict[str, tuple[str, Callable[[Path], object]]] = {  # a done stage's file that later steps read
    "eval": ("eval.json", lambda f: read_eval_json(f, ("base", "memdec"))),
    "router": (f"router/{ROUTER_LAMBDA_JSON}", lambda f: read_router_lambdas(f) if f.is_file() else None),
    "tasks": ("tasks.json", read_tasks_json),
    "samples": ("samples.json", read_samples),
}


def redo_unusable_outputs(job: AdaptRun) -> None:
    """A done stage whose output file is missing or unusable (a field missing or of another type) is
    redone, with the stages that read it, saying why in one line: never a traceback further on."""
    for name, (file, read) in STAGE_OUTPUTS.items():
        if not job.book.is_done(name, job.inputs[name]):
            continue
        try:
            read(job.run / file)
        except MemdecError as exc:
            say(f"warning: {exc}; redoing the {name} stage and the stages after")
            job.book.invalidate(name)
            job.book.redo_after(name)
