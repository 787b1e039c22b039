"""The part of AUTOMATIC1111's HTTP API that clients call (Open WebUI, SillyTavern, Photoshop plugins, the
``webuiapi`` client): its request fields and defaults, its response shapes (``modules/api/models.py``), and the
aesthetic-gradients extension's fields under its script title in ``alwayson_scripts``."""

from __future__ import annotations

import json
import re
import time
from pathlib import Path
from typing import Any

from pydantic import BaseModel, ConfigDict, Field

from stylegrad.errors import RequestError, StylegradError
from stylegrad.files.infotext import parse_infotext
from stylegrad.pipelines.loading import SAMPLERS
from stylegrad.pipelines.request import GenerationRequest

from .controlnet import IPUnits, placeholders
from .jobs import TaskIdInUse, wait
from .responses import EmbeddingsAnswer, ImageAnswer, LoraItem, ModelItem, PNGInfoAnswer, ProgressAnswer, SamplerItem

SCRIPT = "aesthetic embeddings"  # the extension's script title, as A1111 matches alwayson_scripts keys
# the extension's ui() order, and its defaults
SCRIPT_ARGS = ("aesthetic_weight", "aesthetic_steps", "aesthetic_lr", "aesthetic_slerp", "aesthetic_imgs",
               "aesthetic_imgs_text", "aesthetic_slerp_angle", "aesthetic_text_negative")
SCRIPT_DEFAULTS = dict(aesthetic_weight=0.9, aesthetic_steps=5, aesthetic_lr=0.0001, aesthetic_slerp=False,
                       aesthetic_imgs="None", aesthetic_imgs_text="", aesthetic_slerp_angle=0.1,
                       aesthetic_text_negative=False)
CLIP_STOP = "override_settings.CLIP_stop_at_last_layers"
OVERRIDE_MODEL = "override_settings.sd_model_checkpoint"
# the schema's field -> A1111's name for it, so an error names what the client sent
NAMES = {"negative": "negative_prompt", "cfg": "cfg_scale", "sampler": "sampler_name", "n": "batch_size x n_iter",
         "strength": "denoising_strength", "clip_skip": CLIP_STOP, "init_image": "init_images[0]",
         "style": f"alwayson_scripts['{SCRIPT}'].aesthetic_imgs", "style_options.steps": "aesthetic_steps",
         "style_options.lr": "aesthetic_lr", "style_options.weight": "aesthetic_weight",
         "style_options.slerp": "aesthetic_slerp", "style_options.text": "aesthetic_imgs_text",
         "style_options.text_angle": "aesthetic_slerp_angle", "style_options.text_negative": "aesthetic_text_negative"}


class Txt2Img(BaseModel):
    """A1111's StableDiffusionProcessingTxt2Img fields that change the picture here; others (restore_faces,
    tiling, ...) are accepted and ignored, as clients send them all."""

    model_config = ConfigDict(extra="allow")

    prompt: str = ""
    negative_prompt: str = ""
    seed: int = -1
    steps: int = 50
    cfg_scale: float = 7.0
    width: int = 512
    height: int = 512
    sampler_name: str | None = None
    sampler_index: str = "Euler"
    scheduler: str | None = None
    batch_size: int = Field(1, ge=1)
    n_iter: int = Field(1, ge=1)
    override_settings: dict[str, Any] = Field(default_factory=dict)
    override_settings_restore_afterwards: bool = Field(True, description="after a request whose override_settings "
                                                       "name another sd_model_checkpoint, switch back")
    alwayson_scripts: dict[str, Any] = Field(default_factory=dict)
    send_images: bool = True
    save_images: bool = False
    force_task_id: str | None = Field(None, max_length=128)


class Img2Img(Txt2Img):
    init_images: list[str] | None = None
    denoising_strength: float = 0.75
    mask: str | None = None  # inpainting: refused (one clear 422) until it is supported, never silently ignored


class PNGInfoRequest(BaseModel):
    image: str


