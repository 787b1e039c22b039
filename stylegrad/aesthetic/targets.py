"""Where the prompt is pulled to, and how the tuned states are blended back (the A1111 extension's options,
with the maths done along the right axis)."""

from __future__ import annotations

import torch

from stylegrad.aesthetic.vectors import normalize, slerp


def style_target(style: torch.Tensor, text: torch.Tensor | None = None, angle: float = 0.1,
                 negative: bool = False, device: torch.device | str | None = None) -> torch.Tensor:
    """Unit target direction (P,) in float32 (tuning's precision) on ``device``: the model's, where the style
    meets it (default: the text embedding's, else the style's own). The style (a CPU float32 vector) is moved
    there now, so it follows the model wherever the model went. Optionally rotated by ``angle`` towards a text
    embedding (or towards style minus text, with ``negative``). Both are normalized first."""
    if device is None:
        device = text.device if text is not None else style.device
    s = normalize(style.to(device=device, dtype=torch.float32))
    if text is None:
        return s
    t = normalize(text.to(device=device, dtype=torch.float32).reshape(-1))
    if negative:
        t = normalize(s - t)
    return normalize(slerp(s, t, angle))


def blend(z0: torch.Tensor, z: torch.Tensor, weight: float, use_slerp: bool = False) -> torch.Tensor:
    """z = (1 - w) z0 + w z_tuned, or per-token slerp along the feature axis. (B, S, H) -> (B, S, H)."""
    if weight == 1.0:
        return z
    if use_slerp:
        return slerp(z0, z, weight, dim=-1)
    return (1.0 - weight) * z0 + weight * z
