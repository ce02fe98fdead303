"""Generation: the worker thread (``Engine``) takes batches from the scheduler and runs one ``generate()``
call per batch (an ``auto`` batch routed job by job first); ``StepHook``, a stopping criterion called after
each token, appends each row's token, stops rows one by one (EOS, stop strings, ``max_tokens``, a client that
left) and streams text or answers jobs as their rows finish.
"""

import hashlib
import threading
import warnings
from typing import Any

import torch
from transformers import LogitsProcessor, LogitsProcessorList, StoppingCriteria, StoppingCriteriaList

from .config import AUTO
from .models import Models, left_pad
from .requests import ApiError
from .scheduler import Job, Row, Scheduler


def safe_end(text: str, stops: list[str]) -> int:
    """How much of a growing text can be streamed: not a trailing partial character, nor a
    suffix that could begin a stop string."""
    end = len(text)
    while end > 0 and text[end - 1] == "\ufffd":
        end -= 1
    hold = 0
    for s in stops:
        for k in range(min(len(s) - 1, len(text)), hold, -1):
            if text.endswith(s[:k]):
                hold = k
                break
    return min(end, len(text) - hold)


class LogprobRecorder(LogitsProcessor):
    """A logits processor (placed before the sampling warpers) that keeps the step's log-probs."""

    def __init__(self, active: bool):
        self.active = active
        self.last: torch.Tensor | None = None

    def __call__(self, input_ids: torch.Tensor, scores: torch.Tensor) -> torch.Tensor:
        if self.active:
            self.last = torch.log_softmax(scores.float(), dim=-1)
        return scores


class StepHook(StoppingCriteria):
    """A stopping criterion that generate() calls after each new token: it appends each row's token,
    stops rows one by one, and streams text or answers jobs as their rows finish."""

    def __init__(self, batch: list[tuple[Job, list[Row]]], models: Models):
        self.jobs, self.models = [job for job, _ in batch], models
        self.pairs = [(row, job) for job, rows in batch for row in rows]
        self.recorder = LogprobRecorder(any(job.req.logprobs is not None for job in self.jobs))

    def __call__(self, input_ids: torch.Tensor, scores, **kwargs) -> torch.Tensor:
        new = input_ids[:, -1].tolist()
        lp = self.recorder.last
        for i, (row, job) in enumerate(self.pairs):
            if row.finish is not None:
                continue
            if job.cancelled:
                row.finish = "cancelled"
                continue
            want = job.req.logprobs
            self.push(row, new[i], job.req.stop, None if want is None or lp is None else (lp[i], want))
        for job in self.jobs:
            self.report(job)
        return torch.tensor([row.finish is not None for row, _ in self.pairs], dtype=torch.bool,
                            device=input_ids.device)

    def push(self, row: Row, token: int, stops: list[str], logprobs) -> None:
        row.ids.append(token)
        if token in self.models.eos_ids:
            row.finish = "stop"
            return
        before = len(row.text)
        text = self.models.decode(row.ids)
        if logprobs is not None:
            row.logprobs.append(self.logprob_entry(token, before, *logprobs))
        cuts = [i for i in (text.find(s) for s in stops) if i >= 0]
        if cuts:
            text, row.finish = text[: min(cuts)], "stop"
        row.text = text
        if row.finish is None and len(row.ids) >= row.max_tokens:
            row.finish = "length"

    def logprob_entry(self, token: int, offset: int, lp: torch.Tensor, k: int) -> tuple[str, float, dict, int]:
        top = {}
        if k > 0:
            values, ids = lp.topk(k)
            for v, t in zip(values.tolist(), ids.tolist()):
                top.setdefault(self.models.decode([t]), v)
        return self.models.decode([token]), float(lp[token]), top, offset

    def report(self, job: Job) -> None:
        if job.done:
            return
        all_done = job.done = all(row.finish is not None for row in job.rows)  # set before the handler hears it
        if job.req.stream:
            updates = [u for row in job.rows if (u := stream_update(row, job.req.stop)) is not None]
            if updates or all_done:
                job.emit(("done" if all_done else "delta", updates))
        elif all_done:
            job.emit(("done", []))

    def finish(self) -> None:
        """After generate() returns: rows it ended without our say-so ran out of tokens."""
        for row, _ in self.pairs:
            if row.finish is None:
                row.finish = "length"
        for job in self.jobs:
            self.report(job)