def clip_stop(value, field: str) -> int:
    """A1111's CLIP_stop_at_last_layers: 1 (the last layer) to 12."""
    if isinstance(value, bool) or not isinstance(value, int) or not 1 <= value <= 12:
        raise RequestError(field, f"must be a whole number in 1..12, got {value!r}")
    return value


def _script_args(scripts: dict[str, Any]) -> dict[str, Any] | None:
    """The extension's arguments from ``alwayson_scripts`` (a list in its ui() order, or a dict by name)."""
    entry = next((v for k, v in scripts.items() if k.strip().lower() == SCRIPT), None)
    if entry is None:
        return None
    args = entry.get("args", entry) if isinstance(entry, dict) else entry
    if isinstance(args, dict):
        unknown = set(args) - set(SCRIPT_ARGS)
        if unknown:
            raise RequestError(f"alwayson_scripts['{SCRIPT}']",
                               f"{{field}}: unknown argument(s) {', '.join(sorted(unknown))}")
        return {**SCRIPT_DEFAULTS, **args}
    if not isinstance(args, list) or len(args) > len(SCRIPT_ARGS):
        raise RequestError(f"alwayson_scripts['{SCRIPT}'].args",
                           f"{{field}}: a list of at most {len(SCRIPT_ARGS)} values ({', '.join(SCRIPT_ARGS)})")
    return {**SCRIPT_DEFAULTS, **dict(zip(SCRIPT_ARGS, args))}


def _value(args: dict, key: str, kind):
    """A script argument as the schema's type (its range is the schema's to check)."""
    try:
        return kind(args[key])
    except (TypeError, ValueError, OverflowError) as e:  # int(inf) overflows
        raise RequestError(key, f"must be a number, got {args[key]!r}") from e


def to_request(body: Txt2Img, service, init_size: tuple[int, int] | None = None, ip: IPUnits | None = None,
               ip_adapter: str | None = None) -> GenerationRequest:
    """Our request for an A1111 one, through the one build (names inside the server's folders, its limits, seed
    -1 random); a bad field is named as A1111 names it. ``ip``: the ControlNet extension's IP-Adapter units
    (controlnet.py), ``ip_adapter`` the file their model names."""
    name = body.sampler_name or body.sampler_index
    if body.scheduler and body.scheduler.lower() == "karras" and "karras" not in name.lower():
        name = f"{name} Karras"
    values = dict(prompt=body.prompt, negative=body.negative_prompt, seed=body.seed, steps=body.steps,
                  cfg=body.cfg_scale, width=body.width, height=body.height, sampler=name,
                  style_options={"steps": 0})
    # the request's override, else the server's option (POST /sdapi/v1/options), as A1111 reads them
    stop = body.override_settings.get("CLIP_stop_at_last_layers", service.a1111_options["CLIP_stop_at_last_layers"])
    values["clip_skip"] = clip_stop(stop, CLIP_STOP) - 1 or None  # A1111's 1 = the last layer = no skip
    if isinstance(body, Img2Img):
        values["strength"] = body.denoising_strength
    args = _script_args(body.alwayson_scripts)
    if args is not None and str(args["aesthetic_imgs"]) not in ("", "None"):
        options = dict(
            steps=_value(args, "aesthetic_steps", int), lr=_value(args, "aesthetic_lr", float),
            weight=_value(args, "aesthetic_weight", float), slerp=bool(args["aesthetic_slerp"]),
            text=str(args["aesthetic_imgs_text"]) or None, text_angle=_value(args, "aesthetic_slerp_angle", float),
            text_negative=bool(args["aesthetic_text_negative"]),
            personalize_negative=True,  # the extension tunes every prompt it encodes, the negative too
        )
        # the extension tunes only when steps, learning rate and weight are all non-zero: a zero turns it off
        if options["steps"] != 0 and options["lr"] != 0 and options["weight"] != 0:
            values["style"], values["style_options"] = str(args["aesthetic_imgs"]), options
    if ip is not None:
        values.update(ip_adapter=ip_adapter, ip_images=placeholders(len(ip.pictures)), ip_scale=ip.scale)
    names = {**NAMES, **(ip.fields if ip is not None else {})}
    try:
        return service.request(values, n=body.batch_size * body.n_iter, init_size=init_size,
                               random_seed_allowed=True)
    except RequestError as e:
        raise e.renamed(names.get(e.field.split("[")[0], e.field)) from None


