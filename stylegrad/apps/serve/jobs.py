"""One model, many clients: a bounded queue of jobs run one at a time on a worker thread, each with its own
progress and its own cancel switch.

Why one worker: a diffusers pipeline and stylegrad's tuning are not safe to run twice at once on the same weights,
and on one GPU (or two CPU cores) two jobs at once are no faster than one after the other. Why bounded: a client
that floods the server gets a clear 429 at once instead of everyone waiting minutes."""

from __future__ import annotations

import asyncio
import collections
import itertools
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
    """The job was cancelled (``/v1/cancel``): it fails (HTTP 409)."""


class TaskIdInUse(Exception):
    """A client's own job id names a job that has not finished (HTTP 409, naming ``field``)."""

    def __init__(self, job_id: str, field: str = "task_id"):
        self.job_id, self.field = job_id, field
        super().__init__(f"{field} {job_id!r} names a job that has not finished; use another id")


@dataclass
class Job:
    """One request's work: ``run(job)`` on the worker thread; ``job.step(...)`` reports progress and is where a
    cancel or an interrupt takes effect. A cancel fails the job; an interrupt (A1111's) ends its denoising at the
    next step and the job answers with the image so far, as A1111 does."""

    run: Callable[[Job], object]
    id: str = field(default_factory=lambda: uuid.uuid4().hex)
    kind: str = "generate"
    future: Future = field(default_factory=Future)
    cancel_event: threading.Event = field(default_factory=threading.Event)
    interrupted: bool = False
    skip_pending: bool = False  # A1111's skip: the image being denoised ends, the next one starts
    stage: str = "queued"
    done_steps: int = 0
    total_steps: int = 0
    started: float | None = None
    number: int = 0  # order of arrival
    # jobs with the same key may run as one batch: ``run_batch(jobs)`` gives a result (or an exception) per job
    batch_key: object = None
    run_batch: Callable[[list[Job]], list] | None = None

    def step(self, stage: str, done: int, total: int) -> bool | str:
        """Progress from inside the job (styles' Adam steps, denoising steps): raises ``Cancelled`` once cancelled;
        True once interrupted (``pipelines.run.Progress``: stop early, keep what is made)."""
        self.stage, self.done_steps, self.total_steps = stage, done, total
        if self.cancel_event.is_set():
            raise Cancelled(f"job {self.id} was cancelled")
        if self.skip_pending and stage == "denoising" and not self.interrupted:
            self.skip_pending = False
            return "skip"  # pipelines.run.SKIP (a plain string: this module stays free of torch)
        return self.interrupted

    def cancel(self) -> None:
        self.cancel_event.set()

    def interrupt(self) -> None:
        self.interrupted = True

    def skip(self) -> None:
        """A1111's skip: the image being denoised is cut short (kept as it is) and the job goes on with its next."""
        self.skip_pending = True

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
                "cancelled": self.cancel_event.is_set(), "interrupted": self.interrupted}


class JobQueue:
    """``submit`` a job, await its future. At most ``max_waiting`` jobs wait besides the one running. With
    ``max_batch`` > 1, waiting jobs with the running job's ``batch_key`` join it, up to ``max_batch`` in all, and run
    as one (a model runs a batch of images in much less than the time of each alone)."""

    def __init__(self, max_waiting: int = 16, keep: int = 256, max_batch: int = 1):
        self.max_waiting, self.max_batch = max_waiting, max_batch
        self._items: collections.deque[Job] = collections.deque()
        self._lock = threading.Lock()
        self._ready = threading.Condition(self._lock)
        self.batch_sizes: list[int] = []  # of every run, for tests and logs
        self._waiting = 0
        self._closed = False
        self._numbers = itertools.count(1)
        self.current: Job | None = None
        self.jobs: OrderedDict[str, Job] = OrderedDict()  # recent jobs by id, for progress and cancel
        self._keep = keep
        self._thread = threading.Thread(target=self._work, name="stylegrad-worker", daemon=True)
        self._thread.start()

    def submit(self, run: Callable[[Job], object], kind: str = "generate", job_id: str | None = None,
               batch_key: object = None, run_batch: Callable[[list[Job]], list] | None = None) -> Job:
        job = Job(run, kind=kind, batch_key=batch_key, run_batch=run_batch, **({"id": job_id} if job_id else {}))
        with self._lock:
            if self._closed:
                raise ShuttingDown("the server is shutting down")
            if self._waiting >= self.max_waiting:
                raise QueueFull(f"{self._waiting} requests are already waiting (the limit is {self.max_waiting})")
            if job.id in self.jobs and not self.jobs[job.id].future.done():
                raise TaskIdInUse(job.id)
            self._waiting += 1
            job.number = next(self._numbers)
            self.jobs[job.id] = job
            self.jobs.move_to_end(job.id)
            while len(self.jobs) > self._keep:
                oldest = next(iter(self.jobs.values()))
                if not oldest.future.done():
                    break
                self.jobs.popitem(last=False)
            self._items.append(job)
            self._ready.notify()
        return job

    @property
    def waiting(self) -> int:
        return self._waiting

    def _take(self) -> list[Job] | None:
        """The next job, with the waiting jobs that may run in one batch with it; None once closed."""
        with self._ready:
            while not self._items and not self._closed:
                self._ready.wait()
            if not self._items:
                return None
            job = self._items.popleft()
            batch = [job]
            if job.batch_key is not None and job.run_batch is not None and self.max_batch > 1:
                for other in list(self._items):
                    if len(batch) >= self.max_batch:
                        break
                    if other.batch_key == job.batch_key and not other.cancel_event.is_set():
                        self._items.remove(other)
                        batch.append(other)
            self._waiting -= len(batch)
            self.current = job
            return batch

    def _work(self) -> None:
        while (batch := self._take()) is not None:
            live = []
            for job in batch:
                if job.cancel_event.is_set():
                    job.future.set_exception(Cancelled(f"job {job.id} was cancelled before it started"))
                elif job.future.set_running_or_notify_cancel():
                    job.started, job.stage = time.monotonic(), "starting"
                    live.append(job)
            if live:
                self.batch_sizes.append(len(live))
            if len(live) == 1:
                job = live[0]
                try:
                    job.future.set_result(job.run(job))
                except BaseException as e:  # noqa: BLE001 - handed to the request that waits on it
                    job.future.set_exception(e)
            elif live:
                try:
                    results = live[0].run_batch(live)
                except BaseException as e:  # noqa: BLE001
                    results = [e] * len(live)
                for job, result in zip(live, results):
                    if job.cancel_event.is_set():
                        job.future.set_exception(Cancelled(f"job {job.id} was cancelled"))
                    elif isinstance(result, BaseException):
                        job.future.set_exception(result)
                    else:
                        job.future.set_result(result)
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
        with self._ready:
            self._closed = True
            waiting = list(self._items)
            self._items.clear()
            self._ready.notify_all()
        for job in waiting:
            job.future.set_exception(ShuttingDown("the server is shutting down"))
        if self.current is not None:
            self.current.cancel()
        self._thread.join(timeout)


async def wait(job: Job):
    """The job's result, without holding the event loop (other clients, progress polls) while it runs."""
    return await asyncio.wrap_future(job.future)
