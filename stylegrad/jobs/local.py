"""Run a plan's jobs (or a batch's work items) on this machine, skipping those whose file is already there (files
are written atomically, so a file that exists is complete)."""

from __future__ import annotations

import time
from collections.abc import Callable
from pathlib import Path

from tqdm.auto import tqdm

from stylegrad.jobs.plan import Job
from stylegrad.jobs.storage import Storage
from stylegrad.jobs.work import Summary, WorkItem, one_line, render


def pending(jobs: list[Job], out: Path) -> list[Job]:
    """Jobs whose file is missing, one per file (several jobs can share a file: the no-style image)."""
    todo, seen = [], set()
    for job in jobs:
        if job.file not in seen and not (out / job.file).exists():
            seen.add(job.file)
            todo.append(job)
    return todo


def run_local(jobs: list[Job], out: Path, run_job: Callable[[Job], None], progress: bool = True,
              desc: str = "images") -> int:
    """Run the missing jobs in order; returns how many ran."""
    for stale in Path(out).glob("images/**/.*.tmp"):  # left by a run killed mid-write
        stale.unlink()
    todo = pending(jobs, Path(out))
    with tqdm(total=len(todo), desc=desc, unit="img", disable=not progress) as bar:
        for job in todo:
            run_job(job)
            bar.update(1)
    return len(todo)


def grouped(items: list[WorkItem]) -> list[WorkItem]:
    """Items with the same personalization next to each other (first-seen order), so each is tuned once."""
    groups: dict[tuple, list[WorkItem]] = {}
    for item in items:
        groups.setdefault(item.group, []).append(item)
    return [item for group in groups.values() for item in group]


def run_items_local(items: list[WorkItem], storage: Storage, generator, progress: bool = True,
                    desc: str = "images") -> Summary:
    """Every item whose file is missing, on this process's ``generator``; a failing item is reported, the others
    still run."""
    storage.clean_partial()
    start = time.perf_counter()
    todo = [item for item in items if not storage.exists(item.file)]
    summary = Summary(already=len(items) - len(todo), workers=1)
    seen: set[tuple] = set()
    with tqdm(total=len(todo), desc=desc, unit="img", disable=not progress) as bar:
        for item in grouped(todo):
            if item.request.styled:
                summary.styled += 1
                summary.cache_hits += item.group in seen
            try:
                storage.write(item.file, render(generator, item))
                summary.done += 1
                seen.add(item.group)
            except Exception as e:  # noqa: BLE001 - one bad job is reported; the rest still run
                summary.failed.append((item.label, one_line(e)))
            bar.update(1)
    summary.seconds = time.perf_counter() - start
    return summary
