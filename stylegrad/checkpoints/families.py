"""Which Stable Diffusion a single-file checkpoint is, from its keys and shapes (never its name).

The sentinel keys are the original repositories' module names: ``cond_stage_model.transformer`` (SD1's CLIP ViT-L),
``cond_stage_model.model`` (SD2's OpenCLIP ViT-H), ``conditioner.embedders.{0,1}`` (SDXL's two towers; a refiner has
only OpenCLIP bigG at index 0). Shapes decide the variant: the first UNet convolution takes 9 channels in an
inpainting model and 8 in instruct-pix2pix. A file without text-encoder keys falls back to the cross-attention width.
"""

from __future__ import annotations

import re
from dataclasses import dataclass

from stylegrad.families import Family

UNET = "model.diffusion_model."
VAE = "first_stage_model."
FIRST_CONV = UNET + "input_blocks.0.0.weight"

# each family's text encoder(s) in the original layout, in tower order
TEXT_PREFIXES = {
    Family.SD1: ("cond_stage_model.transformer.",),
    Family.SD2: ("cond_stage_model.model.",),
    Family.SDXL: ("conditioner.embedders.0.transformer.", "conditioner.embedders.1.model."),
    Family.SDXL_REFINER: ("conditioner.embedders.0.model.",),
}
# other architectures people keep in the same folders, by a key only they have
OTHER_MODELS = [
    (re.compile(r"(^|\.)double_blocks\.0\.img_attn\."), "a Flux model"),
    (re.compile(r"(^|\.)joint_blocks\.0\.x_block\."), "a Stable Diffusion 3 model"),
    (re.compile(r"^(model\.diffusion_model\.)?(down|up)_blocks\.\d+\.attentions\.\d+\.transformer_blocks\."
                r".*attn1\.to_q\.weight$"), "a UNet in diffusers' layout (load its folder, not this file)"),
    (re.compile(r"(^|\.)adm_in\.|(^|\.)pixart|(^|\.)t_block\."), "a PixArt model"),
    (re.compile(r"^model\.diffusion_model\.(layers|blocks)\.0\."), "a transformer diffusion model (not a SD UNet)"),
]
SUPPORTED = tuple(f for f in Family if f.generates)
# what a single-file checkpoint is called: the models folder lists these; NAME.vae.* beside one is its VAE
CHECKPOINT_SUFFIXES = (".safetensors", ".ckpt", ".pt", ".pth", ".bin")
VAE_SUFFIXES = (".vae.safetensors", ".vae.pt", ".vae.ckpt")


@dataclass(frozen=True)
class CheckpointKind:
    """What a checkpoint holds. ``refusal`` is set (one line) when stylegrad cannot generate with it."""

    family: str | None  # sd1 | sd2 | sdxl | sdxl-refiner | None
    variant: str  # base | inpainting | instruct-pix2pix
    in_channels: int | None
    has_vae: bool
    has_text_encoder: bool
    ema: bool  # also holds model_ema.* copies
    prediction: str | None  # epsilon | v_prediction, when the file says so (a v_pred key); else None
    refusal: str | None = None

    @property
    def label(self) -> str:
        name = Family(self.family).label if self.family else "Stable Diffusion"
        return name if self.variant == "base" else f"{name} {self.variant}"


def a(name: str) -> str:
    """'a Stable Diffusion 1.x', 'an SDXL'."""
    return ("an " if name.startswith("SD") else "a ") + name


def strip_wrapper(keys) -> str:
    """The prefix old ``.ckpt`` files wrap their weights in ('state_dict.'), or ''."""
    return "state_dict." if any(k.startswith("state_dict." + UNET) for k in keys) else ""


def _cross_attention_width(shapes: dict) -> int | None:
    for k, s in shapes.items():
        if k.startswith(UNET) and k.endswith("attn2.to_k.weight") and len(s) == 2:
            return s[1]
    return None


def classify(shapes: dict[str, tuple]) -> CheckpointKind:
    """The kind of an original-layout state dict (keys already without a 'state_dict.' wrapper)."""
    keys = shapes.keys()
    for rx, what in OTHER_MODELS:
        if any(rx.search(k) for k in keys):
            return CheckpointKind(None, "base", None, False, False, False, None,
                                  f"{what}; stylegrad runs Stable Diffusion 1.x, 2.x and SDXL checkpoints")
    if FIRST_CONV not in shapes:
        if any(k.startswith(VAE) for k in keys) or any(k.startswith(("encoder.down.", "decoder.up.")) for k in keys):
            refusal = "a VAE, not a whole model (load it as a model's vae, or bake it in when merging)"
        else:
            refusal = "not a Stable Diffusion checkpoint (no UNet weights under model.diffusion_model.)"
        return CheckpointKind(None, "base", None, False, False, False, None, refusal)
    family = None
    for name in (Family.SDXL, Family.SDXL_REFINER, Family.SD2, Family.SD1):
        if any(k.startswith(TEXT_PREFIXES[name][-1]) for k in keys):  # SDXL: its OpenCLIP bigG at index 1
            family = name
            break
    has_text = family is not None and all(any(k.startswith(p) for k in keys) for p in TEXT_PREFIXES[family])
    if family is None:
        family = Family.of_context_width(_cross_attention_width(shapes))
    in_channels = shapes[FIRST_CONV][1]
    variant = {9: "inpainting", 8: "instruct-pix2pix"}.get(in_channels, "base")
    has_vae = any(k.startswith(VAE + "decoder.") for k in keys)
    ema = sum(k.startswith("model_ema.") for k in keys) > 100
    prediction = "v_prediction" if "v_pred" in keys else None
    kind = CheckpointKind(family, variant, in_channels, has_vae, has_text, ema, prediction)
    refusal = None
    if family is None:
        refusal = "a UNet stylegrad does not recognise (no SD1/SD2/SDXL text encoder keys, unknown attention width)"
    elif family == Family.SDXL_REFINER:
        refusal = ("an SDXL refiner, which only refines another model's latents; pick an SDXL base model "
                   "(or a checkpoint made from one)")
    elif variant == "inpainting":
        refusal = f"{a(kind.label)} model (9 input channels); stylegrad generates with text-to-image checkpoints"
    elif variant == "instruct-pix2pix":
        refusal = f"{a(kind.label)} model (8 input channels); stylegrad generates with text-to-image checkpoints"
    elif in_channels != 4:
        refusal = f"a UNet with {in_channels} input channels; stylegrad generates with 4-channel text-to-image models"
    elif not has_text:
        refusal = f"{a(family.label)} UNet without its text encoder(s); use a full checkpoint"
    return CheckpointKind(family, variant, in_channels, has_vae, has_text, ema, prediction, refusal)
