"""Tiny IP-Adapter files in the published layout, and a tiny CLIP vision folder to encode the reference pictures,
written for any UNet: what a user's ``models/ipadapter`` and ``models/clip_vision`` hold, small enough for a test.

The base layout (``ip-adapter_sd15``): ``image_proj.proj`` maps the image embedding to ``tokens`` context rows,
``image_proj.norm`` normalises them, and each cross-attention layer, in the UNet's processor order, has its own
``ip_adapter.{1,3,5,...}.to_k_ip`` / ``to_v_ip`` (odd numbers: the self-attention layers in between have none)."""

from __future__ import annotations

from pathlib import Path

import torch

TOKENS = 4


def cross_attention_layers(unet) -> list[tuple[str, int]]:
    """(processor name, the layer's inner width) of each cross-attention layer, in the UNet's processor order."""
    out = []
    for name in unet.attn_processors:
        if name.endswith("attn2.processor"):
            attn = unet.get_submodule(name.removesuffix(".processor"))
            out.append((name, attn.to_k.out_features))
    return out


def adapter_tensors(unet, image_dim: int, tokens: int = TOKENS, seed: int = 0, scale: float = 0.3) -> dict:
    """The base adapter's tensors for ``unet`` reading ``image_dim``-wide image embeddings; ``scale``: the size of
    the random weights (large enough that the pictures visibly change the tiny model's image)."""
    g = torch.Generator().manual_seed(seed)
    context = unet.config.cross_attention_dim
    sd = {"image_proj.proj.weight": torch.randn(tokens * context, image_dim, generator=g) * scale,
          "image_proj.proj.bias": torch.randn(tokens * context, generator=g) * scale,
          "image_proj.norm.weight": 1 + 0.1 * torch.randn(context, generator=g),
          "image_proj.norm.bias": 0.1 * torch.randn(context, generator=g)}
    for i, (_, width) in enumerate(cross_attention_layers(unet)):
        for kind in ("to_k_ip", "to_v_ip"):
            sd[f"ip_adapter.{2 * i + 1}.{kind}.weight"] = torch.randn(width, context, generator=g) * scale
    return sd


def write_adapter(path: Path, unet, image_dim: int, tokens: int = TOKENS, seed: int = 0) -> Path:
    """An adapter file: ``.safetensors`` with flat keys, or ``.bin`` as the published pickles hold it
    ({'image_proj': {...}, 'ip_adapter': {...}})."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    sd = adapter_tensors(unet, image_dim, tokens, seed)
    if path.suffix == ".safetensors":
        from safetensors.torch import save_file

        save_file({k: v.contiguous() for k, v in sd.items()}, str(path))
    else:
        nested: dict = {"image_proj": {}, "ip_adapter": {}}
        for key, value in sd.items():
            part, _, rest = key.partition(".")
            nested[part][rest] = value
        torch.save(nested, path)
    return path


def write_image_encoder(folder: Path, image_dim: int, seed: int = 0) -> Path:
    """A tiny ``CLIPVisionModelWithProjection`` (224-pixel input as the real ones, 49 patches, width 32) with its
    image processor: a ``clip_vision`` folder as diffusers and ComfyUI users have it."""
    from transformers import CLIPImageProcessorPil, CLIPVisionConfig, CLIPVisionModelWithProjection

    torch.manual_seed(seed)
    config = CLIPVisionConfig(hidden_size=32, intermediate_size=37, num_attention_heads=4, num_hidden_layers=2,
                              image_size=224, patch_size=32, projection_dim=image_dim, hidden_act="gelu")
    folder = Path(folder)
    CLIPVisionModelWithProjection(config).eval().save_pretrained(folder)
    CLIPImageProcessorPil().save_pretrained(folder)
    return folder
