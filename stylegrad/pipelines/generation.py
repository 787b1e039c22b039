"""Styled generation with a diffusers pipeline: load, encode with the style, run, save PNGs with metadata."""

from __future__ import annotations

import re
from dataclasses import dataclass, replace
from pathlib import Path

import torch
from PIL import Image, ImageDraw, ImageFont
from tqdm.auto import tqdm

from stylegrad import __version__
from stylegrad.aesthetic.encoder import AestheticEncoder
from stylegrad.errors import StylegradError
from stylegrad.files.hub import from_pretrained
from stylegrad.aesthetic.options import StyleOptions
from stylegrad.files.pnginfo import A1111_SAMPLERS, parameters_text, save_png
from stylegrad.files.styles import Style

DEFAULT_MODEL = "stable-diffusion-v1-5/stable-diffusion-v1-5"
SAMPLERS = {
    "ddim": "DDIMScheduler",
    "pndm": "PNDMScheduler",
    "euler": "EulerDiscreteScheduler",
    "euler_a": "EulerAncestralDiscreteScheduler",
    "dpmpp_2m": "DPMSolverMultistepScheduler",
    "unipc": "UniPCMultistepScheduler",
    "lms": "LMSDiscreteScheduler",
}


def pick_device(device: str | None) -> torch.device:
    if device:
        try:
            dev = torch.device(device)
        except RuntimeError as e:
            raise StylegradError(f"unknown device '{device}' (use cpu, cuda, cuda:1, mps)") from e
        if dev.type == "cuda" and not torch.cuda.is_available():
            raise StylegradError(f"device '{device}' requested but CUDA is not available here")
        return dev
    return torch.device("cuda" if torch.cuda.is_available() else "cpu")


def load_pipeline(model: str = DEFAULT_MODEL, device: str | torch.device | None = None, sampler: str | None = None):
    """A StableDiffusionPipeline from a hub id or a local diffusers folder: fp16 on CUDA, fp32 elsewhere."""
    import diffusers

    device = pick_device(str(device) if device is not None else None)
    path = Path(model).expanduser()
    if path.is_file():
        raise StylegradError(
            f"{model} is a single-file checkpoint; pass a diffusers folder or hub id (convert it once with "
            "diffusers' StableDiffusionPipeline.from_single_file(...).save_pretrained(FOLDER))"
        )
    dtype = torch.float16 if device.type == "cuda" else torch.float32
    pipe = from_pretrained(diffusers.StableDiffusionPipeline, model, what="model", torch_dtype=dtype)
    if sampler:
        if sampler not in SAMPLERS:
            raise StylegradError(f"unknown sampler '{sampler}' (choose from {', '.join(SAMPLERS)})")
        pipe.scheduler = getattr(diffusers, SAMPLERS[sampler]).from_config(pipe.scheduler.config)
    return pipe.to(device)


@dataclass(frozen=True)
class Settings:
    """What one image depends on besides the style."""

    prompt: str
    negative: str = ""
    steps: int = 30
    cfg: float = 7.5
    width: int | None = None
    height: int | None = None
    seed: int = 0
    strength: float = 0.75  # img2img only


def run_pipeline(pipe, prompt_embeds, negative_prompt_embeds, settings: Settings,
                 init_image: Image.Image | None = None) -> Image.Image:
    """One image: seeds through ``torch.Generator('cpu')`` so results match plain diffusers on any device."""
    generator = torch.Generator("cpu").manual_seed(settings.seed)
    common = dict(prompt_embeds=prompt_embeds, negative_prompt_embeds=negative_prompt_embeds,
                  num_inference_steps=settings.steps, guidance_scale=settings.cfg, generator=generator)
    if init_image is None:
        return pipe(height=settings.height, width=settings.width, **common).images[0]
    from diffusers import StableDiffusionImg2ImgPipeline

    img2img = StableDiffusionImg2ImgPipeline.from_pipe(pipe)
    return img2img(image=init_image, strength=settings.strength, **common).images[0]


def infotext(pipe, settings: Settings, size: tuple[int, int], model: str, style: Style | None,
             options: StyleOptions, init: bool, extra: dict | None = None) -> str:
    sampler = type(pipe.scheduler).__name__
    fields = {
        "Steps": settings.steps,
        "Sampler": A1111_SAMPLERS.get(sampler, sampler),
        "CFG scale": settings.cfg,
        "Seed": settings.seed,
        "Size": f"{size[0]}x{size[1]}",
        "Model": Path(model).name or model,
        "Denoising strength": settings.strength if init else None,
    }
    if style is not None and options.active:
        fields.update({
            "Aesthetic LR": options.lr,
            "Aesthetic weight": options.weight,
            "Aesthetic steps": options.steps,
            "Aesthetic embedding": style.name,
            "Aesthetic slerp": options.slerp,
            "Aesthetic text": options.text or "",
            "Aesthetic text negative": options.text_negative,
            "Aesthetic slerp angle": options.text_angle,
            "Aesthetic embedding hash": style.digest,
        })
    fields.update(extra or {})
    fields["Version"] = f"stylegrad {__version__}"
    return parameters_text(settings.prompt, settings.negative, fields)


