"""Custom Diffusion (Kumari et al. 2023, CMU): fine-tune only the key and value projections of the UNet's
cross-attention, the layers that read the text, and nothing else (those in float32, the rest of the UNet in the
run's precision). Saved as those matrices (safetensors, diffusers' module paths); ``apply`` puts them into a UNet
of the same model."""

from __future__ import annotations

from pathlib import Path

import torch
from safetensors.torch import load_file

from stylegrad.training.checkpoint import save_tensors
from stylegrad.training.data import STYLE_TEMPLATES
from stylegrad.training.loop import Method
from stylegrad.training.models import Models, train_float32

DEFAULTS = {"steps": 250, "lr": 1e-5, "batch_size": 1, "grad_accum": 1, "weight_decay": 1e-2}


class CustomDiffusion(Method):
    name = "custom-diffusion"
    templates = STYLE_TEMPLATES

    def __init__(self, models: Models, word: str | None = None):
        self.word = word
        self.weights = {name: p for name, p in models.unet.named_parameters()
                        if ".attn2.to_k." in name or ".attn2.to_v." in name}
        train_float32(self.weights.values())

    def trained(self) -> dict[str, torch.Tensor]:
        return dict(self.weights)

    def export(self, out: str | Path, step: int = 0) -> list[Path]:
        meta = {"method": "custom-diffusion", "step": str(step)}
        return [save_tensors(Path(out).with_suffix(".safetensors"), self.weights, meta)]


@torch.no_grad()
def apply(unet, path: str | Path) -> None:
    """Write a Custom Diffusion file's K/V matrices into ``unet`` (a copy the caller owns)."""
    params = dict(unet.named_parameters())
    for name, t in load_file(str(path)).items():
        params[name].copy_(t)
