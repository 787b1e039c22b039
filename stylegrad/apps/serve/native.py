"""stylegrad's own API (/v1): the request fields of ``stylegrad generate``, styles made from uploaded images,
stylecodes, per-request progress and cancel. Its OpenAPI page is /docs."""

from __future__ import annotations

import base64
from dataclasses import MISSING, fields

from fastapi import File, Form, UploadFile
from pydantic import BaseModel, ConfigDict, Field

from stylegrad.aesthetic.options import StyleOptions
from stylegrad.errors import RequestError, StylegradError
from stylegrad.files.styles import save_style
from stylegrad.pipelines.request import GenerationRequest

from .controlnet import placeholders
from .errors import error
from .jobs import wait
from .responses import CancelAnswer, CodeAnswer, GenerateAnswer, JobProgress, ServerInfo, StyleList, StyleMade
from .schema import server_limits

# The fields' types are for the OpenAPI page and for parsing JSON; their defaults are read from the schema's
# dataclasses, and every range, limit and name is checked by the one build (pipelines/request.py).
_REQUEST = {f.name: f.default for f in fields(GenerationRequest) if f.default is not MISSING}
_STYLE = {f.name: f.default for f in fields(StyleOptions)}
SERVER_SET = ("model", "clip_model", "stylecodes_model", "init_image", "stylecode_image",  # not the client's to name
              "ip_image_encoder")


class StyleFields(BaseModel):
    """``StyleOptions``: how the style personalizes the prompt (ranges: see the error a bad value gets)."""

    model_config = ConfigDict(extra="forbid")

    steps: int = _STYLE["steps"]
    lr: float = _STYLE["lr"]
    weight: float = _STYLE["weight"]
    slerp: bool = _STYLE["slerp"]
    text: str | None = _STYLE["text"]
    text_angle: float = _STYLE["text_angle"]
    text_negative: bool = _STYLE["text_negative"]
    regularization: float = _STYLE["regularization"]
    target_similarity: float | None = _STYLE["target_similarity"]
    target_gain: float | None = _STYLE["target_gain"]
    personalize_negative: bool = _STYLE["personalize_negative"]
    towers: str = _STYLE["towers"]


class Generate(BaseModel):
    """One request as ``stylegrad generate`` takes it; files are names inside the server's folders, images base64."""

    model_config = ConfigDict(extra="forbid")

    prompt: str
    negative: str = _REQUEST["negative"]
    seed: int = _REQUEST["seed"]
    n: int = 1
    steps: int = _REQUEST["steps"]
    cfg: float = _REQUEST["cfg"]
    width: int | None = _REQUEST["width"]
    height: int | None = _REQUEST["height"]
    sampler: str | None = _REQUEST["sampler"]
    clip_skip: int | None = _REQUEST["clip_skip"]
    style: str | None = Field(None, description="a style's name in the server's styles folders")
    style_options: StyleFields = Field(default_factory=StyleFields)
    loras: list[str] = Field(default_factory=list, description="'NAME[:TE[:UNET]]', names in the LoRA folders")
    embeddings: list[str] = Field(default_factory=list, description="names in the embeddings folders")
    hypernetworks: list[str] = Field(default_factory=list, description="'NAME[:MULT]', names in the hypernetwork "
                                     "folders, chained before the prompt's <hypernet:NAME:MULT> tags")
    hypernetwork_reading: str = Field(_REQUEST["hypernetwork_reading"], description="a file that does not say "
                                      "whether its output is activated: 'a1111' (yes) or 'comfyui' (no)")
    stylecode: str | None = _REQUEST["stylecode"]
    stylecode_image: str | None = Field(None, description="base64 image to take the stylecode from")
    stylecode_strength: float = _REQUEST["stylecode_strength"]
    stylecode_guidance: bool = _REQUEST["stylecode_guidance"]
    init_image: str | None = Field(None, description="base64 image: img2img")
    strength: float = _REQUEST["strength"]
    weighting: bool = _REQUEST["weighting"]
    ip_adapter: str | None = Field(None, description="an IP-Adapter's name in the server's ipadapter folders "
                                   "(/v1/info lists them): the reference pictures act through it")
    ip_images: list[str] = Field(default_factory=list, description="base64 reference pictures for ip_adapter; "
                                 "several are averaged into one image embedding")
    ip_scale: float = Field(_REQUEST["ip_scale"], description="how strongly the pictures act (0: not at all)")
    ip_style: bool = Field(_REQUEST["ip_style"], description="InstantStyle: the pictures act only on the model "
                           "family's style blocks (their colours and strokes, not their layout)")
    ip_blocks: str | None = Field(_REQUEST["ip_blocks"], description="more blocks for the pictures: 'layout', "
                                  "'mid', 'up.block_0', 'down.block_2:0,1' (words separated by spaces)")
    task_id: str | None = Field(None, max_length=128, description="your id for this request's progress and cancel")


class CodeRequest(BaseModel):
    """An image -> its stylecode; or a code -> a preview image generated with it (SD1.x models)."""

    model_config = ConfigDict(extra="forbid")

    image: str | None = Field(None, description="base64 image whose style becomes a code")
    code: str | None = Field(None, description="a stylecode (or 'A::2 B::1') to preview")
    prompt: str = Field("a house by a lake", description="the preview's prompt")
    seed: int = _REQUEST["seed"]
    steps: int = 20
    width: int | None = None
    height: int | None = None


