"""The one loaded model of a deployment: loaded in ``setup()``, kept for every prediction that asks for it (the
default), and swapped for a prediction that names another model, device or precision (one model in memory at a
time: two SDXL pipelines do not fit most GPUs). A weights URL is downloaded once into the cache."""

from __future__ import annotations

import hashlib
import os
import urllib.parse
import urllib.request
from pathlib import Path

from stylegrad.apps.cog.settings import Deployment
from stylegrad.errors import RequestError, StylegradError, describe
from stylegrad.files.atomic import atomic_path

CHUNK = 1 << 20


def is_url(text: str) -> bool:
    return text.startswith(("http://", "https://"))


def cache_dir() -> Path:
    root = os.environ.get("STYLEGRAD_CACHE") or os.path.join(os.environ.get("XDG_CACHE_HOME", "~/.cache"), "stylegrad")
    return Path(root).expanduser() / "weights"


def fetch_weights(url: str, folder: Path | None = None) -> Path:
    """A checkpoint file at ``url``, downloaded once (atomically: an interrupted download leaves nothing) and then
    read from the cache; the URL's own file name is kept, for the file's kind and the PNG's model name."""
    name = Path(urllib.parse.urlparse(url).path).name or "weights.safetensors"
    path = (folder or cache_dir()) / hashlib.sha256(url.encode()).hexdigest()[:16] / name
    if path.is_file():
        return path
    try:
        with urllib.request.urlopen(urllib.request.Request(url, headers={"User-Agent": "stylegrad"}), timeout=60) as r:
            with atomic_path(path) as tmp, open(tmp, "wb") as out:
                while block := r.read(CHUNK):
                    out.write(block)
    except OSError as e:  # URLError and timeouts are OSErrors
        raise StylegradError(f"cannot download {url}: {describe(e)}") from e
    return path


class Models:
    """The deployment's ``Generator``, by (model, device, dtype)."""

    def __init__(self, deployment: Deployment):
        self.deployment = deployment
        self.key: tuple | None = None
        self.generator = None
        self.encoder: tuple | None = None  # (clip model, device, (model, processor)): styles from pictures

    def image_encoder(self, clip_model: str, device):
        """The CLIP image tower styles are made with, kept for the next prediction's pictures."""
        from stylegrad.aesthetic.embedding import load_image_encoder

        if self.encoder is None or self.encoder[:2] != (clip_model, str(device)):
            self.encoder = None  # the old tower's memory is free before the new one loads
            self.encoder = (clip_model, str(device), load_image_encoder(clip_model, device))
        return self.encoder[2]

    def get(self, model: str | None = None, device: str | None = None, dtype: str | None = None,
            field: str = "model"):
        """The generator for ``model`` (None: the deployment's) on ``device`` in ``dtype`` (None: the deployment's),
        loading it if it is not the one in memory; a model that does not load is a ``RequestError`` on ``field``."""
        from stylegrad.devices import resolve_device, resolve_dtype
        from stylegrad.pipelines.generation import Generator

        d = self.deployment
        dev = resolve_device(device or d.device)
        dt = resolve_dtype(dtype or d.dtype, dev)
        source = model or d.model
        key = (source, str(dev), dt)
        if key == self.key:
            return self.generator
        self.key, self.generator = None, None  # the old model's memory is free before the new one loads
        _empty_cache(dev)
        try:
            self.generator = Generator.load(str(fetch_weights(source) if is_url(source) else source), dev,
                                            d.clip_model, dtype=dt)
        except RequestError:
            raise
        except StylegradError as e:
            if model is None:
                raise
            raise RequestError(field, "{field}: " + describe(e)) from None
        self.key = key
        return self.generator


def _empty_cache(device) -> None:
    import gc

    import torch

    gc.collect()
    if device.type == "cuda":
        torch.cuda.empty_cache()
    elif device.type == "mps":
        torch.mps.empty_cache()
