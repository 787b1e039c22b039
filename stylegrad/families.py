"""The Stable Diffusion families stylegrad knows, in one place.

A family decides what a style is (one CLIP image mean per text tower: 768 wide for SD1.x, 1024 for SD2.x, 768 and
1280 for SDXL), which CLIP's projection defines the style space, how wide the UNet's text conditioning is (how a
single file, a LoRA or an embedding is recognized) and what A1111 calls it. ``Family`` is a string enum, so a
family compares equal to its short name (``Family.SDXL == "sdxl"``), reads from the command line, JSON and file
metadata as that name, and carries everything else as properties. Nothing here imports torch.
"""

from __future__ import annotations

from enum import StrEnum

from stylegrad.errors import StylegradError

OPENAI_CLIP_L = "openai/clip-vit-large-patch14"
OPENCLIP_H = "laion/CLIP-ViT-H-14-laion2B-s32B-b79K"
OPENCLIP_BIGG = "laion/CLIP-ViT-bigG-14-laion2B-39B-b160k"


class Family(StrEnum):
    SD1 = "sd1"
    SD2 = "sd2"
    SDXL = "sdxl"
    SDXL_REFINER = "sdxl-refiner"

    @property
    def label(self) -> str:
        """What users call it: 'Stable Diffusion 1.x', 'SDXL'."""
        return _FACTS[self][0]

    @property
    def context_width(self) -> int:
        """The width of the text conditioning the UNet reads (its cross-attention width)."""
        return _FACTS[self][1]

    @property
    def text_widths(self) -> tuple[int, ...]:
        """One width per text tower, in the pipeline's order (SDXL: CLIP-L, then OpenCLIP bigG)."""
        return _FACTS[self][2]

    @property
    def clip_models(self) -> tuple[str, ...]:
        """Per text tower, the CLIP whose projection and image tower define the style space."""
        return _FACTS[self][3]

    @property
    def clip_model(self) -> str:
        """The first tower's CLIP: the style space of SD1.x and SD2.x, and of SDXL's CLIP-L part."""
        return self.clip_models[0]

    @property
    def generates(self) -> bool:
        """Whether stylegrad generates with this family (a refiner is recognized, then refused)."""
        return self is not Family.SDXL_REFINER

    @property
    def is_sdxl(self) -> bool:
        return self is Family.SDXL

    @classmethod
    def of_context_width(cls, width: int | None) -> Family | None:
        """The family whose UNet reads conditioning of this width (768, 1024, 2048, 1280), or None."""
        return next((f for f in cls if f.context_width == width), None)

    @classmethod
    def of_text_width(cls, width: int | None) -> Family | None:
        """The family a text tower of this width belongs to: 768 SD1.x (also SDXL's CLIP-L), 1024 SD2.x, 1280
        SDXL's bigG (also the refiner's only tower); None for another width."""
        return next((f for f in (cls.SD1, cls.SD2, cls.SDXL) if width in f.text_widths), None)

    @classmethod
    def named(cls, name: str) -> Family:
        """The family called ``name`` ('sd1', 'sd2', 'sdxl'), or a one-line error listing them."""
        try:
            return cls(str(name).lower())
        except ValueError:
            raise StylegradError(f"unknown model family '{name}' (one of {', '.join(f.value for f in cls)})") from None


_FACTS: dict[Family, tuple[str, int, tuple[int, ...], tuple[str, ...]]] = {
    Family.SD1: ("Stable Diffusion 1.x", 768, (768,), (OPENAI_CLIP_L,)),
    Family.SD2: ("Stable Diffusion 2.x", 1024, (1024,), (OPENCLIP_H,)),
    Family.SDXL: ("SDXL", 2048, (768, 1280), (OPENAI_CLIP_L, OPENCLIP_BIGG)),
    Family.SDXL_REFINER: ("SDXL refiner", 1280, (1280,), (OPENCLIP_BIGG,)),
}


def pipeline_family(pipe) -> Family | None:
    """The family of a diffusers pipeline: SDXL by its class, else what a single file said it was, else the UNet's
    conditioning width; None for a model of another width (the tests' tiny models)."""
    if type(pipe).__name__.startswith("StableDiffusionXL"):
        return Family.SDXL
    kind = getattr(pipe, "stylegrad_checkpoint", None)
    if kind is not None and kind.family is not None:
        return Family(kind.family)
    return {768: Family.SD1, 1024: Family.SD2}.get(pipe.unet.config.cross_attention_dim)
