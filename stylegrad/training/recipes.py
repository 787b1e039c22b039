"""The two trainers users run (``stylegrad train textual-inversion`` / ``lora``): check the precision and read the
pictures (a bad choice or picture is one line before the model loads), load, train with the method's defaults
unless told otherwise, resume what a stopped run left, write the file."""

from __future__ import annotations

from dataclasses import fields
from pathlib import Path

from stylegrad.training import lora as lora_method
from stylegrad.training import textual_inversion as ti_method
from stylegrad.training.data import TrainingSet, read_training_set
from stylegrad.training.loop import TrainSettings, train
from stylegrad.training.models import Models, load_models
from stylegrad.training.precision import training_precision

SETTING_NAMES = {f.name for f in fields(TrainSettings)}


def _settings(defaults: dict, out: Path, overrides: dict) -> TrainSettings:
    given = {k: v for k, v in overrides.items() if k in SETTING_NAMES and v is not None}
    work = Path(given.pop("work", None) or out.parent / f"{out.stem}-training")
    return TrainSettings(**{**defaults, **given, "work": work})


def _load(images: list[str], s: TrainSettings, model: str, device, dtype, vae: str | None,
          models_dir: str | None) -> tuple[TrainingSet, Models]:
    """The pictures and the models, in that order, after the precision is checked: nothing loads for a bad one."""
    precision = training_precision(device, dtype, s.mixed_precision)
    data = read_training_set(images, s.resolution)
    return data, load_models(model, precision.device, vae, models_dir, precision.weights)


def train_textual_inversion(images: list[str], out: str | Path, token: str, *, model: str, init: str | None = None,
                            vectors: int = 1, kind: str = "style", device=None, dtype=None, vae: str | None = None,
                            models_dir: str | None = None, resume: bool = True, progress: bool = True,
                            stop_after: int | None = None, **settings) -> list[Path]:
    """An embedding for ``token`` from the pictures: ``out`` as A1111's .pt and .safetensors. ``dtype``: the frozen
    model's precision (auto: fp16 on CUDA and MPS, fp32 on the CPU); ``mixed_precision`` the autocast's
    (training/precision.py); the vectors train in float32."""
    out = Path(out)
    s = _settings(ti_method.DEFAULTS, out, settings)
    data, models = _load(images, s, model, device, dtype, vae, models_dir)
    method = ti_method.TextualInversion(models, token, init, vectors, kind)
    result = train(method, models, data, s, resume, progress, stop_after)
    return method.export(out, result["step"])


def train_lora(images: list[str], out: str | Path, *, model: str, rank: int = 4, alpha: float | None = None,
               text_encoder: bool = False, word: str | None = None, device=None, dtype=None, vae: str | None = None,
               models_dir: str | None = None, resume: bool = True, progress: bool = True,
               stop_after: int | None = None, **settings) -> list[Path]:
    """A kohya-format LoRA from the pictures (captions from .txt files beside them, else style templates with
    ``word``). ``dtype`` and ``mixed_precision`` as for ``train_textual_inversion``; the LoRA trains in float32."""
    out = Path(out)
    s = _settings(lora_method.DEFAULTS, out, settings)
    data, models = _load(images, s, model, device, dtype, vae, models_dir)
    method = lora_method.LoRA(models, rank, alpha, text_encoder, word, s.seed)
    result = train(method, models, data, s, resume, progress, stop_after)
    return method.export(out, result["step"])


# -- DreamArtist, the learned negative embedding, full fine-tuning (dreamartist.py, negative.py, finetune.py) ----
def _trigger(out: Path, word: str | None) -> str:
    """The word to train with: ``word``, else ``out``'s name. Prompts use a file by its name (A1111's rule, and
    stylegrad's), whatever word it was trained with: a note says so when the two differ."""
    if word is not None and word != out.stem:
        from stylegrad.notes import note

        note(f"trained as {word!r}, the files are used by their name: write {out.stem} in prompts")
    return word or out.stem


def train_dreamartist(images: list[str], out: str | Path, word: str | None = None, *, model: str,
                      init: str | None = None, vectors: int = 3, negative_vectors: int = 6, guidance: float = 3.0,
                      kind: str = "style", device=None, dtype=None, vae: str | None = None,
                      models_dir: str | None = None, resume: bool = True, progress: bool = True,
                      stop_after: int | None = None, **settings) -> list[Path]:
    """DreamArtist's pair of embeddings from the pictures: ``NAME.pt`` and ``NAME-neg.pt`` (NAME: ``out``'s stem,
    the word prompts use; each with a ``.safetensors`` twin). ``guidance``: the CFG scale of the training loss
    (the extension's 3). ``dtype`` and ``mixed_precision`` as for ``train_textual_inversion``."""
    from stylegrad.training import dreamartist

    out = Path(out)
    token = _trigger(out, word)
    s = _settings(dreamartist.DEFAULTS, out, settings)
    data, models = _load(images, s, model, device, dtype, vae, models_dir)
    method = dreamartist.DreamArtist(models, token, init, vectors, negative_vectors, guidance, kind, s.seed)
    result = train(method, models, data, s, resume, progress, stop_after)
    return method.export(out, result["step"])


def train_negative(images: list[str], out: str | Path, *, model: str, init: str | None = None, vectors: int = 4,
                   guidance: float = 7.5, device=None, dtype=None, vae: str | None = None,
                   models_dir: str | None = None, resume: bool = True, progress: bool = True,
                   stop_after: int | None = None, **settings) -> list[Path]:
    """A negative-prompt embedding learned over the pictures (their .txt captions as the prompt, guidance
    ``guidance`` in the loss): ``out`` as A1111's .pt and a .safetensors; its file name is the word to put in the
    negative prompt. ``dtype`` and ``mixed_precision`` as for ``train_textual_inversion``."""
    from stylegrad.training import negative

    out = Path(out)
    s = _settings(negative.DEFAULTS, out, settings)
    data, models = _load(images, s, model, device, dtype, vae, models_dir)
    method = negative.LearnedNegative(models, out.stem, init, vectors, guidance)
    result = train(method, models, data, s, resume, progress, stop_after)
    return method.export(out, result["step"])


def train_finetune(images: list[str], out: str | Path, *, model: str, text_encoder: bool = False,
                   word: str | None = None, device=None, dtype=None, vae: str | None = None,
                   models_dir: str | None = None, resume: bool = True, progress: bool = True,
                   stop_after: int | None = None, **settings) -> list[Path]:
    """The whole UNet (and the text encoders with ``text_encoder``) fine-tuned on the pictures, written as the
    diffusers folder ``out`` that ``--model`` loads. Captions from .txt files beside the pictures, else style
    templates with ``word``. ``dtype`` and ``mixed_precision`` as for ``train_textual_inversion``."""
    from stylegrad.training import finetune

    out = finetune.check_out(out)
    s = _settings(finetune.DEFAULTS, out, settings)
    data, models = _load(images, s, model, device, dtype, vae, models_dir)
    method = finetune.FineTune(models, word, text_encoder)
    result = train(method, models, data, s, resume, progress, stop_after)
    return method.export(out, result["step"])