def stream_update(row: Row, stops: list[str]) -> tuple[int, str, list, str | None] | None:
    """(choice index, new text, new logprob entries, finish reason or None), or None if nothing is new."""
    end = len(row.text) if row.finish is not None else max(row.sent, safe_end(row.text, stops))
    delta = row.text[row.sent:end]
    entries = [e for e in row.logprobs[row.lp_sent:] if e[3] < end]
    finish = row.finish if row.finish is not None and not row.finish_sent else None
    if not delta and not entries and finish is None:
        return None
    row.sent, row.lp_sent = end, row.lp_sent + len(entries)
    row.finish_sent = row.finish_sent or finish is not None
    return row.index, delta, entries, finish


class Engine:
    """The worker thread: takes batches from the scheduler and runs generate() on them."""

    def __init__(self, models: Models, scheduler: Scheduler):
        self.models, self.scheduler = models, scheduler
        self.current: list[Job] = []
        self.thread = threading.Thread(target=self._loop, name="memdec-generate", daemon=True)

    def start(self) -> None:
        self.thread.start()

    def stop(self, timeout: float = 30.0) -> None:
        """Fail the waiting jobs, cancel the running ones, and wait for the worker to end."""
        for job in self.scheduler.close():
            job.done = True  # answered: not a cancellation
            job.emit(("error", ApiError(503, "the server is shutting down", "server_error", code="shutting_down")))
        for job in list(self.current):
            job.cancelled = True
        self.thread.join(timeout)

    def _loop(self) -> None:
        while (batch := self.scheduler.next_batch()) is not None:
            batch = [(job, rows) for job, rows in batch if not job.cancelled]
            if not batch:
                continue
            self.current = [job for job, _ in batch]
            self.scheduler.stats["running"] = sum(len(rows) for _, rows in batch)
            try:
                self.run(batch)
            except Exception as exc:  # noqa: BLE001 - one failed batch must not stop the server
                for job in self.current:
                    if not job.done:
                        job.done = True
                        job.emit(("error", ApiError(500, f"generation failed: {type(exc).__name__}: {exc}",
                                                    "server_error")))
            finally:
                self.current = []
                self.scheduler.stats["running"] = 0

    def run(self, batch: list[tuple[Job, list[Row]]]) -> None:
        """One generate() call for the rows of ``batch`` (jobs that share one batch key, and their rows); an
        ``auto`` batch is routed job by job first, then runs one call per chosen model."""
        req = batch[0][0].req
        if req.target != AUTO:
            return self.generate(batch, req.target, req.lmbda)
        groups: dict[str, list[tuple[Job, list[Row]]]] = {}
        for job, rows in batch:
            if job.domain is None:  # a job of more than --max-batch rows keeps its first batch's choice
                with torch.inference_mode():
                    job.domain = self.models.route(job.req.prompts)
            groups.setdefault(job.domain, []).append((job, rows))
        for target, part in groups.items():
            self.generate(part, target, None)

    def generate(self, batch: list[tuple[Job, list[Row]]], target: str, lmbda: float | None) -> None:
        """One generate() call of ``target`` at ``lmbda`` for the rows of ``batch``."""
        req = batch[0][0].req
        hook = StepHook(batch, self.models)
        rows = [row for row, _ in hook.pairs]
        ids, mask = left_pad([row.prompt for row in rows], self.models.pad_id, self.models.device)
        kw: dict[str, Any] = {"do_sample": False}
        if req.sampling:
            kw = {"do_sample": True, "temperature": req.temperature, "top_p": req.top_p, "top_k": 0}
            if req.seed is not None:  # a seeded job runs alone
                torch.manual_seed(batch_seed(req.seed, rows[0].index))
        model = self.models.runner(target, lmbda)
        with torch.inference_mode(), warnings.catch_warnings():
            warnings.simplefilter("ignore")
            model.generate(input_ids=ids, attention_mask=mask, max_new_tokens=max(r.max_tokens for r in rows),
                           pad_token_id=self.models.pad_id, logits_processor=LogitsProcessorList([hook.recorder]),
                           stopping_criteria=StoppingCriteriaList([hook]), **kw)
        hook.finish()


def batch_seed(seed: int, first_row: int) -> int:
    """The torch seed of a seeded request's batch that starts at row ``first_row``: the request's seed for its
    first batch; for a later one (more rows than --max-batch) a hash of both, so that no batch repeats another."""
    if first_row == 0:
        return seed
    return int.from_bytes(hashlib.sha256(f"{seed}:{first_row}".encode()).digest()[:8], "little")
