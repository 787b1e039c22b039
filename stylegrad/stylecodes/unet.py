"""Run a base SD UNet with the Stylecodes control stream, as a drop-in UNet for any diffusers pipeline.

The base UNet runs its encoder as usual. The style map (decoded from a code) enters at the mid block; after the mid
block and after every up sub-block a collab linear mixes [control, base] per pixel, and the base stream becomes
``(1 - s) * base + s * mixed``. With s = 0 the base UNet runs alone, so the output is exactly the base output.
The user's UNet is only read, never changed: ``StylecodeUNet`` holds references and its own state.
"""

from __future__ import annotations

import inspect

import torch
from torch import nn

from stylegrad.errors import StylegradError
from stylegrad.stylecodes.exact import exact_float32
from stylegrad.stylecodes.model import StyleAutoencoder, StylecodesModel, float32_autoencoder


def _mix(collab: nn.Linear, ctrl: torch.Tensor, base: torch.Tensor, strength: torch.Tensor):
    b, c, h, w = ctrl.shape
    mixed = collab(torch.cat([ctrl, base], 1).flatten(2).transpose(1, 2)).transpose(1, 2).reshape(b, 2 * c, h, w)
    new_ctrl, out = mixed.chunk(2, dim=1)
    # each stream stays in its own precision (training: a float32 control model beside a half UNet, under autocast)
    return new_ctrl.to(ctrl.dtype), (base * (1 - strength) + out * strength).to(base.dtype)


def _time_embedding(unet, sample: torch.Tensor, timestep, timestep_cond=None) -> torch.Tensor:
    t = timestep if torch.is_tensor(timestep) else torch.tensor([timestep], device=sample.device)
    t = t.reshape(-1).to(sample.device).expand(sample.shape[0])
    return unet.time_embedding(unet.time_proj(t).to(sample.dtype), timestep_cond)


def controlled_forward(unet, control: StylecodesModel, sample: torch.Tensor, timestep, encoder_hidden_states,
                       style_map: torch.Tensor, strength: torch.Tensor, timestep_cond=None,
                       cross_attention_kwargs=None, checkpoint: bool = False,
                       added_cond_kwargs=None) -> torch.Tensor:
    """The base UNet's computation, sub-block by sub-block, with the control stream beside it (SD1.x layout:
    no class or added embeddings). ``style_map`` is the decoded code at the mid-block size, or a function of that
    size giving it. ``checkpoint`` recomputes sub-blocks in the backward pass (training memory).
    ``added_cond_kwargs``: an IP-Adapter's ``image_embeds`` for the base UNet's blocks (its projection installed
    on the UNet); the control stream reads the text alone."""
    if unet.config.class_embed_type is not None or unet.config.addition_embed_type is not None:
        raise StylegradError("Stylecodes works with SD1.x UNets; this UNet has class or added embeddings (SDXL?)")
    temb = _time_embedding(unet, sample, timestep, timestep_cond)
    ctx, kw = encoder_hidden_states, cross_attention_kwargs
    base_ctx = ctx  # the base blocks' context: with an IP-Adapter, (text, image tokens) as the UNet makes it
    if added_cond_kwargs and getattr(unet, "encoder_hid_proj", None) is not None:
        base_ctx = unet.process_encoder_hidden_states(ctx, added_cond_kwargs)

    def run(fn, *args):
        if checkpoint and torch.is_grad_enabled():
            from torch.utils.checkpoint import checkpoint as ck

            return ck(fn, *args, use_reentrant=False)
        return fn(*args)

    def attend(block, context=ctx):
        return lambda x: block(x, encoder_hidden_states=context, cross_attention_kwargs=kw, return_dict=False)[0]

    h = unet.conv_in(sample)
    skips = [h]
    for block in unet.down_blocks:
        if getattr(block, "has_cross_attention", False):
            h, res = block(hidden_states=h, temb=temb, encoder_hidden_states=base_ctx, cross_attention_kwargs=kw)
        else:
            h, res = block(hidden_states=h, temb=temb)
        skips += res
    h = run(lambda x: unet.mid_block(x, temb, encoder_hidden_states=base_ctx, cross_attention_kwargs=kw), h)
    if callable(style_map):
        style_map = style_map(*h.shape[-2:])
    c = run(lambda x: control.control_model.mid_block(x, temb, encoder_hidden_states=ctx, cross_attention_kwargs=kw),
            style_map.expand(h.shape[0], -1, -1, -1).to(control.middle_block_out.weight.dtype))
    c, h = _mix(control.middle_block_out, c, h, strength)
    up_factor = 2 ** sum(1 for b in unet.up_blocks if b.upsamplers)
    odd_size = any(s % up_factor for s in sample.shape[-2:])
    collabs = iter(control.control_model.up_zero_convs_out)
    for base_block, ctrl_block in zip(unet.up_blocks, control.control_model.up_blocks):
        base_attn = getattr(base_block, "attentions", None) or [None] * len(base_block.resnets)
        ctrl_attn = getattr(ctrl_block, "attentions", None) or [None] * len(ctrl_block.resnets)
        last = len(base_block.resnets) - 1
        for i, (rb, ab, rc, ac) in enumerate(zip(base_block.resnets, base_attn, ctrl_block.resnets, ctrl_attn)):
            skip = skips.pop()
            h = run(rb, torch.cat([h, skip], 1), temb)
            c = run(rc, torch.cat([c, torch.zeros_like(skip)], 1), temb)
            if ab is not None:
                h = run(attend(ab, base_ctx), h)
            if ac is not None:
                c = run(attend(ac), c)
            if i == last and base_block.upsamplers:
                size = skips[-1].shape[2:] if odd_size and skips else None
                h = base_block.upsamplers[0](h, size)
                c = ctrl_block.upsamplers[0](c, size)
            c, h = _mix(next(collabs), c, h, strength)
    h = unet.conv_norm_out(h) if unet.conv_norm_out is not None else h
    h = unet.conv_act(h) if unet.conv_act is not None else h
    return unet.conv_out(h)


