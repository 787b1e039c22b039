"""What a request leaves behind: each image's infotext (A1111's fields plus everything it depends on), PNG files
numbered after those already in the folder, and the paper's comparison grid."""

from __future__ import annotations

import re
from pathlib import Path

from PIL import Image

from stylegrad.files.hashes import short_hash
from stylegrad.files.pnginfo import save_png
from stylegrad.pipelines.grids import label_grid
from stylegrad.pipelines.loading import a1111_sampler_name
from stylegrad.pipelines.request import GenerationRequest, infotext


def slug(text: str, n: int = 40) -> str:
    return re.sub(r"[^A-Za-z0-9]+", "_", text).strip("_")[:n] or "image"


def next_index(out: Path) -> int:
    nums = [int(m.group(1)) for p in out.glob("*.png") if (m := re.match(r"(\d{5})-", p.name))]
    return max(nums, default=-1) + 1


def model_hash(model: str) -> str | None:
    """A1111's short hash of a checkpoint file (None for a folder or a hub id)."""
    return short_hash(model) if Path(model).is_file() else None


def image_infotext(request: GenerationRequest, image: Image.Image, pipe, *, model: str | None, style=None,
                   code: str | None = None, addons: dict | None = None, extra: dict | None = None) -> str:
    """The PNG's ``parameters`` for one image of ``request`` made by ``pipe`` (its sampler's A1111 name).
    ``model``: the file or id the generator loaded (default the request's); ``addons``: the LoRA and TI hashes.
    The device type and the UNet's precision are recorded too: fp16 and fp32 images differ, so ``--from`` uses
    them again (replay.recorded_precision)."""
    from stylegrad.devices import dtype_name, execution_device

    # where it ran: under model CPU offload the weights wait on the CPU, the UNet runs on its hook's device
    where = {"Device": execution_device(pipe.unet).type, "Dtype": dtype_name(pipe.unet.dtype)}
    return infotext(request, size=image.size, sampler_name=a1111_sampler_name(pipe.scheduler), style=style,
                    stylecode=code, model_hash=model_hash(model or request.model), extra={**where, **(extra or {})},
                    addons=addons)


def save_images(images: list[tuple[Image.Image, str]], request: GenerationRequest, out: str | Path) -> list[Path]:
    """``NNNNN-SEED-PROMPT.png`` files in ``out`` (seeds ``request.seed`` on), numbered after those there."""
    out = Path(out)
    index = next_index(out)
    return [save_png(image, out / f"{index + i:05d}-{request.seed + i}-{slug(request.prompt)}.png", text)
            for i, (image, text) in enumerate(images)]


def save_comparison(rows: list[list[Image.Image]], columns: list[int], request: GenerationRequest, text: str,
                    out: str | Path) -> Path:
    """The comparison grid (a row per seed; a column without the style, then one per number of steps) as
    ``NNNNN-compare-SEED-PROMPT.png``."""
    grid = label_grid(rows, ["no style"] + [f"{k} steps" for k in columns[1:]],
                      [f"seed {request.seed + i}" for i in range(len(rows))])
    out = Path(out)
    return save_png(grid, out / f"{next_index(out):05d}-compare-{request.seed}-{slug(request.prompt)}.png", text)
