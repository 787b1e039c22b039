"""Tiny single-file checkpoints in the original Stable Diffusion layout, written from tiny diffusers pipelines: the
test side of the key mapping (diffusers names -> the CompVis/Stability names A1111 and ComfyUI read), written
independently of the loader, which uses diffusers' converters for the other direction."""

from __future__ import annotations

import json
import re
import shutil
from pathlib import Path

import torch
from diffusers import AutoencoderKL, StableDiffusionPipeline, StableDiffusionXLPipeline, UNet2DConditionModel
from safetensors.torch import save_file
from transformers import CLIPTextConfig, CLIPTextModel, CLIPTextModelWithProjection

from stylegrad.world.tokenizer import char_tokenizer

CONFIGS = Path(__file__).parent / "checkpoint_configs"

_RESNET = {"norm1": "in_layers.0", "conv1": "in_layers.2", "time_emb_proj": "emb_layers.1", "norm2": "out_layers.0",
           "conv2": "out_layers.3", "conv_shortcut": "skip_connection"}
_STATIC = {"time_embedding.linear_1.": "time_embed.0.", "time_embedding.linear_2.": "time_embed.2.",
           "add_embedding.linear_1.": "label_emb.0.0.", "add_embedding.linear_2.": "label_emb.0.2.",
           "conv_in.": "input_blocks.0.0.", "conv_norm_out.": "out.0.", "conv_out.": "out.2."}


def _resnet(rest: str) -> str:
    module, tail = rest.split(".", 1)
    return f"{_RESNET[module]}.{tail}"


def unet_key(key: str, config: dict) -> str:
    step = config["layers_per_block"] + 1
    for a, b in _STATIC.items():
        if key.startswith(a):
            return b + key[len(a):]
    if m := re.fullmatch(r"down_blocks\.(\d+)\.(resnets|attentions)\.(\d+)\.(.+)", key):
        i, kind, j, rest = int(m[1]), m[2], int(m[3]), m[4]
        return f"input_blocks.{step * i + j + 1}." + (f"0.{_resnet(rest)}" if kind == "resnets" else f"1.{rest}")
    if m := re.fullmatch(r"down_blocks\.(\d+)\.downsamplers\.0\.conv\.(.+)", key):
        return f"input_blocks.{step * (int(m[1]) + 1)}.0.op.{m[2]}"
    if m := re.fullmatch(r"up_blocks\.(\d+)\.(resnets|attentions)\.(\d+)\.(.+)", key):
        i, kind, j, rest = int(m[1]), m[2], int(m[3]), m[4]
        return f"output_blocks.{step * i + j}." + (f"0.{_resnet(rest)}" if kind == "resnets" else f"1.{rest}")
    if m := re.fullmatch(r"up_blocks\.(\d+)\.upsamplers\.0\.conv\.(.+)", key):
        i = int(m[1])
        part = 2 if config["up_block_types"][i].startswith("CrossAttn") else 1
        return f"output_blocks.{step * i + step - 1}.{part}.conv.{m[2]}"
    if m := re.fullmatch(r"mid_block\.attentions\.0\.(.+)", key):
        return f"middle_block.1.{m[1]}"
    if m := re.fullmatch(r"mid_block\.resnets\.(\d+)\.(.+)", key):
        return f"middle_block.{2 * int(m[1])}.{_resnet(m[2])}"
    raise KeyError(key)


_VAE_ATTN = {"group_norm": "norm", "to_q": "q", "to_k": "k", "to_v": "v", "to_out.0": "proj_out"}


