"""One model, many clients: a bounded queue of jobs run one at a time on a worker thread, each with its own
progress and its own cancel switch.

Why one worker: a diffusers pipeline and stylegrad's tuning are not safe to run twice at once on the same weights,
and on one GPU (or two CPU cores) two jobs at once are no faster than one after the other. Why bounded: a client
that floods the server gets a clear 429 at once instead of everyone waiting minutes."""

from __future__ import annotations

import itertools
import queue
import threading
import time
import uuid
from collections import OrderedDict
from collections.abc import Callable
from concurrent.futures import Future
from dataclasses import dataclass, field


class QueueFull(Exception):
    """The queue holds as many jobs as it may: come back later (HTTP 429)."""


class ShuttingDown(Exception):
    """The server is stopping and takes no more jobs (HTTP 503)."""


class Cancelled(Exception):
    """The job was cancelled (``/interrupt``, or its own cancel)."""


@dataclass
class Job:
    """One request's work: ``run(job)`` on the worker thread; ``job.step(...)`` reports progress and is where a
    cancel takes effect."""

    run: Callable[[Job], object]
    id: str = field(default_factory=lambda: uuid.uuid4().hex)
    kind: str = "generate"
    future: Future = field(default_factory=Future)
    cancel_event: threading.Event = field(default_factory=threading.Event)
    stage: str = "queued"
    done_steps: int = 0
    total_steps: int = 0
    started: float | None = None
    number: int = 0  # order of arrival

    def step(self, stage: str, done: int, total: int) -> None:
        """Progress from inside the job (styles' Adam steps, denoising steps); raises ``Cancelled`` once cancelled."""
        self.stage, self.done_steps, self.total_steps = stage, done, total
        if self.cancel_event.is_set():
            raise Cancelled(f"job {self.id} was cancelled")

    def cancel(self) -> None:
        self.cancel_event.set()

    @property
    def progress(self) -> float:
        if self.future.done():
            return 1.0
        return self.done_steps / self.total_steps if self.total_steps else 0.0

    def snapshot(self) -> dict:
        elapsed = time.monotonic() - self.started if self.started else 0.0
        p = self.progress
        return {"id": self.id, "kind": self.kind, "stage": "done" if self.future.done() else self.stage,
                "progress": p, "step": self.done_steps, "steps": self.total_steps,
                "eta_seconds": elapsed * (1 - p) / p if 0 < p < 1 else 0.0,
                "cancelled": self.cancel_event.is_set()}


class JobQueue:
    """``submit`` a job, await its future. At most ``max_waiting`` jobs wait besides the one running."""

    def __init__(self, max_waiting: int = 16, keep: int = 256):
        self.max_waiting = max_waiting
        self._queue: queue.Queue[Job | None] = queue.Queue()
        self._lock = threading.Lock()
        self._waiting = 0
        self._closed = False
        self._numbers = itertools.count(1)
        self.current: Job | None = None
        self.jobs: OrderedDict[str, Job] = OrderedDict()  # recent jobs by id, for progress and cancel
        self._keep = keep
        self._thread = threading.Thread(target=self._work, name="stylegrad-worker", daemon=True)
        self._thread.start()

    def submit(self, run: Callable[[Job], object], kind: str = "generate", job_id: str | None = None) -> Job:
        job = Job(run, kind=kind, **({"id": job_id} if job_id else {}))
        with self._lock:
            if self._closed:
                raise ShuttingDown("the server is shutting down")
            if self._waiting >= self.max_waiting:
                raise QueueFull(f"{self._waiting} requests are already waiting (the limit is {self.max_waiting})")
            if job.id in self.jobs and not self.jobs[job.id].future.done():
                raise ValueError(f"a job with id {job.id!r} is still running")
            self._waiting += 1
            job.number = next(self._numbers)
            self.jobs[job.id] = job
            self.jobs.move_to_end(job.id)
            while len(self.jobs) > self._keep:
                oldest = next(iter(self.jobs.values()))
                if not oldest.future.done():
                    break
                self.jobs.popitem(last=False)
        self._queue.put(job)
        return job

    @property
    def waiting(self) -> int:
        return self._waiting

    def _work(self) -> None:
        while True:
            job = self._queue.get()
            if job is None:
                return
            with self._lock:
                self._waiting -= 1
                self.current = job
            if job.cancel_event.is_set():
                job.future.set_exception(Cancelled(f"job {job.id} was cancelled before it started"))
            elif job.future.set_running_or_notify_cancel():
                job.started, job.stage = time.monotonic(), "starting"
                try:
                    job.future.set_result(job.run(job))
                except BaseException as e:  # noqa: BLE001 - handed to the request that waits on it
                    job.future.set_exception(e)
            with self._lock:
                self.current = None

    def cancel_all(self) -> int:
        """Cancel the running job and every waiting one (A1111's /interrupt stops the current one only)."""
        n = 0
        for job in list(self.jobs.values()):
            if not job.future.done():
                job.cancel()
                n += 1
        return n

    def close(self, timeout: float = 5.0) -> None:
        with self._lock:
            self._closed = True
        for job in list(self.jobs.values()):
            if not job.future.done():
                job.cancel()
        self._queue.put(None)
        self._thread.join(timeout)
