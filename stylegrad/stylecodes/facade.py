"""Stylecodes for users: an image becomes a short code, and a code (or a weighted blend of codes) styles any
diffusers SD1.x pipeline.

    sc = Stylecodes.load(pipe.unet)                     # published checkpoint + SigLIP; or local paths
    code = sc.code_for(Image.open("ref.png"))           # 'Qx3...1' (21 characters)
    styled = sc.pipeline(pipe, "Qx3...1::2 Ab9...1::1", strength=0.8)
    image = styled("a lighthouse", generator=torch.Generator("cpu").manual_seed(0)).images[0]
"""

from __future__ import annotations

import copy
from dataclasses import dataclass, field

import torch
from PIL import Image

from stylegrad.errors import StylegradError
from stylegrad.pipelines.images import load_image
from stylegrad.stylecodes.codec import Code, blend, dequantize, encode, parse_weighted, quantize
from stylegrad.stylecodes.exact import exact_float32
from stylegrad.stylecodes.model import (
    SIGLIP,
    StyleAutoencoder,
    StylecodesModel,
    float32_autoencoder,
    load_autoencoder,
    load_stylecodes,
)
from stylegrad.stylecodes.unet import with_stylecode


def load_siglip(name_or_path: str = SIGLIP, device=None, dtype=None):
    """(SiglipVisionModel, its image processor), from a hub id or a local folder (in ``dtype``; default the
    file's, float32 as published)."""
    from transformers import SiglipVisionModel

    from stylegrad.files.hub import from_pretrained

    try:
        from transformers import SiglipImageProcessorPil as Processor
    except ImportError:  # pragma: no cover - older transformers
        from transformers import SiglipImageProcessor as Processor
    kw = {"dtype": dtype} if dtype is not None else {}
    model = from_pretrained(SiglipVisionModel, name_or_path, what="SigLIP model", **kw)
    processor = from_pretrained(Processor, name_or_path, what="SigLIP image processor")
    return model.to(device or "cpu").eval(), processor


@torch.no_grad()
def image_tokens(siglip, processor, images: list[Image.Image]) -> torch.Tensor:
    """SigLIP's penultimate hidden states, (B, patches, width): what the style encoder was trained on."""
    pixels = processor(images=[im.convert("RGB") for im in images], return_tensors="pt")["pixel_values"]
    p = next(siglip.parameters())
    return siglip(pixel_values=pixels.to(p.device, p.dtype), output_hidden_states=True).hidden_states[-2]


@dataclass
class Stylecodes:
    """The control model and the image encoder that make and read codes, for one base UNet.

    Codes are made and read in float32 whatever the UNet runs in (``exact.py``): the autoencoder held here is a
    float32 one of its own (a float32 copy of a half-precision one, made once), and SigLIP runs in float32 (a copy
    made once if it was given in half precision). The control model follows the UNet it styles at each call."""

    autoencoder: StyleAutoencoder
    model: StylecodesModel | None = None  # None: codes can be made, not generated with
    siglip: object = None
    processor: object = None
    version: int = 1
    _siglip32: object = field(default=None, init=False, repr=False, compare=False)

    def __post_init__(self):
        shared = self.model is not None and self.autoencoder is self.model.sref_autoencoder
        self.autoencoder = float32_autoencoder(self.autoencoder, separate=shared)

    @classmethod
    def load(cls, base_unet=None, checkpoint: str | None = None, siglip: str | None = SIGLIP,
             version: int = 1, device=None, dtype=None) -> "Stylecodes":
        """``checkpoint``: a path, a folder or a hub id (default: the published SD1.5 model). Without
        ``base_unet`` only the code encoder/decoder is loaded (on ``device``); ``siglip=None`` skips the image
        encoder. The control model comes in the UNet's dtype; the code's autoencoder and SigLIP in float32 (``dtype``
        is accepted and ignored: a code does not depend on it)."""
        if base_unet is not None:
            device = next(base_unet.parameters()).device
            model = load_stylecodes(checkpoint, base_unet)
            auto = model.sref_autoencoder
        else:
            from stylegrad.devices import resolve_device

            device = resolve_device(device or "cpu")
            model, auto = None, load_autoencoder(checkpoint, device)
        enc, proc = load_siglip(siglip, device, torch.float32) if siglip else (None, None)
        return cls(auto, model, enc, proc, version)

    def _float32_siglip(self):
        if all(p.dtype == torch.float32 for p in self.siglip.parameters()):
            return self.siglip
        if self._siglip32 is None or self._siglip32[0] is not self.siglip:
            self._siglip32 = (self.siglip, copy.deepcopy(self.siglip).to(torch.float32).eval())
        return self._siglip32[1]

    @torch.no_grad()
    def latents_for(self, images: list[Image.Image]) -> torch.Tensor:
        """(B, 20) float32 latents, unquantized, computed in float32 on SigLIP's device."""
        if self.siglip is None:
            raise StylegradError("no SigLIP image encoder loaded: codes can be read but not made")
        siglip = self._float32_siglip()
        device = next(siglip.parameters()).device
        with exact_float32(device):
            tokens = image_tokens(siglip, self.processor, images)
            return self.autoencoder.to(device).encode(tokens)

    def code_for(self, image: Image.Image, format: str = "stylegrad") -> str:
        """The image's style as a code (quantized so that decoding and re-encoding gives the same code)."""
        return encode(quantize(self.latents_for([image])[0].tolist()), self.version, format)

    def latent_of(self, codes: str) -> torch.Tensor:
        """One code, or a weighted blend ``CODE1::2 CODE2::1``, as the decoder's 20-d input."""
        parts = parse_weighted(codes)
        for code, _ in parts:
            self._check_version(code)
        return torch.tensor(blend(parts) if len(parts) > 1 else dequantize(parts[0][0].levels))

    def _check_version(self, code: Code) -> None:
        if code.version != self.version:
            raise StylegradError(f"stylecode {encode(code.levels, code.version)} is for model version "
                                 f"{code.version}; the loaded Stylecodes model is version {self.version}")

    def pipeline(self, pipe, codes: str, strength: float = 1.0, guide_style: bool = False):
        """A pipeline sharing ``pipe``'s components whose UNet carries the style; ``pipe`` is unchanged."""
        if self.model is None:
            raise StylegradError("Stylecodes was loaded without a base UNet: load(pipe.unet, ...) to generate")
        return with_stylecode(pipe, self.model, self.latent_of(codes), strength, guide_style, self.autoencoder)


def encode_image(image_path: str, checkpoint: str | None = None, siglip: str = SIGLIP, format: str = "stylegrad",
                 device=None) -> str:
    """The code of one image file's style (only the code encoder and SigLIP are loaded, no SD model)."""
    image = load_image(image_path)
    return Stylecodes.load(None, checkpoint, siglip, device=device).code_for(image, format)


__all__ = ["SIGLIP", "Stylecodes", "encode_image", "image_tokens", "load_siglip"]
