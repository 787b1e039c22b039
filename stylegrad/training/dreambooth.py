"""DreamBooth-style fine-tuning (Ruiz et al. 2023): every UNet weight trained on the pictures, with the
prior-preservation loss: pictures the base model makes for the class prompt are trained on too, so the model keeps
what the class looked like. The UNet trains in float32 (from the weights as loaded) while the VAE and text encoders
stay in the run's half precision. Saved as the whole UNet (safetensors); ``merge`` blends it with the base at
``alpha``, A1111's weighted-sum merge."""

from __future__ import annotations

from pathlib import Path

import torch

from stylegrad.training.checkpoint import save_tensors
from stylegrad.training.data import STYLE_TEMPLATES
from stylegrad.training.loop import Method
from stylegrad.training.models import Models, condition, train_float32
from stylegrad.training.step import diffusion_loss, latent_moments

DEFAULTS = {"steps": 400, "lr": 5e-6, "batch_size": 1, "grad_accum": 1, "weight_decay": 1e-2}


class DreamBooth(Method):
    name = "dreambooth"
    templates = STYLE_TEMPLATES

    def __init__(self, models: Models, word: str, class_pixels: torch.Tensor, class_prompts: list[str],
                 prior_weight: float = 1.0, batch_size: int = 1):
        """``class_pixels`` (N, 3, R, R) in [-1, 1]: the base model's pictures of ``class_prompts`` (one each)."""
        self.word, self.models = word, models
        self.params = dict(models.unet.named_parameters())
        train_float32(self.params.values())
        self.class_mean, self.class_std = latent_moments(models.vae, class_pixels)
        self.class_prompts, self.prior_weight, self.batch_size = list(class_prompts), prior_weight, batch_size

    def trained(self) -> dict[str, torch.Tensor]:
        return dict(self.params)

    def extra_loss(self, models: Models, generator: torch.Generator) -> torch.Tensor:
        idx = torch.randint(len(self.class_mean), (self.batch_size,), generator=generator)
        cond = condition(models, [self.class_prompts[int(i)] for i in idx])
        loss = diffusion_loss(models.unet, models.scheduler, self.class_mean[idx], self.class_std[idx], cond,
                              generator)
        return self.prior_weight * loss

    def export(self, out: str | Path, step: int = 0) -> list[Path]:
        meta = {"method": "dreambooth", "step": str(step)}
        return [save_tensors(Path(out).with_suffix(".safetensors"), self.params, meta)]


@torch.no_grad()
def merge(base: dict[str, torch.Tensor], tuned: dict[str, torch.Tensor], alpha: float) -> dict[str, torch.Tensor]:
    """(1 - alpha) * base + alpha * tuned, tensor by tensor."""
    return {k: torch.lerp(base[k].float(), tuned[k].float(), alpha) for k in base}
