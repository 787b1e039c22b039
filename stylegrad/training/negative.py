"""A learned negative embedding: N vectors for a word that goes in the negative prompt, trained over a picture set
with everything else frozen. The positive prompt is each picture's caption (its ``.txt`` file; the empty prompt
without one) and the loss is on classifier-free guidance's prediction ``e_neg + s * (e_caption - e_neg)``, so the
guided sampler's noise estimate, with the word as the negative prompt, matches the pictures' noise. This is what
the methods table calls "null-text inversion" (an unconditional embedding trained for classifier-free guidance),
as a style: written as an A1111 embedding file (``NAME.pt`` and its ``.safetensors`` twin) the user puts in the
negative prompt, with any positive prompt.

It is NOT null-text inversion proper (Mokady et al. 2022, arXiv 2211.09794): that is a per-image editing tool,
which after a DDIM inversion of ONE real picture fits a separate unconditional embedding for every sampling
timestep so that guided sampling reconstructs that picture exactly, for prompt-to-prompt editing. Its embeddings
belong to one picture, one prompt and one sampler schedule and are not a reusable style; stylegrad does not build
it."""

from __future__ import annotations

from pathlib import Path

import torch

from stylegrad.training import textual_inversion
from stylegrad.training.loop import Method
from stylegrad.training.models import Models, condition
from stylegrad.training.step import diffusion_loss
from stylegrad.training.textual_inversion import TextualInversion

DEFAULTS = dict(textual_inversion.DEFAULTS)  # the same vectors, trained the same way
GUIDANCE = 7.5  # the guidance it is trained for: stylegrad's (and diffusers') default CFG scale


class LearnedNegative(Method):
    name = "negative"

    def __init__(self, models: Models, token: str, init: str | None = None, vectors: int = 4,
                 guidance: float = GUIDANCE):
        self.embedding = TextualInversion(models, token, init, vectors)
        self.token, self.guidance = token, float(guidance)
        # word stays None: the captions are the pictures' own, the word only in the negative prompt

    def trained(self) -> dict[str, torch.Tensor]:
        return self.embedding.trained()

    def words(self) -> list[dict[str, torch.Tensor]]:
        return self.embedding.words()

    def loss(self, models: Models, captions: list[str], mean: torch.Tensor, std: torch.Tensor,
             generator: torch.Generator, resolution: int | None = None) -> torch.Tensor:
        words = self.words()
        cond = condition(models, captions, words, resolution)
        uncond = condition(models, [self.token] * len(captions), words, resolution)
        return diffusion_loss(models.unet, models.scheduler, mean, std, cond, generator, uncond=uncond,
                              guidance=self.guidance)

    def negative_prompt(self) -> str:
        return self.token

    def describe(self) -> dict:
        return {"token": self.token, "init": self.embedding.init, "vectors": self.embedding.vectors[0].shape[0],
                "guidance": self.guidance}

    def export(self, out: str | Path, step: int = 0) -> list[Path]:
        """``out`` as A1111's ``.pt`` and a ``.safetensors`` (as the textual-inversion trainer writes)."""
        return self.embedding.export(out, step)
