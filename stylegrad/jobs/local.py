"""Run a plan's jobs on this machine, skipping those whose file is already there (files are written atomically,
so a file that exists is complete)."""

from __future__ import annotations

from collections.abc import Callable
from pathlib import Path

from tqdm.auto import tqdm

from stylegrad.jobs.plan import Job


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
