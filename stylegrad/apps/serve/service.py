"""What every front end of ``stylegrad serve`` asks of the one loaded model (the A1111 API, the native API and the
web UI alike): generations, styles from images, stylecodes, PNG info, and the lists of what is installed. Every
name a client gives is resolved inside the configured folders here, and every job runs through the one queue."""

from __future__ import annotations

import gc
import io
import logging
import tempfile
from collections.abc import Callable
from dataclasses import replace
from pathlib import Path

from PIL import Image

from stylegrad.aesthetic.embedding import embed_images
from stylegrad.errors import RequestError, StylegradError, is_out_of_memory
from stylegrad.families import Family, pipeline_family
from stylegrad.files.pnginfo import read_generation_info
from stylegrad.files.styles import Style, save_style
from stylegrad.pipelines.generation import Generator
from stylegrad.pipelines.loading import SAMPLERS, a1111_sampler_name
from stylegrad.pipelines.request import GenerationRequest, build, check

from . import folders
from .checkpoints import Checkpoint, Checkpoints, describe
from .jobs import Cancelled, Job, JobQueue
from .settings import ServeSettings

log = logging.getLogger("stylegrad.serve")


class Service:
    def __init__(self, generator: Generator, settings: ServeSettings, clip_model: str | None = None,
                 stylecodes_model: str | None = None, load_model: Callable[[str], Generator] | None = None):
        """``load_model(path)``: the Generator for a checkpoint a client switches to (``stylegrad serve`` loads it
        with its own --device/--dtype policy); default: on the loaded model's device and in its dtype."""
        self.generator, self.settings = generator, settings
        self.checkpoints = Checkpoints(settings.models_dir)
        self._load_model = load_model or self._load_like_current
        self._switches = 0  # model switches queued so far
        self.clip_model = clip_model  # the image tower styles are made with (default: the model family's)
        self.stylecodes_model = stylecodes_model
        self.queue = JobQueue(settings.max_waiting, max_batch=settings.max_batch)
        self._image_encoder = None
        self._codes = None
        self.a1111_options = {"CLIP_stop_at_last_layers": 1}  # A1111's server-wide settings a client may set

    # -- requests, with names inside the configured folders ---------------------------------------------------
    @property
    def names(self) -> folders.FolderNames:
        s = self.settings
        return folders.FolderNames(s.styles_dirs, s.loras_dirs, s.embeddings_dirs, s.ipadapter_dirs,
                                   s.hypernetworks_dirs)

    def style_path(self, name: str) -> str:
        return self.names.style(name)

    def request(self, values: dict, *, n: int = 1, init_size: tuple[int, int] | None = None,
                random_seed_allowed: bool = False) -> GenerationRequest:
        """The request a client asked for (schema field names), through the one ``build``: this server's model,
        CLIP and Stylecodes model, its folders and its limits."""
        values = {"model": str(self.generator.model or ""), "clip_model": self.clip_model,
                  "stylecodes_model": self.stylecodes_model, **values}
        if values.get("ip_adapter") is not None:
            values = {**values, **self._ip_adapter_values(values["ip_adapter"])}
        request = build(values, self.settings.limits, n=n, init_size=init_size, names=self.names,
                        random_seed_allowed=random_seed_allowed)
        self._check_lora_tags(request)
        self._check_hypernet_tags(request)
        return request

    def _check_hypernet_tags(self, request: GenerationRequest) -> None:
        """The prompt's <hypernet:NAME:MULT> tags name hypernetworks in the folders, as LoRA tags must."""
        from stylegrad.prompts.syntax import hypernet_tags

        tags = hypernet_tags(request.prompt)
        found = self.hypernetworks() if tags else {}
        for tag in tags:
            if tag.name not in found:
                error = folders.refusal(tag.name, self.settings.hypernetworks_dirs, "hypernetwork")
                raise RequestError("prompt", "{field}: " + str(error))

    def hypernetworks(self) -> dict[str, Path]:
        """A1111's list: stem -> file in the hypernetwork folders (A1111 skips a None.pt)."""
        from stylegrad.addons.hypernetworks.library import EXTENSIONS

        return {k: v for k, v in folders.listing(self.settings.hypernetworks_dirs, EXTENSIONS).items() if k != "None"}

    def _check_lora_tags(self, request: GenerationRequest) -> None:
        """The prompt's <lora:NAME:W> tags name LoRAs in the folders, as the ``loras`` field must: anything else
        is refused as that field refuses it (the library would note it on the server's console and go on)."""
        from stylegrad.prompts.syntax import extract_tags

        tags = extract_tags(request.prompt)[1]
        loras = self.loras() if tags else {}
        for tag in tags:
            if tag.name not in loras:
                error = folders.refusal(tag.name, self.settings.loras_dirs, "LoRA")
                raise RequestError("prompt", "{field}: " + str(error))

    def _ip_adapter_values(self, name) -> dict:
        """The IP-Adapter a client names, as a file inside the ipadapter folders (a 422 naming ip_adapter for
        anything else)."""
        if not isinstance(name, str):
            raise RequestError("ip_adapter", f"must be text, got {name!r}"[:120])
        try:
            path = self.names.ip_adapter(name)
        except StylegradError as e:
            raise RequestError("ip_adapter", "{field}: " + str(e)) from None
        return {"ip_adapter": path}

    def _with_image_encoder(self, request: GenerationRequest) -> GenerationRequest:
        """The request with the image encoder of the server's clip_vision folders that fits its adapter (the first,
        in their order; then the library's own places: beside the adapter, the hub). Run in the job: reading a
        pickled adapter's shapes loads it."""
        folders = [Path(d) for d in self.settings.clip_vision_dirs if Path(d).is_dir()]
        if request.ip_adapter is None or request.ip_image_encoder is not None or not folders:
            return request
        from stylegrad.addons.ipadapter.encoder import find_encoder
        from stylegrad.addons.ipadapter.library import AdapterLibrary
        from stylegrad.addons.ipadapter.shapes import adapter_shape
        from stylegrad.files.recognize import open_file

        adapter = Path(request.ip_adapter)
        shape = adapter_shape(open_file(adapter)[1].shapes, adapter.name)
        beside = AdapterLibrary([str(adapter.parent)]).clip_vision_folders(adapter)
        return replace(request, ip_image_encoder=find_encoder(shape, None, folders + beside))

    # -- the lists A1111 clients read ---------------------------------------------------------------------
    def styles(self) -> dict[str, Path]:
        return folders.listing(self.settings.styles_dirs, folders.STYLE_SUFFIXES)

    def loras(self) -> dict[str, Path]:
        return folders.listing(self.settings.loras_dirs, folders.ADDON_SUFFIXES)

    def embeddings(self) -> dict[str, Path]:
        return folders.listing(self.settings.embeddings_dirs, folders.ADDON_SUFFIXES)

    def ip_adapters(self) -> dict[str, Path]:
        return folders.listing(self.settings.ipadapter_dirs, folders.IPADAPTER_SUFFIXES)

    @property
    def model_name(self) -> str:
        return Path(str(self.generator.model or "model")).stem or str(self.generator.model)

    @property
    def family(self) -> str | None:
        return pipeline_family(self.generator.pipe)

    def samplers(self) -> list[tuple[str, str]]:
        return [(short, a1111) for short, (_, a1111, _) in SAMPLERS.items()]

    def default_sampler(self) -> str:
        return a1111_sampler_name(self.generator.pipe.scheduler)

    def default_size(self) -> int:
        """The model's own image side (its UNet's sample size x the VAE's scale), as diffusers defaults to."""
        pipe = self.generator.pipe
        return int(pipe.unet.config.sample_size * getattr(pipe, "vae_scale_factor", 8))

    def encoder_widths(self) -> list[tuple[int, str]]:
        """(width, part of an embedding file) of each text encoder: what an embedding must fit."""
        pipe = self.generator.pipe
        if getattr(pipe, "text_encoder_2", None) is not None:
            return [(pipe.text_encoder.config.hidden_size, "clip_l"), (pipe.text_encoder_2.config.hidden_size, "clip_g")]
        return [(pipe.text_encoder.config.hidden_size, "")]

    def sampler_label(self, short: str | None) -> str:
        return SAMPLERS[short][1] if short else self.default_sampler()

    def model_hash(self) -> str | None:
        model = self.generator.model
        return self.generator._model_hash(str(model)) if model else None

    def current_checkpoint(self) -> Checkpoint:
        return describe(str(self.generator.model or ""))

    def models(self) -> list[Checkpoint]:
        """What a client may switch to (the models folder's checkpoints), the loaded model first if not there."""
        current, listed = self.current_checkpoint(), self.checkpoints.listing()
        same = lambda c: Path(c.path).resolve() == Path(current.path).resolve()  # noqa: E731
        return listed if any(map(same, listed)) else [current, *listed]

    # -- jobs -------------------------------------------------------------------------------------------------
    def submit_generation(self, request: GenerationRequest, n: int = 1, init_image: Image.Image | None = None,
                          stylecode_image: Image.Image | None = None, job_id: str | None = None,
                          model: Checkpoint | None = None, restore: bool = True,
                          field: str = "sd_model_checkpoint", ip_images: list[Image.Image] | None = None) -> Job:
        """``model``: run on this checkpoint of the models folder (``find_model``; A1111's override of
        sd_model_checkpoint): a switch queued just before the job, and with ``restore`` one back just after.
        ``ip_images``: the uploaded IP-Adapter pictures, written for the job into a folder of its own (removed
        after it) under the names the request holds for them (``controlnet.placeholders``)."""
        check(request, self.settings.limits, n=n, init_size=init_image.size if init_image is not None else None)
        if len(ip_images or ()) != len(request.ip_images):  # a client's picture is an upload, never a server path
            raise RequestError("ip_images", f"{{field}}: {len(request.ip_images)} named, {len(ip_images or ())} "
                               "uploaded")
        if self.settings.log_prompts:
            log.info("generate %r seed=%s steps=%s style=%s", request.prompt, request.seed, request.steps,
                     request.style)
        else:
            log.info("generate: %d image(s), %d steps, %s", n, request.steps, "styled" if request.styled else "plain")

        key = None
        if (model is None and self.settings.max_batch > 1 and n == 1 and init_image is None and stylecode_image is None
                and not request.uses_stylecode and not request.loras and not request.init_image
                and request.ip_adapter is None
                and "<lora:" not in request.prompt + request.negative
                and not request.hypernetworks and "<hypernet:" not in request.prompt):
            key = ("generate", request.sampler, request.steps, request.cfg, request.width, request.height,
                   request.model, request.clip_model, self._switches)  # never batched across a model switch

        def run_batch(jobs: list[Job]):
            def progress(stage, done, total):
                for j in jobs:
                    j.stage, j.done_steps, j.total_steps = stage, done, total
                if all(j.cancel_event.is_set() for j in jobs):
                    raise Cancelled("every job of this batch was cancelled")
                return all(j.interrupted for j in jobs)  # others' images are not cut short for one interrupt

            results = self.generator.images_batch([self._on_current_model(j.request) for j in jobs], progress)
            return [[r] for r in results]

        def run(job: Job):
            if switch is not None and switch.future.exception() is not None:  # done: it ran just before (FIFO)
                raise switch.future.exception()  # not on another model than the one asked for
            with tempfile.TemporaryDirectory(prefix="stylegrad-serve-") as tmp:
                r = self._on_current_model(request)
                if stylecode_image is not None:
                    path = Path(tmp) / "stylecode.png"
                    stylecode_image.save(path)
                    r = replace(r, stylecode_image=str(path))
                if ip_images:
                    paths = [Path(tmp) / Path(name).name for name in request.ip_images]
                    for image, path in zip(ip_images, paths, strict=True):
                        image.save(path)
                    r = replace(r, ip_images=tuple(map(str, paths)))
                r = self._with_image_encoder(r)
                return self.generator.images(r, n, progress=job.step, init_image=init_image)

        switch, job, remember = None, None, {}
        if model is not None:
            self._switches += 1
            switch = self.queue.submit(self._switch(lambda: model, field, remember), "model")
        try:
            job = self.queue.submit(run, "generate", job_id, batch_key=key, run_batch=run_batch if key else None)
            if switch is not None and restore:
                self._switches += 1
                self.queue.submit(self._switch(lambda: remember.get("previous"), field), "model")
        except Exception:  # a full queue: none of them runs, and the model stays as it is
            for queued in (switch, job):
                if queued is not None:
                    queued.cancel()
            raise
        job.request = request
        return job

    def find_model(self, value: str, field: str = "sd_model_checkpoint") -> Checkpoint | None:
        """The models folder's checkpoint ``value`` names (a title, name, file name or hash, as A1111 takes
        ``sd_model_checkpoint``); None where it is the loaded model; a 422 naming ``field`` for anything else."""
        if not isinstance(value, str) or not value.strip():
            raise RequestError(field, "{field}: a model's title, name or hash, as /sdapi/v1/sd-models lists them "
                               f"(got {value!r})")
        if self.current_checkpoint().answers_to(value):
            return None
        wanted = self.checkpoints.find(value)
        if wanted is None:
            if not self.settings.models_dir:
                raise RequestError(field, f"{{field}}: {value!r} is not the loaded model, and this server has no "
                                   "models folder to switch in (start it with --models-dir)")
            raise RequestError(field, f"{{field}}: no checkpoint {value!r} in this server's models folder "
                               "(/sdapi/v1/sd-models lists them; /sdapi/v1/refresh-checkpoints reads it again)")
        return wanted

    def submit_model(self, value: str, field: str = "sd_model_checkpoint") -> Job | None:
        """Switch to the models folder's checkpoint ``value`` names (A1111's ``sd_model_checkpoint``): a job in the
        one queue, so it runs after the requests before it and never under a running one; the new model loads
        with the same device and dtype policy, then replaces the Generator and the old one is freed. None: it is
        the loaded model already."""
        wanted = self.find_model(value, field)
        if wanted is None:
            return None
        self._switches += 1  # first: a generation queued from now on never joins a batch from before the switch
        return self.queue.submit(self._switch(lambda: wanted, field), "model")

    def _switch(self, target: Callable[[], Checkpoint | None], field: str,
                remember: dict | None = None) -> Callable[[Job], Checkpoint | None]:
        """A job's run: load ``target()`` (where it is not the loaded model already), replace the Generator and
        free the old one. ``remember['previous']``: the model it replaced, for a switch back."""
        def run(job: Job):
            wanted = target()
            job.step("loading model", 0, 1)
            if remember is not None:
                remember["previous"] = self.current_checkpoint()
            if wanted is not None and not self.current_checkpoint().answers_to(wanted.path):  # not done already
                try:
                    new = self._load_model(wanted.path)
                except Exception as e:
                    if not is_out_of_memory(e):
                        raise
                    free_memory()  # what the failed load took
                    raise RequestError(field, f"{{field}}: not enough memory to load {wanted.name!r} beside the "
                                       "loaded model, which stays loaded") from None
                old, self.generator = self.generator, new
                self._image_encoder = None  # styles' image tower follows the model family
                del old
                free_memory()
                log.info("model: %s", self.generator.model)
            job.step("loading model", 1, 1)
            return wanted

        return run

    def _on_current_model(self, request: GenerationRequest) -> GenerationRequest:
        """The request as the model it runs on names it (the infotext's Model): a switch queued before it may have
        replaced the one it was built with."""
        model = self.generator.model
        return replace(request, model=str(model)) if model and request.model != str(model) else request

    def _load_like_current(self, path: str) -> Generator:
        from stylegrad.devices import execution_device

        g, s = self.generator, self.settings
        return Generator.load(path, execution_device(g.pipe.unet), g.clip_model, g.siglip_model,
                              embeddings_dirs=list(s.embeddings_dirs), loras_dirs=list(s.loras_dirs),
                              dtype=g.pipe.unet.dtype, hypernetworks_dirs=list(s.hypernetworks_dirs))

    def submit_style(self, images: list[bytes], name: str, save: bool = True) -> Job:
        """A style from uploaded images (already checked by content), saved into the first styles folder."""
        if not images:
            raise StylegradError("a style needs at least one image")
        if len(images) > self.settings.max_style_images:
            raise StylegradError(f"at most {self.settings.max_style_images} images per style (got {len(images)})")
        safe = "".join(c if c.isalnum() or c in "-_" else "_" for c in name)[:64].strip("_") or "style"

        def run(job: Job):
            job.step("style", 0, len(images))
            with tempfile.TemporaryDirectory(prefix="stylegrad-style-") as tmp:
                paths = []
                for i, raw in enumerate(images):
                    p = Path(tmp) / f"{i:04d}.png"
                    Image.open(io.BytesIO(raw)).convert("RGB").save(p)
                    paths.append(p)
                if self.family == "sdxl":  # both image towers: CLIP-L's and bigG's
                    from stylegrad.aesthetic.embedding import embed_images_sdxl

                    style = embed_images_sdxl(paths, self._style_clip(), progress=False, name=safe)
                else:
                    style = embed_images(paths, self._style_clip(), encoder=self._encoder(), progress=False,
                                         name=safe)
            job.step("style", len(images), len(images))
            saved = None
            if save and self.settings.styles_dirs:
                folder = Path(self.settings.styles_dirs[0])
                folder.mkdir(parents=True, exist_ok=True)
                saved = save_style(style, _free_name(folder, safe))
            return style, saved, self.score(style)

        return self.queue.submit(run, "style")

    def submit_code(self, image: Image.Image) -> Job:
        def run(job: Job):
            job.step("code", 0, 1)
            return self._stylecodes().code_for(image)

        return self.queue.submit(run, "code")

    def submit_evaluation(self, prompts: list[str], style: str, steps: list[int], seeds: int, base: GenerationRequest,
                          out: Path) -> Job:
        """The paper's experiment on a few prompts (``evaluate``), its report written into ``out``."""
        if not self.settings.predictor:
            raise StylegradError("evaluation needs an aesthetic predictor: start the server with --predictor")
        if not prompts or len(prompts) > 20 or seeds < 1 or seeds > 4 or not steps or len(steps) > 6:
            raise StylegradError("evaluate takes 1-20 prompts, 1-4 seeds and 1-6 step counts here (the CLI has no "
                                 "such limits)")
        path = self.style_path(style)

        def run(job: Job):
            from stylegrad.devices import execution_device
            from stylegrad.evaluation.experiment import evaluate
            from stylegrad.evaluation.metrics import ClipEmbedder
            from stylegrad.evaluation.predictors import load_predictor

            job.step("evaluate", 0, 1)
            embedder = ClipEmbedder(self._style_clip(), execution_device(self.generator.pipe.unet))
            summary = evaluate(self.generator, embedder, load_predictor(self.settings.predictor), prompts, [path],
                               steps, list(range(base.seed, base.seed + seeds)), base, out, progress=False)
            job.step("evaluate", 1, 1)
            return summary

        return self.queue.submit(run, "evaluate")

    # -- helpers ------------------------------------------------------------------------------------------
    def _style_clip(self) -> str:
        from stylegrad.aesthetic.tower import detect_family

        if self.clip_model:
            return self.clip_model
        if self.family == Family.SDXL:
            return Family.SDXL.clip_models[0]  # CLIP-L's mean; bigG's is made beside it
        return detect_family(self.generator.pipe.text_encoder).clip_model

    def _encoder(self):
        if self._image_encoder is None:
            from stylegrad.aesthetic.embedding import load_image_encoder

            self._image_encoder = load_image_encoder(self._style_clip())
        return self._image_encoder

    def _stylecodes(self):
        if self._codes is None:
            from stylegrad.stylecodes.facade import SIGLIP, Stylecodes

            self._codes = Stylecodes.load(None, self.stylecodes_model, self.generator.siglip_model or SIGLIP)
        return self._codes

    def score(self, style: Style) -> float | None:
        """The style's aesthetic score by the configured predictor, where one is configured and fits."""
        if not self.settings.predictor:
            return None
        from stylegrad.evaluation.metrics import aesthetic_score
        from stylegrad.evaluation.predictors import load_predictor

        try:
            pred = load_predictor(self.settings.predictor)
            pred.check_width(style.width)
        except StylegradError as e:
            log.info("no aesthetic score: %s", e)
            return None
        return float(aesthetic_score(pred, style.vector[None])[0])

    def png_info(self, raw: bytes) -> tuple[str, dict, dict]:
        """(infotext, the PNG's other text chunks, the parsed fields) of an uploaded image."""
        with tempfile.NamedTemporaryFile(suffix=".png") as f:
            f.write(raw)
            f.flush()
            with Image.open(f.name) as im:
                items = {k: v for k, v in im.info.items() if isinstance(v, str) and k != "parameters"}
            info = read_generation_info(f.name)
        if info is None:
            return "", items, {}
        fields = {k: v for k, v in info.as_dict().items() if k != "raw"}
        return info.raw or "", items, fields

    def close(self) -> None:
        self.queue.close()


def free_memory() -> None:
    """Give a dropped model's memory back: to the process (gc) and to the device's allocator cache."""
    import torch

    gc.collect()
    if torch.cuda.is_available():
        torch.cuda.empty_cache()
    mps = getattr(torch, "mps", None)
    if mps is not None and torch.backends.mps.is_available():
        mps.empty_cache()


def _free_name(folder: Path, stem: str) -> Path:
    path = folder / f"{stem}.safetensors"
    i = 1
    while path.exists():
        path = folder / f"{stem}-{i}.safetensors"
        i += 1
    return path