def info_json(body: Txt2Img, request: GenerationRequest, seeds: list[int], infotexts: list[str], service) -> str:
    """A1111's ``info``: a JSON string describing the batch (the fields clients read)."""
    n = len(seeds)
    return json.dumps({
        "prompt": body.prompt, "all_prompts": [body.prompt] * n,
        "negative_prompt": body.negative_prompt, "all_negative_prompts": [body.negative_prompt] * n,
        "seed": seeds[0] if seeds else request.seed, "all_seeds": seeds, "subseed": -1, "all_subseeds": [-1] * n,
        "subseed_strength": 0, "width": request.width, "height": request.height,
        "sampler_name": service.sampler_label(request.sampler), "cfg_scale": request.cfg, "steps": request.steps,
        "batch_size": body.batch_size, "restore_faces": False, "face_restoration_model": None,
        "sd_model_name": service.model_name, "sd_model_hash": service.model_hash(), "sd_vae_name": None,
        "sd_vae_hash": None, "seed_resize_from_w": -1, "seed_resize_from_h": -1,
        "denoising_strength": request.strength if isinstance(body, Img2Img) else None,
        "extra_generation_params": {}, "index_of_first_image": 0, "infotexts": infotexts, "styles": [],
        "job_timestamp": time.strftime("%Y%m%d%H%M%S"), "clip_skip": (request.clip_skip or 0) + 1,
        "is_using_inpainting_conditioning": False, "version": "stylegrad",
    })


def png_info_answer(text: str, items: dict[str, str], size: tuple[int, int]) -> dict:
    """A1111's png-info answer: the infotext (a NovelAI image's written as A1111 writes it), its fields as A1111
    parses them ('Size: 512x768' as Size-1 and Size-2, 'Clip skip' 1 where absent), the image's other text."""
    if items.get("Software") == "NovelAI":
        text = _novelai_infotext(items, size) or text
    if not text:
        return {"info": "", "items": items, "parameters": {}}
    prompt, negative, fields = parse_infotext(text)
    parameters = {"Prompt": prompt, "Negative prompt": negative}
    for key, value in fields.items():
        m = re.fullmatch(r"(\d+)x(\d+)", str(value))
        if m:
            parameters[f"{key}-1"], parameters[f"{key}-2"] = m.groups()
        else:
            parameters[key] = value
    parameters.setdefault("Clip skip", "1")
    return {"info": text, "items": items, "parameters": parameters}


def _novelai_infotext(items: dict[str, str], size: tuple[int, int]) -> str | None:
    """What A1111 makes of NovelAI's Description and JSON Comment (its Clip skip 2 and ENSD 31337 included)."""
    try:
        c = json.loads(items["Comment"])
        known = {n: a for short, (_, a, _) in SAMPLERS.items() for n in (a.lower(), short, f"k_{short}")}
        sampler = known.get(str(c.get("sampler", "")).lower(), "Euler a")
        return (f"{items.get('Description', '')}\nNegative prompt: {c['uc']}\nSteps: {c['steps']}, Sampler: "
                f"{sampler}, CFG scale: {c['scale']}, Seed: {c['seed']}, Size: {size[0]}x{size[1]}, Clip skip: 2, "
                "ENSD: 31337")
    except (KeyError, TypeError, ValueError, AttributeError):
        return None


def model_item(service) -> dict:
    """The loaded model as A1111's sd-models lists it (its title is what options' sd_model_checkpoint holds)."""
    return service.current_checkpoint().item()


