"""The two trainers users run (``stylegrad train textual-inversion`` / ``lora``): load, read the pictures, train
with the method's defaults unless told otherwise, resume what a stopped run left, write the file."""

from __future__ import annotations

from dataclasses import fields
from pathlib import Path

from stylegrad.training import lora as lora_method
from stylegrad.training import textual_inversion as ti_method
from stylegrad.training.data import read_training_set
from stylegrad.training.loop import TrainSettings, train
from stylegrad.training.models import load_models

SETTING_NAMES = {f.name for f in fields(TrainSettings)}


def _settings(defaults: dict, out: Path, overrides: dict) -> TrainSettings:
    given = {k: v for k, v in overrides.items() if k in SETTING_NAMES and v is not None}
    work = Path(given.pop("work", None) or out.parent / f"{out.stem}-training")
    return TrainSettings(**{**defaults, **given, "work": work})


def train_textual_inversion(images: list[str], out: str | Path, token: str, *, model: str, init: str | None = None,
                            vectors: int = 1, kind: str = "style", device=None, vae: str | None = None,
                            models_dir: str | None = None, resume: bool = True, progress: bool = True,
                            stop_after: int | None = None, **settings) -> list[Path]:
    """An embedding for ``token`` from the pictures: ``out`` as A1111's .pt and .safetensors."""
    out = Path(out)
    s = _settings(ti_method.DEFAULTS, out, settings)
    data = read_training_set(images, s.resolution)  # bad pictures fail before the model loads
    models = load_models(model, device, vae, models_dir)
    method = ti_method.TextualInversion(models, token, init, vectors, kind)
    result = train(method, models, data, s, resume, progress, stop_after)
    return method.export(out, result["step"])


def train_lora(images: list[str], out: str | Path, *, model: str, rank: int = 4, alpha: float | None = None,
               text_encoder: bool = False, word: str | None = None, device=None, vae: str | None = None,
               models_dir: str | None = None, resume: bool = True, progress: bool = True,
               stop_after: int | None = None, **settings) -> list[Path]:
    """A kohya-format LoRA from the pictures (captions from .txt files beside them, else style templates with
    ``word``)."""
    out = Path(out)
    s = _settings(lora_method.DEFAULTS, out, settings)
    data = read_training_set(images, s.resolution)
    models = load_models(model, device, vae, models_dir)
    method = lora_method.LoRA(models, rank, alpha, text_encoder, word, s.seed)
    result = train(method, models, data, s, resume, progress, stop_after)
    return method.export(out, result["step"])
