"""Images in and out of the API: base64 PNGs with their infotext out; uploads checked by content, not by name.

An upload is decoded on a worker thread (``read_image``), never on the event loop, a few at a time, and only after
its header's size is within the pixel limit: a 8 KB PNG can say 8000x8000 and decode to 200 MB."""

from __future__ import annotations

import base64
import binascii
import io
import re
import threading

from PIL import Image, PngImagePlugin

from stylegrad.errors import RequestError, StylegradError

from .settings import MAX_PIXELS

FORMATS = ("PNG", "JPEG", "WEBP", "BMP", "GIF")
DECODING = threading.BoundedSemaphore(2)  # uploads decoded at once: memory stays bounded under a flood


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


def open_image(raw: bytes, max_bytes: int, what: str = "image", max_pixels: int = MAX_PIXELS) -> Image.Image:
    """An RGB image from uploaded bytes, whatever name or type the client claims: the bytes must decode as one of
    ``FORMATS``, within the size limits (the pixels read from the header, before anything is decoded)."""
    if len(raw) > max_bytes:
        raise RequestError(what, f"{{field}}: larger than {max_bytes >> 20} MB")
    try:
        with Image.open(io.BytesIO(raw)) as probe:
            if probe.format not in FORMATS:
                raise RequestError(what, f"{{field}}: {probe.format} images are not accepted "
                                   f"({', '.join(FORMATS)} are)")
            if probe.width * probe.height > max_pixels:
                raise RequestError(what, f"{{field}}: {probe.width}x{probe.height} is more than the {max_pixels:,} "
                                   "pixels accepted")
            probe.verify()
        with Image.open(io.BytesIO(raw)) as im:
            return im.convert("RGB")
    except StylegradError:
        raise
    except Image.DecompressionBombError as e:  # PIL's own limit (lowered where the web page is mounted): the header
        found = re.search(r"\((\d+) pixels\)", str(e))
        size = f"{int(found.group(1)):,} pixels" if found else "the image"
        raise RequestError(what, f"{{field}}: {size} is more than the {max_pixels:,} pixels accepted") from e
    except (OSError, ValueError, SyntaxError) as e:
        raise RequestError(what, f"{{field}}: not a readable image ({type(e).__name__})") from e


async def read_image(data: str | bytes, max_bytes: int, what: str, max_pixels: int = MAX_PIXELS) -> Image.Image:
    """``open_image`` of base64 text or raw bytes, on a worker thread: the event loop keeps answering others."""
    from starlette.concurrency import run_in_threadpool

    def work() -> Image.Image:
        with DECODING:
            raw = data if isinstance(data, bytes) else decode_b64(data, max_bytes, what)
            return open_image(raw, max_bytes, what, max_pixels)

    return await run_in_threadpool(work)


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
