"""IP-Adapter (Ye et al. 2023, arXiv 2308.06721), the base variant, trained for a model: an image embedding
becomes a few extra context tokens (``image_proj``: a linear map and a LayerNorm), and every cross-attention of
the frozen UNet reads them through its own key and value matrices beside the text's (decoupled cross-attention):
``attn(q, K_text, V_text) + scale * attn(q, K_img, V_img)``. Trained with the diffusion loss on pictures with their
captions, the image embedding being the picture's own; the UNet and the image encoder are never trained, so at
use time the style (or anything else) comes from whatever reference picture is given, without training.

Written in the layout the published files and diffusers' ``load_ip_adapter`` read: ``image_proj.proj.weight``
(tokens x cross width, image width), ``image_proj.proj.bias``, ``image_proj.norm.weight/bias``, and
``ip_adapter.{N}.to_k_ip.weight`` / ``to_v_ip.weight`` with N = 1, 3, 5, ... over the UNet's attention processors
in order, counting only the cross-attentions (attn2), as the official files number them. diffusers reads a base
file as 4 tokens whatever the proj's shape, so 4 it is."""

from __future__ import annotations

from contextlib import contextmanager
from pathlib import Path

import torch
import torch.nn.functional as F
from torch import nn

from stylegrad.training.checkpoint import save_tensors

TOKENS = 4  # diffusers' load_ip_adapter takes any base file (image_proj.proj) as 4 tokens


class ImageProjection(nn.Module):
    """(B, image width) image embeddings -> (B, TOKENS, cross width) context tokens."""

    def __init__(self, image_dim: int, cross_dim: int, tokens: int = TOKENS):
        super().__init__()
        self.tokens = tokens
        self.proj = nn.Linear(image_dim, tokens * cross_dim)
        self.norm = nn.LayerNorm(cross_dim)

    def forward(self, embeds: torch.Tensor) -> torch.Tensor:
        return self.norm(self.proj(embeds).reshape(len(embeds), self.tokens, -1))


def cross_attentions(unet) -> list[tuple[str, int]]:
    """(processor name, published key number) of every cross-attention, in the UNet's processor order: each
    transformer block has attn1 then attn2, and the files number all attentions from 0, so attn2s are 1, 3, 5..."""
    names = [n for n in unet.attn_processors if n.endswith("attn2.processor")]
    return [(n, 2 * i + 1) for i, n in enumerate(names)]


class IPAdapter(nn.Module):
    """The trained tensors: the image projection and one (to_k_ip, to_v_ip) pair per cross-attention, each pair
    started from that attention's own text K and V (the paper's initialization: the new branch starts by reading
    image tokens the way the text is read)."""

    def __init__(self, unet, image_dim: int, tokens: int = TOKENS):
        super().__init__()
        cross = unet.config.cross_attention_dim
        self.image_proj = ImageProjection(image_dim, cross, tokens)
        self.names = cross_attentions(unet)
        self.ip_adapter = nn.ModuleDict()
        for name, key in self.names:
            attn = unet.get_submodule(name.removesuffix(".processor"))
            pair = nn.Module()
            pair.to_k_ip = nn.Linear(cross, attn.to_k.out_features, bias=False)
            pair.to_v_ip = nn.Linear(cross, attn.to_v.out_features, bias=False)
            with torch.no_grad():
                pair.to_k_ip.weight.copy_(attn.to_k.weight.float())
                pair.to_v_ip.weight.copy_(attn.to_v.weight.float())
            self.ip_adapter[str(key)] = pair
        self.float()

    def published(self) -> dict[str, torch.Tensor]:
        """The state dict as the published files key it (see the module docstring)."""
        return {k: v for k, v in self.state_dict().items()}

    def save(self, out: str | Path, metadata: dict[str, str] | None = None) -> Path:
        return save_tensors(Path(out), self.published(), {"method": "ip-adapter", **(metadata or {})})


