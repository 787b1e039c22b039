"""A batch of images as a plan of jobs, each with the file it writes: what the local runner (and later a Ray
runner) executes, and what a resumed run checks off."""

from __future__ import annotations

import re
from dataclasses import dataclass

NO_STYLE = "no-style"


@dataclass(frozen=True)
class Job:
    prompt_index: int
    prompt: str
    style: str  # style name, or NO_STYLE for steps 0
    steps: int
    seed: int
    file: str  # relative to the output folder


def safe_name(name: str) -> str:
    return re.sub(r"[^A-Za-z0-9_.-]+", "_", name).strip("_") or "style"


def plan(prompts: list[str], styles: list[str], steps: list[int], seeds: list[int]) -> list[Job]:
    """Every (prompt, style, steps, seed) image; steps 0 is one "no style" image that every style shares."""
    jobs = []
    for i, prompt in enumerate(prompts):
        for name in styles:
            for k in steps:
                folder = f"images/{NO_STYLE}" if k == 0 else f"images/{safe_name(name)}/steps{k:03d}"
                for seed in seeds:
                    jobs.append(Job(i, prompt, name, k, seed, f"{folder}/p{i:03d}-seed{seed}.png"))
    return jobs
