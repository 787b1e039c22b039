"""Styled generation with a diffusers pipeline: a ``GenerationRequest`` in, PNGs with full metadata out.

``Generator`` holds one loaded pipeline and what requests add to it, loaded when first needed and kept: the
aesthetic encoder (and its CLIP projection) only for styled requests, a Stylecodes model only for stylecode ones,
style files and init images by path."""

from __future__ import annotations

import re
from collections.abc import Callable
from contextlib import nullcontext
from dataclasses import replace
from pathlib import Path

import torch
from PIL import Image
from tqdm.auto import tqdm

from stylegrad.aesthetic.encoder import AestheticEncoder
from stylegrad.aesthetic.sdxl import SDXLAestheticEncoder
from stylegrad.errors import StylegradError
from stylegrad.files.hashes import short_hash
from stylegrad.files.infotext import parse_infotext
from stylegrad.files.pnginfo import read_generation_info, save_png
from stylegrad.files.styles import Style, load_style
from stylegrad.notes import note
from stylegrad.pipelines.addons import Addons, RequestAddons
from stylegrad.pipelines.grids import label_grid
from stylegrad.pipelines.loading import a1111_sampler_name, is_sdxl, load_pipeline, pipeline_family, with_sampler
from stylegrad.pipelines.request import (
    GenerationRequest,
    expected_style_digest,
    foreign_notes,
    infotext,
    request_from_infotext,
)


def run_pipeline(pipe, prompt_embeds, negative_prompt_embeds, request: GenerationRequest,
                 init_image: Image.Image | None = None, on_step: Callable[[int, int], None] | None = None,
                 **pooled) -> Image.Image:
    """One image: seeded through ``torch.Generator('cpu')`` so results match plain diffusers on any device.
    ``pooled``: SDXL's pooled_prompt_embeds and negative_pooled_prompt_embeds. ``on_step(done, total)`` after each
    denoising step (an exception it raises stops the image)."""
    generator = torch.Generator("cpu").manual_seed(request.seed)
    common = dict(prompt_embeds=prompt_embeds, negative_prompt_embeds=negative_prompt_embeds,
                  num_inference_steps=request.steps, guidance_scale=request.cfg, generator=generator, **pooled)
    if on_step is not None:
        def step_end(pipe_, i, t, kwargs):
            on_step(i + 1, pipe_.num_timesteps)
            return kwargs

        common["callback_on_step_end"] = step_end
    if init_image is None:
        return pipe(height=request.height, width=request.width, **common).images[0]
    import diffusers

    img2img = (diffusers.StableDiffusionXLImg2ImgPipeline if is_sdxl(pipe)
               else diffusers.StableDiffusionImg2ImgPipeline).from_pipe(pipe)
    return img2img(image=init_image, strength=request.strength, **common).images[0]


def load_image(path: str, what: str = "image") -> Image.Image:
    try:
        with Image.open(path) as im:
            return im.convert("RGB")
    except (OSError, ValueError, SyntaxError) as e:
        raise StylegradError(f"cannot read {what} {path}: {e}") from e


def load_init_image(path: str | None, width: int | None, height: int | None) -> Image.Image | None:
    """The img2img start, resized to the request's size (or its own) rounded down to a multiple of 8."""
    if path is None:
        return None
    return fit_init_image(load_image(path, "init image"), width, height)


def fit_init_image(image: Image.Image, width: int | None, height: int | None) -> Image.Image:
    w, h = width or image.width, height or image.height
    return image.convert("RGB").resize((w - w % 8, h - h % 8), Image.LANCZOS)


# progress(stage, done, total): 'style' Adam steps and 'denoising' steps as they happen; raising stops the work
Progress = Callable[[str, int, int], None]


def style_progress(total: int, desc: str = "style", progress: Progress | None = None):
    """A tqdm bar and the callback that advances it (one tick per Adam step), also reported to ``progress``."""
    bar = tqdm(total=total, desc=desc, unit="step", leave=False, disable=total == 0 or progress is not None)

    def callback(step: int, similarity: float) -> None:
        bar.set_postfix(cos=f"{similarity:.3f}")
        bar.update(1)
        if progress is not None:
            progress("style", bar.n, total)

    return bar, callback


