"""What the small world lets us measure: does the small CLIP recognize scenes, and does a style change the
pictures while the prompt survives (the paper's claim)?"""

from __future__ import annotations

import statistics
from dataclasses import dataclass, replace

import torch
import torch.nn.functional as F

from stylegrad.aesthetic.encoder import AestheticEncoder
from stylegrad.aesthetic.options import StyleOptions
from stylegrad.evaluation.metrics import ClipEmbedder, style_similarity
from stylegrad.files.styles import Style
from stylegrad.pipelines.request import GenerationRequest
from stylegrad.pipelines.run import run_pipeline

from . import STEPS
from .data import caption_facts, class_captions

PROMPTS = ("a red circle", "a blue square", "a yellow triangle", "a green cross",
           "a green circle", "a yellow square", "a red triangle", "a blue cross")  # every color and shape twice
DEMO_LR = 3e-5  # higher rates push the world's 64-wide text states off the UNet's data (docs/world.md)
DENOISE = GenerationRequest(prompt="", steps=20, cfg=3.0, width=32, height=32)  # cfg: docs/world.md


def zero_shot(embedder: ClipEmbedder, images, captions: list[str] | None = None) -> list[str]:
    """The caption (of ``captions``, default every color x shape) each image matches best."""
    captions = captions or class_captions()
    text = F.normalize(embedder.texts(captions), dim=-1)
    img = F.normalize(embedder.images(list(images)), dim=-1)
    return [captions[i] for i in (img @ text.T).argmax(1).tolist()]


def split_caption(caption: str) -> tuple[str, str]:
    """'a red circle' -> ('red', 'circle')."""
    facts = caption_facts(caption)
    return facts["color"], facts["shape"]


@dataclass
class Row:
    steps: int
    style_similarity: float
    shape_accuracy: float
    color_accuracy: float
    images: list
    recognized: list  # (color, shape) the probe saw in each image
    wanted: list  # (color, shape) each prompt asked for

    @property
    def accuracy(self) -> float:
        """Share of images whose color and shape were both recognized as asked."""
        return statistics.fmean(g == w for g, w in zip(self.recognized, self.wanted))


def measure_effect(pipe, encoder: AestheticEncoder, embedder: ClipEmbedder, style: Style | None,
                   prompts=PROMPTS, seeds=range(4), steps=STEPS,
                   options: StyleOptions = StyleOptions(lr=DEMO_LR), settings: GenerationRequest = DENOISE) -> list[Row]:
    """Style similarity and prompt fidelity (zero-shot shape and color) of generated images, per steps.
    With ``style=None`` only steps 0 makes sense and style similarity is NaN."""
    rows = []
    for k in steps:
        images, wanted = [], []
        for prompt in prompts:
            pe, ne = encoder.encode(prompt, style if k else None, replace(options, steps=k))
            for seed in seeds:
                images.append(run_pipeline(pipe, pe, ne, replace(settings, prompt=prompt, seed=seed)))
                wanted.append(split_caption(prompt))
        got = [split_caption(c) for c in zero_shot(embedder, images)]
        sims = (style_similarity(embedder.images(images), style.direction) if style is not None
                else torch.tensor([float("nan")]))
        rows.append(Row(
            steps=k,
            style_similarity=float(sims.mean()),
            shape_accuracy=statistics.fmean(g[1] == w[1] for g, w in zip(got, wanted)),
            color_accuracy=statistics.fmean(g[0] == w[0] for g, w in zip(got, wanted)),
            images=images,
            recognized=got,
            wanted=wanted,
        ))
    return rows
