"""How a run computes: the frozen weights' dtype, the forward's autocast and fp16's loss scaling, decided once,
before any model loads.

A run keeps the weights it does not train (the UNet, the VAE, the text encoders, less what the method trains) in
the model's dtype, and the tensors it trains in float32: AdamW's steps are far below fp16's resolution, and a
gradient scaler refuses half gradients. The forward then mixes the two under ``torch.autocast``. As in kohya's
scripts and the diffusers training examples, one precision usually says it all:

================  ================================  =========================================================
dtype             mixed_precision                   the run
================  ================================  =========================================================
auto              unset                             the device policy (fp16 on CUDA and MPS, fp32 on the CPU),
                                                    autocast in it when it is half
auto              no                                float32 throughout
auto              fp16 / bf16                       weights in it, autocast in it (kohya's --mixed_precision)
fp32              unset or no                       float32 throughout (A1111's --no-half)
fp32              fp16 / bf16                       float32 weights, autocast in half (classic AMP)
fp16 / bf16       unset or the same                 half weights, autocast in that half
fp16 / bf16       no or the other half              refused: half weights train only under their own autocast
================  ================================  =========================================================

fp16 adds a ``GradScaler`` (its small gradients underflow otherwise), whose state the checkpoints keep, so a
resumed fp16 run is exact. A precision torch's autocast lacks on the device is refused in one line."""

from __future__ import annotations

import warnings
from contextlib import nullcontext
from dataclasses import dataclass

import torch

from stylegrad.devices import DTYPES, dtype_name, resolve_device, resolve_dtype
from stylegrad.errors import RequestError

MIXED = ("no", "fp16", "bf16")


@dataclass(frozen=True)
class Precision:
    """A run's device, its frozen weights' dtype and its autocast dtype (None: no autocast)."""

    device: torch.device
    weights: torch.dtype
    autocast: torch.dtype | None

    def context(self):
        """The forward's autocast (a no-op context without one)."""
        if self.autocast is None:
            return nullcontext()
        return torch.autocast(self.device.type, dtype=self.autocast)

    def scaler(self) -> torch.amp.GradScaler | None:
        """fp16's loss scaling; bf16 (fp32's range) and fp32 need none."""
        return torch.amp.GradScaler(self.device.type) if self.autocast is torch.float16 else None

    def describe(self) -> dict[str, str]:
        """As the CLI names it: ``{'dtype': 'fp16', 'mixed_precision': 'fp16'}``."""
        return {"dtype": dtype_name(self.weights),
                "mixed_precision": "no" if self.autocast is None else dtype_name(self.autocast)}


def autocast_works(device: torch.device, dtype: torch.dtype) -> bool:
    """Whether torch's autocast computes in ``dtype`` on ``device`` here (it only warns, and does nothing, where it
    cannot)."""
    if not torch.amp.is_autocast_available(device.type):
        return False
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        try:
            with torch.autocast(device.type, dtype=dtype):
                return torch.is_autocast_enabled(device.type)
        except (RuntimeError, UserWarning, AssertionError):
            return False


def training_precision(device: str | torch.device | None = None, dtype: str | torch.dtype | None = None,
                       mixed_precision: str | None = None) -> Precision:
    """The run's precision from the user's ``device``, ``dtype`` (the frozen weights') and ``mixed_precision`` (the
    autocast's), by the table above; a combination that cannot train is one line (a ``RequestError`` naming the
    field)."""
    device = resolve_device(device)
    mixed = None if mixed_precision in (None, "auto") else str(mixed_precision).lower()
    if mixed is not None and mixed not in MIXED:
        raise RequestError("mixed_precision", f"{{field}} must be no, fp16 or bf16, got {mixed_precision}")
    if dtype is None or dtype == "auto":
        weights = resolve_dtype(None if mixed is None else DTYPES.get(mixed, torch.float32), device)
    else:
        weights = resolve_dtype(dtype, device)
    half = weights is not torch.float32
    if mixed is None:
        compute = weights if half else None
    elif mixed == "no":
        compute = None
        if half:
            raise RequestError("mixed_precision", f"{{field}} no with {dtype_name(weights)} weights: frozen half "
                               f"weights train only under autocast (leave it unset, or use dtype fp32)")
    else:
        compute = DTYPES[mixed]
        if half and compute is not weights:
            raise RequestError("mixed_precision", f"{{field}} {mixed} with {dtype_name(weights)} weights: autocast "
                               f"computes in the weights' precision ({dtype_name(weights)}), or use dtype fp32")
    if compute is not None and not autocast_works(device, compute):
        name = dtype_name(compute)
        field = "mixed_precision" if mixed is not None else "dtype"
        raise RequestError(field, f"{{field}} {name} cannot apply on {device.type}: this torch has no {name} "
                           "autocast there; train in fp32")
    return Precision(device, weights, compute)
