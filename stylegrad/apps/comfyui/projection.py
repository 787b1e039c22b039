"""Where a ComfyUI CLIP tower's style space (its text projection) comes from.

ComfyUI builds every text tower with a ``text_projection`` Linear from its cast ops, whose weights are never
initialised (comfy/clip_model.py; ``comfy.ops`` skips ``reset_parameters``), and an SD1.x or SDXL checkpoint has no
CLIP-L projection to load into it (comfy/supported_models.py drops ``clip_l.transformer.text_projection.weight`` on
save and finds none on load). So CLIP-L's matrix in ComfyUI is whatever memory held (zeros, noise or NaN) and is never
read here: openai's ViT-L/14 projection is read alone instead, from the node's ``clip_model`` input, else from a file in
ComfyUI's ``models/clip_vision`` holding it, else from the Hugging Face cache (as stylegrad reads it for SD1.x).
bigG (SDXL) and ViT-H (SD2.x) projections are in the checkpoint (OpenCLIP's ``text_projection``, which ComfyUI
transposes into the Linear) and are read there. A projection that is not finite or all zeros is refused: it would
make the style space empty and the conditioning NaN."""

from __future__ import annotations

import os
from pathlib import Path

import torch

from stylegrad.aesthetic.tower import ClipParts, clip_parts
from stylegrad.errors import StylegradError
from stylegrad.families import Family

KEYS = ("text_projection.weight", "text_projection")  # transformers' (P, H); OpenCLIP's (H, P), transposed


def check_projection(weight: torch.Tensor, where: str) -> torch.Tensor:
    """``weight`` if it can define a style space; an error naming ``where`` it came from otherwise."""
    if not bool(torch.isfinite(weight).all()):
        raise StylegradError(f"the text projection from {where} is not finite (NaN or inf): an uninitialised "
                             "or broken matrix cannot define the style space")
    if not bool(weight.any()):
        raise StylegradError(f"the text projection from {where} is all zeros: an uninitialised matrix cannot "
                             "define the style space")
    return weight


def file_projection(path: str | os.PathLike, width: int) -> torch.Tensor | None:
    """The text projection (P, ``width``) in one safetensors file (a CLIP model's, transformers' or OpenCLIP's
    names), read alone; None if the file has none of that width."""
    from safetensors import safe_open

    try:
        with safe_open(str(path), framework="pt", device="cpu") as f:
            names = set(f.keys())
            for key in KEYS:
                if key in names:
                    shape = f.get_slice(key).get_shape()
                    transposed = key == "text_projection"
                    if len(shape) == 2 and shape[0 if transposed else 1] == width:
                        weight = f.get_tensor(key)
                        return (weight.T if transposed else weight).float().contiguous()
    except (OSError, ValueError, RuntimeError) as e:  # not a safetensors file
        raise StylegradError(f"{path} is not a readable safetensors file ({str(e)[:80]})") from None
    return None


def _clip_vision_files() -> tuple[list[Path], list[str]]:
    """(the safetensors files in ComfyUI's clip_vision folders, the folders), when ComfyUI knows that folder."""
    try:
        import folder_paths
    except ImportError:
        return [], []
    if "clip_vision" not in getattr(folder_paths, "folder_names_and_paths", {}):
        return [], []
    folders = folder_paths.get_folder_paths("clip_vision")
    files = [Path(p) for name in folder_paths.get_filename_list("clip_vision") if name.endswith(".safetensors")
             and (p := folder_paths.get_full_path("clip_vision", name))]
    return files, folders


def _named(clip_model: str, width: int, layers: int, device) -> tuple[ClipParts, str]:
    """The node's ``clip_model`` input: a safetensors file (a path, or a name in models/clip_vision), a folder or a
    hub id."""
    where = f"the node's clip_model input '{clip_model}'"
    path = Path(clip_model).expanduser()
    if not path.is_file():
        files, _ = _clip_vision_files()
        path = next((f for f in files if f.name == clip_model or str(f).endswith(os.sep + clip_model)), path)
    if path.is_file():
        weight = file_projection(path, width)
        if weight is None:
            raise StylegradError(f"{where}: the file has no text projection for a {width}-wide text tower "
                                 "(text_projection.weight)")
        return ClipParts(weight.to(device), {}, layers, width), where
    try:
        parts = clip_parts(clip_model, layers, device)
    except StylegradError as e:
        raise StylegradError(f"{where}: {e}") from None
    return parts, where


def clip_l_projection(clip_model: str | None, width: int, layers: int, device) -> tuple[ClipParts, str]:
    """(CLIP-L's style space, where it was read): the node's input if given, else the first file in
    models/clip_vision with such a projection, else openai's ViT-L/14 from the Hugging Face cache. One error lists
    every place looked in when none has it. ``layers``: the tower's (only the projection is read; the parts carry
    no layers)."""
    if clip_model:
        parts, where = _named(clip_model, width, layers, device)
    else:
        files, folders = _clip_vision_files()
        parts = None
        for path in files:
            weight = file_projection(path, width)
            if weight is not None:
                parts, where = ClipParts(weight.to(device), {}, layers, width), str(path)
                break
        if parts is None:
            repo = Family.SD1.clip_model
            try:
                parts, where = clip_parts(repo, layers, device), f"{repo} (Hugging Face cache)"
            except StylegradError as e:
                looked = ", ".join(folders) if folders else "no clip_vision folder"
                raise StylegradError(
                    f"CLIP-L's text projection (its style space) was not found: ComfyUI's CLIP carries none for "
                    f"SD1.x/SDXL; looked in models/clip_vision ({looked}: no .safetensors file with a "
                    f"text_projection.weight for width {width}) and the Hugging Face cache ({e}). Put openai's "
                    f"clip-vit-large-patch14 model.safetensors in models/clip_vision, or name a file in the node's "
                    f"clip_model input") from None
    if parts.hidden_size != width or parts.projection.shape[-1] != width:
        raise StylegradError(f"{where}: its text projection is for a {parts.projection.shape[-1]}-wide tower, "
                             f"CLIP-L here is {width}")
    check_projection(parts.projection, where)
    parts.layers = {}  # CLIP-L's tower is ComfyUI's own, whole
    return parts, where
