"""What one deployment serves, read from its environment once in ``setup()`` (``cog.yaml``'s ``environment``, or
``docker run -e``): the model it loads, where and in what precision, and the folders it reads."""

from __future__ import annotations

import os
from dataclasses import dataclass

from stylegrad.pipelines.limits import SERVER, Limits

MODEL_ENV = "STYLEGRAD_MODEL"  # hub id, diffusers folder, checkpoint file or http(s) URL of one
DEVICE_ENV, DTYPE_ENV = "STYLEGRAD_DEVICE", "STYLEGRAD_DTYPE"  # stylegrad.devices' names; default auto
CLIP_ENV = "STYLEGRAD_CLIP_MODEL"  # whose projection defines the style space (default: the model family's)
STYLECODES_ENV = "STYLEGRAD_STYLECODES_MODEL"  # default: the published Stylecodes model


def _dirs(env: str) -> tuple[str, ...]:
    value = os.environ.get(env)
    return tuple(p for p in value.split(os.pathsep) if p) if value else ()


@dataclass(frozen=True)
class Deployment:
    model: str
    device: str = "auto"
    dtype: str = "auto"
    clip_model: str | None = None
    stylecodes_model: str | None = None
    styles_dirs: tuple[str, ...] = ()  # the paper's embeddings, by name
    limits: Limits = SERVER  # a hosted model takes a server's limits (the schema's maxima are these)

    @classmethod
    def from_env(cls, weights: str | None = None) -> Deployment:
        """``weights``: what Cog hands ``setup()`` ($COG_WEIGHTS, a fine-tune's weights URL): the model then."""
        from stylegrad.pipelines.loading import DEFAULT_MODEL

        env = os.environ.get
        return cls(model=str(weights or env(MODEL_ENV) or DEFAULT_MODEL), device=env(DEVICE_ENV) or "auto",
                   dtype=env(DTYPE_ENV) or "auto", clip_model=env(CLIP_ENV) or None,
                   stylecodes_model=env(STYLECODES_ENV) or None, styles_dirs=_dirs("STYLEGRAD_STYLES_DIR"))