def routes(app, service) -> None:
    """A1111's /sdapi/v1 routes of this module: generation and png-info, the lists of what is loaded, and the
    running job's progress, interrupt and skip (a1111_lists.py has the rest)."""
    _generation_routes(app, service)
    _list_routes(app, service)
    _control_routes(app, service)


def _generation_routes(app, service) -> None:
    """txt2img, img2img (one job each through the one request schema) and png-info."""
    from starlette.concurrency import run_in_threadpool

    from stylegrad.pipelines.outputs import save_images

    from . import controlnet
    from .images import decode_b64, png_b64, read_image

    s = service.settings

    async def run(body: Txt2Img, init: bool):
        n = body.batch_size * body.n_iter
        init_image = None
        if init:
            if body.mask:
                raise RequestError("mask", "{field}: inpainting is not supported by this server yet (send img2img "
                                   "without a mask)")
            if not body.init_images:
                raise RequestError("init_images", "{field}: one base64 image is needed")
            init_image = await read_image(body.init_images[0], s.max_upload_bytes, "init_images[0]",
                                          s.max_image_pixels)
        ip = controlnet.parse_units(body.alwayson_scripts, body.init_images[0] if init else None)
        ip_images = ip_adapter = None
        if ip is not None:  # the folder read (and the hash checked) off the loop, then the pictures decoded
            ip_adapter = str(await run_in_threadpool(
                lambda: controlnet.find_adapter(ip.model, service.ip_adapters(), ip.fields["ip_adapter"])))
            ip_images = await controlnet.read_pictures(ip, s)
        request = to_request(body, service, init_image.size if init_image is not None else None, ip, ip_adapter)
        model = None
        if "sd_model_checkpoint" in body.override_settings:  # this request on another model (found off the loop)
            model = await run_in_threadpool(service.find_model, body.override_settings["sd_model_checkpoint"],
                                            OVERRIDE_MODEL)
        try:
            job = service.submit_generation(request, n, init_image=init_image, job_id=body.force_task_id,
                                            model=model, restore=body.override_settings_restore_afterwards,
                                            field=OVERRIDE_MODEL, ip_images=ip_images)
        except RequestError as e:
            raise e.renamed(NAMES.get(e.field, e.field)) from None
        except TaskIdInUse as e:
            raise TaskIdInUse(e.job_id, "force_task_id") from None
        results = await wait(job)  # interrupted: the images made so far, the last one cut short (as A1111)
        seeds = [request.seed + i for i in range(len(results))]
        infotexts = [text for _, text in results]
        if body.save_images:  # as A1111: into the outputs folder, beside answering them
            folder = Path(s.outputs_dir) / ("img2img-images" if init else "txt2img-images")
            await run_in_threadpool(save_images, results, request, folder)
        images = []  # send_images false: A1111's empty list
        if body.send_images:  # PNG encoding is heavy work: off the event loop
            images = await run_in_threadpool(lambda: [png_b64(im, text) for im, text in results])
        parameters = body.model_dump(exclude={"init_images"})
        return {"images": images, "parameters": parameters,
                "info": info_json(body, request, seeds, infotexts, service)}

    @app.post("/sdapi/v1/txt2img", tags=["A1111"], response_model=ImageAnswer)
    async def txt2img(body: Txt2Img):
        """Text to image, as A1111's API (the aesthetic fields under alwayson_scripts['Aesthetic embeddings'])."""
        return await run(body, False)

    @app.post("/sdapi/v1/img2img", tags=["A1111"], response_model=ImageAnswer)
    async def img2img(body: Img2Img):
        return await run(body, True)

    @app.post("/sdapi/v1/png-info", tags=["A1111"], response_model=PNGInfoAnswer)
    async def png_info(body: PNGInfoRequest):
        """An image's infotext and its fields, as A1111 answers them."""
        raw = await run_in_threadpool(decode_b64, body.image, s.max_upload_bytes, "image")
        image = await read_image(raw, s.max_upload_bytes, "image", s.max_image_pixels)  # an image, or one error
        info, items, fields = await run_in_threadpool(service.png_info, raw)
        infotext = info if fields.get("tool") in ("automatic1111", "stylegrad") else ""  # not ComfyUI's graph
        return png_info_answer(infotext, items, image.size)


