"""Tiny models built in code with the classes Stable Diffusion uses, so every stylegrad path runs offline."""

from __future__ import annotations

from pathlib import Path

import torch
from diffusers import AutoencoderKL, DDIMScheduler, StableDiffusionPipeline, UNet2DConditionModel
from transformers import (
    CLIPConfig,
    CLIPImageProcessorPil,
    CLIPModel,
    CLIPTextConfig,
    CLIPTextModel,
    CLIPTokenizer,
    CLIPVisionConfig,
)

from stylegrad.world.tokenizer import char_tokenizer

HIDDEN = 32
PROJ = 24


def tiny_tokenizer() -> CLIPTokenizer:
    return char_tokenizer()


def tiny_clip(seed: int = 0, layers: int = 2, vocab_size: int | None = None,
              hidden_act: str = "quick_gelu") -> CLIPModel:
    tok = tiny_tokenizer()
    torch.manual_seed(seed)
    text = CLIPTextConfig(
        vocab_size=vocab_size or len(tok), hidden_size=HIDDEN, intermediate_size=37, num_attention_heads=4,
        num_hidden_layers=layers, max_position_embeddings=77, projection_dim=PROJ, hidden_act=hidden_act,
        bos_token_id=tok.bos_token_id, eos_token_id=tok.eos_token_id, pad_token_id=tok.pad_token_id,
    )
    vision = CLIPVisionConfig(
        hidden_size=HIDDEN, intermediate_size=37, num_attention_heads=4, num_hidden_layers=2, image_size=32,
        patch_size=8, projection_dim=PROJ, hidden_act="quick_gelu",
    )
    cfg = CLIPConfig(text_config=text.to_dict(), vision_config=vision.to_dict(), projection_dim=PROJ)
    return CLIPModel(cfg).eval()


def tiny_processor() -> CLIPImageProcessorPil:
    return CLIPImageProcessorPil(size={"shortest_edge": 32}, crop_size={"height": 32, "width": 32})


def text_encoder_from(clip: CLIPModel, layers: int | None = None) -> CLIPTextModel:
    """The pipeline's text encoder: the CLIP text tower, optionally cut to its first ``layers`` (as SD2 does)."""
    cfg = CLIPTextConfig.from_dict(clip.config.text_config.to_dict())
    if layers is not None:
        cfg.num_hidden_layers = layers
    enc = CLIPTextModel(cfg).eval()
    enc.load_state_dict(clip.text_model.state_dict(), strict=False)
    return enc


def tiny_pipeline(clip: CLIPModel, seed: int = 0, text_layers: int | None = None) -> StableDiffusionPipeline:
    torch.manual_seed(seed)
    unet = UNet2DConditionModel(
        block_out_channels=(8, 16), layers_per_block=1, sample_size=16, in_channels=4, out_channels=4,
        down_block_types=("DownBlock2D", "CrossAttnDownBlock2D"), up_block_types=("CrossAttnUpBlock2D", "UpBlock2D"),
        cross_attention_dim=HIDDEN, norm_num_groups=4, attention_head_dim=2,
    )
    vae = AutoencoderKL(
        block_out_channels=(8, 16), in_channels=3, out_channels=3, latent_channels=4, norm_num_groups=4,
        down_block_types=("DownEncoderBlock2D",) * 2, up_block_types=("UpDecoderBlock2D",) * 2,
    )
    scheduler = DDIMScheduler(beta_schedule="scaled_linear", beta_start=0.00085, beta_end=0.012, clip_sample=False,
                              set_alpha_to_one=False, steps_offset=1)
    return StableDiffusionPipeline(
        unet=unet.eval(), vae=vae.eval(), scheduler=scheduler, text_encoder=text_encoder_from(clip, text_layers),
        tokenizer=tiny_tokenizer(), safety_checker=None, feature_extractor=None, requires_safety_checker=False,
    )


def save_world(root: Path, seed: int = 0) -> tuple[Path, Path]:
    """Save a tiny CLIP (with processor and tokenizer) and a tiny SD pipeline; return (clip_dir, sd_dir)."""
    clip = tiny_clip(seed)
    clip_dir, sd_dir = root / "clip", root / "sd"
    clip.save_pretrained(clip_dir)
    tiny_processor().save_pretrained(clip_dir)
    tiny_tokenizer().save_pretrained(clip_dir)
    tiny_pipeline(clip, seed).save_pretrained(sd_dir)
    return clip_dir, sd_dir


def tiny_siglip(seed: int = 0):
    """A tiny SigLIP vision tower and its processor (16 patch tokens of width 32)."""
    from transformers import SiglipImageProcessorPil, SiglipVisionConfig, SiglipVisionModel

    torch.manual_seed(seed)
    cfg = SiglipVisionConfig(hidden_size=HIDDEN, intermediate_size=37, num_hidden_layers=2, num_attention_heads=4,
                             image_size=32, patch_size=8)
    return SiglipVisionModel(cfg).eval(), SiglipImageProcessorPil(size={"height": 32, "width": 32})


def tiny_stylecodes(unet, seed: int = 0, trained_look: bool = True):
    """A Stylecodes model for ``unet`` with a small autoencoder (width 32) reading tiny SigLIP tokens. The collab
    weights start at the identity, where the control stream cannot reach the base; they are moved off it, as
    training would, so the style acts."""
    from stylegrad.stylecodes.model import StylecodesModel

    torch.manual_seed(seed)
    model = StylecodesModel(unet, dict(input_dim=HIDDEN, width=32, feedforward=64, max_len=128))
    with torch.no_grad():
        for layer in [model.middle_block_out, *model.control_model.up_zero_convs_out] if trained_look else []:
            layer.weight.add_(0.2 * torch.randn_like(layer.weight))
    return model.eval()
