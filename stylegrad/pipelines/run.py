"""Running a request: the pipeline to run (sampler, stylecode), the style's conditioning, the denoising.

The user's pipeline is only read. Every image is made by a pipeline object of stylegrad's own that shares its
components (diffusers' ``from_pipe``, or the Stylecodes pipeline): a pipeline call writes its state on the object
it runs on (guidance scale, timesteps, progress-bar settings), so that object must not be the user's. Denoising
progress is stylegrad's: a bar of its own, or the caller's ``progress``; the pipelines' own bars stay off.
"""

from __future__ import annotations

import math
from collections.abc import Callable
from contextlib import nullcontext
from dataclasses import dataclass, field

import torch
from PIL import Image
from tqdm.auto import tqdm

from stylegrad.aesthetic.encoder import AestheticEncoder, EncodedPrompt
from stylegrad.devices import offload_models
from stylegrad.errors import StylegradError
from stylegrad.families import Family, pipeline_family
from stylegrad.files.styles import Style, load_style
from stylegrad.pipelines.addons import Addons, RequestAddons
from stylegrad.pipelines.images import fit_init_image, load_image, load_init_image
from stylegrad.pipelines.loading import derived_pipeline, with_sampler
from stylegrad.pipelines.request import GenerationRequest

# progress(stage, done, total): 'style' Adam steps and 'denoising' steps as they happen; raising stops the work;
# returning True at a denoising step ends the denoising there, keeping the image so far, and starts no further image
# (A1111's interrupt); returning SKIP ends this image's denoising the same way and goes on with the next (its skip)
SKIP = "skip"
Progress = Callable[[str, int, int], bool | str | None]
StepEnd = Callable[[int, int], bool | None]  # (steps done, steps in all) of one image; True: stop here


def style_progress(total: int, desc: str = "style", progress: Progress | None = None):
    """A tqdm bar and the callback that advances it (one tick per Adam step), also reported to ``progress``."""
    bar = tqdm(total=total, desc=desc, unit="step", leave=False, disable=total == 0 or progress is not None)

    def callback(step: int, similarity: float) -> None:
        bar.set_postfix(cos=f"{similarity:.3f}")
        bar.update(1)
        if progress is not None:
            progress("style", bar.n, total)

    return bar, callback


class DenoisingProgress:
    """The denoising steps of ``n`` images, on stylegrad's bar (no ``progress``) or reported to ``progress``."""

    def __init__(self, progress: Progress | None = None, n: int = 1):
        self.progress, self.n, self.bar = progress, n, None
        self.stopped = False  # ``progress`` asked to stop: no further image is started

    def image(self, i: int) -> StepEnd:
        """The step callback of the ``i``-th image."""
        def on_step(done: int, total: int) -> bool:
            if self.progress is not None:
                asked = self.progress("denoising", i * total + done, self.n * total)
                if asked == SKIP:
                    return True  # this image only
                self.stopped = bool(asked) or self.stopped
                return self.stopped
            if self.bar is None:
                self.bar = tqdm(total=self.n * total, desc="denoising", unit="step", leave=False)
            self.bar.update(1)
            return False

        return on_step

    def close(self) -> None:
        if self.bar is not None:
            self.bar.close()


def own_pipeline(pipe):
    """A new pipeline object sharing ``pipe``'s components, whose progress-bar settings are its own dict with
    diffusers' bar off."""
    ours = derived_pipeline(pipe)
    ours.set_progress_bar_config(disable=True)  # a new dict on the new object: the user's settings stay as they are
    return ours


def run_pipeline(pipe, prompt_embeds, negative_prompt_embeds, request: GenerationRequest,
                 init_image: Image.Image | None = None, on_step: StepEnd | None = None,
                 **pooled) -> Image.Image:
    """One image: seeded through ``torch.Generator('cpu')`` so results match plain diffusers on any device.
    ``pooled``: SDXL's pooled_prompt_embeds and negative_pooled_prompt_embeds. ``on_step(done, total)`` after each
    denoising step (an exception it raises stops the image). With ``init_image``, an img2img pipeline sharing
    ``pipe``'s components runs it."""
    generator = torch.Generator("cpu").manual_seed(request.seed)
    common = dict(prompt_embeds=prompt_embeds, negative_prompt_embeds=negative_prompt_embeds,
                  num_inference_steps=request.steps, guidance_scale=request.cfg, generator=generator, **pooled)
    if on_step is not None:
        def step_end(pipe_, i, t, kwargs):
            if on_step(i + 1, pipe_.num_timesteps):
                pipe_._interrupt = True  # diffusers' own switch (reset by each call): the steps left are skipped
            return kwargs

        common["callback_on_step_end"] = step_end
    try:
        if init_image is None:
            return pipe(height=request.height, width=request.width, **common).images[0]
        img2img = img2img_pipeline(pipe)
        img2img.set_progress_bar_config(**getattr(pipe, "_progress_bar_config", {}))
        # diffusers runs int(steps x strength) steps, none below 1/steps; A1111 runs at least one: so do we
        strength = max(request.strength, math.nextafter(1 / request.steps, 1.0))
        return img2img(image=init_image, strength=strength, **common).images[0]
    finally:
        offload_models(pipe)  # model CPU offload: every component back on the CPU, as after the user's own call


