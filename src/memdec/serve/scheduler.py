"""Jobs and the queue: a ``Job`` is a request on its way (its ``Row``s: one per prompt and choice); the
``Scheduler`` holds at most ``--max-queue`` waiting jobs (429 beyond) and hands the worker batches of up to
``--max-batch`` rows of jobs that may share one ``generate()`` call (the same batch key).
"""

import asyncio
import contextlib
import threading
import time
import uuid
from collections import deque
from dataclasses import dataclass, field

from .requests import ApiError, GenRequest

BATCH_WINDOW_S = 0.005  # the worker waits this long for compatible requests to join a batch that has room


@dataclass
class Row:
    """One sequence of a batch: one prompt, one of its n choices."""

    index: int
    prompt: list[int]
    max_tokens: int
    ids: list[int] = field(default_factory=list)  # generated, EOS included
    text: str = ""
    finish: str | None = None  # "stop", "length", or "cancelled"
    logprobs: list[tuple[str, float, dict, int]] = field(default_factory=list)  # (token, logprob, top, text offset)
    sent: int = 0  # characters streamed
    lp_sent: int = 0
    finish_sent: bool = False


class Job:
    """A request on its way through the queue and the worker. Events to the handler:
    ("delta", updates), ("done", updates) or ("error", ApiError)."""

    def __init__(self, req: GenRequest, loop: asyncio.AbstractEventLoop):
        self.req, self.loop = req, loop
        self.rows = [Row(p * req.n + j, ids, budget) for p, (ids, budget) in enumerate(zip(req.prompts, req.max_tokens))
                     for j in range(req.n)]
        self.id = ("chatcmpl-" if req.kind == "chat" else "cmpl-") + uuid.uuid4().hex[:24]
        self.created = int(time.time())
        self.key = req.batch_key()
        self.events: asyncio.Queue = asyncio.Queue()
        self.cancelled = False
        self.done = False
        self.next_row = 0  # rows handed to the worker so far: a job of more than --max-batch rows runs in parts
        self.domain: str | None = None  # an ``auto`` job: the id that answered it, once routed

    @property
    def rows_left(self) -> int:
        return len(self.rows) - self.next_row

    def emit(self, event: tuple) -> None:
        """Called from the worker thread."""
        try:
            self.loop.call_soon_threadsafe(self.events.put_nowait, event)
        except RuntimeError:  # the event loop is closed: nobody is listening
            pass


class Scheduler:
    """The bounded queue of waiting jobs, and the batches the worker takes from it (thread-safe)."""

    def __init__(self, max_batch: int, max_queue: int):
        self.max_batch, self.max_queue = max_batch, max_queue
        self._cond = threading.Condition()
        self._pending: deque[Job] = deque()
        self.closed = False
        self.stats = {"requests": 0, "rejected": 0, "cancelled": 0, "batches": 0, "largest_batch": 0, "running": 0}

    def waiting(self) -> int:
        return len(self._pending)

    def submit(self, job: Job) -> None:
        with self._cond:
            if self.closed:
                raise ApiError(503, "the server is shutting down", "server_error", code="shutting_down")
            if len(self._pending) >= self.max_queue:
                self.stats["rejected"] += 1
                raise ApiError(429, f"The server is busy: {self.max_queue} requests are waiting. Retry shortly.",
                               "rate_limit_error", code="rate_limit_exceeded", headers={"Retry-After": "1"})
            self.stats["requests"] += 1
            self._pending.append(job)
            self._cond.notify_all()

    def drop(self, job: Job) -> None:
        """Count a job whose client left, and forget its waiting rows, freeing its place in the queue
        (its running rows stop at the next token)."""
        with self._cond:
            self.stats["cancelled"] += 1
            with contextlib.suppress(ValueError):
                self._pending.remove(job)

    def _compatible_rows(self, key) -> int:
        return sum(j.rows_left for j in self._pending if j.key == key)

    def next_batch(self, window: float = BATCH_WINDOW_S) -> list[tuple[Job, list[Row]]] | None:
        """Rows of the oldest job and of the waiting jobs that may share its generate() call; None once closed."""
        with self._cond:
            while not self._pending and not self.closed:
                self._cond.wait()
            if self.closed:
                return None
            key, deadline = self._pending[0].key, time.monotonic() + window
            while self.max_batch > 1 and self._compatible_rows(key) < self.max_batch and not self.closed:
                left = deadline - time.monotonic()
                if left <= 0:
                    break
                self._cond.wait(left)  # let requests that arrive together join
            if self.closed or not self._pending:
                return None if self.closed else []
            return self._take()

    def _take(self) -> list[tuple[Job, list[Row]]]:
        """Up to --max-batch rows: the oldest job's next rows, then those of waiting jobs with its batch key, in
        order. A job whose rows are not all taken keeps its place in the queue (the oldest runs on next)."""
        key, room, batch = self._pending[0].key, self.max_batch, []
        for job in list(self._pending):
            if room == 0:
                break
            if job.key != key:
                continue
            rows = job.rows[job.next_row: job.next_row + room]
            job.next_row += len(rows)
            room -= len(rows)
            batch.append((job, rows))
            if job.rows_left == 0:
                self._pending.remove(job)
        self.stats["batches"] += 1
        self.stats["largest_batch"] = max(self.stats["largest_batch"], self.max_batch - room)
        return batch

    def close(self) -> list[Job]:
        """Refuse new jobs; return the waiting ones."""
        with self._cond:
            self.closed = True
            left = list(self._pending)
            self._pending.clear()
            self._cond.notify_all()
        return left
