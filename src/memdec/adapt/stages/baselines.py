"""2b. The baselines (``memdec.baselines``, with ``--baselines``): each trained on the memory decoder's
tokens and budget, or the α=0 candidate reused where a method's recipe is the same."""

from __future__ import annotations

import os
import shutil
from dataclasses import asdict
from pathlib import Path

from ...baselines import BaselineConfig, Method, method_names, train_baseline
from ...checkpoint import MEMDEC_JSON, read_baseline_json, read_memdec_json, write_baseline_json
from ...report import candidate_name
from ...train import TrainConfig
from ..job import AdaptRun, remove
from ..stagebook import say
from .train import PRUNED


def baseline_stage(job: AdaptRun, method: Method, train_cfg: TrainConfig) -> str:
    """2b. A baseline on the memory decoder's TrainConfig: the same tokens, windows, steps and
    schedule, α=0. A method whose training is the memory decoder's with α=0 (ce-decoder) reuses the
    α=0 teacher candidate when there is one (not a transferred one). Returns the baseline's folder."""
    s, book, name = job.s, job.book, method.name
    folder = job.run / "baselines" / name
    done, changed = book.begin(name, job.inputs[name], method.adapt_what(s))
    if done:
        return str(folder)
    if changed:
        remove(folder)
    reusable = job.run / "candidates" / candidate_name(0.0, 0.0)
    if (method.reuses_alpha0_decoder and s.transfer_from is None and (reusable / MEMDEC_JSON).is_file()
            and not read_memdec_json(reusable).get(PRUNED)):
        book.run(name, job.inputs[name], lambda: reuse_candidate(method, reusable, folder))
        return str(folder)

    def work() -> dict:
        options = {**asdict(train_cfg), "alpha": 0.0, "out": str(folder), **method.adapt_options(s)}
        train_baseline(BaselineConfig(**options, method=name))
        info = read_baseline_json(folder, method_names())
        return {k: info.get(k) for k in ("lambda", "trainable_parameters", "train_seconds")}

    book.run(name, job.inputs[name], work)
    return str(folder)


def reuse_candidate(method: Method, candidate: Path, folder: Path) -> dict:
    """The α=0 candidate as ``method``'s baseline (ce-decoder): its files hard-linked (no copy, no
    training), then ``baseline.json``. Returns the stage's summary."""
    folder.mkdir(parents=True, exist_ok=True)
    for f in candidate.iterdir():
        if f.is_file() and f.name not in (MEMDEC_JSON, "log.jsonl"):
            try:
                os.link(f, folder / f.name)
            except OSError:  # a filesystem without hard links
                shutil.copy2(f, folder / f.name)
    info = {**read_memdec_json(candidate), "reused_from": str(candidate.relative_to(folder.parent.parent))}
    write_baseline_json(folder, info, method.name, mixed=not method.alone)
    say(f"{method.name}: reused {info['reused_from']} (the same recipe on the same tokens), not trained again")
    return {"lambda": info["lambda"], "trainable_parameters": info.get("trainable_parameters"),
            "train_seconds": info.get("train_seconds"), "reused_from": info["reused_from"]}
