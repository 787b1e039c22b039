"""Adam's settings as one explicit object, and one Adam step of one tensor on torch's own kernels."""

from __future__ import annotations

from dataclasses import dataclass

import torch
from torch.optim.adam import adam


@dataclass(frozen=True)
class AdamSettings:
    """torch.optim.Adam's hyper-parameters (no weight decay, no amsgrad), plus which of its kernels to use."""

    lr: float
    beta1: float = 0.9
    beta2: float = 0.999
    eps: float = 1e-8
    fused: bool = True  # torch's fused kernel (CPU and CUDA); else its foreach one (how the large weights' moments
    # are stored is the engine's choice, not Adam's: engine.EngineSettings.memory)

    @classmethod
    def for_device(cls, device: torch.device, lr: float, betas: tuple[float, float] = (0.9, 0.999),
                   eps: float = 1e-8) -> AdamSettings:
        """The fused kernel where torch has one for the device: one pass over memory per step."""
        return cls(lr, betas[0], betas[1], eps, fused=device.type in ("cpu", "cuda"))

    def optimizer(self, params: list[torch.Tensor]) -> torch.optim.Adam:
        kernel = {"fused": True} if self.fused else {"foreach": True}
        return torch.optim.Adam(params, lr=self.lr, betas=(self.beta1, self.beta2), eps=self.eps, **kernel)


def _fused_kernel():
    """torch's fused Adam kernel itself, where the build has it (``torch.optim.adam`` calls the same one)."""
    return getattr(torch, "_fused_adam_", None)


_FUSED = _fused_kernel()


def adam_step(weight: torch.Tensor, grad: torch.Tensor, exp_avg: torch.Tensor, exp_avg_sq: torch.Tensor,
              step: torch.Tensor, adam_settings: AdamSettings) -> None:
    """One Adam step of one tensor, in place; ``step`` (a 0-d float tensor) is advanced. Why not
    ``torch.optim.adam.adam``: its Python bookkeeping (grouping by device and dtype, checks) around the fused
    kernel it ends in; this calls that kernel directly with the same arguments, the same bits. Measured
    (2026-12-07, 2-core CPU): 7.5 us a call against 19 us, so 0.8 ms a step over SD1.x's 72 weights; that is noise
    next to a CPU step (bench/products.py: 1.01x over the 72 weights) and counts where the kernels are short,
    on GPUs (torch's path is the only one there; not measured here)."""
    global _FUSED
    s = adam_settings
    if _FUSED is not None and s.fused:
        try:
            step += 1
            _FUSED([weight], [grad], [exp_avg], [exp_avg_sq], [], [step], lr=s.lr, beta1=s.beta1, beta2=s.beta2,
                   weight_decay=0.0, eps=s.eps, amsgrad=False, maximize=False)
            return
        except (RuntimeError, TypeError):  # a private op: if this torch's differs, use the public path from now on
            step -= 1
            _FUSED = None
    adam([weight], [grad], [exp_avg], [exp_avg_sq], [], [step], amsgrad=False, maximize=False, weight_decay=0.0,
         lr=s.lr, beta1=s.beta1, beta2=s.beta2, eps=s.eps, fused=s.fused or None, foreach=None if s.fused else True)
