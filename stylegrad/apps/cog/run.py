"""One prediction: the model it asks for, its style (the user's pictures, a style file, or one of the paper's
embeddings by name), one ``GenerationRequest`` through ``build`` with a server's limits, then the images written
as PNGs with their infotext. Any ``RequestError`` is named as the Cog input that set the field."""

from __future__ import annotations

import tempfile
from dataclasses import replace
from pathlib import Path

from stylegrad.apps.cog import inputs, paper, pictures
from stylegrad.apps.cog.models import Models
from stylegrad.errors import RequestError, StylegradError, describe

STYLE_FILE = "style.safetensors"  # the style made from the user's pictures, beside the images


def predict(models: Models, given: dict, out: Path) -> list[Path]:
    """The files of one prediction, written into ``out``: the PNGs, then the style file when one was made."""
    from stylegrad.pipelines.outputs import save_images
    from stylegrad.pipelines.request import build

    d = models.deployment
    model = str(given["model_file"]) if given["model_file"] else (given["model"] or None)
    try:
        request = build({**inputs.request_values(given), "model": model or d.model, "clip_model": d.clip_model,
                         "stylecodes_model": d.stylecodes_model},
                        d.limits, n=given["n_samples"], random_seed_allowed=True)  # checked before any model loads
        generator = models.get(model, given["device"] or None, given["dtype"] or None,
                               field="model_file" if given["model_file"] else "model")
        style, made = _style(models, generator, given, out)
        request = replace(request, model=str(generator.model), style=style)
        generator.check(request)
    except RequestError as e:
        raise inputs.renamed(e) from None
    images = generator.images(request, given["n_samples"])
    return save_images(images, request, out) + ([made] if made else [])


def _style(models: Models, generator, given: dict, out: Path) -> tuple[str | None, Path | None]:
    """(the style file to use, the file made from pictures if it was): pictures, else a style file, else the
    paper's embedding by name (looked for only when the options would use a style)."""
    if given["style_images"] and given["style_file"]:
        raise RequestError("style_file", "give {field} or style_images, not both")
    if given["style_images"]:
        made = _style_from_pictures(models, generator, given["style_images"], out / STYLE_FILE)
        return str(made), made
    if given["style_file"]:
        from stylegrad.files.styles import load_style

        try:
            load_style(given["style_file"])  # read once here, so a bad file is named as this input
        except StylegradError as e:
            raise RequestError("style_file", "{field}: " + describe(e)) from None
        return str(given["style_file"]), None
    name = given["aesthetic_embedding"]
    if name == paper.NONE or given["aesthetic_steps"] == 0 or given["aesthetic_weight"] == 0:
        return None, None
    return paper.find(name, models.deployment.styles_dirs), None


def _style_from_pictures(models: Models, generator, uploads: list, path: Path) -> Path:
    """The pictures' style in the space of the model's text tower(s) (SDXL: CLIP-L's and bigG's), saved."""
    from stylegrad.aesthetic.embedding import embed_images, embed_images_sdxl
    from stylegrad.devices import execution_device
    from stylegrad.families import Family, pipeline_family
    from stylegrad.files.styles import save_style

    clip = style_clip(generator, models.deployment.clip_model)
    with tempfile.TemporaryDirectory(prefix="stylegrad-pictures-") as tmp:
        files = pictures.collect(uploads, Path(tmp))
        try:
            if pipeline_family(generator.pipe) == Family.SDXL:
                style = embed_images_sdxl(files, clip, progress=False, name="style")
            else:
                style = embed_images(files, clip, encoder=models.image_encoder(clip, execution_device(generator.pipe.unet)),
                                     progress=False, name="style")
        except StylegradError as e:
            raise RequestError("style_images", "{field}: " + describe(e)) from None
    return save_style(style, path)


def style_clip(generator, clip_model: str | None) -> str:
    """The CLIP whose image tower makes styles for this model: the deployment's, else the family's (SDXL: CLIP-L;
    bigG's mean is made beside it)."""
    from stylegrad.aesthetic.tower import detect_family
    from stylegrad.families import Family, pipeline_family

    if clip_model:
        return clip_model
    if pipeline_family(generator.pipe) == Family.SDXL:
        return Family.SDXL.clip_models[0]
    return detect_family(generator.pipe.text_encoder).clip_model
