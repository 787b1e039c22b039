"""Styled generation with a diffusers pipeline: a ``GenerationRequest`` in, PNGs with full metadata out.

``Generator`` is the one object the CLI, the server, batches and the experiment hold: a loaded pipeline and the
thin sequence of the three jobs, each in its own module: running a request (run.py: the pipeline per sampler and
stylecode, the aesthetic conditioning, the denoising), writing what it made (outputs.py: infotext, PNG files,
the comparison grid), and replaying a PNG (replay.py: ``request_from_png``). The pipeline handed in is only read,
its progress-bar settings included."""

from __future__ import annotations

from dataclasses import replace
from pathlib import Path

import torch
from PIL import Image

from stylegrad.aesthetic.encoder import AestheticEncoder
from stylegrad.errors import StylegradError
from stylegrad.files.styles import Style
from stylegrad.pipelines.addons import Addons, RequestAddons
from stylegrad.pipelines.images import fit_init_image, load_image, load_init_image
from stylegrad.pipelines.loading import load_pipeline
from stylegrad.pipelines.outputs import image_infotext, model_hash, next_index, save_comparison, save_images
from stylegrad.pipelines.replay import request_from_png
from stylegrad.pipelines.request import GenerationRequest
from stylegrad.pipelines.run import DenoisingProgress, Progress, Runner, pooled_kwargs, run_pipeline, style_progress

__all__ = ["Generator", "Progress", "fit_init_image", "load_image", "load_init_image", "next_index",
           "request_from_png", "run_pipeline", "style_progress"]


