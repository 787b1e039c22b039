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


def adam_step(weight: torch.Tensor, grad: torch.Tensor, exp_avg: torch.Tensor, exp_avg_sq: torch.Tensor,
              step: torch.Tensor, adam_settings: AdamSettings) -> None:
    """One Adam step of one tensor, in place, on torch's own kernel (fused where torch has one for the device);
    ``step`` (a 0-d float tensor) is advanced."""
    s = adam_settings
    adam([weight], [grad], [exp_avg], [exp_avg_sq], [], [step], amsgrad=False, maximize=False, weight_decay=0.0,
         lr=s.lr, beta1=s.beta1, beta2=s.beta2, eps=s.eps, fused=s.fused or None, foreach=None if s.fused else True)
