"""The training pictures and their captions: every method reads them the same way.

Pictures are resized (shorter side to the resolution) and center-cropped, as the diffusers training examples do,
so pictures of mixed sizes train together (a note says how many were resized). A caption comes from a ``.txt``
file beside the picture when there is one, else from prompt templates with the method's word in them."""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

import torch
from PIL import Image

from stylegrad.aesthetic.embedding import find_images
from stylegrad.errors import StylegradError
from stylegrad.notes import note

# our own phrasings of the two kinds of prompt the textual-inversion recipe trains with; {} is the new word
STYLE_TEMPLATES = ("a painting in the style of {}", "a picture in the style of {}", "an image, {} style",
                   "a rendering in the style of {}", "a small picture in the style of {}",
                   "a detailed image in the style of {}", "artwork in the style of {}", "{} style")
OBJECT_TEMPLATES = ("a photo of a {}", "a picture of the {}", "an image of a {}", "a close-up photo of the {}",
                    "a rendering of a {}", "a bright photo of the {}", "a small {}", "a photo of one {}")


@dataclass
class TrainingSet:
    pixels: torch.Tensor  # (N, 3, R, R) in [-1, 1]
    captions: list[str | None]  # from .txt files; None: use a template
    paths: list[Path]

    def __len__(self) -> int:
        return len(self.paths)

    def caption(self, i: int, word: str | None, templates: tuple[str, ...], generator: torch.Generator) -> str:
        """The picture's caption (with ``word`` added where the caption lacks it), or a template with ``word``
        (drawn with ``generator``, so a resumed run draws the same)."""
        own = self.captions[i]
        pick = int(torch.randint(len(templates), (1,), generator=generator))
        if own is not None:
            return own if word is None or word in own else f"{word}, {own}"
        return templates[pick].format(word or "").strip()


def _fit(image: Image.Image, size: int) -> Image.Image:
    w, h = image.size
    scale = size / min(w, h)
    image = image.resize((max(size, round(w * scale)), max(size, round(h * scale))), Image.Resampling.BICUBIC)
    w, h = image.size
    left, top = (w - size) // 2, (h - size) // 2
    return image.crop((left, top, left + size, top + size))


def read_training_set(inputs: list[str | Path], resolution: int) -> TrainingSet:
    """Pictures (files or folders) with their captions. Unreadable pictures or captions are one error naming the
    file: a training set is small, and a silently missing picture changes what is learned."""
    if resolution < 8 or resolution % 8:
        raise StylegradError(f"resolution must be a positive multiple of 8, got {resolution}")
    paths = find_images(inputs)
    if not paths:
        raise StylegradError(f"no pictures found in {', '.join(map(str, inputs))}")
    pixels, captions, resized = [], [], 0
    for path in paths:
        try:
            with Image.open(path) as im:
                image = im.convert("RGB")
        except Exception as e:  # noqa: BLE001 - PIL raises many kinds for a bad file
            raise StylegradError(f"cannot read the picture {path} ({type(e).__name__})") from None
        resized += image.size != (resolution, resolution)
        arr = torch.frombuffer(bytearray(_fit(image, resolution).tobytes()), dtype=torch.uint8)
        pixels.append(arr.reshape(resolution, resolution, 3).permute(2, 0, 1).float() / 127.5 - 1)
        text = path.with_suffix(".txt")
        if text.is_file():
            try:
                captions.append(" ".join(text.read_text(encoding="utf-8").split()))
            except (OSError, UnicodeDecodeError) as e:
                raise StylegradError(f"cannot read the caption {text} ({type(e).__name__}: use UTF-8 text)") from None
        else:
            captions.append(None)
    if resized:
        note(f"{resized} of {len(paths)} pictures were resized and center-cropped to {resolution}x{resolution}")
    return TrainingSet(torch.stack(pixels), captions, paths)