def img2img_pipeline(pipe):
    """The img2img pipeline of ``pipe``'s family, sharing its components."""
    import diffusers

    sdxl = pipeline_family(pipe) is Family.SDXL
    cls = diffusers.StableDiffusionXLImg2ImgPipeline if sdxl else diffusers.StableDiffusionImg2ImgPipeline
    return cls.from_pipe(pipe)


@dataclass
class Prepared:
    """What every image of a request shares."""

    request: GenerationRequest
    pipe: object  # stylegrad's own pipeline object: the sampler's, carrying the stylecode
    style: Style | None
    init: Image.Image | None
    code: str | None  # the stylecode used (made from the request's image when it gave one)
    addons: RequestAddons
    conditioning: EncodedPrompt | None = None
    embeddings_used: list[str] = field(default_factory=list)  # textual-inversion words the prompt used


class Runner:
    """What one pipeline needs to run requests, loaded when first needed and kept: an aesthetic encoder per CLIP
    model (only for styled requests), a pipeline per sampler, Stylecodes models, style files by path."""

    def __init__(self, pipe, addons: Addons, clip_model=None, siglip_model: str | None = None):
        self.pipe = pipe
        self.addons = addons
        self.clip_model = clip_model
        self.siglip_model = siglip_model
        self._encoders: dict = {}
        self._styles: dict[str, Style] = {}
        self._stylecodes: dict = {}
        self._samplers: dict = {}  # sampler -> stylegrad's pipeline sharing self.pipe's components
        self._ip = None  # IP-Adapter files and encoders (addons/ipadapter/run.py), made at the first request using one

    def encoder(self, clip_model=None) -> AestheticEncoder:
        """The aesthetic encoder for this pipeline (every family: one or two towers), one per CLIP model."""
        key = clip_model or self.clip_model
        if key not in self._encoders:
            self._encoders[key] = AestheticEncoder.from_pipeline(self.pipe, key)
        return self._encoders[key]

    def style(self, path: str | None) -> Style | None:
        if path is None:
            return None
        if path not in self._styles:
            self._styles[path] = load_style(path)
        return self._styles[path]

    def check(self, request: GenerationRequest) -> None:
        """Refuse what this model cannot do, before any work."""
        family = pipeline_family(self.pipe)
        if family in ("sdxl", "sd2") and request.uses_stylecode:
            raise StylegradError(f"stylecodes need a Stable Diffusion 1.x model (the published Stylecodes model is "
                                 f"SD1.5-only); this is {'an SDXL' if family == 'sdxl' else 'a SD2.x'} model")

    def request_addons(self, request: GenerationRequest) -> RequestAddons:
        """The request's LoRAs bound to the pipeline, and the embeddings its text encoders can take."""
        if pipeline_family(self.pipe) is Family.SDXL:
            encoders = {"l": (self.pipe.text_encoder.config.hidden_size, "clip_l"),
                        "g": (self.pipe.text_encoder_2.config.hidden_size, "clip_g")}
        else:
            encoders = {"": (self.pipe.text_encoder.config.hidden_size, "")}
        return self.addons.for_request(request, encoders)

    def pipeline(self, request: GenerationRequest):
        """(stylegrad's pipeline for the request's sampler, carrying its stylecode; the code or None)."""
        if request.sampler not in self._samplers:
            pipe = with_sampler(self.pipe, request.sampler)
            if pipe is self.pipe:  # the model's own sampler: still a pipeline object of our own
                pipe = own_pipeline(self.pipe)
            pipe.set_progress_bar_config(disable=True)  # a pipeline with_sampler derived: a dict of its own
            self._samplers[request.sampler] = pipe
        pipe = self._samplers[request.sampler]
        if not request.uses_stylecode:
            return pipe, None
        from stylegrad.stylecodes.facade import SIGLIP, Stylecodes

        siglip = (self.siglip_model or SIGLIP) if request.stylecode_image else None
        key = (request.stylecodes_model, siglip)
        if key not in self._stylecodes:
            self._stylecodes[key] = Stylecodes.load(self.pipe.unet, request.stylecodes_model, siglip)
        sc = self._stylecodes[key]
        code = request.stylecode or sc.code_for(load_image(request.stylecode_image, "stylecode image"))
        return sc.pipeline(pipe, code, request.stylecode_strength, request.stylecode_guidance), code

    def prepare(self, request: GenerationRequest, init_image: Image.Image | None = None) -> Prepared:
        """The pipeline to run, the style, the init image (a given image is resized as the request's path would
        be), the code and the add-ons; no conditioning yet."""
        self.check(request)
        style = self.style(request.style)
        pipe, code = self.pipeline(request)
        init = load_init_image(request.init_image, request.width, request.height) if init_image is None else \
            fit_init_image(init_image, request.width, request.height)
        addons = self.request_addons(request)
        addons.ip = self.ip_adapter(request, style)
        return Prepared(request, pipe, style, init, code, addons)

    def ip_adapter(self, request: GenerationRequest, style: Style | None = None):
        """The request's IP-Adapter on this pipeline's UNet, ready for the call (None without one)."""
        if request.ip_adapter is None:
            return None
        from stylegrad.addons.ipadapter.run import IPAdapters

        if self._ip is None:
            self._ip = IPAdapters()
        return self._ip.for_request(request, self.pipe.unet, pipeline_family(self.pipe), style)

    def conditioning(self, request: GenerationRequest, style: Style | None, addons: RequestAddons,
                     desc: str = "style", progress: Progress | None = None) -> tuple[EncodedPrompt, list[str]]:
        """(the request's conditioning, the embedding words it used): plain when the request has no active style
        (no CLIP loaded)."""
        encoder = self.encoder(request.clip_model if request.styled else None)
        styled = style if request.styled else None
        towers = len(encoder.towers_for(styled, request.style_options)) if request.styled else 0
        bar, callback = style_progress(request.style_options.steps * towers if request.styled else 0, desc, progress)
        try:
            e = encoder.encode(request.prompt, styled, request.style_options, request.negative, request.clip_skip,
                               callback, embeddings=addons.embeddings, loras=addons.loras,
                               weighting=request.weighting)
        finally:
            bar.close()
        return e, list(encoder.last_embeddings)

    def condition(self, prepared: Prepared, progress: Progress | None = None) -> Prepared:
        prepared.conditioning, prepared.embeddings_used = self.conditioning(
            prepared.request, prepared.style, prepared.addons, progress=progress)
        return prepared

    def denoise(self, prepared: Prepared, request: GenerationRequest, on_step: StepEnd | None = None,
                conditioning: EncodedPrompt | None = None) -> Image.Image:
        """One image of a prepared request (``request``: its seed), the request's UNet LoRAs and hypernetworks
        hooked for the call."""
        e = conditioning or prepared.conditioning
        loras, hypernets = prepared.addons.loras, prepared.addons.hypernetworks
        ip = prepared.addons.ip  # IP-Adapter: installed on the UNet for the call, its image embeddings passed in
        with loras.applied(("unet",)) if loras else nullcontext(), \
                hypernets.applied() if hypernets else nullcontext(), \
                ip.applied(self.pipe.unet) if ip else nullcontext():
            return run_pipeline(prepared.pipe, e.prompt_embeds, e.negative_prompt_embeds, request, prepared.init,
                                on_step, **pooled_kwargs(e), **ip_kwargs(ip, self.pipe.unet, request))

    def denoise_batch(self, pipe, requests: list[GenerationRequest], conditionings: list[EncodedPrompt],
                      on_step: StepEnd | None = None) -> list[Image.Image]:
        """Requests that share what the pipeline call takes, in one batch of UNet passes."""
        first = requests[0]
        pooled = {k: torch.cat([pooled_kwargs(e)[k] for e in conditionings]) for k in pooled_kwargs(conditionings[0])}
        step_end = None
        if on_step is not None:
            def step_end(pipe_, i, t, kwargs):
                if on_step(i + 1, pipe_.num_timesteps):
                    pipe_._interrupt = True
                return kwargs
        try:
            return pipe(prompt_embeds=torch.cat([e.prompt_embeds for e in conditionings]),
                        negative_prompt_embeds=torch.cat([e.negative_prompt_embeds for e in conditionings]),
                        num_inference_steps=first.steps, guidance_scale=first.cfg,
                        generator=[torch.Generator("cpu").manual_seed(r.seed) for r in requests], height=first.height,
                        width=first.width, callback_on_step_end=step_end, **pooled).images
        finally:
            offload_models(pipe)


def ip_kwargs(ip, unet, request: GenerationRequest) -> dict:
    """The IP-Adapter's image embeddings as the pipeline call takes them (guided as diffusers decides it)."""
    if ip is None:
        return {}
    return ip.pipeline_kwargs(unet, request.cfg > 1 and unet.config.time_cond_proj_dim is None)


def pooled_kwargs(e: EncodedPrompt) -> dict[str, torch.Tensor]:
    """SDXL's pooled embeddings as the pipeline call takes them (none for SD1.x/SD2.x)."""
    return {k: v for k, v in e.pipeline_kwargs().items() if k.endswith("pooled_prompt_embeds")}
