"""Aesthetic scores of files: images through the CLIP image tower, style files directly (a style already is a
CLIP image embedding)."""

from __future__ import annotations

import torch

from stylegrad.devices import resolve_device, resolve_dtype
from stylegrad.errors import StylegradError
from stylegrad.evaluation.metrics import ClipEmbedder, aesthetic_score
from stylegrad.evaluation.predictors import DEFAULT, load_predictor
from stylegrad.families import Family
from stylegrad.files.recognize import inspect_file
from stylegrad.files.styles import load_style


def score_files(files: list[str], predictor: str = DEFAULT, clip_model: str | None = None,
                device: str | torch.device | None = None, dtype: str | torch.dtype | None = None) -> list[dict]:
    """[{"file", "kind", "score"}] in the order given; a file that is neither an image nor a style is an error.
    ``device`` (default the CPU) and ``dtype`` (stylegrad.devices' policy): where and in what precision the CLIP
    image tower and the predictor run; scores are float32 either way."""
    device = resolve_device(device or "cpu")  # a bad device or dtype fails before anything loads
    dtype = resolve_dtype(dtype, device)
    pred = load_predictor(predictor).to(device, dtype)
    kinds = {f: inspect_file(f).kind for f in files}
    results: dict[str, tuple[str, float]] = {}
    for f in files:
        if kinds[f] != "image":
            style = load_style(f)  # refuses anything but a style, saying what it is
            pred.check_width(style.width)
            results[f] = ("style", float(aesthetic_score(pred, style.vector[None])[0]))
    images = [f for f in files if kinds[f] == "image"]
    if images:
        from stylegrad.pipelines.images import load_image

        embedder = ClipEmbedder(clip_model or pred.clip_model or Family.SD1.clip_model, device, dtype=dtype)
        pred.check_width(embedder.width)
        pics = [load_image(f) for f in images]
        for f, v in zip(images, aesthetic_score(pred, embedder.images(pics))):
            results[f] = ("image", float(v))
    if not results:
        raise StylegradError("nothing to score")
    return [{"file": f, "kind": results[f][0], "score": results[f][1]} for f in files]