class StyleMaps:
    """A code decoded to the control stream's starting map, once per mid-block size and device. Decoded in float32
    by a float32 autoencoder held here, outside any module tree (moving or casting the pipeline never reaches or
    rounds it): the map is the same in every precision until the UNet casts it where it acts."""

    def __init__(self, autoencoder: StyleAutoencoder, latent: torch.Tensor, separate: bool = False):
        self.autoencoder = float32_autoencoder(autoencoder, separate)
        self.latent = latent.detach().reshape(1, -1).to(torch.float32)  # (1, 20)
        self.maps: dict[tuple[int, int, torch.device], torch.Tensor] = {}

    @torch.no_grad()
    def __call__(self, height: int, width: int, device: torch.device) -> torch.Tensor:
        """(1, C, height, width) float32 on ``device``."""
        key = (height, width, torch.device(device))
        if key not in self.maps:
            auto = self.autoencoder.to(key[2])  # moved, never cast: float32 stays float32
            with exact_float32(key[2]):
                self.maps[key] = auto.decode(self.latent.to(key[2]), height, width)
        return self.maps[key]


def follow(control: StylecodesModel, device: torch.device, dtype: torch.dtype) -> None:
    """Move the control stream (not the code's autoencoder) to where the base UNet runs, in its dtype."""
    for part in (control.control_model, control.middle_block_out):
        p = next(part.parameters())
        if p.device != device or p.dtype != dtype:
            part.to(device=device, dtype=dtype)