def _slug(text: str, n: int = 40) -> str:
    return re.sub(r"[^A-Za-z0-9]+", "_", text).strip("_")[:n] or "image"


def next_index(out: Path) -> int:
    nums = [int(m.group(1)) for p in out.glob("*.png") if (m := re.match(r"(\d{5})-", p.name))]
    return max(nums, default=-1) + 1


class Generator:
    """One pipeline, many requests. The pipeline handed in is only read: samplers and Stylecodes run on pipelines
    that share its components."""

    def __init__(self, pipe, model: str | None = None, clip_model=None, siglip_model: str | None = None,
                 embeddings_dirs: list[str] | None = None, loras_dirs: list[str] | None = None):
        """``embeddings_dirs`` / ``loras_dirs``: folders of textual-inversion embeddings and LoRAs, like A1111's
        ``embeddings/`` and ``models/Lora`` (default: $STYLEGRAD_EMBEDDINGS_DIR, $STYLEGRAD_LORAS_DIR)."""
        self.pipe = pipe
        self.addons = Addons(pipe, embeddings_dirs, loras_dirs)
        self.model = model
        self.clip_model = clip_model
        self.siglip_model = siglip_model  # the image encoder codes are made with (default: the published one)
        self._encoders: dict = {}
        self._styles: dict[str, Style] = {}
        self._stylecodes: dict = {}
        self._samplers: dict = {}  # sampler -> a pipeline sharing self.pipe's components
        self.last_embeddings: list[str] = []

    @classmethod
    def load(cls, model: str, device: str | torch.device | None = None, clip_model=None,
             siglip_model: str | None = None, vae: str | None = None, models_dir: str | None = None,
             embeddings_dirs: list[str] | None = None, loras_dirs: list[str] | None = None) -> Generator:
        """``model``: a hub id, a diffusers folder, a .safetensors/.ckpt file, or a file's name in the models
        folder (``models_dir`` or $STYLEGRAD_MODELS_DIR)."""
        from stylegrad.checkpoints.library import resolve_model

        path = resolve_model(model, models_dir)
        return cls(load_pipeline(path, device, vae=vae), path, clip_model, siglip_model, embeddings_dirs, loras_dirs)

    def encoder(self, clip_model=None) -> AestheticEncoder | SDXLAestheticEncoder:
        """The aesthetic encoder for this pipeline (SDXL's for SDXL pipelines), one per CLIP model."""
        key = clip_model or self.clip_model
        if key not in self._encoders:
            cls = SDXLAestheticEncoder if is_sdxl(self.pipe) else AestheticEncoder
            self._encoders[key] = cls.from_pipeline(self.pipe, key)
        return self._encoders[key]

    def style(self, path: str | None) -> Style | None:
        if path is None:
            return None
        if path not in self._styles:
            self._styles[path] = load_style(path)
        return self._styles[path]

    def _stylecode_pipeline(self, pipe, request: GenerationRequest):
        """(pipeline carrying the code, the code) for a stylecode request."""
        from stylegrad.stylecodes.facade import SIGLIP, Stylecodes

        siglip = (self.siglip_model or SIGLIP) if request.stylecode_image else None
        key = (request.stylecodes_model, siglip)
        if key not in self._stylecodes:
            self._stylecodes[key] = Stylecodes.load(self.pipe.unet, request.stylecodes_model, siglip)
        sc = self._stylecodes[key]
        code = request.stylecode or sc.code_for(load_image(request.stylecode_image, "stylecode image"))
        return sc.pipeline(pipe, code, request.stylecode_strength, request.stylecode_guidance), code

    def check(self, request: GenerationRequest) -> None:
        """Refuse what this model cannot do, before any work."""
        family = pipeline_family(self.pipe)
        if family in ("sdxl", "sd2") and request.uses_stylecode:
            raise StylegradError(f"stylecodes need a Stable Diffusion 1.x model (the published Stylecodes model is "
                                 f"SD1.5-only); this is {'an SDXL' if family == 'sdxl' else 'a SD2.x'} model")

    def request_addons(self, request: GenerationRequest) -> RequestAddons:
        """The request's LoRAs bound to the pipeline, and the embeddings its text encoders can take."""
        if is_sdxl(self.pipe):
            encoders = {"l": (self.pipe.text_encoder.config.hidden_size, "clip_l"),
                        "g": (self.pipe.text_encoder_2.config.hidden_size, "clip_g")}
        else:
            encoders = {"": (self.pipe.text_encoder.config.hidden_size, "")}
        return self.addons.for_request(request, encoders)

    def _prepare(self, request: GenerationRequest):
        """What every image of a request shares: the pipeline to run, the style, the init image, the code."""
        self.check(request)
        style = self.style(request.style)
        if request.sampler not in self._samplers:
            self._samplers[request.sampler] = with_sampler(self.pipe, request.sampler)
        pipe = self._samplers[request.sampler]
        code = None
        if request.uses_stylecode:
            pipe, code = self._stylecode_pipeline(pipe, request)
        pipe.set_progress_bar_config(desc="denoising", leave=False, disable=False)
        init = load_init_image(request.init_image, request.width, request.height)
        return pipe, style, init, code

    def embeddings(self, request: GenerationRequest, style: Style | None, desc: str = "style",
                   addons: RequestAddons | None = None, progress: Progress | None = None):
        """(prompt_embeds, negative_prompt_embeds, pooled): plain when the request has no active style (no CLIP
        loaded); ``pooled`` holds SDXL's pooled embeddings (empty for SD1/SD2). ``addons``: the request's LoRAs
        and embeddings (resolved here when not given); the embeddings it used are in ``self.last_embeddings``."""
        addons = addons or self.request_addons(request)
        encoder = self.encoder(request.clip_model) if request.styled else self.encoder(None)
        steps = request.style_options.steps if request.styled else 0
        if is_sdxl(self.pipe):
            towers = len(encoder.towers_for(style, request.style_options)) if request.styled else 0
            bar, callback = style_progress(steps * towers, desc, progress)
            try:
                e = encoder.encode(request.prompt, style if request.styled else None, request.style_options,
                                   request.negative, request.clip_skip, callback, loras=addons.loras,
                                   embeddings=addons.embeddings, weighting=request.weighting)
                self.last_embeddings = list(encoder.last_embeddings)
            finally:
                bar.close()
            return e.prompt_embeds, e.negative_prompt_embeds, dict(
                pooled_prompt_embeds=e.pooled_prompt_embeds, negative_pooled_prompt_embeds=e.negative_pooled_prompt_embeds)
        bar, callback = style_progress(steps, desc, progress)
        try:
            pe, ne = encoder.encode(request.prompt, style if request.styled else None, request.style_options,
                                    request.negative, request.clip_skip, callback, embeddings=addons.embeddings[""],
                                    loras=addons.loras, weighting=request.weighting)
            self.last_embeddings = list(encoder.last_embeddings)
            return pe, ne, {}
        finally:
            bar.close()

    def _model_hash(self, model: str) -> str | None:
        return short_hash(model) if Path(model).is_file() else None

    def images(self, request: GenerationRequest, n: int = 1, progress: Progress | None = None,
               init_image: Image.Image | None = None) -> list[tuple[Image.Image, str]]:
        """``n`` images with seeds ``seed .. seed+n-1`` and the infotext of each; the style is applied once.
        ``progress``: see ``Progress`` (no terminal bars then). ``init_image``: an img2img start given as an image
        rather than as ``request.init_image``'s path (resized as that would be)."""
        if n < 1:
            raise StylegradError(f"n must be >= 1, got {n}")
        pipe, style, init, code = self._prepare(request)
        if init_image is not None:
            init = fit_init_image(init_image, request.width, request.height)
        addons = self.request_addons(request)
        pe, ne, pooled = self.embeddings(request, style, addons=addons, progress=progress)
        fields = addons.infotext_fields(self.last_embeddings)
        out = []
        if progress is not None:
            pipe.set_progress_bar_config(disable=True)
        for i in range(n):
            r = request.with_seed(request.seed + i)
            on_step = None if progress is None else (lambda done, total, i=i: progress(
                "denoising", i * total + done, n * total))
            with addons.loras.applied(("unet",)) if addons.loras else nullcontext():
                image = run_pipeline(pipe, pe, ne, r, init, on_step, **pooled)
            text = infotext(r, size=image.size, sampler_name=a1111_sampler_name(pipe.scheduler), style=style,
                            stylecode=code, model_hash=self._model_hash(self.model or r.model), addons=fields)
            out.append((image, text))
        return out

    def images_batch(self, requests: list[GenerationRequest], progress: Progress | None = None
                     ) -> list[tuple[Image.Image, str]]:
        """One image per request, the requests' UNet passes run as one batch: for a server, where many clients
        send requests that differ only in prompt, style and seed. They must share what the pipeline call takes
        (sampler, steps, guidance, size) and have no LoRA, stylecode or init image. Each image equals its request
        run alone up to float rounding (a batch takes other kernels), so pixels may differ by one level."""
        first = requests[0]
        shared = lambda r: (r.sampler, r.steps, r.cfg, r.width, r.height, r.model, r.clip_model)  # noqa: E731
        if any(shared(r) != shared(first) or r.loras or r.init_image or r.uses_stylecode for r in requests):
            raise StylegradError("requests in one batch must share sampler, steps, guidance and size, without "
                                 "LoRAs, stylecodes or init images")
        pipe, _, _, _ = self._prepare(first)
        parts = []
        for r in requests:
            style = self.style(r.style)
            addons = self.request_addons(r)
            if addons.loras:
                raise StylegradError("a request with LoRAs (a <lora:...> tag) cannot join a batch")
            pe, ne, pooled = self.embeddings(r, style, addons=addons, progress=progress)
            parts.append((r, style, pe, ne, pooled, addons.infotext_fields(self.last_embeddings)))
        out: list = [None] * len(requests)
        groups: dict = {}  # prompts of another length (more 75-token chunks) go in a batch of their own
        for i, (_, _, pe, ne, _, _) in enumerate(parts):
            groups.setdefault((tuple(pe.shape), tuple(ne.shape)), []).append(i)
        if progress is not None:
            pipe.set_progress_bar_config(disable=True)
        for members in groups.values():
            rs = [parts[i] for i in members]
            pooled = {k: torch.cat([p[4][k] for p in rs]) for k in rs[0][4]}
            step_end = None
            if progress is not None:
                def step_end(pipe_, i, t, kwargs):
                    progress("denoising", i + 1, pipe_.num_timesteps)
                    return kwargs
            images = pipe(prompt_embeds=torch.cat([p[2] for p in rs]), negative_prompt_embeds=torch.cat(
                [p[3] for p in rs]), num_inference_steps=first.steps, guidance_scale=first.cfg,
                generator=[torch.Generator("cpu").manual_seed(p[0].seed) for p in rs], height=first.height,
                width=first.width, callback_on_step_end=step_end, **pooled).images
            for i, (r, style, _, _, _, fields), image in zip(members, rs, images):
                out[i] = (image, infotext(r, size=image.size, sampler_name=a1111_sampler_name(pipe.scheduler),
                                          style=style, model_hash=self._model_hash(self.model or r.model),
                                          addons=fields))
        return out

    def generate(self, request: GenerationRequest, out: str | Path, n: int = 1) -> list[Path]:
        """Write ``n`` PNGs into ``out`` (numbered after those already there)."""
        out = Path(out)
        index = next_index(out)
        return [save_png(image, out / f"{index + i:05d}-{request.seed + i}-{_slug(request.prompt)}.png", text)
                for i, (image, text) in enumerate(self.images(request, n))]

    def compare(self, request: GenerationRequest, sweep: list[int], out: str | Path, n: int = 1) -> Path:
        """The paper's figure: the same seeds without the style and with it at each number of steps, one grid."""
        if request.style is None:
            raise StylegradError("a comparison needs a style")
        pipe, style, init, code = self._prepare(request)
        addons = self.request_addons(request)
        columns = [0] + [k for k in dict.fromkeys(sweep) if k > 0]
        requests = [replace(request, style_options=replace(request.style_options, steps=k)) for k in columns]
        embeds = [self.embeddings(r, style, f"style, {r.style_options.steps} steps", addons) for r in requests]
        with addons.loras.applied(("unet",)) if addons.loras else nullcontext():
            rows = [[run_pipeline(pipe, pe, ne, r.with_seed(request.seed + i), init, **pooled)
                     for r, (pe, ne, pooled) in zip(requests, embeds)] for i in range(n)]
        grid = label_grid(rows, ["no style"] + [f"{k} steps" for k in columns[1:]],
                          [f"seed {request.seed + i}" for i in range(n)])
        text = infotext(requests[-1], size=rows[0][0].size, sampler_name=a1111_sampler_name(pipe.scheduler),
                        style=style, stylecode=code, model_hash=self._model_hash(self.model or request.model),
                        extra={"Aesthetic steps sweep": " ".join(map(str, columns))},
                        addons=addons.infotext_fields(self.last_embeddings))
        out = Path(out)
        return save_png(grid, out / f"{next_index(out):05d}-compare-{request.seed}-{_slug(request.prompt)}.png", text)