def vae_key(key: str, n_blocks: int) -> tuple[str, bool]:
    """(original key, whether a linear weight becomes a 1x1 convolution)."""
    key = key.replace("conv_shortcut", "nin_shortcut")
    if m := re.fullmatch(r"encoder\.down_blocks\.(\d+)\.resnets\.(\d+)\.(.+)", key):
        return f"encoder.down.{m[1]}.block.{m[2]}.{m[3]}", False
    if m := re.fullmatch(r"encoder\.down_blocks\.(\d+)\.downsamplers\.0\.conv\.(.+)", key):
        return f"encoder.down.{m[1]}.downsample.conv.{m[2]}", False
    if m := re.fullmatch(r"decoder\.up_blocks\.(\d+)\.resnets\.(\d+)\.(.+)", key):
        return f"decoder.up.{n_blocks - 1 - int(m[1])}.block.{m[2]}.{m[3]}", False
    if m := re.fullmatch(r"decoder\.up_blocks\.(\d+)\.upsamplers\.0\.conv\.(.+)", key):
        return f"decoder.up.{n_blocks - 1 - int(m[1])}.upsample.conv.{m[2]}", False
    if m := re.fullmatch(r"(encoder|decoder)\.mid_block\.resnets\.(\d+)\.(.+)", key):
        return f"{m[1]}.mid.block_{int(m[2]) + 1}.{m[3]}", False
    if m := re.fullmatch(r"(encoder|decoder)\.mid_block\.attentions\.0\.(group_norm|to_q|to_k|to_v|to_out\.0)\.(.+)",
                         key):
        return f"{m[1]}.mid.attn_1.{_VAE_ATTN[m[2]]}.{m[3]}", m[2] != "group_norm" and m[3] == "weight"
    return key.replace("conv_norm_out", "norm_out"), False


def open_clip_state(text: CLIPTextModel | CLIPTextModelWithProjection, extra_layer: bool = False) -> dict:
    """OpenCLIP's names (fused q/k/v, resblocks) for a transformers text tower; ``extra_layer`` appends an
    unused last block, as SD2 files hold the 24th layer their model skips."""
    sd = {k.removeprefix("text_model."): v for k, v in text.state_dict().items()}
    out = {"token_embedding.weight": sd["embeddings.token_embedding.weight"],
           "positional_embedding": sd["embeddings.position_embedding.weight"],
           "ln_final.weight": sd["final_layer_norm.weight"], "ln_final.bias": sd["final_layer_norm.bias"],
           "logit_scale": torch.tensor(4.6052)}
    if "text_projection.weight" in sd:
        out["text_projection"] = sd["text_projection.weight"].T.contiguous()
    n = text.config.num_hidden_layers
    for i in range(n + int(extra_layer)):
        src = i if i < n else n - 1
        p = f"encoder.layers.{src}."
        r = f"transformer.resblocks.{i}."
        noise = (lambda t: t + 0.5) if i >= n else (lambda t: t)  # the unused layer differs from the others
        for kind in ("weight", "bias"):
            out[r + f"attn.in_proj_{kind}"] = noise(torch.cat([sd[p + f"self_attn.{x}_proj.{kind}"] for x in "qkv"]))
            out[r + f"attn.out_proj.{kind}"] = noise(sd[p + f"self_attn.out_proj.{kind}"])
            out[r + f"ln_1.{kind}"] = noise(sd[p + f"layer_norm1.{kind}"])
            out[r + f"ln_2.{kind}"] = noise(sd[p + f"layer_norm2.{kind}"])
            out[r + f"mlp.c_fc.{kind}"] = noise(sd[p + f"mlp.fc1.{kind}"])
            out[r + f"mlp.c_proj.{kind}"] = noise(sd[p + f"mlp.fc2.{kind}"])
    return out


