"""The one noise/loss step every method trains with (DDPM's, as the diffusers examples and kohya compute it):
noise the pictures' latents at a random timestep, ask the UNet for the noise (or v), mean squared error."""

from __future__ import annotations

import torch
import torch.nn.functional as F


@torch.no_grad()
def latent_moments(vae, pixels: torch.Tensor, batch: int = 8) -> tuple[torch.Tensor, torch.Tensor]:
    """(mean, std) of the VAE's latent distribution per picture, scaled, in float32: the VAE is frozen, so this is
    read once and each step samples ``mean + std * noise`` (what ``latent_dist.sample()`` does), with the step's
    generator. An fp16 VAE whose config says ``force_upcast`` (SDXL's overflows in fp16) encodes in float32, as the
    diffusers pipelines decode: cast up for the call and back (exact both ways; the VAE is the run's own copy)."""
    means, stds = [], []
    dtype = next(vae.parameters()).dtype
    upcast = dtype == torch.float16 and bool(getattr(vae.config, "force_upcast", False))
    if upcast:
        vae.float()
    try:
        p = next(vae.parameters())
        for i in range(0, len(pixels), batch):
            dist = vae.encode(pixels[i:i + batch].to(p.device, p.dtype)).latent_dist
            means.append(dist.mean.float())
            stds.append(dist.std.float())
    finally:
        if upcast:
            vae.half()
    scale = vae.config.scaling_factor
    shift = getattr(vae.config, "shift_factor", None) or 0.0
    return (torch.cat(means) - shift) * scale, torch.cat(stds) * scale


def diffusion_loss(unet, scheduler, mean: torch.Tensor, std: torch.Tensor, cond: dict, generator: torch.Generator,
                   reduction: str = "mean", uncond: dict | None = None, guidance: float = 1.0) -> torch.Tensor:
    """MSE between the UNet's prediction and its target for latents drawn from (mean, std), noised at uniform random
    timesteps. Every random number comes from ``generator`` (CPU), so a resumed run draws the same ones.
    ``uncond``: the prediction is classifier-free guidance's ``e_u + guidance * (e_c - e_u)`` with ``e_u`` the
    UNet on this conditioning (a negative prompt being trained), as the sampler will combine them."""
    shape, device = mean.shape, mean.device
    latents = mean + std * torch.randn(shape, generator=generator).to(device)
    noise = torch.randn(shape, generator=generator).to(device)
    t = torch.randint(0, scheduler.config.num_train_timesteps, (shape[0],), generator=generator).to(device)
    noisy = scheduler.add_noise(latents, noise, t)
    if scheduler.config.prediction_type == "v_prediction":
        target = scheduler.get_velocity(latents, noise, t)
    else:
        target = noise
    pred = unet(noisy, t, **cond).sample
    if uncond is not None:
        pred_u = unet(noisy, t, **uncond).sample.float()  # combined in float32 where the UNet runs in half
        pred = pred_u + guidance * (pred.float() - pred_u)
    loss = F.mse_loss(pred.float(), target.float(), reduction="none").mean(dim=(1, 2, 3))
    return loss.mean() if reduction == "mean" else loss
