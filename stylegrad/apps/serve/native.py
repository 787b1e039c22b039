"""stylegrad's own API (/v1): the request fields of ``stylegrad generate``, styles made from uploaded images,
stylecodes, per-request progress and cancel. Its OpenAPI page is /docs."""

from __future__ import annotations

import base64

from fastapi import File, Form, UploadFile
from pydantic import BaseModel, ConfigDict, Field

from stylegrad.aesthetic.options import StyleOptions
from stylegrad.errors import StylegradError
from stylegrad.files.styles import save_style
from stylegrad.pipelines.loading import sampler_id
from stylegrad.pipelines.request import GenerationRequest


class StyleFields(BaseModel):
    model_config = ConfigDict(extra="forbid")

    steps: int = Field(10, ge=0)
    lr: float = Field(1e-4, ge=0, le=1)
    weight: float = Field(1.0, ge=0, le=1)
    slerp: bool = False
    text: str | None = None
    text_angle: float = Field(0.1, ge=0, le=1)
    text_negative: bool = False
    regularization: float = Field(0.0, ge=0)
    target_similarity: float | None = Field(None, ge=-1, le=1)
    personalize_negative: bool = False
    towers: str = Field("both", pattern="^(l|g|both)$")


class Generate(BaseModel):
    """One request as ``stylegrad generate`` takes it; files are names inside the server's folders, images base64."""

    model_config = ConfigDict(extra="forbid")

    prompt: str
    negative: str = ""
    seed: int = Field(0, ge=0, lt=2**32)
    n: int = Field(1, ge=1)
    steps: int = Field(30, ge=1)
    cfg: float = Field(7.5, ge=0, le=100)
    width: int | None = Field(None, ge=8)
    height: int | None = Field(None, ge=8)
    sampler: str | None = None
    clip_skip: int | None = Field(None, ge=0, le=11)
    style: str | None = Field(None, description="a style's name in the server's styles folders")
    style_options: StyleFields = Field(default_factory=StyleFields)
    loras: list[str] = Field(default_factory=list, description="'NAME[:TE[:UNET]]', names in the LoRA folders")
    embeddings: list[str] = Field(default_factory=list, description="names in the embeddings folders")
    stylecode: str | None = None
    stylecode_image: str | None = Field(None, description="base64 image to take the stylecode from")
    stylecode_strength: float = Field(1.0, ge=0, le=10)
    init_image: str | None = Field(None, description="base64 image: img2img")
    strength: float = Field(0.75, gt=0, le=1)
    weighting: bool = True
    task_id: str | None = Field(None, max_length=128, description="your id for this request's progress and cancel")


class CodeRequest(BaseModel):
    """An image -> its stylecode; or a code -> a preview image generated with it (SD1.x models)."""

    model_config = ConfigDict(extra="forbid")

    image: str | None = Field(None, description="base64 image whose style becomes a code")
    code: str | None = Field(None, description="a stylecode (or 'A::2 B::1') to preview")
    prompt: str = Field("a house by a lake", description="the preview's prompt")
    seed: int = Field(0, ge=0, lt=2**32)
    steps: int = Field(20, ge=1)
    width: int | None = Field(None, ge=8)
    height: int | None = Field(None, ge=8)


def to_request(body: Generate, service) -> GenerationRequest:
    s = service.settings
    for side in (body.width, body.height):
        if side is not None and (side > s.max_side or side % 8):
            raise StylegradError(f"width and height must be multiples of 8, at most {s.max_side}")
    if body.steps > s.max_steps:
        raise StylegradError(f"steps must be at most {s.max_steps}")
    if body.style_options.steps > s.max_style_steps:
        raise StylegradError(f"style_options.steps must be at most {s.max_style_steps}")
    options = StyleOptions(**body.style_options.model_dump())
    return GenerationRequest(
        prompt=body.prompt, negative=body.negative, seed=body.seed, steps=body.steps, cfg=body.cfg,
        width=body.width, height=body.height, sampler=sampler_id(body.sampler) if body.sampler else None,
        clip_skip=body.clip_skip, model=str(service.generator.model or ""), clip_model=service.clip_model,
        style=service.style_path(body.style) if body.style else None, style_options=options,
        loras=tuple(service.lora_arg(x) for x in body.loras),
        embeddings=tuple(service.embedding_arg(x) for x in body.embeddings),
        stylecode=body.stylecode or None, stylecode_strength=body.stylecode_strength, strength=body.strength,
        stylecodes_model=service.stylecodes_model, weighting=body.weighting)


