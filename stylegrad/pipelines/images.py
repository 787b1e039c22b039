"""The pictures a request reads: an init image for img2img, a stylecode's reference image. One-line errors."""

from __future__ import annotations

from PIL import Image

from stylegrad.errors import StylegradError


def load_image(path: str, what: str = "image") -> Image.Image:
    try:
        with Image.open(path) as im:
            return im.convert("RGB")
    except (OSError, ValueError, SyntaxError) as e:
        raise StylegradError(f"cannot read {what} {path}: {e}") from e


def load_init_image(path: str | None, width: int | None, height: int | None) -> Image.Image | None:
    """The img2img start, resized to the request's size (or its own) rounded down to a multiple of 8."""
    if path is None:
        return None
    return fit_init_image(load_image(path, "init image"), width, height)


def fit_init_image(image: Image.Image, width: int | None, height: int | None) -> Image.Image:
    from stylegrad.pipelines.request import img2img_size

    return image.convert("RGB").resize(img2img_size(width, height, image.size), Image.LANCZOS)