def to_request(body: Generate, service, init_size: tuple[int, int] | None = None) -> GenerationRequest:
    """The request of what the client sent (what it left out: the schema's defaults), through the one build; the
    IP-Adapter pictures are the job's files (``controlnet.placeholders``)."""
    values = body.model_dump(exclude_unset=True, exclude={"n", "task_id", *SERVER_SET})
    if "ip_images" in values:
        values["ip_images"] = placeholders(len(values["ip_images"]))
    return service.request(values, n=body.n, init_size=init_size)


def routes(app, service) -> None:
    from starlette.concurrency import run_in_threadpool

    from .images import png_b64, read_image

    s = service.settings

    async def image(data: str, what: str):
        return await read_image(data, s.max_upload_bytes, what, s.max_image_pixels)

    @app.post("/v1/generate", tags=["stylegrad"], response_model=GenerateAnswer)
    async def generate(body: Generate):
        """Images as base64 PNGs (each with its infotext), the same pixels as ``stylegrad generate`` gives."""
        init = await image(body.init_image, "init_image") if body.init_image else None
        request = to_request(body, service, init.size if init is not None else None)
        if len(body.ip_images) > s.max_ip_images:  # before any is decoded
            raise RequestError("ip_images", f"at most {s.max_ip_images} pictures, got {len(body.ip_images)}")
        pictures = [await image(data, f"ip_images[{i}]") for i, data in enumerate(body.ip_images)]
        code_image = await image(body.stylecode_image, "stylecode_image") if body.stylecode_image else None
        if code_image is not None and body.stylecode:
            raise RequestError("stylecode_image", "give stylecode or {field}, not both")
        job = service.submit_generation(request, body.n, init_image=init, stylecode_image=code_image,
                                        job_id=body.task_id, ip_images=pictures)
        results = await wait(job)
        images = await run_in_threadpool(lambda: [png_b64(im, text) for im, text in results])
        return {"task_id": job.id, "images": images, "infotexts": [text for _, text in results],
                "seeds": [body.seed + i for i in range(len(results))]}

    @app.post("/v1/styles", tags=["stylegrad"], response_model=StyleMade)
    async def make_style(files: list[UploadFile] = File(...), name: str = Form("style")):
        """A style from uploaded images (checked by content): its file (base64 safetensors, also saved into the
        server's first styles folder, where requests can name it) and its aesthetic score."""
        if len(files) > s.max_style_images:  # before any is read
            raise RequestError("files", f"at most {s.max_style_images} images per style, got {len(files)}")
        raws = []
        for f in files:
            raw = await f.read(s.max_upload_bytes + 1)
            await read_image(raw, s.max_upload_bytes, f.filename or "upload", s.max_image_pixels)  # an image?
            raws.append(raw)
        job = service.submit_style(raws, name)
        style, saved, score = await wait(job)
        import tempfile
        from pathlib import Path

        def file_bytes() -> bytes:
            with tempfile.TemporaryDirectory() as tmp:
                return save_style(style, Path(tmp) / "style.safetensors").read_bytes()

        data = await run_in_threadpool(file_bytes)
        return {"name": saved.stem if saved else style.name, "saved": saved is not None, "images": len(raws),
                "width": style.width, "sdxl": style.is_sdxl, "aesthetic_score": score,
                "file": base64.b64encode(data).decode("ascii")}

    @app.get("/v1/styles", tags=["stylegrad"], response_model=StyleList)
    def list_styles():  # reads the folders: a plain function, run off the event loop
        return {"styles": sorted(service.styles())}

    @app.post("/v1/codes", tags=["stylegrad"], response_model=CodeAnswer, response_model_exclude_unset=True)
    async def code(body: CodeRequest):
        """An image's style as a stylecode (SD1.5 Stylecodes), to paste into a prompt or a request; or, given a
        code, a preview image made with it."""
        if (body.image is None) == (body.code is None):
            raise StylegradError("give image (to make a code) or code (to preview it)")
        if body.image is not None:
            return {"code": await wait(service.submit_code(await image(body.image, "image")))}
        preview = Generate(prompt=body.prompt, seed=body.seed, steps=body.steps, width=body.width,
                           height=body.height, stylecode=body.code)
        ((im, text),) = await wait(service.submit_generation(to_request(preview, service)))
        return {"code": body.code, "preview": png_b64(im, text), "infotext": text}

    @app.get("/v1/progress/{task_id}", tags=["stylegrad"], response_model=JobProgress, name="task_progress")
    async def progress(task_id: str):
        job = service.queue.jobs.get(task_id)
        if job is None:
            return error(404, f"no task {task_id!r}", "task_id")
        return job.snapshot()

    @app.post("/v1/cancel/{task_id}", tags=["stylegrad"], response_model=CancelAnswer, name="cancel_task")
    async def cancel(task_id: str):
        job = service.queue.jobs.get(task_id)
        if job is None:
            return error(404, f"no task {task_id!r}", "task_id")  # as /v1/progress answers it
        job.cancel()
        return {"cancelled": task_id}

    @app.get("/v1/info", tags=["stylegrad"], response_model=ServerInfo)
    def info():
        return {"model": service.model_name, "family": service.family, "styles": sorted(service.styles()),
                "loras": sorted(service.loras()), "embeddings": sorted(service.embeddings()),
                "ip_adapters": sorted(service.ip_adapters()),
                "samplers": [a for _, a in service.samplers()], "default_sampler": service.default_sampler(),
                "limits": server_limits(s)}
