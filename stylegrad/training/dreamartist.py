"""DreamArtist (Dong et al. 2022, arXiv 2211.11337, "contrastive prompt tuning"): two textual-inversion embeddings
trained together, a positive one for ``WORD`` and a negative one for ``WORD-neg``. Each step asks the UNet for the
noise twice, on the caption and on the same caption with ``WORD-neg`` in place of ``WORD``, and the loss is on
classifier-free guidance's combination ``e_neg + s * (e_pos - e_neg)``: the negative learns what the pictures are
not, so the pair is meant to be used with guidance, ``WORD`` in the prompt and ``WORD-neg`` in the negative prompt
(stylegrad adds the latter itself: pipelines/addons.py).

Defaults are the A1111 extension's (7eu7d7/DreamArtist-sd-webui-extension): s = 3, lr 0.003, batch 1, 3 positive
and 6 negative vectors from the same start (an init word's or the table's mean), the negative jittered by 1e-3 so
the two part. The extension's optional reconstruction and discriminator losses, its EMA and its U-Net training are
not here. The pair is written as two A1111 embedding files, ``NAME.pt`` and ``NAME-neg.pt`` (each with its
``.safetensors`` twin, as the textual-inversion trainer writes)."""

from __future__ import annotations

import re
from pathlib import Path

import torch

from stylegrad.training.loop import Method
from stylegrad.training.models import Models, condition
from stylegrad.training.step import diffusion_loss
from stylegrad.training.textual_inversion import TextualInversion

NEG = "-neg"  # the extension's name for the negative embedding: NAME-neg
DEFAULTS = {"steps": 3000, "lr": 3e-3, "batch_size": 1, "grad_accum": 1, "weight_decay": 1e-2}
GUIDANCE = 3.0  # the extension's default "CFG scale" for training


def negative_caption(caption: str, word: str) -> str:
    """The caption the negative branch reads: ``word`` replaced by ``word-neg`` where it stands as a word."""
    return re.sub(rf"(?<![\w-]){re.escape(word)}(?![\w-])", word + NEG, caption)


class DreamArtist(Method):
    name = "dreamartist"

    def __init__(self, models: Models, word: str, init: str | None = None, vectors: int = 3,
                 negative_vectors: int = 6, guidance: float = GUIDANCE, kind: str = "style", seed: int = 0):
        self.positive = TextualInversion(models, word, init, vectors, kind)
        self.negative = TextualInversion(models, word + NEG, init, negative_vectors, kind)
        g = torch.Generator().manual_seed(seed)
        with torch.no_grad():
            for v in self.negative.vectors:  # (n, H): the extension's jitter, so both branches do not start equal
                v.add_(torch.randn(v.shape, generator=g) * 1e-3)
        self.word, self.templates, self.guidance = word, self.positive.templates, float(guidance)

    def trained(self) -> dict[str, torch.Tensor]:
        return {**{f"positive.{k}": v for k, v in self.positive.trained().items()},
                **{f"negative.{k}": v for k, v in self.negative.trained().items()}}

    def words(self) -> list[dict[str, torch.Tensor]]:
        return [{**p, **n} for p, n in zip(self.positive.words(), self.negative.words())]

    def loss(self, models: Models, captions: list[str], mean: torch.Tensor, std: torch.Tensor,
             generator: torch.Generator, resolution: int | None = None) -> torch.Tensor:
        words = self.words()
        cond = condition(models, captions, words, resolution)
        uncond = condition(models, [negative_caption(c, self.word) for c in captions], words, resolution)
        return diffusion_loss(models.unet, models.scheduler, mean, std, cond, generator, uncond=uncond,
                              guidance=self.guidance)

    def negative_prompt(self) -> str:
        return self.word + NEG

    def describe(self) -> dict:
        return {"token": self.word, "init": self.positive.init, "vectors": self.positive.vectors[0].shape[0],
                "negative_vectors": self.negative.vectors[0].shape[0], "guidance": self.guidance,
                "kind": self.positive.kind}

    def export(self, out: str | Path, step: int = 0) -> list[Path]:
        """``NAME.pt`` and ``NAME-neg.pt`` beside each other (NAME: ``out``'s stem, the word A1111 and stylegrad
        read from a file name), each with its ``.safetensors`` twin."""
        out = Path(out)
        return [*self.positive.export(out, step), *self.negative.export(out.with_name(out.stem + NEG + out.suffix),
                                                                          step)]
