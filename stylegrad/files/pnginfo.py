"""PNG metadata in the AUTOMATIC1111 ``parameters`` format, with the fields its aesthetic-gradients extension
writes, so web UIs, image browsers and sd-parsers read our images."""

from __future__ import annotations

import json
import os
import tempfile
from pathlib import Path

from PIL import Image
from PIL.PngImagePlugin import PngInfo

A1111_SAMPLERS = {
    "PNDMScheduler": "PLMS",
    "DDIMScheduler": "DDIM",
    "EulerDiscreteScheduler": "Euler",
    "EulerAncestralDiscreteScheduler": "Euler a",
    "DPMSolverMultistepScheduler": "DPM++ 2M",
    "LMSDiscreteScheduler": "LMS",
    "UniPCMultistepScheduler": "UniPC",
    "HeunDiscreteScheduler": "Heun",
}


def _value(v) -> str:
    """A1111 infotext separates fields with ', ' and keys with ': ': a value holding either is quoted as JSON, as
    A1111 itself does (a weighted stylecode 'CODE::2' keeps its colons)."""
    text = " ".join(str(v).split())
    return json.dumps(text) if any(c in text for c in ",:") else text


def parameters_text(prompt: str, negative: str, fields: dict) -> str:
    lines = [prompt.strip()]
    if negative.strip():
        lines.append(f"Negative prompt: {negative.strip()}")
    lines.append(", ".join(f"{k}: {_value(v)}" for k, v in fields.items() if v is not None))
    return "\n".join(lines)


def read_parameters(path: str | os.PathLike) -> str | None:
    with Image.open(path) as im:
        return im.info.get("parameters")


def save_png(image: Image.Image, path: str | os.PathLike, parameters: str | None = None) -> Path:
    """Write atomically, so an interrupted run never leaves a truncated image."""
    p = Path(path)
    p.parent.mkdir(parents=True, exist_ok=True)
    info = PngInfo()
    if parameters:
        info.add_text("parameters", parameters)
    fd, tmp = tempfile.mkstemp(dir=p.parent, prefix=f".{p.name}.", suffix=".tmp")
    os.close(fd)
    try:
        image.save(tmp, format="PNG", pnginfo=info)
        os.replace(tmp, p)
    finally:
        if os.path.exists(tmp):
            os.unlink(tmp)
    return p