def original_state(pipe, vae: bool = True) -> dict[str, torch.Tensor]:
    """The pipeline's weights in the original single-file layout."""
    out = {}
    for k, v in pipe.unet.state_dict().items():
        out["model.diffusion_model." + unet_key(k, pipe.unet.config)] = v
    if vae:
        n = len(pipe.vae.config.block_out_channels)
        for k, v in pipe.vae.state_dict().items():
            key, conv = vae_key(k, n)
            out["first_stage_model." + key] = v[..., None, None] if conv else v
    if isinstance(pipe, StableDiffusionXLPipeline):
        for k, v in pipe.text_encoder.state_dict().items():
            out["conditioner.embedders.0.transformer.text_model." + k] = v
        for k, v in open_clip_state(pipe.text_encoder_2).items():
            out["conditioner.embedders.1.model." + k] = v
    elif pipe.text_encoder.config.hidden_act == "gelu":  # our tiny SD2 (OpenCLIP uses gelu, CLIP ViT-L quick_gelu)
        for k, v in open_clip_state(pipe.text_encoder, extra_layer=True).items():
            out["cond_stage_model.model." + k] = v
    else:
        for k, v in pipe.text_encoder.state_dict().items():
            out["cond_stage_model.transformer.text_model." + k] = v
        out["cond_stage_model.transformer.text_model.embeddings.position_ids"] = torch.arange(77)[None]
    return {k: v.detach().clone().contiguous() for k, v in out.items()}


def write_checkpoint(pipe, path: Path, dtype: torch.dtype | None = None, vae: bool = True,
                     extra: dict | None = None) -> Path:
    state = original_state(pipe, vae)
    if dtype is not None:
        state = {k: v.to(dtype) if v.is_floating_point() else v for k, v in state.items()}
    state.update(extra or {})
    path.parent.mkdir(parents=True, exist_ok=True)
    if path.suffix == ".safetensors":
        save_file(state, str(path))
    else:
        torch.save({"state_dict": state, "global_step": 1}, path)
    return path


def configs_folder(root: Path) -> Path:
    """The tiny configs with the tiny tokenizer saved beside them (what STYLEGRAD_CHECKPOINT_CONFIGS points at)."""
    folder = root / "checkpoint_configs"
    shutil.copytree(CONFIGS, folder, dirs_exist_ok=True)
    char_tokenizer().save_pretrained(folder / "tokenizer")
    tok2 = char_tokenizer()
    tok2.pad_token = "!"
    tok2.save_pretrained(folder / "tokenizer_2")
    return folder


def _config(family: str) -> dict:
    return json.loads((CONFIGS / f"{family}.json").read_text())


def _text(cfg: dict):
    cfg = dict(cfg)
    cls = {"CLIPTextModel": CLIPTextModel, "CLIPTextModelWithProjection": CLIPTextModelWithProjection}[cfg.pop("class")]
    cfg.pop("prefix"), cfg.pop("layout")
    return cls(CLIPTextConfig(**cfg)).eval()


def family_pipeline(family: str, seed: int = 0, prediction: str = "epsilon"):
    """A tiny SD2 or SDXL pipeline with random weights, built from the tiny configs."""
    import diffusers

    cfg = _config(family)
    if prediction == "v_prediction":
        for part, changes in cfg["v_prediction"].items():
            cfg[part] = {**cfg[part], **changes}
    torch.manual_seed(seed)
    unet = UNet2DConditionModel.from_config(cfg["unet"]).eval()
    vae = AutoencoderKL.from_config(cfg["vae"]).eval()
    sched = dict(cfg["scheduler"])
    scheduler = getattr(diffusers, sched.pop("class")).from_config(sched)
    tok = char_tokenizer()
    if family == "sdxl":
        tok2 = char_tokenizer()
        tok2.pad_token = "!"
        return StableDiffusionXLPipeline(vae=vae, text_encoder=_text(cfg["text_encoder"]),
                                         text_encoder_2=_text(cfg["text_encoder_2"]), tokenizer=tok,
                                         tokenizer_2=tok2, unet=unet, scheduler=scheduler,
                                         force_zeros_for_empty_prompt=True, add_watermarker=False)
    if family == "sd2":
        tok.pad_token = "!"
    return StableDiffusionPipeline(vae=vae, text_encoder=_text(cfg["text_encoder"]), tokenizer=tok, unet=unet,
                                   scheduler=scheduler, safety_checker=None, feature_extractor=None,
                                   requires_safety_checker=False)
