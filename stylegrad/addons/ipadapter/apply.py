"""An adapter on a UNet for one call, and nothing left after it.

stylegrad denoises on a pipeline object of its own that shares the user's UNet module (pipelines/run.py), so what
IP-Adapter needs on the UNet is installed for the call and the UNet is given back as it was: its attention
processors (the very objects it had), ``encoder_hid_proj`` (where it was held: a plain attribute, as diffusers'
UNet starts, or a submodule) and ``config.encoder_hid_dim_type``. The modules are diffusers' own
(``IPAdapterAttnProcessor2_0`` or the xformers one, ``ImageProjection`` / ``IPAdapterPlusImageProjection`` inside
``MultiIPAdapterImageProjection``), made by diffusers' own converters from the file's tensors, so the numbers are
``load_ip_adapter``'s; they are put where the UNet's weights are, in its dtype (under model CPU offload they move
with it, as its submodules). Per-layer scales are set as ``set_ip_adapter_scale`` sets them, with diffusers'
expansion of the scale dict (InstantStyle's blocks)."""

from __future__ import annotations

from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass

import torch

from stylegrad.addons.ipadapter.files import AdapterFile
from stylegrad.errors import StylegradError

_MISSING = object()


def _ip_processor_classes() -> tuple[type, ...]:
    from diffusers.models.attention_processor import (
        IPAdapterAttnProcessor,
        IPAdapterAttnProcessor2_0,
        IPAdapterXFormersAttnProcessor,
    )

    return IPAdapterAttnProcessor, IPAdapterAttnProcessor2_0, IPAdapterXFormersAttnProcessor


def check_fits(unet, adapter: AdapterFile) -> None:
    """The adapter's keys against the UNet's cross-attention layers: another family or layout is one line."""
    cross = [n for n in unet.attn_processors if not n.endswith("attn1.processor") and "motion_modules" not in n]
    width = unet.config.cross_attention_dim
    width = width[0] if isinstance(width, (list, tuple)) else width
    s = adapter.shape
    if s.context_width != width or s.layers != len(cross):
        from stylegrad.addons.ipadapter.shapes import FAMILIES

        made = {"sd1": "SD1.x", "sd2": "SD2.x", "sdxl": "SDXL"}.get(s.family or "", f"a {s.context_width}-wide UNet")
        here = {"sd1": "an SD1.x", "sd2": "an SD2.x", "sdxl": "an SDXL"}.get(FAMILIES.get(width, ""),
                                                                             f"a {width}-wide")
        raise StylegradError(f"IP-Adapter {adapter.name} is for {made} ({s.layers} cross-attention layers, width "
                             f"{s.context_width}); this is {here} UNet ({len(cross)} layers, width {width})")


def layer_scales(unet, config: float | dict) -> dict[str, float]:
    """Each IP processor's scale for ``config`` (a float, or diffusers' per-block dict), as
    ``set_ip_adapter_scale`` assigns it: the dict expanded by diffusers (unnamed blocks 0), then by name prefix."""
    from diffusers.loaders.unet_loader_utils import _maybe_expand_lora_scales

    names = [n for n in unet.attn_processors if not n.endswith("attn1.processor")]
    if not isinstance(config, dict):
        return {n: float(config) for n in names}
    try:
        expanded = _maybe_expand_lora_scales(unet, [config], default_scale=0.0)[0]
    except ValueError as e:
        raise StylegradError(f"the IP-Adapter blocks do not fit this UNet: {e}") from None
    out = {}
    for n in names:
        out[n] = 1.0  # diffusers' processors start at 1; a name no key prefixes keeps it
        for prefix, s in expanded.items():
            if n.startswith(prefix):
                out[n] = float(s)
    return out


def _hid_place(unet) -> tuple[str, object]:
    if "encoder_hid_proj" in unet._modules:
        return "module", unet._modules["encoder_hid_proj"]
    return "attr", unet.__dict__.get("encoder_hid_proj", _MISSING)


def _restore_hid(unet, place: tuple[str, object]) -> None:
    where, value = place
    unet._modules.pop("encoder_hid_proj", None)
    unet.__dict__.pop("encoder_hid_proj", None)
    if where == "module":
        unet._modules["encoder_hid_proj"] = value
    elif value is not _MISSING:
        unet.__dict__["encoder_hid_proj"] = value


def _config_value(unet, key: str):
    """The attribute ``unet.config.KEY`` reads (diffusers' FrozenDict keeps it apart from the dict's item)."""
    return unet._internal_dict.__dict__.get(key, _MISSING)


def _set_config(unet, key: str, value) -> None:
    """``unet.config.KEY = value`` as diffusers' loader sets it (the attribute; the dict's item is left alone)."""
    if value is _MISSING:
        unet._internal_dict.__dict__.pop(key, None)
    else:
        object.__setattr__(unet._internal_dict, key, value)


@dataclass
class Built:
    """An adapter's modules for one UNet, as diffusers' converters make them: kept between calls (converting and
    moving SDXL's 700 MB of keys per image would cost every image), moved where the UNet is at each install."""

    processors: dict  # layer name -> IPAdapterAttnProcessor2_0 (or the xformers one): the cross-attention layers
    projection: torch.nn.Module  # MultiIPAdapterImageProjection around ImageProjection / IPAdapterPlusImageProjection


def build(unet, adapter: AdapterFile) -> Built:
    from diffusers.models.embeddings import MultiIPAdapterImageProjection

    check_fits(unet, adapter)
    state = adapter.state_dict()
    converted = unet._convert_ip_adapter_attn_to_diffusers([state], low_cpu_mem_usage=False)
    projection = unet._convert_ip_adapter_image_proj_to_diffusers(state["image_proj"], low_cpu_mem_usage=False)
    ip_classes = _ip_processor_classes()
    return Built({n: p for n, p in converted.items() if isinstance(p, ip_classes)},
                 MultiIPAdapterImageProjection([projection]))


@contextmanager
def installed(unet, adapter: AdapterFile, scales: float | dict = 1.0, built: Built | None = None) -> Iterator[None]:
    """``adapter`` on ``unet`` for the block: diffusers' processors and projection (``built`` for this UNet, or
    made now), weights where the UNet's are, in its dtype; the UNet exactly as before afterwards, whatever happens
    inside."""
    built = built or build(unet, adapter)
    weights = next(unet.parameters())
    device, dtype = weights.device, weights.dtype
    saved = dict(unet.attn_processors)  # the very processor objects, restored as they were
    per_layer = layer_scales(unet, scales)
    procs = {}
    for name, original in saved.items():
        proc = built.processors.get(name)
        if proc is None:
            procs[name] = original  # self-attention and anything else: the UNet's own object
        else:
            proc.to(device, dtype)
            proc.scale = [per_layer.get(name, 1.0)]
            procs[name] = proc
    place = _hid_place(unet)
    hid_type = _config_value(unet, "encoder_hid_dim_type")
    if place[1] not in (None, _MISSING) and hid_type == "text_proj":
        raise StylegradError("this UNet already projects its text context (encoder_hid_proj): IP-Adapter is not "
                             "supported on it")
    try:
        unet.set_attn_processor(procs)
        unet.encoder_hid_proj = built.projection.to(device, dtype)
        _set_config(unet, "encoder_hid_dim_type", "ip_image_proj")
        yield
    finally:  # the projection first: the plus variants' Resampler has attention layers of its own
        _restore_hid(unet, place)
        _set_config(unet, "encoder_hid_dim_type", hid_type)
        unet.set_attn_processor(saved)
