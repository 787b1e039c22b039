"""Full fine-tuning: every UNet weight (and, if asked, the text encoders') trained on the pictures with the plain
diffusion loss, the VAE frozen. It is DreamBooth (dreambooth.py) without the prior-preservation images: nothing
holds the model to what it made before, so it moves the whole model towards the pictures, their style and their
content alike. What it trains is float32 (from the weights as loaded), the frozen parts stay in the run's
precision. Saved as a diffusers folder of the whole pipeline, which ``--model`` (and diffusers'
``from_pretrained``) loads; the trained parts stay float32 there."""

from __future__ import annotations

import shutil
from pathlib import Path

import torch

from stylegrad.errors import StylegradError
from stylegrad.training import dreambooth
from stylegrad.training.data import STYLE_TEMPLATES
from stylegrad.training.loop import Method
from stylegrad.training.models import Models, train_float32

DEFAULTS = {**dreambooth.DEFAULTS, "steps": 1000}  # DreamBooth's learning rate: the same weights move


def check_out(out: str | Path) -> Path:
    """Where a fine-tune may be written (checked before training): a new folder, an empty one, or an earlier
    diffusers folder it replaces; never a file or a folder holding something else."""
    out = Path(out)
    if out.suffix.lower() in (".safetensors", ".ckpt", ".pt", ".bin"):
        raise StylegradError(f"a fine-tune is written as a diffusers folder: give out a folder name, not {out.name}")
    if out.exists() and not (out / "model_index.json").is_file() and (out.is_file() or any(out.iterdir())):
        raise StylegradError(f"{out} exists and is not a diffusers folder; choose another out")
    return out


class FineTune(Method):
    name = "finetune"
    templates = STYLE_TEMPLATES

    def __init__(self, models: Models, word: str | None = None, text_encoder: bool = False):
        self.word, self.models, self.text_encoder = word, models, text_encoder
        self.params = {f"unet.{n}": p for n, p in models.unet.named_parameters()}
        if text_encoder:
            for i, encoder in enumerate(models.text_encoders):
                part = "text_encoder" + (f"_{i + 1}" if i else "")  # the pipeline's component names
                self.params.update({f"{part}.{n}": p for n, p in encoder.named_parameters()})
        train_float32(self.params.values())

    def trained(self) -> dict[str, torch.Tensor]:
        return dict(self.params)

    def describe(self) -> dict:
        return {"word": self.word, "text_encoder": self.text_encoder}

    def export(self, out: str | Path, step: int = 0) -> list[Path]:
        """The pipeline with its trained parts as a diffusers folder ``out``, written whole (a folder renamed into
        place). An existing ``out`` is replaced only when it is a diffusers folder (an earlier export)."""
        out = check_out(out)
        tmp = out.with_name(f".{out.name}.tmp")
        shutil.rmtree(tmp, ignore_errors=True)
        self.models.pipe.save_pretrained(tmp, safe_serialization=True)
        (tmp / "trained_by.txt").write_text(f"stylegrad finetune, {step} steps"
                                             f"{', text encoder' if self.text_encoder else ''}\n", encoding="utf-8")
        if out.exists():
            shutil.rmtree(out)
        tmp.rename(out)
        return [out]
