"""Reference pictures -> the embeddings an adapter reads, as diffusers' ``encode_image`` makes them, averaged over
the pictures, and cached.

Base and light read the pooled ``image_embeds`` (1, D), their negative is zeros; plus and full read the encoder's
penultimate hidden states (1, 257, W), their negative is the states of an all-zero picture (diffusers' convention,
so one picture gives diffusers' numbers exactly). Several pictures are averaged (what ComfyUI's and A1111's users
get from several references with 'average'): the mean of their embeddings, in float32, then the encoder's dtype.

Each picture's embedding is cached by (its sha256, the encoder, the kind, the dtype): in memory, and as a small
safetensors file under ``$STYLEGRAD_CACHE/ipadapter`` so a style's pictures are encoded once, not every call
(and the encoder is not even loaded when every picture is cached)."""

from __future__ import annotations

import hashlib
import os
from collections.abc import Callable
from pathlib import Path

import torch
from PIL import Image

from stylegrad.errors import StylegradError
from stylegrad.files.atomic import atomic_path
from stylegrad.files.hashes import sha256_file

ZERO = "zero-image"  # the cache key of the all-zero picture (the plus variants' negative)


def cache_folder() -> Path:
    root = os.environ.get("STYLEGRAD_CACHE") or os.path.join(os.environ.get("XDG_CACHE_HOME", "~/.cache"), "stylegrad")
    return Path(root).expanduser() / "ipadapter"


def encoder_identity(where: str) -> str:
    """What names an encoder in the cache: its weights' sha256 for a local file or folder, the hub id otherwise."""
    p = Path(where)
    if p.is_file():
        return sha256_file(p)
    if p.is_dir():
        weights = sorted(p.glob("*.safetensors")) or sorted(p.glob("*.bin"))
        return hashlib.sha256("".join(sha256_file(w) for w in weights).encode()).hexdigest()
    return where


class PictureEmbedder:
    """The embeddings of pictures under one encoder; ``load()`` gives (model, processor) when first needed."""

    def __init__(self, identity: str, load: Callable[[], tuple], dtype: torch.dtype, disk: bool = True):
        self.identity, self._load, self.dtype, self.disk = identity, load, dtype, disk
        self._encoder: tuple | None = None
        self._memory: dict[tuple, torch.Tensor] = {}
        self.encoded = 0  # pictures run through the encoder (the cache's misses), for tests and notes

    def encoder(self) -> tuple:
        if self._encoder is None:
            self._encoder = self._load()
        return self._encoder

    def _file(self, key: tuple) -> Path:
        name = hashlib.sha256("|".join(map(str, key)).encode()).hexdigest()[:32]
        return cache_folder() / f"{name}.safetensors"

    def _cached(self, picture: str, hidden: bool, make: Callable[[], torch.Tensor]) -> torch.Tensor:
        digest = picture if picture == ZERO else sha256_file(picture)
        key = (digest, self.identity, "hidden" if hidden else "pooled", str(self.dtype).replace("torch.", ""))
        if key in self._memory:
            return self._memory[key]
        path = self._file(key)
        value = None
        if self.disk and path.is_file():
            from safetensors.torch import load_file

            try:
                value = load_file(str(path))["embedding"]
            except Exception:  # a torn or foreign file is a miss, rewritten below
                value = None
        if value is None:
            value = make().detach().to("cpu").contiguous()
            self.encoded += 1
            if self.disk:
                try:
                    from safetensors.torch import save_file

                    path.parent.mkdir(parents=True, exist_ok=True)
                    with atomic_path(path) as tmp:
                        save_file({"embedding": value}, str(tmp))
                except (OSError, StylegradError):  # a read-only cache costs an encoding next time, nothing more
                    pass
        self._memory[key] = value
        return value

    def _run(self, pixels: torch.Tensor, hidden: bool) -> torch.Tensor:
        model, _ = self.encoder()
        p = next(model.parameters())
        with torch.no_grad():
            if hidden:
                return model(pixels.to(p.device, p.dtype), output_hidden_states=True).hidden_states[-2]  # (1, T, W)
            return model(pixels.to(p.device, p.dtype)).image_embeds  # (1, D)

    def _pixels(self, picture: str) -> torch.Tensor:
        try:
            with Image.open(picture) as im:
                image = im.convert("RGB")
        except (OSError, ValueError) as e:
            raise StylegradError(f"IP-Adapter picture {Path(picture).name} is not a readable image ({e})") from None
        return self.encoder()[1](image, return_tensors="pt").pixel_values

    def embeds(self, pictures: list[str], hidden: bool) -> tuple[torch.Tensor, torch.Tensor]:
        """(the pictures' mean embedding, the negative), each (1, D) or (1, T, W) on the CPU in the encoder's
        dtype."""
        if not pictures:
            raise StylegradError("IP-Adapter needs at least one picture")
        for p in pictures:
            if not Path(p).is_file():
                raise StylegradError(f"IP-Adapter picture not found: {p}")
        each = [self._cached(p, hidden, lambda p=p: self._run(self._pixels(p), hidden)) for p in pictures]
        mean = each[0] if len(each) == 1 else torch.stack([e.float() for e in each]).mean(0).to(each[0].dtype)
        if not hidden:
            return mean, torch.zeros_like(mean)
        zero = self._cached(ZERO, hidden, lambda: self._run(torch.zeros(1, 3, self._size(), self._size()), hidden))
        return mean, zero

    def _size(self) -> int:
        return self.encoder()[0].config.image_size
