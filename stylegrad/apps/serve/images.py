"""Images in and out of the API: base64 PNGs with their infotext out; uploads checked by content, not by name."""

from __future__ import annotations

import base64
import binascii
import io

from PIL import Image, PngImagePlugin

from stylegrad.errors import RequestError, StylegradError

FORMATS = ("PNG", "JPEG", "WEBP", "BMP", "GIF")
MAX_PIXELS = 64_000_000  # a decompression bomb is refused before it is decoded


def decode_b64(data: str, max_bytes: int, what: str = "image") -> bytes:
    """A1111 clients send images as base64, sometimes as a data URL ('data:image/png;base64,...')."""
    if not isinstance(data, str) or not data:
        raise RequestError(what, "{field}: base64 image data is needed")
    if data.startswith("data:"):
        data = data.split(",", 1)[-1]
    if len(data) * 3 // 4 > max_bytes:
        raise RequestError(what, f"{{field}}: larger than {max_bytes >> 20} MB")
    try:
        return base64.b64decode(data, validate=True)
    except (binascii.Error, ValueError) as e:
        raise RequestError(what, f"{{field}}: not valid base64 ({e})") from e


def open_image(raw: bytes, max_bytes: int, what: str = "image") -> Image.Image:
    """An RGB image from uploaded bytes, whatever name or type the client claims: the bytes must decode as one of
    ``FORMATS``, within the size limits."""
    if len(raw) > max_bytes:
        raise RequestError(what, f"{{field}}: larger than {max_bytes >> 20} MB")
    try:
        with Image.open(io.BytesIO(raw)) as probe:
            if probe.format not in FORMATS:
                raise RequestError(what, f"{{field}}: {probe.format} images are not accepted "
                                   f"({', '.join(FORMATS)} are)")
            if probe.width * probe.height > MAX_PIXELS:
                raise RequestError(what, f"{{field}}: {probe.width}x{probe.height} is more pixels than accepted")
            probe.verify()
        with Image.open(io.BytesIO(raw)) as im:
            return im.convert("RGB")
    except StylegradError:
        raise
    except (OSError, ValueError, SyntaxError, Image.DecompressionBombError) as e:
        raise RequestError(what, f"{{field}}: not a readable image ({type(e).__name__})") from e


def png_bytes(image: Image.Image, parameters: str | None = None) -> bytes:
    """A PNG with A1111's 'parameters' text chunk, so the image carries its settings wherever it goes."""
    info = PngImagePlugin.PngInfo()
    if parameters:
        info.add_text("parameters", parameters)
    buf = io.BytesIO()
    image.save(buf, format="PNG", pnginfo=info)
    return buf.getvalue()


def png_b64(image: Image.Image, parameters: str | None = None) -> str:
    return base64.b64encode(png_bytes(image, parameters)).decode("ascii")
