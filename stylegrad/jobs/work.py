"""One unit of batch work: a request and the file it writes. Shared by the local runner and the Ray runner, so
both make the same bytes from the same request."""

from __future__ import annotations

import hashlib
import json
from dataclasses import dataclass, field

from stylegrad.errors import describe as one_line  # noqa: F401 - the runners' name for the one description
from stylegrad.jobs.records import recorded
from stylegrad.pipelines.request import GenerationRequest


@dataclass(frozen=True)
class WorkItem:
    request: GenerationRequest
    file: str  # relative to the output root
    label: str  # how errors name it: 'line 3', 'p001 seed 2'

    @property
    def group(self) -> tuple:
        """What the personalization depends on: items with the same key reuse one tuning (the encoder's cache)."""
        r = self.request
        return (r.prompt, r.negative, r.style, r.style_options.key() if r.styled else None, r.clip_skip, r.loras,
                r.embeddings, r.weighting, r.clip_model)

    @property
    def digest(self) -> str:
        """The request, hashed: a rerun that asks another image for the same file is refused."""
        data = json.dumps(recorded(self.request), sort_keys=True, default=str)
        return hashlib.sha256(data.encode()).hexdigest()[:16]


@dataclass(frozen=True)
class WorkerSpec:
    """What a worker loads once: picklable, so a Ray actor on another node builds the same Generator."""

    model: str
    device: str | None = None
    clip_model: str | None = None
    vae: str | None = None
    models_dir: str | None = None
    embeddings_dirs: tuple[str, ...] | None = None
    loras_dirs: tuple[str, ...] | None = None
    dtype: str | None = None  # auto | fp32 | fp16 | bf16 (stylegrad.devices)

    def load(self):
        from stylegrad.pipelines.generation import Generator

        return Generator.load(self.model, self.device, self.clip_model, vae=self.vae, models_dir=self.models_dir,
                              embeddings_dirs=list(self.embeddings_dirs) if self.embeddings_dirs else None,
                              loras_dirs=list(self.loras_dirs) if self.loras_dirs else None, dtype=self.dtype)


def render(generator, item: WorkItem) -> bytes:
    """The item's PNG with its infotext: the same bytes wherever it runs."""
    from stylegrad.files.pnginfo import png_bytes

    ((image, text),) = generator.images(item.request, progress=lambda *a: None)  # the batch has one bar
    return png_bytes(image, text)


@dataclass
class Summary:
    """What a run did: images made now, already there, retried after a worker died, failed (with the reason)."""

    done: int = 0
    already: int = 0
    retried: int = 0
    failed: list[tuple[str, str]] = field(default_factory=list)  # (label, reason)
    cache_hits: int = 0
    styled: int = 0
    workers: int = 1
    seconds: float = 0.0
    startup: float = 0.0  # until every worker had its model loaded

    def as_dict(self) -> dict:
        return {"done": self.done, "already": self.already, "retried": self.retried, "workers": self.workers,
                "failed": [{"job": label, "reason": reason} for label, reason in self.failed],
                "cache_hits": self.cache_hits, "styled": self.styled, "seconds": round(self.seconds, 2),
                "startup_seconds": round(self.startup, 2)}

    def lines(self) -> list[str]:
        out = [f"{self.done} made, {self.already} already there, {self.retried} retried, {len(self.failed)} failed"
               f" ({self.workers} worker{'s' if self.workers != 1 else ''}, {self.seconds:.1f} s)"]
        out += [f"failed: {label}: {reason}" for label, reason in self.failed]
        return out