class Generator:
    """One pipeline, many requests. The pipeline handed in is only read: every image is made on a pipeline object
    of stylegrad's own sharing its components (run.py)."""

    def __init__(self, pipe, model: str | None = None, clip_model=None, siglip_model: str | None = None,
                 embeddings_dirs: list[str] | None = None, loras_dirs: list[str] | None = None,
                 hypernetworks_dirs: list[str] | None = None):
        """``embeddings_dirs`` / ``loras_dirs`` / ``hypernetworks_dirs``: folders of textual-inversion embeddings,
        LoRAs and hypernetworks, like A1111's ``embeddings/``, ``models/Lora`` and ``models/hypernetworks``
        (default: $STYLEGRAD_EMBEDDINGS_DIR, $STYLEGRAD_LORAS_DIR, $STYLEGRAD_HYPERNETWORKS_DIR)."""
        self.pipe = pipe
        self.addons = Addons(pipe, embeddings_dirs, loras_dirs, hypernetworks_dirs)
        self.model = model
        # clip_model, siglip_model (the image encoder codes are made with; default the published one): the runner's
        self.runner = Runner(pipe, self.addons, clip_model, siglip_model)
        self.last_embeddings: list[str] = []

    @property
    def clip_model(self):
        return self.runner.clip_model

    @property
    def siglip_model(self) -> str | None:
        return self.runner.siglip_model

    @classmethod
    def load(cls, model: str, device: str | torch.device | None = None, clip_model=None,
             siglip_model: str | None = None, vae: str | None = None, models_dir: str | None = None,
             embeddings_dirs: list[str] | None = None, loras_dirs: list[str] | None = None,
             dtype: str | torch.dtype | None = None, hypernetworks_dirs: list[str] | None = None) -> Generator:
        """``model``: a hub id, a diffusers folder, a .safetensors/.ckpt file, or a file's name in the models
        folder (``models_dir`` or $STYLEGRAD_MODELS_DIR). ``device``, ``dtype``: stylegrad.devices' policy."""
        from stylegrad.checkpoints.library import resolve_model

        path = resolve_model(model, models_dir)
        return cls(load_pipeline(path, device, vae=vae, dtype=dtype), path, clip_model, siglip_model, embeddings_dirs,
                   loras_dirs, hypernetworks_dirs)

    def encoder(self, clip_model=None) -> AestheticEncoder:
        """The aesthetic encoder for this pipeline (SD1.x/SD2.x: one tower; SDXL: both), one per CLIP model."""
        return self.runner.encoder(clip_model)

    def style(self, path: str | None) -> Style | None:
        return self.runner.style(path)

    def check(self, request: GenerationRequest) -> None:
        """Refuse what this model cannot do, before any work."""
        self.runner.check(request)

    def request_addons(self, request: GenerationRequest) -> RequestAddons:
        """The request's LoRAs bound to the pipeline, and the embeddings its text encoders can take."""
        return self.runner.request_addons(request)

    def embeddings(self, request: GenerationRequest, style: Style | None, desc: str = "style",
                   addons: RequestAddons | None = None, progress: Progress | None = None):
        """(prompt_embeds, negative_prompt_embeds, pooled): plain when the request has no active style (no CLIP
        loaded); ``pooled`` holds SDXL's pooled embeddings (empty for SD1/SD2). ``addons``: the request's LoRAs
        and embeddings (resolved here when not given); the embeddings it used are in ``self.last_embeddings``.
        (``encoder(...).encode`` gives the same tensors as one ``EncodedPrompt``.)"""
        request = self.addons.paired(request)  # DreamArtist's NAME-neg in the negative prompt
        e, self.last_embeddings = self.runner.conditioning(request, style, addons or self.request_addons(request),
                                                           desc, progress)
        return e.prompt_embeds, e.negative_prompt_embeds, pooled_kwargs(e)

    def _model_hash(self, model: str) -> str | None:
        return model_hash(model)

    def images(self, request: GenerationRequest, n: int = 1, progress: Progress | None = None,
               init_image: Image.Image | None = None) -> list[tuple[Image.Image, str]]:
        """``n`` images with seeds ``seed .. seed+n-1`` and the infotext of each; the style is applied once.
        ``progress``: see ``Progress`` (no terminal bars then). ``init_image``: an img2img start given as an image
        rather than as ``request.init_image``'s path (resized as that would be)."""
        if n < 1:
            raise StylegradError(f"n must be >= 1, got {n}")
        request = self.addons.paired(request)  # DreamArtist's NAME-neg in the negative prompt, and in the PNG
        run = self.runner.condition(self.runner.prepare(request, init_image), progress)
        self.last_embeddings = run.embeddings_used
        fields = run.addons.infotext_fields(run.embeddings_used)
        steps = DenoisingProgress(progress, n)
        out = []
        try:
            for i in range(n):
                r = request.with_seed(request.seed + i)
                image = self.runner.denoise(run, r, steps.image(i))
                out.append((image, image_infotext(r, image, run.pipe, model=self.model, style=run.style,
                                                  code=run.code, addons=fields)))
                if steps.stopped:  # interrupted: this image cut short, no further one
                    break
        finally:
            steps.close()
        return out

    def images_batch(self, requests: list[GenerationRequest], progress: Progress | None = None
                     ) -> list[tuple[Image.Image, str]]:
        """One image per request, the requests' UNet passes run as one batch: for a server, where many clients
        send requests that differ only in prompt, style and seed. They must share what the pipeline call takes
        (sampler, steps, guidance, size) and have no LoRA, stylecode or init image. Each image equals its request
        run alone up to float rounding (a batch takes other kernels), so pixels may differ by one level."""
        requests = [self.addons.paired(r) for r in requests]
        first = requests[0]
        shared = lambda r: (r.sampler, r.steps, r.cfg, r.width, r.height, r.model, r.clip_model)  # noqa: E731
        if any(shared(r) != shared(first) or r.loras or r.init_image or r.uses_stylecode for r in requests):
            raise StylegradError("requests in one batch must share sampler, steps, guidance and size, without "
                                 "LoRAs, stylecodes or init images")
        self.runner.check(first)
        pipe, _ = self.runner.pipeline(first)
        parts = []
        for r in requests:
            style = self.style(r.style)
            addons = self.request_addons(r)
            if addons.loras:
                raise StylegradError("a request with LoRAs (a <lora:...> tag) cannot join a batch")
            if addons.hypernetworks:
                raise StylegradError("a request with hypernetworks (a <hypernet:...> tag) cannot join a batch")
            if r.ip_adapter is not None:
                raise StylegradError("a request with an IP-Adapter cannot join a batch")
            e, used = self.runner.conditioning(r, style, addons, progress=progress)
            self.last_embeddings = used
            parts.append((r, style, e, addons.infotext_fields(used)))
        out: list = [None] * len(requests)
        groups: dict = {}  # prompts of another length (more 75-token chunks) go in a batch of their own
        for i, (_, _, e, _) in enumerate(parts):
            groups.setdefault((tuple(e.prompt_embeds.shape), tuple(e.negative_prompt_embeds.shape)), []).append(i)
        for members in groups.values():
            rs = [parts[i] for i in members]
            steps = DenoisingProgress(progress)
            try:
                images = self.runner.denoise_batch(pipe, [p[0] for p in rs], [p[2] for p in rs], steps.image(0))
            finally:
                steps.close()
            for i, (r, style, _, fields), image in zip(members, rs, images):
                out[i] = (image, image_infotext(r, image, pipe, model=self.model, style=style, addons=fields))
        return out

    def generate(self, request: GenerationRequest, out: str | Path, n: int = 1) -> list[Path]:
        """Write ``n`` PNGs into ``out`` (numbered after those already there)."""
        return save_images(self.images(request, n), request, out)

    def compare(self, request: GenerationRequest, sweep: list[int], out: str | Path, n: int = 1) -> Path:
        """The paper's figure: the same seeds without the style and with it at each number of steps, one grid."""
        if request.style is None:
            raise StylegradError("a comparison needs a style")
        request = self.addons.paired(request)
        run = self.runner.prepare(request)
        columns = [0] + [k for k in dict.fromkeys(sweep) if k > 0]
        requests = [replace(request, style_options=replace(request.style_options, steps=k)) for k in columns]
        embeds = [self.runner.conditioning(r, run.style, run.addons, f"style, {r.style_options.steps} steps")
                  for r in requests]
        self.last_embeddings = embeds[-1][1]
        steps = DenoisingProgress(None, n * len(columns))
        try:
            rows = [[self.runner.denoise(run, r.with_seed(request.seed + i), steps.image(i * len(columns) + j), e)
                     for j, (r, (e, _)) in enumerate(zip(requests, embeds))] for i in range(n)]
        finally:
            steps.close()
        text = image_infotext(requests[-1], rows[0][0], run.pipe, model=self.model, style=run.style, code=run.code,
                              extra={"Aesthetic steps sweep": " ".join(map(str, columns))},
                              addons=run.addons.infotext_fields(self.last_embeddings))
        return save_comparison(rows, columns, request, text, out)