def _attend(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor) -> torch.Tensor:
    """softmax(q k^T / sqrt(d)) v: the fused kernel on accelerators; on the CPU the plain product, which costs
    less than the fused kernel on the few tokens of small latents (2.5x on the world's UNet, docs/world.md)."""
    if q.device.type != "cpu":
        return F.scaled_dot_product_attention(q, k, v)
    return torch.softmax(q @ k.transpose(-1, -2) * q.shape[-1] ** -0.5, dim=-1) @ v


class DecoupledAttention:
    """An attn2 processor: the context's last ``tokens`` rows are the image tokens, read through the adapter's own
    K and V; the rest is the text, read as the attention always does. Plain attention (diffusers' SD attention has
    no group norm, spatial norm, residual or cross norm in its transformer blocks; refused otherwise)."""

    def __init__(self, pair: nn.Module, tokens: int, scale: float = 1.0):
        self.pair, self.tokens, self.scale = pair, tokens, scale

    def __call__(self, attn, hidden_states, encoder_hidden_states=None, attention_mask=None, temb=None, **_):
        if attn.group_norm is not None or attn.spatial_norm is not None or attn.norm_cross or hidden_states.ndim != 3:
            raise NotImplementedError("this attention layout is not the SD UNet's")
        text, image = encoder_hidden_states[:, :-self.tokens], encoder_hidden_states[:, -self.tokens:]
        b = hidden_states.shape[0]

        def heads(x):  # (B, N, inner) -> (B, heads, N, head width)
            return x.view(b, -1, attn.heads, x.shape[-1] // attn.heads).transpose(1, 2)

        q = heads(attn.to_q(hidden_states))
        out = _attend(q, heads(attn.to_k(text)), heads(attn.to_v(text)))
        ip = _attend(q, heads(self.pair.to_k_ip(image.to(self.pair.to_k_ip.weight.dtype))),
                     heads(self.pair.to_v_ip(image.to(self.pair.to_v_ip.weight.dtype))))
        out = out + self.scale * ip.to(out.dtype)
        out = attn.to_out[1](attn.to_out[0](out.transpose(1, 2).reshape(b, -1, out.shape[1] * out.shape[3])))
        if attn.residual_connection:
            out = out + hidden_states
        return out / attn.rescale_output_factor


@contextmanager
def installed(unet, adapter: IPAdapter, scale: float = 1.0):
    """The UNet's attn2 processors swapped for decoupled ones for the block, then put back as they were: the
    UNet's context is then ``cat(text states, adapter.image_proj(embeds))`` along the tokens."""
    before = dict(unet.attn_processors)
    procs = dict(before)
    for name, key in adapter.names:
        procs[name] = DecoupledAttention(adapter.ip_adapter[str(key)], adapter.image_proj.tokens, scale)
    unet.set_attn_processor(procs)
    try:
        yield
    finally:
        unet.set_attn_processor(before)


def context(adapter: IPAdapter, text: torch.Tensor, embeds: torch.Tensor) -> torch.Tensor:
    """The UNet's context for text states (B, 77, W) and image embeddings (B, D): the image tokens appended."""
    tokens = adapter.image_proj(embeds.to(adapter.image_proj.proj.weight.dtype))
    return torch.cat([text, tokens.to(text.dtype)], dim=1)


def drop(text: torch.Tensor, embeds: torch.Tensor, empty: torch.Tensor, generator: torch.Generator,
         p: float = 0.05) -> tuple[torch.Tensor, torch.Tensor]:
    """The paper's dropout, per picture: text alone dropped (p), the image alone (p, a zero embedding: what a
    pipeline gives as the unconditional image), both (p); so classifier-free guidance works on either side."""
    u = torch.rand(len(text), generator=generator).to(text.device)
    no_text = ((u < p) | (u >= 1 - p))[:, None, None]
    no_image = ((u >= p) & (u < 2 * p) | (u >= 1 - p))[:, None]
    return torch.where(no_text, empty.expand_as(text), text), torch.where(no_image, torch.zeros_like(embeds), embeds)