class StylecodeUNet(nn.Module):
    """A UNet that a diffusers pipeline can call in place of its own: same config, dtype and device as the base.

    ``strength`` scales the style; ``guide_style`` gives the style to the conditional half of a classifier-free
    guidance batch only (the reference gives it to both halves), so guidance pushes towards the style too.
    ``autoencoder``: the code's float32 autoencoder (default: a float32 copy of the control model's). The control
    stream follows the base UNet each call (a pipeline moved or cast after this was made), and the code's map is
    decoded in float32 and cast only where it enters the UNet."""

    def __init__(self, base, control: StylecodesModel, latent: torch.Tensor, strength: float = 1.0,
                 guide_style: bool = False, autoencoder: StyleAutoencoder | None = None):
        super().__init__()
        self.base, self.control = base, control
        self.maps = StyleMaps(control.sref_autoencoder if autoencoder is None else autoencoder, latent,
                              separate=autoencoder is None)
        self.strength, self.guide_style = float(strength), guide_style
        self.config = base.config

    # What diffusers' SD pipelines read on ``pipe.unet`` besides ``config``, ``dtype`` and ``device`` (text-to-image
    # and img2img: ``encoder_hid_proj`` for IP-Adapter image embeds; SDXL's ``add_embedding``; accelerate's offload
    # hook for ``_execution_device``): read from the base UNet. Anything else is not there (AttributeError), so no
    # method that would change the user's UNet (``set_attn_processor``, ``fuse_qkv_projections``, ...) is reached
    # through the wrapper.
    FORWARDED = frozenset({"encoder_hid_proj", "add_embedding", "_hf_hook"})

    def __getattr__(self, name: str):
        try:
            return super().__getattr__(name)
        except AttributeError:
            if name in StylecodeUNet.FORWARDED:
                return getattr(super().__getattr__("base"), name)
            raise AttributeError(f"'{type(self).__name__}' has no attribute '{name}' (the base UNet's are not "
                                 "forwarded beyond StylecodeUNet.FORWARDED)") from None

    @property
    def dtype(self) -> torch.dtype:
        return self.base.dtype

    @property
    def device(self) -> torch.device:
        return self.base.device

    def _strengths(self, batch: int, device, dtype) -> torch.Tensor:
        s = torch.full((batch, 1, 1, 1), self.strength, device=device, dtype=dtype)
        if self.guide_style and batch % 2 == 0:
            s[: batch // 2] = 0  # diffusers puts the unconditional half first
        return s

    def forward(self, sample, timestep, encoder_hidden_states, timestep_cond=None, cross_attention_kwargs=None,
                added_cond_kwargs=None, return_dict: bool = True, **kwargs):
        from diffusers.models.unets.unet_2d_condition import UNet2DConditionOutput

        if self.strength == 0:
            return self.base(sample, timestep, encoder_hidden_states, timestep_cond=timestep_cond,
                             cross_attention_kwargs=cross_attention_kwargs, added_cond_kwargs=added_cond_kwargs,
                             return_dict=return_dict, **kwargs)
        follow(self.control, sample.device, self.base.dtype)
        out = controlled_forward(self.base, self.control, sample, timestep, encoder_hidden_states,
                                 lambda h, w: self.maps(h, w, sample.device),
                                 self._strengths(sample.shape[0], sample.device, sample.dtype), timestep_cond,
                                 cross_attention_kwargs, added_cond_kwargs=added_cond_kwargs)
        return UNet2DConditionOutput(sample=out) if return_dict else (out,)


def mid_size(unet, height: int, width: int, vae_scale: int = 8) -> tuple[int, int]:
    """The mid block's spatial size for an image of height x width pixels."""
    down = 2 ** sum(1 for b in unet.down_blocks if getattr(b, "downsamplers", None))
    h, w = height // vae_scale, width // vae_scale
    return -(-h // down), -(-w // down)


def with_stylecode(pipe, control: StylecodesModel, latent: torch.Tensor, strength: float = 1.0,
                   guide_style: bool = False, autoencoder: StyleAutoencoder | None = None):
    """A new pipeline of the same class sharing every component with ``pipe`` except the UNet, which is wrapped:
    ``pipe`` itself is left as it was."""
    unet = StylecodeUNet(pipe.unet, control, latent, strength, guide_style, autoencoder)
    accepted = inspect.signature(type(pipe).__init__).parameters
    parts = {k: v for k, v in pipe.components.items() if k in accepted}
    parts["unet"] = unet
    if "requires_safety_checker" in accepted:
        parts["requires_safety_checker"] = bool(pipe.config.get("requires_safety_checker", False))
    styled = type(pipe)(**parts)
    styled.set_progress_bar_config(**getattr(pipe, "_progress_bar_config", {}))
    return styled
