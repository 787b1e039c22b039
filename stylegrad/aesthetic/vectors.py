"""Small vector maths shared by style files, targets and output blending."""

import torch


def normalize(x: torch.Tensor, dim: int = -1) -> torch.Tensor:
    """L2-normalize along ``dim`` (the feature axis by default)."""
    return x / x.norm(dim=dim, keepdim=True)


def slerp(a: torch.Tensor, b: torch.Tensor, t: float, dim: int = -1) -> torch.Tensor:
    """Spherical interpolation from ``a`` (t=0) to ``b`` (t=1), one angle per vector along ``dim``.

    The angle comes from the normalized vectors and the weights are applied to the vectors as given,
    so unnormalized inputs keep their scale. Nearly parallel pairs fall back to linear interpolation.
    """
    cos = (normalize(a, dim) * normalize(b, dim)).sum(dim, keepdim=True).clamp(-1.0, 1.0)
    omega = torch.acos(cos)
    sin = torch.sin(omega)
    parallel = sin.abs() < 1e-6
    safe_sin = torch.where(parallel, torch.ones_like(sin), sin)
    wa = torch.where(parallel, torch.full_like(sin, 1.0 - t), torch.sin((1.0 - t) * omega) / safe_sin)
    wb = torch.where(parallel, torch.full_like(sin, t), torch.sin(t * omega) / safe_sin)
    return wa * a + wb * b
