"""LoRA (Hu et al. 2021): a low-rank update ``up @ down * alpha / rank`` beside each attention projection of the
UNet (and optionally the text encoders), the base weights frozen. Saved in kohya's format (``lora_unet_...``,
``lora_te_...``, ``.lora_down/.lora_up/.alpha``), which A1111, ComfyUI, diffusers and stylegrad load. Defaults:
the diffusers text-to-image LoRA example's (rank 4, alpha = rank, lr 1e-4)."""

from __future__ import annotations

import math
from pathlib import Path

import torch
from safetensors.torch import save_file
from torch import nn

from stylegrad.errors import StylegradError
from stylegrad.families import Family
from stylegrad.files.atomic import atomic_path
from stylegrad.training.data import STYLE_TEMPLATES
from stylegrad.training.loop import Method
from stylegrad.training.models import Models

UNET_TARGETS = ("to_q", "to_k", "to_v", "to_out.0")
TEXT_TARGETS = ("q_proj", "k_proj", "v_proj", "out_proj")
DEFAULTS = {"steps": 1000, "lr": 1e-4, "batch_size": 1, "grad_accum": 1, "weight_decay": 1e-2}


class LoraLinear(nn.Module):
    """``base(x) + up(down(x)) * alpha / rank``; ``up`` starts at zero, so training starts from the base model.
    ``down`` and ``up`` are float32 beside a base of any precision (under autocast they compute in its precision,
    their gradients and AdamW's steps stay float32)."""

    def __init__(self, base: nn.Linear, rank: int, alpha: float):
        super().__init__()
        self.base, self.scale = base, alpha / rank
        where = {"device": base.weight.device, "dtype": torch.float32}
        self.down = nn.Linear(base.in_features, rank, bias=False, **where)
        self.up = nn.Linear(rank, base.out_features, bias=False, **where)
        nn.init.kaiming_uniform_(self.down.weight, a=math.sqrt(5))
        nn.init.zeros_(self.up.weight)

    def forward(self, x):
        return self.base(x) + self.up(self.down(x.to(self.down.weight.dtype))).to(x.dtype) * self.scale


def _swap(root: nn.Module, path: str, module: nn.Module) -> None:
    parent, _, name = path.rpartition(".")
    setattr(root.get_submodule(parent) if parent else root, name, module)


def kohya_name(component: str, path: str, models: Models) -> str:
    """kohya's key for a module: SD1.x/SD2.x the diffusers path, SDXL's UNet the original (SGM) path; text
    encoders under 'text_model.'."""
    if component == "unet":
        if models.sdxl:
            from stylegrad.addons.lora.names import original_name, unet_original_prefixes

            path = original_name(path, unet_original_prefixes(models.unet)) or path
        return "lora_unet_" + path.replace(".", "_")
    if not path.startswith("text_model."):
        path = "text_model." + path
    return f"lora_{component}_" + path.replace(".", "_")


class LoRA(Method):
    name = "lora"
    templates = STYLE_TEMPLATES

    def __init__(self, models: Models, rank: int = 4, alpha: float | None = None, text_encoder: bool = False,
                 word: str | None = None, seed: int = 0):
        if rank < 1:
            raise StylegradError(f"rank must be >= 1, got {rank}")
        self.rank, self.alpha, self.models = rank, float(alpha if alpha is not None else rank), models
        self.word = word
        torch.manual_seed(seed)  # the down matrices' start
        self.layers: dict[str, LoraLinear] = {}
        parts = [("unet", models.unet, UNET_TARGETS)]
        if text_encoder:
            names = ["te"] if len(models.text_encoders) == 1 else ["te1", "te2"]
            parts += [(n, e, TEXT_TARGETS) for n, e in zip(names, models.text_encoders)]
        for component, root, targets in parts:
            for path, module in list(root.named_modules()):
                if isinstance(module, nn.Linear) and path.endswith(targets) and \
                        any(path.endswith("." + t) for t in targets):
                    layer = LoraLinear(module, rank, self.alpha)
                    _swap(root, path, layer)
                    self.layers[kohya_name(component, path, models)] = layer
        if not self.layers:
            raise StylegradError("no attention layers found to put LoRA beside")

    def trained(self) -> dict[str, torch.Tensor]:
        out = {}
        for name, layer in self.layers.items():
            out[name + ".lora_down.weight"] = layer.down.weight
            out[name + ".lora_up.weight"] = layer.up.weight
        return out

    def describe(self) -> dict:
        return {"rank": self.rank, "alpha": self.alpha, "modules": len(self.layers)}

    def export(self, out: str | Path, step: int = 0) -> list[Path]:
        out = Path(out).with_suffix(".safetensors")
        tensors = {k: v.detach().float().cpu().contiguous() for k, v in self.trained().items()}
        for name in self.layers:
            tensors[name + ".alpha"] = torch.tensor(self.alpha)
        base = {Family.SD1: "sd_v1", Family.SD2: "sd_v2", Family.SDXL: "sdxl_base_v1-0"}[self.models.family]
        meta = {"ss_network_module": "networks.lora", "ss_network_dim": str(self.rank),
                "ss_network_alpha": str(self.alpha), "ss_base_model_version": base, "ss_steps": str(step),
                "trained_by": "stylegrad"}
        out.parent.mkdir(parents=True, exist_ok=True)
        with atomic_path(out) as tmp:
            save_file(tensors, str(tmp), metadata=meta)
        return [out]
