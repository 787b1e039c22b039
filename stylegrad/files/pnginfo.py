"""Generation metadata in PNGs: what AUTOMATIC1111 (and stylegrad, in A1111's format), ComfyUI, NovelAI and kohya
sd-scripts write, read back into one structure; and PNG writing with A1111's ``parameters`` chunk."""

from __future__ import annotations

import json
import os
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

from PIL import Image
from PIL.PngImagePlugin import PngInfo

from stylegrad.errors import StylegradError
from stylegrad.files.atomic import atomic_path
from stylegrad.files.infotext import parse_infotext


@dataclass
class GenerationInfo:
    """How an image says it was made. ``parameters`` holds the tool's own field names and values."""

    tool: str  # automatic1111 | stylegrad | comfyui | novelai | kohya
    prompt: str = ""
    negative: str = ""
    parameters: dict[str, Any] = field(default_factory=dict)
    loras: list[dict[str, Any]] = field(default_factory=list)
    embeddings: list[str] = field(default_factory=list)
    raw: str = ""  # the text it was read from (A1111's parameters, ComfyUI's prompt graph)

    def as_dict(self) -> dict[str, Any]:
        return asdict(self)


def png_bytes(image: Image.Image, parameters: str | None = None) -> bytes:
    """The PNG ``save_png`` writes, as bytes (for a worker writing to shared or remote storage)."""
    import io

    info = PngInfo()
    if parameters:
        info.add_text("parameters", parameters)
    buf = io.BytesIO()
    image.save(buf, format="PNG", pnginfo=info)
    return buf.getvalue()


def save_png(image: Image.Image, path: str | os.PathLike, parameters: str | None = None) -> Path:
    """Write atomically, so an interrupted run never leaves a truncated image."""
    info = PngInfo()
    if parameters:
        info.add_text("parameters", parameters)
    with atomic_path(path) as tmp:
        image.save(tmp, format="PNG", pnginfo=info)
    return Path(path)


def png_text(path: str | os.PathLike) -> dict[str, str]:
    """Every text chunk, also those after the image data (Pillow reads those only once the image is loaded)."""
    try:
        with Image.open(path) as im:
            im.load()
            chunks = dict(getattr(im, "text", None) or {})
            chunks.update({k: v for k, v in im.info.items() if isinstance(v, str)})
    except (OSError, ValueError, SyntaxError) as e:
        raise StylegradError(f"cannot read image {path}: {e}") from e
    return chunks


def _a1111(chunks: dict[str, str]) -> GenerationInfo | None:
    text = chunks.get("parameters")
    if not text:
        return None
    prompt, negative, fields = parse_infotext(text)
    tool = "stylegrad" if str(fields.get("Version", "")).startswith("stylegrad") else "automatic1111"
    return GenerationInfo(tool, prompt, negative, fields, raw=text)


def _linked(graph: dict, ref) -> dict | None:
    if isinstance(ref, list) and ref and str(ref[0]) in graph:
        return graph[str(ref[0])]
    return None


def _text_of(graph: dict, ref, depth: int = 0) -> str:
    """The text a conditioning input comes from, following links through nodes that pass conditioning on."""
    node = _linked(graph, ref)
    if node is None or depth > 20:
        return ""
    inputs = node.get("inputs", {})
    for key in ("text", "text_g", "text_l"):
        if key in inputs:
            value = inputs[key]
            return value if isinstance(value, str) else _text_of(graph, value, depth + 1)
    for key in ("conditioning", "conditioning_1", "positive"):
        if key in inputs:
            return _text_of(graph, inputs[key], depth + 1)
    return ""


def _comfyui(chunks: dict[str, str]) -> GenerationInfo | None:
    text = chunks.get("prompt")
    if not text:
        return None
    try:
        graph = json.loads(text)
    except ValueError:
        return None
    if not isinstance(graph, dict) or not all(isinstance(n, dict) and "class_type" in n for n in graph.values()):
        return None
    info = GenerationInfo("comfyui", raw=text)
    for node in graph.values():
        kind, inputs = node["class_type"], node.get("inputs", {})
        if kind.startswith("KSampler") and not info.prompt:
            for key, name in (("seed", "seed"), ("noise_seed", "seed"), ("steps", "steps"), ("cfg", "cfg"),
                              ("sampler_name", "sampler_name"), ("scheduler", "scheduler"), ("denoise", "denoise")):
                if key in inputs and not isinstance(inputs[key], list):
                    info.parameters[name] = inputs[key]
            info.prompt = _text_of(graph, inputs.get("positive")).strip()
            info.negative = _text_of(graph, inputs.get("negative")).strip()
        elif kind.startswith("CheckpointLoader") and "ckpt_name" in inputs:
            info.parameters["model"] = inputs["ckpt_name"]
        elif kind.startswith("LoraLoader") and "lora_name" in inputs:
            info.loras.append({"name": inputs["lora_name"], "strength_model": inputs.get("strength_model"),
                               "strength_clip": inputs.get("strength_clip")})
        elif kind == "EmptyLatentImage":
            info.parameters.update({k: inputs[k] for k in ("width", "height") if k in inputs})
    texts = [n.get("inputs", {}).get("text") for n in graph.values()]
    for t in texts:
        if isinstance(t, str):
            for word in t.replace(",", " ").split():
                if word.startswith("embedding:"):
                    name = word[len("embedding:"):].strip("()")
                    if name and name not in info.embeddings:
                        info.embeddings.append(name)
    return info


def _novelai(chunks: dict[str, str]) -> GenerationInfo | None:
    if chunks.get("Software", "").lower() != "novelai":
        return None
    info = GenerationInfo("novelai", chunks.get("Description", ""), raw=chunks.get("Comment", ""))
    try:
        comment = json.loads(chunks.get("Comment", "{}"))
    except ValueError:
        comment = {}
    if isinstance(comment, dict):
        info.negative = str(comment.pop("uc", ""))
        comment.pop("prompt", None)
        info.parameters = comment
    if "Source" in chunks:
        info.parameters["source"] = chunks["Source"]
    return info


_KOHYA = ("seed", "sampler", "steps", "scale", "negative-scale", "clip-prompt", "raw-prompt", "original-height",
          "original-width")


def _kohya(chunks: dict[str, str]) -> GenerationInfo | None:
    if "prompt" not in chunks or not {"seed", "steps", "scale"} <= set(chunks):
        return None
    return GenerationInfo("kohya", chunks["prompt"], chunks.get("negative-prompt", ""),
                          {k: chunks[k] for k in _KOHYA if k in chunks})


READERS = [_a1111, _comfyui, _novelai, _kohya]  # the first that recognises the chunks wins


def read_generation_info(path: str | os.PathLike) -> GenerationInfo | None:
    """How the image says it was made, or None if it carries no generation metadata stylegrad knows."""
    chunks = png_text(path)
    for reader in READERS:
        info = reader(chunks)
        if info is not None:
            return info
    return None
