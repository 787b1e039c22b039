"""Every name a LoRA file may use for a module of a diffusers UNet or CLIP text encoder, with ``_`` for ``.``:
diffusers' own paths (kohya's SD1.x/SD2.x names), the original ``input_blocks``/``middle_block``/``output_blocks``
paths (SDXL's SGM names, and LyCORIS's for SD1.x), ``text_model.`` paths of the text encoders, and
lora_diffusion's numbering of the layers it injected. Worked out from the modules and the UNet's config, so it
holds for SD1.x, SD2.x and SDXL alike, and on the ``meta`` device."""

from __future__ import annotations

import torch

ADAPTABLE = (torch.nn.Linear, torch.nn.Conv2d)

_RESNET = {"in_layers.0": "norm1", "in_layers.2": "conv1", "emb_layers.1": "time_emb_proj", "out_layers.0": "norm2",
           "out_layers.3": "conv2", "skip_connection": "conv_shortcut"}


def _per_block(value, n: int) -> list[int]:
    return list(value) if isinstance(value, (list, tuple)) else [value] * n


def unet_original_prefixes(unet) -> dict[str, str]:
    """diffusers block path -> the original (ldm/SGM) path of the same block."""
    cfg = unet.config
    n = len(cfg.down_block_types)
    layers = _per_block(cfg.layers_per_block, n)
    out = {"conv_in": "input_blocks.0.0", "time_embedding.linear_1": "time_embed.0",
           "time_embedding.linear_2": "time_embed.2", "add_embedding.linear_1": "label_emb.0.0",
           "add_embedding.linear_2": "label_emb.0.2", "conv_norm_out": "out.0", "conv_out": "out.2",
           "mid_block.resnets.0": "middle_block.0", "mid_block.attentions.0": "middle_block.1",
           "mid_block.resnets.1": "middle_block.2"}
    i = 1
    for b, kind in enumerate(cfg.down_block_types):
        for j in range(layers[b]):
            out[f"down_blocks.{b}.resnets.{j}"] = f"input_blocks.{i}.0"
            if "CrossAttn" in kind:
                out[f"down_blocks.{b}.attentions.{j}"] = f"input_blocks.{i}.1"
            i += 1
        if b < n - 1:
            out[f"down_blocks.{b}.downsamplers.0.conv"] = f"input_blocks.{i}.0.op"
            i += 1
    i = 0
    up_layers = list(reversed(layers))
    for b, kind in enumerate(cfg.up_block_types):
        attn = "CrossAttn" in kind
        for j in range(up_layers[b] + 1):
            out[f"up_blocks.{b}.resnets.{j}"] = f"output_blocks.{i}.0"
            if attn:
                out[f"up_blocks.{b}.attentions.{j}"] = f"output_blocks.{i}.1"
            if j == up_layers[b] and b < n - 1:
                out[f"up_blocks.{b}.upsamplers.0.conv"] = f"output_blocks.{i}.{2 if attn else 1}.conv"
            i += 1
    return out


def original_name(path: str, prefixes: dict[str, str]) -> str | None:
    """A diffusers UNet module path in the original layout (None where it has no counterpart)."""
    parts = path.split(".")
    for n in range(len(parts), 0, -1):
        head = ".".join(parts[:n])
        if head in prefixes:
            rest = ".".join(parts[n:])
            if ".resnets." in head and rest:
                rest = _resnet_rest(rest)
            return prefixes[head] + ("." + rest if rest else "")
    return None


def _resnet_rest(rest: str) -> str:
    for diffusers, original in ((d, o) for o, d in _RESNET.items()):
        if rest == diffusers or rest.startswith(diffusers + "."):
            return original + rest[len(diffusers):]
    return rest


def _underscored(path: str) -> str:
    return path.replace(".", "_")


def lookup(component: str, model: torch.nn.Module) -> dict[str, str]:
    """Every accepted spelling (underscored) -> the module's path in ``model``, for its Linear and Conv layers."""
    table: dict[str, str] = {}
    prefixes = unet_original_prefixes(model) if component == "unet" else None
    for path, module in model.named_modules():
        if not isinstance(module, ADAPTABLE):
            continue
        table[_underscored(path)] = path
        if prefixes is not None:
            original = original_name(path, prefixes)
            if original is not None:
                table.setdefault(_underscored(original), path)
        elif not path.startswith("text_model."):
            table.setdefault(_underscored("text_model." + path), path)  # transformers 5 dropped .text_model
    return table


# lora_diffusion injects into the Linear layers inside these classes, in module order
LORA_DIFFUSION_TARGETS = {"unet": ("CrossAttention", "Attention", "GEGLU"), "te": ("CLIPAttention",)}


_OLD_BLOCK_ORDER = {"attn1": 0, "ff": 1, "attn2": 2}  # diffusers <= 0.11 registered a block's ff before attn2


def injection_order(model: torch.nn.Module, classes) -> list[str]:
    """The paths lora_diffusion numbers ``0, 1, ...``: Linear layers of each module of ``classes``, in the module
    order of the diffusers it was written for (inside a transformer block: attn1, ff, attn2)."""
    found = []
    for path, module in model.named_modules():
        if type(module).__name__ in classes:
            found += [f"{path}.{sub}" for sub, m in module.named_modules() if sub and isinstance(m, torch.nn.Linear)]
    blocks: dict[str, int] = {}

    def key(path: str):
        head, sep, rest = path.partition(".transformer_blocks.")
        if not sep:
            return (blocks.setdefault(path, len(blocks)), 0)
        number, _, inner = rest.partition(".")
        block = blocks.setdefault(f"{head}.{number}", len(blocks))
        return (block, _OLD_BLOCK_ORDER.get(inner.split(".")[0], 3))

    return sorted(found, key=key)  # stable: the order inside each attention is kept
