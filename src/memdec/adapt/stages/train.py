"""1. The datastore stage and 2. the train stage: one memory decoder per teacher candidate (or one
transferred from ``--transfer-from``), the best on --valid linked as ``RUN/memdec``; the two-phase
candidates; which candidates keep their weights."""

from __future__ import annotations

import dataclasses
import math
import shutil
import time
from pathlib import Path

from ...baselines import methods
from ...checkpoint import MEMDEC_JSON, read_memdec_json, write_memdec_json
from ...checks import OWN_MARKER
from ...datastore import DatastoreConfig, build_datastore
from ...errors import MemdecError
from ...report import PHASE_ONE, candidate_label, candidate_name, two_phase_name
from ...store import describe, read_manifest
from ...train import TrainConfig, planned_steps, train
from ...transfer import TransferConfig, transfer
from ..job import AdaptRun, remove
from ..options import full_model_decoder, stage_fields
from ..stagebook import say


def teacher_candidates(alphas: list[float], betas: list[float]) -> list[tuple[float, float]]:
    """(α, β) of every candidate decoder, in the given order: β only matters where α > 0."""
    out: list[tuple[float, float]] = []
    for a in alphas:
        for b in (betas if a > 0 else [0.0]):
            if (a, b) not in out:
                out.append((a, b))
    return out


def datastore_stage(job: AdaptRun) -> None:
    """1. Keys, index and kNN targets of the training corpus, in ``RUN/datastore``."""
    s, book, inputs = job.s, job.book, job.inputs["datastore"]
    done, changed = book.begin("datastore", inputs, f"keys, index and kNN targets of {s.corpus}"
                               + (f" (first {s.train_tokens} tokens)" if s.train_tokens else ""))
    if not done:
        keys_identity = lambda d: {k: v for k, v in d.items() if k not in ("k", "knn_temp")}  # noqa: E731
        if changed and keys_identity(book.recorded_inputs("datastore")) != keys_identity(inputs):
            remove(job.datastore)  # other keys: nothing to reuse (a k/T change reuses keys and index)

        def work() -> dict:
            build_datastore(DatastoreConfig(model=s.model, corpus=s.corpus, out=str(job.datastore), k=s.k,
                                            knn_temp=s.knn_temp, block_size=s.ds_block_size, stride=s.ds_stride,
                                            max_tokens=s.train_tokens, device=job.device, text_field=s.text_field))
            return {"describe": describe(job.datastore)}

        book.run("datastore", inputs, work)
    say(book.summary("datastore").get("describe", ""))


def train_config(job: AdaptRun) -> TrainConfig:
    """The memory decoder's TrainConfig (its first teacher candidate); the baselines share its budget:
    every option of the train stage that TrainConfig has, under its fingerprint key (``block_size``)."""
    s, names = job.s, {f.name for f in dataclasses.fields(TrainConfig)}
    own = {k: v for k, v in stage_fields(s.train, omit=False).items() if k in names and k != "teacher_base_weight"}
    return TrainConfig(**{**own, "alpha": s.alpha[0]}, datastore=str(job.datastore), out=str(job.ckpt), valid=s.valid,
                       valid_max_tokens=s.valid_tokens, save_every=s.eval_every, device=job.device, warmup=2,
                       keep_trainer_state=job.keep_trainer_state)


def train_stage(job: AdaptRun) -> TrainConfig:
    """2. One memory decoder per teacher candidate (α, β); the best on --valid becomes ``RUN/memdec``.
    Returns the chosen candidate's TrainConfig."""
    s, book = job.s, job.book
    names = [candidate_name(a, b) for a, b in teacher_candidates(s.alpha, s.teacher_base_weight)]
    names += [two_phase_name(a) for a in s.two_phase]
    init = f"{s.init_layers} blocks" if s.init_layers else (s.init or (
        "full copy of the base" if full_model_decoder(s.decoder) else f"decoder {s.decoder} of the base"))
    if s.transfer_from is not None:
        length = (f"{s.transfer_budget:g} of its training tokens" if s.transfer_budget is not None
                  else f"{s.max_steps} steps")
        init = f"transferred from {s.transfer_from}, {s.transfer_init} rows, {length}"
    labels = " or ".join(candidate_label(n) for n in names)
    done, changed = book.begin("train", job.inputs["train"], f"memory decoder ({labels}, chosen on {s.valid}; {init})")
    if not done:
        if changed:
            remove(job.ckpt, job.run / "candidates")
        book.run("train", job.inputs["train"], lambda: train_candidates(job))
    return dataclasses.replace(train_config(job), alpha=book.summary("train").get("chosen_alpha", s.alpha[0]))


