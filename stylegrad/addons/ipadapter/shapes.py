"""What an IP-Adapter file is, told from its tensor shapes alone (no torch: ``stylegrad info`` reads it too).

The published files (h94/IP-Adapter, as ``.bin`` pickles or ``.safetensors``) hold ``image_proj.*`` (the image
embedding -> extra context tokens) and ``ip_adapter.N.to_k_ip/to_v_ip`` (per cross-attention layer, N odd, in the
UNet's attention-processor order). The projection's keys name the variant: ``proj.weight`` + ``norm``: base (and
light, which has the same shapes: only the name tells them apart), 4 tokens from the pooled ``image_embeds``;
``latents`` + ``proj_in`` + ``layers.*``: plus (the Resampler reading the encoder's penultimate patch states);
``proj.3.weight``: full (all 257 states through an MLP). FaceID files (InsightFace embeddings) are named and
refused. The cross-attention width gives the UNet family (768 SD1.x, 1024 SD2.x, 2048 SDXL); the image side's
width the CLIP vision encoder (pooled: 1024 OpenCLIP ViT-H/14, 1280 ViT-bigG/14, 768 CLIP ViT-L/14; hidden:
1280, 1664, 1024 the same three)."""

from __future__ import annotations

import re
from dataclasses import dataclass

from stylegrad.errors import StylegradError

POOLED_ENCODERS = {1024: "vit-h", 1280: "bigG", 768: "vit-l"}
HIDDEN_ENCODERS = {1280: "vit-h", 1664: "bigG", 1024: "vit-l"}
ENCODER_NAMES = {"vit-h": "OpenCLIP ViT-H/14", "bigG": "OpenCLIP ViT-bigG/14", "vit-l": "CLIP ViT-L/14"}
FAMILIES = {768: "sd1", 1024: "sd2", 2048: "sdxl"}
_LAYER = re.compile(r"^ip_adapter\.(\d+)\.to_k_ip\.weight$")


@dataclass(frozen=True)
class AdapterShape:
    variant: str  # base | light | plus | plus-face | full
    hidden_states: bool  # reads the encoder's penultimate states (plus, full), not the pooled image_embeds
    image_width: int  # the width the projection reads: image_embeds' (base) or the hidden states' (plus, full)
    context_width: int  # the UNet's cross-attention width the keys read
    tokens: int  # extra context tokens per picture
    layers: int  # cross-attention layers it has keys for
    family: str | None  # sd1 | sd2 | sdxl, None for a width no published model has
    encoder: str | None  # vit-h | bigG | vit-l, None for another width

    def describe(self) -> str:
        fam = {"sd1": "SD1.x", "sd2": "SD2.x", "sdxl": "SDXL"}.get(self.family or "", f"a {self.context_width}-wide UNet")
        enc = ENCODER_NAMES.get(self.encoder or "", f"a {self.image_width}-wide image encoder")
        return f"IP-Adapter {self.variant} for {fam} ({self.tokens} tokens, {self.layers} layers; image encoder {enc})"


def is_ip_adapter(shapes: dict) -> bool:
    return any(_LAYER.match(k) for k in shapes) and any(k.startswith("image_proj.") for k in shapes)


def adapter_shape(shapes: dict[str, tuple[int, ...]], name: str = "") -> AdapterShape:
    """The variant, family and encoder of a file's ``{key: shape}`` (keys prefixed ``image_proj.`` and
    ``ip_adapter.``); ``name``: the file's name, which alone tells light from base and plus-face from plus."""
    if not is_ip_adapter(shapes):
        raise StylegradError("not an IP-Adapter file (no 'image_proj.*' and 'ip_adapter.N.to_k_ip' tensors)")
    proj = {k[len("image_proj."):]: v for k, v in shapes.items() if k.startswith("image_proj.")}
    keys = sorted(int(m.group(1)) for k in shapes if (m := _LAYER.match(k)))
    context = shapes[f"ip_adapter.{keys[0]}.to_k_ip.weight"][1]
    low = name.lower()
    if any(k.startswith("perceiver_resampler.") for k in proj) or ("proj.0.weight" in proj and "norm.weight" in proj
                                                                   and "proj.3.weight" not in proj):
        raise StylegradError("an IP-Adapter FaceID file: it reads InsightFace face embeddings, which stylegrad "
                             "does not compute (use a base, light, plus or full adapter)")
    if "proj.weight" in proj:
        rows, width = proj["proj.weight"]
        variant, hidden, tokens = ("light" if "light" in low else "base"), False, rows // context
    elif "latents" in proj:
        width, tokens = proj["proj_in.weight"][1], proj["latents"][1]
        variant, hidden = ("plus-face" if "face" in low else "plus"), True
    elif "proj.3.weight" in proj:
        width, variant, hidden, tokens = proj["proj.0.weight"][0], "full", True, 257
    else:
        raise StylegradError("an IP-Adapter file with an image projection stylegrad does not know "
                             f"({', '.join(sorted(proj)[:4])}...)")
    encoders = HIDDEN_ENCODERS if hidden else POOLED_ENCODERS
    return AdapterShape(variant, hidden, width, context, tokens, len(keys), FAMILIES.get(context),
                        encoders.get(width))
