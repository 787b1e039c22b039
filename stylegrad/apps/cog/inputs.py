"""Cog's inputs as the request's fields, and the request's fields as Cog's inputs (so an error names what the
client sent). The published model's names keep their meaning (``scale`` is the guidance scale, ``ddim_steps`` the
denoising steps, ``plms`` PLMS or else DDIM); every style option is ``aesthetic_<option>`` (Adam's betas as
``aesthetic_beta1`` and ``aesthetic_beta2``)."""

from __future__ import annotations

from dataclasses import fields

from stylegrad.aesthetic.options import StyleOptions
from stylegrad.errors import RequestError

STYLE_INPUTS = {f"aesthetic_{f.name}": f.name for f in fields(StyleOptions) if f.name != "betas"}
BETAS = ("aesthetic_beta1", "aesthetic_beta2")
# request field -> Cog input, where they differ
RENAMED = {"negative": "negative_prompt", "cfg": "scale", "steps": "ddim_steps", "n": "n_samples",
           **{f"style_options.{name}": cog for cog, name in STYLE_INPUTS.items()},
           "style_options.betas": "aesthetic_beta1", "style_options.betas[0]": BETAS[0],
           "style_options.betas[1]": BETAS[1]}


def cog_name(field: str) -> str:
    """The Cog input that set request field ``field`` (``loras[0]`` -> ``lora_files[0]``)."""
    for listed, cog in (("loras[", "lora_files["), ("embeddings[", "embedding_files[")):
        if field.startswith(listed):
            return cog + field[len(listed):]
    return RENAMED.get(field, field)


def renamed(error: RequestError) -> RequestError:
    return error.renamed(cog_name(error.field))


def style_options(given: dict) -> dict:
    options = {name: given[cog] for cog, name in STYLE_INPUTS.items()}
    options["betas"] = (given[BETAS[0]], given[BETAS[1]])
    options["text"] = options["text"] or None  # Cog's empty text: no text
    return options


def sampler(given: dict) -> str:
    """``sampler`` (A1111's name) where given, else the published model's choice: PLMS, or DDIM."""
    return given["sampler"] or ("PLMS" if given["plms"] else "DDIM")


def _files(paths) -> list[str]:
    return [str(p) for p in paths or ()]


def embeddings(given: dict) -> tuple[str, ...]:
    """'FILE:TOKEN' per embedding file: the trigger words come from ``embedding_tokens`` (an upload's own file
    name is a temporary one, so it cannot be the word)."""
    files = _files(given["embedding_files"])
    tokens = [t.strip() for t in given["embedding_tokens"].split(",") if t.strip()]
    if len(tokens) != len(files):
        raise RequestError("embedding_tokens", f"{{field}}: give one trigger word per embedding file, separated by "
                           f"commas ({len(files)} file(s), {len(tokens)} word(s))")
    return tuple(f"{f}:{t}" for f, t in zip(files, tokens))


def request_values(given: dict) -> dict:
    """The request's fields (``pipelines.request.build``'s values) from Cog's inputs, except the model and the
    style, which the prediction resolves."""
    seed, clip_skip = given["seed"], given["clip_skip"]
    return dict(
        prompt=given["prompt"], negative=given["negative_prompt"], seed=-1 if seed is None else seed,
        steps=given["ddim_steps"], cfg=given["scale"], width=given["width"], height=given["height"],
        sampler=sampler(given), clip_skip=clip_skip - 1 if clip_skip and clip_skip > 1 else None,
        init_image=str(given["init_image"]) if given["init_image"] else None, strength=given["strength"],
        style_options=style_options(given), stylecode=given["stylecode"] or None,
        stylecode_image=str(given["stylecode_image"]) if given["stylecode_image"] else None,
        stylecode_strength=given["stylecode_strength"], stylecode_guidance=given["stylecode_guidance"],
        loras=tuple(f"{f}:{given['lora_scale']}" for f in _files(given["lora_files"])), embeddings=embeddings(given),
        weighting=given["prompt_weighting"],
    )
