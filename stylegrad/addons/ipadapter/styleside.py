"""A style file as the adapter's image side, where that is sound.

An aesthetic-gradients style is a mean CLIP image embedding (aesthetic/embedding.py: ``image_embeds``, the
projection's output, of a ``CLIPVisionModelWithProjection``). A base or light adapter reads exactly that vector
from its own encoder, so a style can stand for the pictures when it was made in that encoder's space:

- SDXL styles hold a CLIP ViT-L/14 mean (768) and an OpenCLIP ViT-bigG/14 mean (1280, laion2B-39B-b160k: the
  tower of h94's ``sdxl_models/image_encoder``). The bigG part is the image side of ``ip-adapter_sdxl``
  (SDXL, bigG) and of ``ip-adapter_sd15_vit-G`` (SD1.5, bigG).
- SD2.x styles are OpenCLIP ViT-H/14 means (1024: the tower of h94's ``models/image_encoder``), the image side of
  ``ip-adapter_sd15``, ``ip-adapter_sd15_light`` and ``ip-adapter_sdxl_vit-h``.
- SD1.x styles are CLIP ViT-L/14 means (768): no published adapter reads ViT-L/14, so they serve none.
- plus, plus-face and full adapters read the encoder's per-patch hidden states, which a mean vector does not
  hold: for them the pictures are needed (``ip_images``), and their cached embeddings make that cheap.

The match is by width and by the style's recorded encoder (a ViT-H style for a 1024 adapter, bigG for 1280). A
style saved with ``--mean raw`` is exactly the average of its pictures' embeddings (what ``ip_images`` with the
same pictures gives); the default unit-length style has the same direction at length 1 (the raw embeddings'
length differs), so the adapter acts with another strength: noted once."""

from __future__ import annotations

import torch

from stylegrad.addons.ipadapter.shapes import ENCODER_NAMES, AdapterShape
from stylegrad.errors import StylegradError

_ENCODER_WORDS = {"bigG": ("bigg",), "vit-h": ("vit-h", "h-14", "h14"), "vit-l": ("large-patch14", "vit-l", "l-14")}


def _recorded_as(encoder_name: str, wanted: str | None) -> bool:
    """The style's recorded encoder is ``wanted``'s tower (unknown names are taken on the width alone)."""
    low = encoder_name.lower()
    known = [k for k, words in _ENCODER_WORDS.items() if any(w in low for w in words)]
    return not known or wanted in known


def style_embeds(style, shape: AdapterShape) -> tuple[torch.Tensor, bool]:
    """(the style's vector as the adapter's image embedding (1, D) in float32, whether it is unit length);
    a style whose space is not the adapter's is one line saying which adapters it serves."""
    need = ENCODER_NAMES.get(shape.encoder or "", f"a {shape.image_width}-wide encoder")
    if shape.hidden_states:
        raise StylegradError(f"an IP-Adapter {shape.variant} reads the image encoder's patch states, which a style "
                             "(one mean vector) does not hold: give the pictures (--ip-image)")
    parts = [("clip_g", style.g, style.metadata.get("encoder_g", "")),
             ("clip_l", style.vector, style.metadata.get("encoder", ""))]
    for _, v, encoder in parts:
        if v is not None and v.shape[0] == shape.image_width and _recorded_as(encoder, shape.encoder):
            unit = style.metadata.get("method", "").startswith("L2-normalized") or abs(float(v.norm()) - 1) < 1e-4
            return v.reshape(1, -1).float(), unit
    have = " and ".join(f"{n} {v.shape[0]}" for n, v, _ in parts if v is not None)
    raise StylegradError(f"style '{style.name}' ({have}-wide) is not in this IP-Adapter's image space ({need}, "
                         f"{shape.image_width}-wide): SDXL styles' bigG part serves ip-adapter_sdxl and "
                         "ip-adapter_sd15_vit-G, SD2.x (ViT-H) styles serve ip-adapter_sd15/_light/_sdxl_vit-h; give "
                         "the pictures (--ip-image) otherwise")
