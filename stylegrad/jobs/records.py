"""What batch and evaluation folders record of a request (their manifests and digests), so that a folder made by
an earlier stylegrad still resumes: fields added since folders began recording requests are left out while they
hold their defaults (the request means the same image); set, they are recorded and an older run's folder refuses
the new one."""

from __future__ import annotations

from dataclasses import MISSING, asdict, fields

from stylegrad.aesthetic.options import StyleOptions
from stylegrad.pipelines.request import GenerationRequest

LATER_FIELDS = frozenset({"hypernetworks", "hypernetwork_reading", "ip_adapter", "ip_images", "ip_scale", "ip_style",
                          "ip_blocks", "ip_image_encoder"})
LATER_STYLE_FIELDS = frozenset({"target_gain"})


def _defaults(cls) -> dict:
    out = {}
    for f in fields(cls):
        out[f.name] = f.default_factory() if f.default_factory is not MISSING else f.default
    return out


def without_later_defaults(values: dict, later: frozenset = LATER_FIELDS, cls=None) -> dict:
    """``values`` (a request's or its style options' fields by name) less the ``later`` fields at their default."""
    defaults = _defaults(cls or (GenerationRequest if later is LATER_FIELDS else StyleOptions))
    return {k: v for k, v in values.items()
            if not (k in later and _same(v, defaults.get(k)))}


def _same(a, b) -> bool:
    norm = (lambda v: list(v) if isinstance(v, (list, tuple)) else v)
    return norm(a) == norm(b)


def recorded(request: GenerationRequest) -> dict:
    """The request as batch folders record it (its digest): every field, the later ones only when set."""
    data = without_later_defaults(asdict(request))
    data["style_options"] = without_later_defaults(data["style_options"], LATER_STYLE_FIELDS)
    return data
