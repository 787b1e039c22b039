"""One place that turns a user's ``--device`` into a torch device, with a one-line error for a bad one."""

from __future__ import annotations

import torch

from stylegrad.errors import StylegradError


def resolve_device(device: str | torch.device | None = None) -> torch.device:
    """``None``/``"auto"``: CUDA if present, else CPU. Otherwise the named device, checked to exist here."""
    if device is None or str(device) == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    try:
        dev = torch.device(device)
    except (RuntimeError, TypeError) as e:
        raise StylegradError(f"unknown device '{device}' (use cpu, cuda, cuda:1, mps or auto)") from e
    if dev.type == "cuda":
        if not torch.cuda.is_available():
            raise StylegradError(f"device '{device}' requested but CUDA is not available here")
        if dev.index is not None and dev.index >= torch.cuda.device_count():
            raise StylegradError(f"device '{device}' requested but this machine has {torch.cuda.device_count()} GPU(s)")
    elif dev.type == "mps" and not torch.backends.mps.is_available():
        raise StylegradError(f"device '{device}' requested but MPS is not available here")
    elif dev.type not in ("cpu", "cuda", "mps", "xpu"):
        raise StylegradError(f"unsupported device '{device}' (use cpu, cuda, cuda:1, mps or auto)")
    return dev


def default_dtype(device: torch.device) -> torch.dtype:
    """fp16 on CUDA (what SD users run), fp32 elsewhere (CPU half precision is slow and inexact)."""
    return torch.float16 if device.type == "cuda" else torch.float32