def train_candidates(job: AdaptRun) -> dict:
    """Train each candidate on the same data and schedule (within --train-budget), link the best on
    --valid as ``RUN/memdec``; returns the stage's summary."""
    s, base_cfg = job.s, train_config(job)
    teachers = teacher_candidates(s.alpha, s.teacher_base_weight)
    several = len(teachers) + len(s.two_phase) > 1
    scores, seconds, skipped, t0 = {}, {}, [], time.perf_counter()
    spent = lambda: scores and s.train_budget is not None and time.perf_counter() - t0 > s.train_budget  # noqa: E731
    for alpha, beta in teachers:
        name = candidate_name(alpha, beta)
        if spent():
            skipped.append(name)
            continue
        out = job.run / "candidates" / name if several else job.ckpt
        cfg = dataclasses.replace(base_cfg, alpha=alpha, teacher_base_weight=beta, out=str(out))
        if s.transfer_from is not None:
            transfer(TransferConfig(source=s.transfer_from, model=s.model, train=cfg, new_rows=s.transfer_init,
                                    budget=s.transfer_budget))
        else:
            train(cfg)
        info = read_memdec_json(out)
        scores[name], seconds[name] = info["train_stats"].get("best_ppl", math.inf), info.get("train_seconds")
    phase_one = None  # (its folder, the steps left for phase two): trained once, before the first two-phase candidate
    for alpha in s.two_phase:
        name = two_phase_name(alpha)
        if spent():
            skipped.append(name)
            continue
        out = job.run / "candidates" / name if several else job.ckpt
        phase_one = phase_one or train_phase_one(job, base_cfg)
        seconds[name] = train_phase_two(base_cfg, alpha, out, *phase_one)
        scores[name] = read_memdec_json(out)["train_stats"].get("best_ppl", math.inf)
    if skipped:
        say(f"training budget of {s.train_budget:g} s spent: skipped {', '.join(candidate_label(n) for n in skipped)}")
    chosen = min(scores, key=scores.get)
    if several:
        remove(job.ckpt)
        job.ckpt.symlink_to(Path("candidates") / chosen, target_is_directory=True)
    info = read_memdec_json(job.ckpt)
    return {"lambda": info["lambda"], "train_stats": info["train_stats"], "chosen": chosen,
            "chosen_alpha": info["alpha"], "chosen_teacher_base_weight": info.get("teacher_base_weight", 0.0),
            "valid_joint_ppl": scores, "train_seconds": seconds, "skipped": skipped}


PRUNED = "weights_removed"  # memdec.json of a candidate whose weights prune_candidates removed


def keeps_candidates(job: AdaptRun, asked: bool | None) -> bool:
    """Whether this call keeps every candidate's weights: ``asked`` (--keep-candidates, or
    --no-keep-candidates), else what an earlier call of this run asked (the train stage's summary
    records it), so that weights a user asked to keep are removed only when asked. Says in one line
    when an earlier call's choice holds, and which weights an earlier call removed (they cannot come
    back without training again); both are recorded for the report."""
    earlier = job.book.summary("train").get("keep_candidates")
    keep = bool(earlier) if asked is None else asked
    if asked is None and earlier:
        say("candidates: keeping every candidate's weights, as an earlier call of this run asked (--keep-candidates); "
             "--no-keep-candidates removes them")
    folder, removed = job.run / "candidates", []
    if keep and folder.is_dir():
        removed = [c.name for c in sorted(folder.iterdir()) if (c / MEMDEC_JSON).is_file() and not c.is_symlink()
                   and read_memdec_json(c).get(PRUNED)]
        if removed:
            say(f"candidates: the weights of {', '.join(candidate_label(n) for n in removed)} were removed by an "
                 f"earlier call without --keep-candidates; --keep-candidates cannot bring them back (only training "
                 f"them again can: another train stage)")
    if job.book.is_done("train", job.inputs["train"]):
        job.book.note("train", keep_candidates=keep, weights_removed=removed)
    return keep


def prune_candidates(job: AdaptRun) -> None:
    """Remove the weights (every file but ``memdec.json``, ``log.jsonl`` and the marker, and ``trainer_state/``) of
    each candidate decoder but the chosen one (``RUN/memdec``) and one a baseline reuses (the ce-decoder's
    α=0 candidate, whose files are hard links of the baseline's); their metrics stay for the report, and
    their ``memdec.json`` says that the weights are gone."""
    folder = job.run / "candidates"
    if not folder.is_dir():
        return
    keep = {job.ckpt.resolve()}  # the chosen one, and any a baseline reuses (hard links: removing frees nothing)
    keep |= {(job.run / r).resolve() for m in methods() if (r := job.book.summary(m.name).get("reused_from"))}
    for candidate in sorted(folder.iterdir()):
        if not candidate.is_dir() or candidate.resolve() in keep or not (candidate / MEMDEC_JSON).is_file():
            continue
        info = read_memdec_json(candidate)
        if info.get(PRUNED):
            continue
        write_memdec_json(candidate, {**info, PRUNED: "memdec adapt kept only the chosen candidate (--keep-candidates "
                                                      "keeps every one)"})  # first: never a weightless checkpoint
        for p in candidate.iterdir():
            if p.name not in (MEMDEC_JSON, "log.jsonl", OWN_MARKER):
                if p.is_dir() and not p.is_symlink():
                    shutil.rmtree(p)
                else:
                    p.unlink()
        say(f"removed the weights of candidate {candidate_label(candidate.name)} (not chosen)")


def train_phase_one(job: AdaptRun, base_cfg: TrainConfig) -> tuple[Path, int]:
    """The first phase of the two-phase candidates, shared by all of them: cross-entropy for the first
    half of the CE-only candidate's steps, in ``RUN/candidates/two-phase-ce``. Returns its folder and
    the steps left for phase two."""
    total = planned_steps(base_cfg, read_manifest(job.datastore).n_keys)
    if total < 2:
        raise MemdecError(f"--two-phase splits the steps in two, but the run has {total} step; "
                          f"raise --epochs or --max-steps")
    first = job.run / "candidates" / PHASE_ONE
    train(dataclasses.replace(base_cfg, alpha=0.0, teacher_base_weight=0.0, max_steps=total // 2, out=str(first)))
    return first, total - total // 2


def train_phase_two(base_cfg: TrainConfig, alpha: float, out: Path, first: Path, steps: int) -> float | None:
    """A two-phase candidate's second phase: ``alpha`` for ``steps`` from phase one's best checkpoint
    ``first``, with a fresh optimizer and schedule. Returns both phases' seconds."""
    train(dataclasses.replace(base_cfg, alpha=alpha, teacher_base_weight=0.0, init=str(first), init_layers=None,
                              max_steps=steps, out=str(out)))
    phases = [read_memdec_json(p).get("train_seconds") for p in (first, out)]
    return None if None in phases else round(sum(phases), 1)
