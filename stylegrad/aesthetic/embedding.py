"""Images -> style: the mean CLIP image embedding of a folder of pictures.

Streams: a worker thread decodes and preprocesses up to two batches ahead while the model runs on this one, and
only a running sum is kept, so 10,000 images take the memory of three batches.
"""

from __future__ import annotations

import os
from collections import deque
from collections.abc import Iterable
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import torch
from PIL import Image
from tqdm.auto import tqdm

from stylegrad import __version__
from stylegrad.devices import resolve_device, resolve_dtype
from stylegrad.errors import StylegradError
from stylegrad.families import OPENAI_CLIP_L
from stylegrad.files.styles import Style, save_style
from stylegrad.notes import note

IMAGE_SUFFIXES = {".png", ".jpg", ".jpeg", ".webp", ".bmp", ".gif", ".tif", ".tiff"}
MEANS = {
    "normalized": "L2-normalized mean of the CLIP image embeddings (the paper)",
    "raw": "raw mean of the CLIP image embeddings (the reference script and the AUTOMATIC1111 extension)",
}


def find_images(inputs: Iterable[str | os.PathLike], recursive: bool = False) -> list[Path]:
    """Files named directly, plus files with an image suffix inside named folders (sorted, no duplicates)."""
    found: list[Path] = []
    for item in inputs:
        p = Path(item).expanduser()
        if p.is_dir():
            entries = p.rglob("*") if recursive else p.iterdir()
            found += sorted(f for f in entries if f.is_file() and f.suffix.lower() in IMAGE_SUFFIXES)
        elif p.is_file():
            found.append(p)
        else:
            raise StylegradError(f"no such file or folder: {p}")
    return list(dict.fromkeys(found))


def load_image_encoder(clip_model: str, device: torch.device | str | None = None,
                       dtype: torch.dtype | str | None = None):
    """(CLIPVisionModelWithProjection, its image processor) from a hub id or folder, on ``device`` in ``dtype``
    (stylegrad.devices' policy: auto is fp16 on CUDA and MPS, fp32 on the CPU; checked before anything loads)."""
    from transformers import CLIPVisionModelWithProjection

    from stylegrad.files.hub import from_pretrained

    try:  # transformers 5 without torchvision: the PIL processor, same preprocessing
        from transformers import CLIPImageProcessorPil as Processor
    except ImportError:  # pragma: no cover - older transformers
        from transformers import CLIPImageProcessor as Processor
    device = resolve_device(device)
    dtype = resolve_dtype(dtype, device)
    model = from_pretrained(CLIPVisionModelWithProjection, clip_model, what="CLIP model", dtype=dtype)
    processor = from_pretrained(Processor, clip_model, what="CLIP image processor")
    return model.to(device, dtype).eval(), processor


def _decode(paths: list[Path], processor) -> tuple[list[Path], torch.Tensor | None, list[tuple[Path, str]]]:
    images, ok, skipped = [], [], []
    for p in paths:
        try:
            with Image.open(p) as im:
                images.append(im.convert("RGB"))
            ok.append(p)
        except Exception as e:  # PIL raises many types for unreadable or truncated files
            skipped.append((p, type(e).__name__))
    pixels = processor(images=images, return_tensors="pt")["pixel_values"] if images else None
    return ok, pixels, skipped


def embed_images(
    inputs: Iterable[str | os.PathLike],
    clip_model: str = OPENAI_CLIP_L,
    *,
    batch_size: int = 16,
    recursive: bool = False,
    mean: str = "normalized",
    device: torch.device | str | None = None,
    dtype: torch.dtype | str | None = None,
    encoder=None,
    progress: bool = True,
    name: str = "style",
) -> Style:
    """A style from images: the mean of their CLIP image embeddings (projection space).

    ``mean="normalized"`` stores the unit-length mean (the paper), ``"raw"`` the plain mean (the reference
    script, A1111). Both point the same way and every use site normalizes, so they generate the same images;
    the unit file is scale-free, so mixing weights mean what they say. ``device`` and ``dtype``: where and in
    what precision the CLIP image tower runs (stylegrad.devices' policy); the style is a CPU float32 vector
    whatever they are. ``encoder`` is an optional (model, processor) pair to reuse (it keeps its own).
    """
    if mean not in MEANS:
        raise StylegradError(f"unknown mean '{mean}' (choose from {', '.join(MEANS)})")
    if batch_size < 1:
        raise StylegradError(f"batch_size must be >= 1, got {batch_size}")
    if encoder is None:  # an unsupported device or dtype is one line before the images are even listed
        device = resolve_device(device)
        dtype = resolve_dtype(dtype, device)
    paths = find_images(inputs, recursive)
    if not paths:
        raise StylegradError("no image files found in the given paths")
    model, processor = encoder or load_image_encoder(clip_model, device, dtype)
    device = next(model.parameters()).device
    dtype = next(model.parameters()).dtype

    total: torch.Tensor | None = None  # running sum (P,): float64 on the CPU, float32 on a device (see _batch_sum)
    count = 0
    skipped: list[tuple[Path, str]] = []
    chunks = [paths[i : i + batch_size] for i in range(0, len(paths), batch_size)]
    bar = tqdm(total=len(paths), desc="embedding images", unit="img", disable=not progress)
    with ThreadPoolExecutor(max_workers=1) as pool:
        pending = deque(pool.submit(_decode, c, processor) for c in chunks[:2])
        next_chunk = 2
        while pending:
            ok, pixels, bad = pending.popleft().result()
            if next_chunk < len(chunks):  # keep two batches queued for decoding while the model runs
                pending.append(pool.submit(_decode, chunks[next_chunk], processor))
                next_chunk += 1
            skipped += bad
            if pixels is not None:
                with torch.no_grad():
                    feats = _batch_sum(model(pixel_values=pixels.to(device, dtype)).image_embeds)  # (P,)
                total = feats if total is None else total + feats
                count += len(ok)
            bar.update(len(ok) + len(bad))
    bar.close()

    if skipped:
        listed = ", ".join(f"{p.name} ({why})" for p, why in skipped[:20])
        more = f" and {len(skipped) - 20} more" if len(skipped) > 20 else ""
        note(f"skipped {len(skipped)} file(s) that are not readable images: {listed}{more}")
    if count == 0:
        raise StylegradError(f"none of the {len(paths)} files is a readable image")
    return _mean_style(total, count, mean, clip_model, name)


