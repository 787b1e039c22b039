"""LoRA files -> one group of tensors per target module, whatever the format's key names.

A target is ``(component, name)``: component ``unet``, ``te`` (the first text encoder) or ``te2`` (SDXL's
second); name is the module's path with ``_`` for ``.`` (kohya's spelling, which every format reduces to), or
``#N`` for lora_diffusion's N-th injected layer. The tensors are renamed to the adapters' vocabulary: ``down``,
``up``, ``mid``, ``alpha``, ``dora_scale``, ``hada_*``, ``lokr_*``, ``diff``, ``diff_b``, ``weight``, ``on_input``.
"""

from __future__ import annotations

import json
import re
from dataclasses import dataclass, field
from pathlib import Path

import torch

from stylegrad.errors import StylegradError
from stylegrad.files.recognize import open_file

# kohya/LyCORIS: 'lora_unet_<path>.<suffix>'
_KOHYA = re.compile(r"^(lora_unet|lora_te[12]?)_(.+?)\.(lora_down\.weight|lora_up\.weight|lora_mid\.weight|alpha|"
                    r"dora_scale|hada_[wt][12](?:_[ab])?|lokr_[wt][12](?:_[ab])?|diff|diff_b|weight|on_input|scale)$")
_KOHYA_COMPONENT = {"lora_unet": "unet", "lora_te": "te", "lora_te1": "te", "lora_te2": "te2"}
_SUFFIX = {"lora_down.weight": "down", "lora_up.weight": "up", "lora_mid.weight": "mid",
           "lora_A.weight": "down", "lora_B.weight": "up", "lora.down.weight": "down", "lora.up.weight": "up",
           "lora_A.default.weight": "down", "lora_B.default.weight": "up"}
# diffusers / PEFT: '<component>.<path>.lora_A.weight'
_DOTTED = re.compile(r"^(.+)\.(lora_[AB](?:\.default)?\.weight|lora\.(?:down|up)\.weight|alpha)$")
_DIFFUSERS_COMPONENT = {"unet": "unet", "text_encoder": "te", "text_encoder_2": "te2"}
_PROCESSOR = re.compile(r"^(.+)\.processor\.(to_q|to_k|to_v|to_out)_lora\.(down|up)\.weight$")
_LORA_DIFFUSION = re.compile(r"^(unet|text_encoder):(\d+):(up|down)$")


@dataclass
class LoraFile:
    """One LoRA/LyCORIS file read into target groups."""

    path: str
    format: str
    groups: dict[tuple[str, str], dict[str, torch.Tensor]]
    embeddings: dict[str, torch.Tensor] = field(default_factory=dict)  # lora_diffusion's bundled tokens
    metadata: dict[str, str] = field(default_factory=dict)
    unread: list[str] = field(default_factory=list)  # keys no rule read
    rank_scale: dict[tuple[str, str], float] = field(default_factory=dict)  # PEFT: alpha / r from its config

    @property
    def name(self) -> str:
        return Path(self.path).stem


def _kohya(keys, read, groups, unread):
    for k in keys:
        m = _KOHYA.match(k)
        if m is None:
            unread.append(k)
            continue
        prefix, name, suffix = m.groups()
        groups.setdefault((_KOHYA_COMPONENT[prefix], name), {})[_SUFFIX.get(suffix, suffix)] = read(k)


def _component_path(dotted: str, default: str | None) -> tuple[str, str] | None:
    head, _, rest = dotted.partition(".")
    if head in _DIFFUSERS_COMPONENT:
        return _DIFFUSERS_COMPONENT[head], rest
    if dotted.startswith("base_model.model."):
        return default, dotted[len("base_model.model."):]
    return (default, dotted) if default else None


def _dotted(keys, read, groups, unread, default):
    for k in keys:
        m = _PROCESSOR.match(k)
        if m is not None:  # old diffusers attention processors: '<attn>.processor.to_q_lora.down.weight'
            module, proj, which = m.groups()
            target = f"{module}.{'to_out.0' if proj == 'to_out' else proj}"
            place = _component_path(target, "unet")
            groups.setdefault((place[0], place[1].replace(".", "_")), {})[which] = read(k)
            continue
        m = _DOTTED.match(k)
        place = _component_path(m.group(1), default) if m else None
        if place is None or place[0] is None:
            unread.append(k)
            continue
        groups.setdefault((place[0], place[1].replace(".", "_")), {})[_SUFFIX.get(m.group(2), m.group(2))] = read(k)


def _peft_config(path: Path) -> dict | None:
    config = path.with_name("adapter_config.json")
    if not config.is_file():
        return None
    try:
        return json.loads(config.read_text(encoding="utf-8"))
    except (OSError, ValueError):
        return None


def _peft_scales(groups, config: dict) -> dict:
    """alpha / r (or / sqrt(r) with rsLoRA) per target, with the config's per-module patterns."""
    r, alpha = config.get("r", 8), config.get("lora_alpha", 8)
    out = {}
    for key in groups:
        dotted = key[1].replace("_", ".")
        rr = next((v for p, v in (config.get("rank_pattern") or {}).items() if re.search(p, dotted)), r)
        aa = next((v for p, v in (config.get("alpha_pattern") or {}).items() if re.search(p, dotted)), alpha)
        out[key] = aa / (rr ** 0.5 if config.get("use_rslora") else rr)
    return out


def read_lora(path: str | Path) -> LoraFile:
    """Any LoRA/LyCORIS file A1111 reads, plus PEFT and lora_diffusion files; refused in one line otherwise."""
    info, content, _ = open_file(path)
    path = Path(path)
    if info.kind != "lora":
        raise StylegradError(f"{path} is not a LoRA: it is {info.detail}")
    if content is None or info.format == "lora-diffusion-list":
        raise StylegradError(f"{path}: {info.detail}")
    keys, read = list(content.shapes), content.read
    groups: dict = {}
    unread: list[str] = []
    embeddings: dict[str, torch.Tensor] = {}
    scales: dict = {}
    fmt = info.format
    if fmt == "lora-diffusion":
        for k in keys:
            m = _LORA_DIFFUSION.match(k)
            if m:
                part, n, which = m.groups()
                groups.setdefault(("unet" if part == "unet" else "te", f"#{n}"), {})[which] = read(k)
            elif content.metadata.get(k) == "<embed>" or (k.startswith("<") and len(content.shapes[k]) == 1):
                embeddings[k] = read(k).float()
            else:
                unread.append(k)
    elif any(_KOHYA.match(k) for k in keys):
        _kohya(keys, read, groups, unread)
    else:
        config = _peft_config(path) if fmt == "peft" else None
        base = ((config or {}).get("auto_mapping") or {}).get("base_model_class", "")
        default = "te" if base.startswith("CLIPText") else "unet" if "UNet" in base else None
        _dotted(keys, read, groups, unread, default)
        if config:
            scales = _peft_scales(groups, config)
    if not groups:
        raise StylegradError(f"{path}: no key maps to a module (first keys: {', '.join(keys[:3])})")
    return LoraFile(str(path), fmt, groups, embeddings, dict(content.metadata), unread, scales)