def _slug(text: str, n: int = 40) -> str:
    return re.sub(r"[^A-Za-z0-9]+", "_", text).strip("_")[:n] or "image"


def next_index(out: Path) -> int:
    nums = [int(m.group(1)) for p in out.glob("*.png") if (m := re.match(r"(\d{5})-", p.name))]
    return max(nums, default=-1) + 1


def load_init_image(path: str | None, width: int | None, height: int | None) -> Image.Image | None:
    if path is None:
        return None
    try:
        with Image.open(path) as im:
            image = im.convert("RGB")
    except (OSError, ValueError) as e:
        raise StylegradError(f"cannot read --init-image {path}: {e}") from e
    w, h = width or image.width, height or image.height
    return image.resize((w - w % 8, h - h % 8), Image.LANCZOS)


def style_progress(total: int, desc: str = "style"):
    """A tqdm bar and the callback that advances it (one tick per Adam step)."""
    bar = tqdm(total=total, desc=desc, unit="step", leave=False)

    def callback(step: int, similarity: float) -> None:
        bar.set_postfix(cos=f"{similarity:.3f}")
        bar.update(1)

    return bar, callback


def generate(pipe, encoder: AestheticEncoder, settings: Settings, style: Style | None, options: StyleOptions,
             out: Path, n: int = 1, model: str = "", init_image: Image.Image | None = None,
             clip_skip: int | None = None, extra_fields: dict | None = None) -> list[Path]:
    """``n`` images with seeds ``seed .. seed+n-1``; the style is applied once (the encoder caches).
    ``extra_fields`` go into the PNG metadata (the stylecode, for instance)."""
    bar, callback = style_progress(options.steps if style is not None and options.active else 0)
    pe, ne = encoder.encode(settings.prompt, style, options, settings.negative, clip_skip, callback)
    bar.close()
    paths = []
    index = next_index(out)
    for i in range(n):
        s = replace(settings, seed=settings.seed + i)
        image = run_pipeline(pipe, pe, ne, s, init_image)
        text = infotext(pipe, s, image.size, model, style, options, init_image is not None, extra_fields)
        paths.append(save_png(image, out / f"{index + i:05d}-{s.seed}-{_slug(s.prompt)}.png", text))
    return paths


def label_grid(rows: list[list[Image.Image]], labels: list[str], row_labels: list[str]) -> Image.Image:
    """Images in a grid with a caption under each column header and a seed at each row's start."""
    w, h = rows[0][0].size
    font = ImageFont.load_default()
    pad_top = 24
    pad_left = max(90, 12 + int(max((font.getlength(t) for t in row_labels), default=0)))  # no label cut off
    grid = Image.new("RGB", (pad_left + w * len(labels), pad_top + h * len(rows)), "white")
    draw = ImageDraw.Draw(grid)
    for j, text in enumerate(labels):
        draw.text((pad_left + j * w + 4, 6), text, fill="black", font=font)
    for i, (row, text) in enumerate(zip(rows, row_labels)):
        draw.text((4, pad_top + i * h + h // 2 - 6), text, fill="black", font=font)
        for j, image in enumerate(row):
            grid.paste(image, (pad_left + j * w, pad_top + i * h))
    return grid


def compare(pipe, encoder: AestheticEncoder, settings: Settings, style: Style, options: StyleOptions,
            sweep: list[int], out: Path, n: int = 1, init_image: Image.Image | None = None,
            clip_skip: int | None = None, extra_fields: dict | None = None) -> Path:
    """The paper's figure: the same seed without the style and with it at each number of steps."""
    columns = [0] + [k for k in sweep if k > 0]
    embeds = []
    for k in columns:
        bar, callback = style_progress(k, f"style, {k} steps")
        embeds.append(encoder.encode(settings.prompt, style, replace(options, steps=k), settings.negative,
                                     clip_skip, callback))
        bar.close()
    rows = []
    for i in range(n):
        s = replace(settings, seed=settings.seed + i)
        rows.append([run_pipeline(pipe, pe, ne, s, init_image) for pe, ne in embeds])
    labels = ["no style"] + [f"{k} steps" for k in columns[1:]]
    grid = label_grid(rows, labels, [f"seed {settings.seed + i}" for i in range(n)])
    fields = {"Steps": settings.steps, "Sampler": A1111_SAMPLERS.get(type(pipe.scheduler).__name__, "?"),
              "CFG scale": settings.cfg, "Seed": settings.seed, "Aesthetic embedding": style.name,
              "Aesthetic LR": options.lr, "Aesthetic steps sweep": " ".join(map(str, columns)),
              **(extra_fields or {}), "Version": f"stylegrad {__version__}"}
    name = f"{next_index(out):05d}-compare-{settings.seed}-{_slug(settings.prompt)}.png"
    return save_png(grid, out / name, parameters_text(settings.prompt, settings.negative, fields))