def _batch_sum(embeds: torch.Tensor) -> torch.Tensor:
    """A batch's embeddings (B, P) summed where they are: in float64 on the CPU (the sum of many images loses
    nothing), in float32 on a device (MPS has no float64, and a GPU's is slow); never a copy to the CPU per batch."""
    return (embeds.double() if embeds.device.type == "cpu" else embeds.float()).sum(0)


def _mean_style(total: torch.Tensor, count: int, mean: str, clip_model, name: str) -> Style:
    vector = (total.to(device="cpu", dtype=torch.float64) / count).float()  # one move off the device, at the end
    if mean == "normalized":
        vector = Style(vector).direction  # the raw mean's own direction, to the bit
    metadata = {
        "encoder": clip_model if isinstance(clip_model, str) else str(clip_model),
        "num_images": str(count),
        "method": MEANS[mean],
        "stylegrad_version": __version__,
    }
    return Style(vector, metadata, name)


def embed_pictures(pictures: list[Image.Image], clip_model: str = OPENAI_CLIP_L, *, batch_size: int = 16,
                   mean: str = "normalized", device: torch.device | str | None = None,
                   dtype: torch.dtype | str | None = None, encoder=None, name: str = "style") -> Style:
    """``embed_images`` for pictures already in memory (a ComfyUI IMAGE batch, a web upload): the same
    preprocessing, model and mean, so the same pictures give the same style as their files."""
    if mean not in MEANS:
        raise StylegradError(f"unknown mean '{mean}' (choose from {', '.join(MEANS)})")
    if not pictures:
        raise StylegradError("no pictures to make a style from")
    model, processor = encoder or load_image_encoder(clip_model, device, dtype)
    p = next(model.parameters())
    total = None
    for i in range(0, len(pictures), batch_size):
        pixels = processor(images=[im.convert("RGB") for im in pictures[i:i + batch_size]],
                           return_tensors="pt")["pixel_values"]
        with torch.no_grad():
            feats = _batch_sum(model(pixel_values=pixels.to(p.device, p.dtype)).image_embeds)
        total = feats if total is None else total + feats
    return _mean_style(total, len(pictures), mean, clip_model, name)


BIGG = "laion/CLIP-ViT-bigG-14-laion2B-39B-b160k"  # SDXL's second text tower is this CLIP's (1280-wide space)
BIGG_WIDTH = 1280


def embed_images_sdxl(inputs: Iterable[str | os.PathLike], clip_model: str = OPENAI_CLIP_L, clip_model_g: str = BIGG,
                      **kwargs) -> Style:
    """An SDXL style: the images' mean in CLIP ViT-L/14's space (for SDXL's first text tower) and in OpenCLIP
    ViT-bigG/14's (for its second), one file. bigG's image tower is large (1.8 B parameters): the images are read
    once per tower, and only one tower is loaded at a time."""
    first = embed_images(inputs, clip_model, **kwargs)
    g = embed_images(inputs, clip_model_g, **kwargs)
    if clip_model_g == BIGG and g.width != BIGG_WIDTH:
        raise StylegradError(f"{clip_model_g} gives {g.width}-wide image embeddings; SDXL's second text tower "
                             f"needs OpenCLIP ViT-bigG/14's {BIGG_WIDTH} (check the model's config.json: "
                             "projection_dim must be 1280)")
    meta = {**first.metadata, "encoder_g": g.metadata["encoder"], "family": "sdxl"}
    return Style(first.vector, meta, first.name, g.vector)


def embed_to_file(inputs: Iterable[str | os.PathLike], output: str | os.PathLike, clip_model: str = OPENAI_CLIP_L,
                  *, format: str | None = None, name: str | None = None, **kwargs) -> Style:
    """``embed_images`` saved to ``output`` (format from the suffix unless given); returns the style."""
    clip_model_g = kwargs.pop("clip_model_g", None)
    if clip_model_g:
        style = embed_images_sdxl(inputs, clip_model, clip_model_g, name=name or Path(output).stem, **kwargs)
    else:
        style = embed_images(inputs, clip_model, name=name or Path(output).stem, **kwargs)
    save_style(style, output, format)
    return style