def routes(app, service) -> None:
    from .app import wait
    from .images import decode_b64, open_image, png_b64

    s = service.settings

    def image(data: str, what: str):
        return open_image(decode_b64(data, s.max_upload_bytes, what), s.max_upload_bytes, what)

    @app.post("/v1/generate", tags=["stylegrad"])
    async def generate(body: Generate):
        """Images as base64 PNGs (each with its infotext), the same pixels as ``stylegrad generate`` gives."""
        request = to_request(body, service)
        init = image(body.init_image, "init_image") if body.init_image else None
        code_image = image(body.stylecode_image, "stylecode_image") if body.stylecode_image else None
        if code_image is not None and body.stylecode:
            raise StylegradError("give stylecode or stylecode_image, not both")
        job = service.submit_generation(request, body.n, init_image=init, stylecode_image=code_image,
                                        job_id=body.task_id)
        results = await wait(job)
        return {"task_id": job.id, "images": [png_b64(im, text) for im, text in results],
                "infotexts": [text for _, text in results], "seeds": [body.seed + i for i in range(body.n)]}

    @app.post("/v1/styles", tags=["stylegrad"])
    async def make_style(files: list[UploadFile] = File(...), name: str = Form("style")):
        """A style from uploaded images (checked by content): its file (base64 safetensors, also saved into the
        server's first styles folder, where requests can name it) and its aesthetic score."""
        raws = []
        for f in files:
            raw = await f.read(s.max_upload_bytes + 1)
            open_image(raw, s.max_upload_bytes, f.filename or "upload")  # refuses what is not an image
            raws.append(raw)
        job = service.submit_style(raws, name)
        style, saved, score = await wait(job)
        import tempfile
        from pathlib import Path

        with tempfile.TemporaryDirectory() as tmp:
            data = save_style(style, Path(tmp) / "style.safetensors").read_bytes()
        return {"name": saved.stem if saved else style.name, "saved": saved is not None, "images": len(raws),
                "width": style.width, "sdxl": style.is_sdxl, "aesthetic_score": score,
                "file": base64.b64encode(data).decode("ascii")}

    @app.get("/v1/styles", tags=["stylegrad"])
    async def list_styles():
        return {"styles": sorted(service.styles())}

    @app.post("/v1/codes", tags=["stylegrad"])
    async def code(body: CodeRequest):
        """An image's style as a stylecode (SD1.5 Stylecodes), to paste into a prompt or a request; or, given a
        code, a preview image made with it."""
        if (body.image is None) == (body.code is None):
            raise StylegradError("give image (to make a code) or code (to preview it)")
        if body.image is not None:
            return {"code": await wait(service.submit_code(image(body.image, "image")))}
        preview = Generate(prompt=body.prompt, seed=body.seed, steps=body.steps, width=body.width,
                           height=body.height, stylecode=body.code)
        ((im, text),) = await wait(service.submit_generation(to_request(preview, service)))
        return {"code": body.code, "preview": png_b64(im, text), "infotext": text}

    @app.get("/v1/progress/{task_id}", tags=["stylegrad"])
    async def progress(task_id: str):
        job = service.queue.jobs.get(task_id)
        if job is None:
            from .app import error

            return error(404, f"no task {task_id!r}")
        return job.snapshot()

    @app.post("/v1/cancel/{task_id}", tags=["stylegrad"])
    async def cancel(task_id: str):
        job = service.queue.jobs.get(task_id)
        if job is None:
            raise StylegradError(f"no task {task_id!r}")
        job.cancel()
        return {"cancelled": task_id}

    @app.get("/v1/info", tags=["stylegrad"])
    async def info():
        return {"model": service.model_name, "family": service.family, "styles": sorted(service.styles()),
                "loras": sorted(service.loras()), "embeddings": sorted(service.embeddings()),
                "samplers": [a for _, a in service.samplers()], "default_sampler": service.default_sampler(),
                "limits": {k: getattr(s, k) for k in ("max_side", "max_steps", "max_style_steps", "max_images",
                                                        "max_upload_bytes", "max_style_images", "max_waiting")}}
