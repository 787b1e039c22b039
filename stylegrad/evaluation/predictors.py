"""Published aesthetic predictors: small heads on a CLIP image embedding that output a 1-10 score.

- Simulacra linear probes (crowsonkb/simulacra-aesthetic-models): score = linear(normalize(x) * sqrt(D)).
- The LAION "improved aesthetic predictor" (christophschuhmann/improved-aesthetic-predictor): an MLP
  768 -> 1024 -> 128 -> 64 -> 16 -> 1 (no activations; dropout only in training) on normalize(x).
Loaded as data (``weights_only``), from a path or a short name that downloads once into a cache folder.
"""

from __future__ import annotations

import math
import os
import urllib.request
from dataclasses import dataclass
from pathlib import Path

import torch
import torch.nn.functional as F

from stylegrad.errors import StylegradError, first_line
from stylegrad.files.atomic import atomic_path

_SAC = "https://github.com/crowsonkb/simulacra-aesthetic-models/raw/master/models/"
_LAION = "https://github.com/christophschuhmann/improved-aesthetic-predictor/raw/main/"


@dataclass(frozen=True)
class Known:
    url: str
    filename: str
    clip_model: str  # the CLIP image tower the predictor was trained on


KNOWN = {
    "laion-l14": Known(_LAION + "sac%2Blogos%2Bava1-l14-linearMSE.pth", "sac+logos+ava1-l14-linearMSE.pth",
                       "openai/clip-vit-large-patch14"),
    "sac-l14": Known(_SAC + "sac_public_2022_06_29_vit_l_14_linear.pth", "sac_public_2022_06_29_vit_l_14_linear.pth",
                     "openai/clip-vit-large-patch14"),
    "sac-b16": Known(_SAC + "sac_public_2022_06_29_vit_b_16_linear.pth", "sac_public_2022_06_29_vit_b_16_linear.pth",
                     "openai/clip-vit-base-patch16"),
    "sac-b32": Known(_SAC + "sac_public_2022_06_29_vit_b_32_linear.pth", "sac_public_2022_06_29_vit_b_32_linear.pth",
                     "openai/clip-vit-base-patch32"),
}
DEFAULT = "laion-l14"
MLP_LAYERS = ("layers.0", "layers.2", "layers.4", "layers.6", "layers.7")


class AestheticPredictor:
    """A score head on CLIP image embeddings (any scale: inputs are normalized first)."""

    def __init__(self, state: dict[str, torch.Tensor], name: str, clip_model: str | None = None):
        self.name, self.clip_model = name, clip_model
        self.state = {k: v.detach().float() for k, v in state.items()}
        if set(self.state) == {"linear.weight", "linear.bias"}:
            self.kind = "simulacra-linear"
            self.width = self.state["linear.weight"].shape[1]
        elif set(self.state) == {f"{p}.{w}" for p in MLP_LAYERS for w in ("weight", "bias")}:
            self.kind = "laion-mlp"
            self.width = self.state["layers.0.weight"].shape[1]
        else:
            keys = ", ".join(sorted(self.state)[:4])
            raise StylegradError(f"predictor '{name}' is not a known aesthetic predictor (keys: {keys} ...)")

    def check_width(self, width: int) -> None:
        if width != self.width:
            raise StylegradError(
                f"predictor '{self.name}' takes {self.width}-wide CLIP embeddings but the CLIP model gives "
                f"{width}-wide ones; use the CLIP model it was trained on"
                + (f" ({self.clip_model})" if self.clip_model else "")
            )

    @property
    def device(self) -> torch.device:
        return next(iter(self.state.values())).device

    @property
    def dtype(self) -> torch.dtype:
        return next(iter(self.state.values())).dtype

    def to(self, device: torch.device | str | None = None, dtype: torch.dtype | None = None) -> AestheticPredictor:
        """Move the weights (in place; returns self). Loaded on the CPU in float32; what it scores follows it."""
        self.state = {k: v.to(device=device, dtype=dtype) for k, v in self.state.items()}
        return self

    @torch.no_grad()
    def __call__(self, embeds: torch.Tensor) -> torch.Tensor:
        """(B, D) or (D,) CLIP image embeddings (any device, any dtype: a style's CPU vector, a GPU's image
        embeddings) -> (B,) or () float32 scores on the predictor's device. The inputs are moved to the weights'
        device when scored and normalized in float32 there, then cast to the weights' dtype."""
        x = F.normalize(embeds.to(device=self.device, dtype=torch.float32), dim=-1)
        self.check_width(x.shape[-1])
        s = self.state
        if self.kind == "simulacra-linear":
            x = x * math.sqrt(self.width)
            return F.linear(x.to(self.dtype), s["linear.weight"], s["linear.bias"]).squeeze(-1).float()
        x = x.to(self.dtype)
        for layer in MLP_LAYERS:
            x = F.linear(x, s[f"{layer}.weight"], s[f"{layer}.bias"])
        return x.squeeze(-1).float()


def cache_dir() -> Path:
    root = os.environ.get("STYLEGRAD_CACHE") or os.path.join(os.environ.get("XDG_CACHE_HOME", "~/.cache"), "stylegrad")
    return Path(root).expanduser() / "predictors"


def _offline() -> bool:
    return any(os.environ.get(v, "0") not in ("", "0", "false", "False") for v in ("HF_HUB_OFFLINE", "STYLEGRAD_OFFLINE"))


def _download(known: Known, name: str) -> Path:
    target = cache_dir() / known.filename
    if target.exists():
        return target
    how = f"download {known.url} to {target}, or pass the file's path as the predictor"
    if _offline():
        raise StylegradError(f"predictor '{name}' is not downloaded and downloads are off (offline): {how}")
    try:
        with atomic_path(target) as tmp:
            urllib.request.urlretrieve(known.url, tmp)
    except (OSError, StylegradError) as e:
        raise StylegradError(f"could not download predictor '{name}' ({e}): {how}") from e
    return target


def load_predictor(name_or_path: str = DEFAULT) -> AestheticPredictor:
    """A predictor from a file path, or a short name (laion-l14, sac-l14, sac-b16, sac-b32)."""
    known = KNOWN.get(name_or_path)
    if known is not None:
        path, clip = _download(known, name_or_path), known.clip_model
    else:
        path, clip = Path(name_or_path).expanduser(), None
        if not path.is_file():
            raise StylegradError(
                f"no predictor file or known name '{name_or_path}' (known: {', '.join(KNOWN)})"
            )
        for k in KNOWN.values():
            if path.name == k.filename:
                clip = k.clip_model
    try:
        state = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as e:  # refused pickles, truncated files, not a torch file
        raise StylegradError(f"cannot read predictor {path}: {first_line(e, 160)}") from e
    if isinstance(state, dict) and "state_dict" in state:
        state = state["state_dict"]
    if not isinstance(state, dict) or not all(isinstance(v, torch.Tensor) for v in state.values()):
        raise StylegradError(f"predictor {path} is not a state dict of tensors")
    return AestheticPredictor(state, Path(path).stem if known is None else name_or_path, clip)