def _list_routes(app, service) -> None:
    """sd-models, samplers, loras, embeddings: what this server has loaded or can load."""
    # the lists read files (hashes, folders, embeddings): plain functions, which FastAPI runs off the event loop
    @app.get("/sdapi/v1/sd-models", tags=["A1111"], response_model=list[ModelItem])
    def sd_models():
        """The models folder's checkpoints (what options' sd_model_checkpoint switches to), or the one loaded
        model where the server has no models folder."""
        return [c.item() for c in service.models()]

    @app.get("/sdapi/v1/samplers", tags=["A1111"], response_model=list[SamplerItem])
    async def samplers():
        return [{"name": a1111, "aliases": [short], "options": {}} for short, a1111 in service.samplers()]

    @app.get("/sdapi/v1/loras", tags=["A1111"], response_model=list[LoraItem])
    def loras():
        return [{"name": name, "alias": name, "path": str(path), "metadata": {}}
                for name, path in sorted(service.loras().items())]

    @app.get("/sdapi/v1/embeddings", tags=["A1111"], response_model=EmbeddingsAnswer)
    def embeddings():
        from stylegrad.addons.embeddings import load_embedding

        widths = service.encoder_widths()
        loaded, skipped = {}, {}
        for name, path in sorted(service.embeddings().items()):
            try:
                e = load_embedding(path, name)
            except StylegradError:
                continue
            v = next(iter(e.parts.values()))
            item = {"step": None, "sd_checkpoint": None, "sd_checkpoint_name": None, "shape": int(v.shape[-1]),
                    "vectors": e.vectors}
            fits = any(e.for_width(w, part) is not None for w, part in widths)
            (loaded if fits else skipped)[name] = item
        return {"loaded": loaded, "skipped": skipped}


def _control_routes(app, service) -> None:
    """progress, interrupt and skip of the job that is running."""
    @app.get("/sdapi/v1/progress", tags=["A1111"], response_model=ProgressAnswer)
    async def progress(skip_current_image: bool = False):
        job = service.queue.current
        if job is not None and job.future.done():  # answered already: the worker is only letting it go
            job = None
        snap = job.snapshot() if job else None
        return {
            "progress": snap["progress"] if snap else 0.0,
            "eta_relative": snap["eta_seconds"] if snap else 0.0,
            "state": {"skipped": False, "interrupted": bool(snap and (snap["interrupted"] or snap["cancelled"])),
                      "stopping_generation": False,
                      "job": job.id if job else "", "job_count": service.queue.waiting + (1 if job else 0),
                      "job_timestamp": time.strftime("%Y%m%d%H%M%S"), "job_no": job.number if job else 0,
                      "sampling_step": snap["step"] if snap else 0, "sampling_steps": snap["steps"] if snap else 0},
            "current_image": None,
            "textinfo": snap["stage"] if snap else None,
        }

    @app.post("/sdapi/v1/interrupt", tags=["A1111"], response_model=dict[str, Any])
    async def interrupt():
        """Ends the running generation at its next denoising step, as A1111's does: its request answers with the
        image so far (and the images before it); waiting requests still run."""
        job = service.queue.current
        if job is not None:
            job.interrupt()
        return {}

    @app.post("/sdapi/v1/skip", tags=["A1111"], response_model=dict[str, Any])
    async def skip():
        """Ends the image being denoised at its next step, as A1111's does: the request goes on with its next
        image and answers with all of them, the skipped one as it was."""
        job = service.queue.current
        if job is not None:
            job.skip()
        return {}