def request_from_png(path: str | Path, embeddings_dirs: list[str] | None = None, loras_dirs: list[str] | None = None,
                     **overrides) -> GenerationRequest:
    """The request a stylegrad PNG records (an A1111 PNG gives its settings), with ``overrides`` (e.g. ``model=``,
    ``style=``) that are not None. What the image asks for and cannot be had here (a sampler with no equivalent,
    a LoRA or embedding missing from the folders or different from the one used) is noted, one line each."""
    info = read_generation_info(path)
    if info is None or info.tool not in ("stylegrad", "automatic1111"):
        raise StylegradError(f"{path} has no generation parameters stylegrad can regenerate from")
    request = request_from_infotext(info.raw)
    for line in foreign_notes(info.raw) + _addon_notes(info.raw, embeddings_dirs, loras_dirs):
        note(f"{Path(path).name}: {line}")
    changes = {k: v for k, v in overrides.items() if v is not None}
    if "style" in changes and request.style is None:
        raise StylegradError(f"{path} was made without a style, so a style cannot replace its own")
    request = replace(request, **changes)
    if request.style is not None:
        digest = expected_style_digest(info.raw)
        style = load_style(request.style)
        if digest and style.digest != digest:
            raise StylegradError(f"style file {request.style} is not the one {path} was made with "
                                 f"(hash {style.digest}, the image records {digest})")
    return request


def _recorded(value: str | None) -> dict[str, str]:
    """A1111's 'name: hash, name: hash' fields."""
    return dict(part.rsplit(": ", 1) for part in (value or "").split(", ") if ": " in part)


def _addon_notes(text: str, embeddings_dirs, loras_dirs) -> list[str]:
    from stylegrad.addons.embeddings import EmbeddingLibrary
    from stylegrad.addons.lora.library import LoraLibrary, lora_hash

    _, _, f = parse_infotext(text)
    notes = []
    embeddings, loras = EmbeddingLibrary(embeddings_dirs), LoraLibrary(loras_dirs)
    for name, digest in _recorded(f.get("TI hashes")).items():
        e = embeddings.get(name)
        if e is None:
            notes.append(f"embedding '{name}' is not in the embeddings folders: its word is read as plain text")
        elif e.short_hash != digest:
            notes.append(f"embedding '{name}' differs from the one the image was made with ({e.short_hash}, "
                         f"the image records {digest})")
    for name, digest in _recorded(f.get("Lora hashes")).items():
        found = loras.find(name)
        if found is not None and lora_hash(found) != digest:
            notes.append(f"LoRA '{name}' differs from the one the image was made with ({lora_hash(found)}, the "
                         f"image records {digest})")
    return notes

