"""LoRAs baked into a checkpoint file as it is streamed (``stylegrad merge MODEL --lora FILE:W``): each LoRA is
bound to the family's modules built on the ``meta`` device (every key checked, no weights loaded), and each
module's change is added to the checkpoint tensor that holds its weight in the original layout: the UNet's
``input_blocks``/``middle_block``/``output_blocks`` names, the CLIP text encoder's ``text_model`` names, and
OpenCLIP's fused ``in_proj_weight`` (q, k, v stacked) for SD2.x and SDXL's second encoder."""

from __future__ import annotations

import torch

from stylegrad.addons.lora.names import original_name, unet_original_prefixes
from stylegrad.addons.lora.network import LoraNetwork, Patch
from stylegrad.checkpoints.families import UNET

_OPEN_CLIP = {"self_attn.out_proj": "attn.out_proj", "mlp.fc1": "mlp.c_fc", "mlp.fc2": "mlp.c_proj"}
_QKV = {"self_attn.q_proj": 0, "self_attn.k_proj": 1, "self_attn.v_proj": 2}


def _meta_components(family: str) -> dict[str, tuple[torch.nn.Module, dict]]:
    import transformers
    from diffusers import UNet2DConditionModel

    from stylegrad.checkpoints.loading import family_config

    cfg = family_config(family)
    out = {}
    with torch.device("meta"):
        out["unet"] = (UNet2DConditionModel.from_config(cfg["unet"]), {})
        for component, name in (("te", "text_encoder"), ("te2", "text_encoder_2")):
            if name in cfg:
                te = dict(cfg[name])
                info = {"prefix": te.pop("prefix"), "layout": te.pop("layout")}
                te.pop("class")
                out[component] = (transformers.CLIPTextModel(transformers.CLIPTextConfig(**te)), info)
    return out


class LoraBaker:
    """Which checkpoint tensors the LoRAs change, and the change of each."""

    def __init__(self, family: str, loras: list[tuple[str, float, float]]):
        from stylegrad.addons.lora.formats import read_lora

        parts = _meta_components(family)
        net = LoraNetwork({c: m for c, (m, _) in parts.items()}, [(read_lora(f), te, unet) for f, te, unet in loras])
        prefixes = unet_original_prefixes(parts["unet"][0])
        self.targets: dict[str, list[tuple[Patch, int | None]]] = {}  # key -> (patch, q/k/v block or None)
        for p in net.patches:
            if p.component == "unet":
                key = UNET + original_name(p.path, prefixes)
                block = None
            else:
                info = parts[p.component][1]
                key, block = self._text_key(p.path, info)
            self.targets.setdefault(key + ".weight", []).append((p, block))
            if p.adapter.bias is not None:
                self.targets.setdefault(key + ".bias", []).append((p, block))
        self.keys = set(self.targets)

    @staticmethod
    def _text_key(path: str, info: dict) -> tuple[str, int | None]:
        if info["layout"] != "open_clip":
            return info["prefix"] + "text_model." + path, None
        layer, module = path[len("encoder.layers."):].split(".", 1)
        base = f"{info['prefix']}transformer.resblocks.{layer}."
        if module in _QKV:
            return base + "attn.in_proj", _QKV[module]  # '.weight' -> in_proj_weight below
        return base + _OPEN_CLIP[module], None

    def checkpoint_keys(self) -> dict[str, str]:
        """Our key -> the checkpoint's (OpenCLIP names its fused tensors ``in_proj_weight``/``in_proj_bias``)."""
        return {k: k.replace("attn.in_proj.", "attn.in_proj_") for k in self.keys}

    def apply(self, key: str, t: torch.Tensor) -> torch.Tensor:
        """``t`` (the checkpoint tensor named by our ``key``) with every change to it added, in float32."""
        out = t.float().clone()
        for p, block in self.targets[key]:
            part = out if block is None else out.chunk(3, dim=0)[block]
            if key.endswith(".bias"):
                part += p.adapter.bias.float().reshape(part.shape) * p.multiplier
            else:
                part += p.adapter.full_delta(part.reshape(p.module.weight.shape), p.multiplier).reshape(part.shape)
        return out
