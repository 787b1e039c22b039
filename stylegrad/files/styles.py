"""Style files: one aesthetic embedding (a mean CLIP image embedding) plus metadata.

Reads what people already share (bare ``.pt`` tensors of any dtype, shape (D,) or (1, D), saved on any device;
``.safetensors``; our own format) and refuses, with a reason, files that are something else. Nothing is
unpickled beyond plain tensors and containers (``torch.load(weights_only=True)``).
"""

from __future__ import annotations

import hashlib
import os
from dataclasses import dataclass, field
from datetime import UTC, datetime
from pathlib import Path

import torch
from safetensors.torch import save_file

from stylegrad import __version__
from stylegrad.aesthetic.vectors import normalize, slerp
from stylegrad.errors import StylegradError
from stylegrad.files.atomic import atomic_path
from stylegrad.files.recognize import STYLE_FORMAT, STYLE_KEY, describe_width, open_file


def on_cpu(vector: torch.Tensor, what: str = "style vector") -> torch.Tensor:
    """``vector`` as a CPU float32 tensor (itself when it already is one): where a style's numbers live, whatever
    device or precision made them, so files, digests and float64 maths never depend on the machine."""
    if vector.device.type == "meta":
        raise StylegradError(f"the {what} is on the meta device: it has a shape but no values")
    return vector.detach().to(device="cpu", dtype=torch.float32)


@dataclass(frozen=True)
class Style:
    """One aesthetic embedding. ``vector`` (and ``g``) are kept on the CPU in float32 whatever device or dtype
    they came from; a model that uses the style moves its direction to its own device and dtype when it acts.
    ``vector`` keeps its scale as read; every use site takes ``direction``."""

    vector: torch.Tensor  # (D,) float32 on the CPU; for an SDXL style, its CLIP-L part
    metadata: dict[str, str] = field(default_factory=dict)
    name: str = "style"
    g: torch.Tensor | None = None  # (1280,) float32 on the CPU: an SDXL style's OpenCLIP ViT-bigG/14 part

    def __post_init__(self) -> None:
        object.__setattr__(self, "vector", on_cpu(self.vector))
        if self.g is not None:
            object.__setattr__(self, "g", on_cpu(self.g, "style's clip_g vector"))

    @property
    def is_sdxl(self) -> bool:
        return self.g is not None

    def part(self, name: str) -> torch.Tensor | None:
        """The unit direction of one part: ``clip_l`` (or the only vector), ``clip_g`` (None if absent)."""
        if name == "clip_g":
            return None if self.g is None else normalize(self.g.double()).float()
        return self.direction

    def check_part(self, name: str, width: int) -> None:
        v = self.g if name == "clip_g" else self.vector
        if v is None or v.shape[0] != width:
            have = "none" if v is None else describe_width(v.shape[0])
            raise StylegradError(f"style '{self.name}' has {have} for {name} but the model's tower is "
                                 f"{describe_width(width)}")

    @property
    def width(self) -> int:
        return self.vector.shape[0]

    @property
    def norm(self) -> float:
        return float(self.vector.norm())

    @property
    def direction(self) -> torch.Tensor:
        """The unit direction, normalized in float64 then rounded: for a unit vector made this way it returns the
        same bits, so a raw file and its unit-length copy tune, generate and cache identically."""
        return normalize(self.vector.double()).float()

    @property
    def digest(self) -> str:
        """Hash of the direction(s): files that differ only in scale generate the same images."""
        h = hashlib.sha256(self.direction.contiguous().numpy().tobytes())
        if self.g is not None:
            h.update(self.part("clip_g").contiguous().numpy().tobytes())
        return h.hexdigest()[:16]

    def check_width(self, width: int) -> None:
        if self.width != width:
            raise StylegradError(
                f"style '{self.name}' is {describe_width(self.width)} but the model's CLIP is "
                f"{describe_width(width)}; make the style with the CLIP model of this model's family"
            )


def load_style(path: str | os.PathLike) -> Style:
    """Load an aesthetic embedding from any file format people share; refuse anything else with a reason."""
    info, content, key = open_file(path)
    if not info.usable:
        raise StylegradError(f"{path} is not an aesthetic embedding: {info.detail}")
    vector = on_cpu(content.read(key)).reshape(-1).clone()
    meta = dict(info.metadata)
    g = on_cpu(content.read("clip_g")).reshape(-1).clone() if info.format == "stylegrad-sdxl" else None
    return Style(vector, meta, meta.get("name") or Path(path).stem, g)


def save_style(style: Style, path: str | os.PathLike, format: str | None = None) -> Path:
    """Write ``style`` atomically: ``safetensors`` with metadata, or ``pt``, a bare (1, D) fp32 tensor that the
    reference repo and the AUTOMATIC1111 extension load. ``format=None``: from the suffix (.pt/.pth/.bin: pt)."""
    p = Path(path)
    if format is None:
        format = "pt" if p.suffix.lower() in (".pt", ".pth", ".bin") else "safetensors"
    if format not in ("safetensors", "pt"):
        raise StylegradError(f"unknown style format '{format}' (use safetensors or pt)")
    tensor = on_cpu(style.vector).reshape(1, -1).contiguous().clone()  # a CPU tensor in the file, always
    if style.is_sdxl and format == "pt":
        raise StylegradError("an SDXL style has two parts (clip_l, clip_g): save it as .safetensors")
    with atomic_path(p) as tmp:
        if format == "pt":
            torch.save(tensor, tmp)
        else:
            meta = {k: str(v) for k, v in style.metadata.items()}
            meta.update(format=STYLE_FORMAT, format_version="1", width=str(style.width), name=style.name)
            meta.setdefault("stylegrad_version", __version__)
            meta.setdefault("created", datetime.now(UTC).isoformat(timespec="seconds"))
            if style.is_sdxl:  # the keys SDXL embeddings use, one image mean per text tower
                meta["widths"] = f"{style.width},{style.g.shape[0]}"
                g = on_cpu(style.g).reshape(1, -1).contiguous().clone()
                save_file({"clip_l": tensor, "clip_g": g}, str(tmp), metadata=meta)
            else:
                save_file({STYLE_KEY: tensor}, str(tmp), metadata=meta)
    return p


def mix_styles(parts: list[tuple[Style, float]], use_slerp: bool = False, name: str = "mix") -> Style:
    """Normalized weighted mean of style directions; ``use_slerp`` walks the great circle between two styles."""
    if not parts:
        raise StylegradError("nothing to mix: give at least one style")
    widths = {(s.width, s.g.shape[0] if s.g is not None else None) for s, _ in parts}
    if len(widths) > 1:
        raise StylegradError(
            "cannot mix styles of different widths: " + ", ".join(
                f"'{s.name}' is {s.width}" + (f"+{s.g.shape[0]}" if s.g is not None else "") for s, _ in parts)
        )
    if parts[0][0].is_sdxl:  # each part mixed on its own
        mixed_l = mix_styles([(Style(s.vector, s.metadata, s.name), w) for s, w in parts], use_slerp, name)
        mixed_g = mix_styles([(Style(s.g, s.metadata, s.name), w) for s, w in parts], use_slerp, name)
        return Style(mixed_l.vector, mixed_l.metadata, name, mixed_g.vector)
    total = sum(w for _, w in parts)
    if use_slerp:
        if len(parts) != 2:
            raise StylegradError(f"slerp mixes exactly two styles, got {len(parts)}")
        (a, wa), (b, wb) = parts
        if wa < 0 or wb < 0 or total <= 0:
            raise StylegradError("slerp needs non-negative weights with a positive sum")
        v = normalize(slerp(a.direction, b.direction, wb / total))
    else:
        mixed = sum(w * s.direction for s, w in parts)
        if float(mixed.norm()) < 1e-6:
            raise StylegradError("the weighted styles cancel out (their mix has no direction)")
        v = normalize(mixed)
    encoders = {s.metadata.get("encoder") for s, _ in parts} - {None}
    recipe = (" slerp " if use_slerp else " + ").join(f"{s.name}*{w:g}" for s, w in parts)
    meta = {"method": f"mix: {recipe}"}
    if len(encoders) == 1:
        meta["encoder"] = encoders.pop()
    return Style(v, meta, name)


def parse_weighted(spec: str) -> tuple[str, float]:
    """'FILE:WEIGHT' -> (FILE, WEIGHT); a file whose own name holds ':' (and no weight) is taken whole."""
    path, sep, weight = spec.rpartition(":")
    if sep and path and not Path(spec).exists():
        try:
            return path, float(weight)
        except ValueError:
            pass
    return spec, 1.0


def mix_style_files(specs: list[str], output: str | os.PathLike, use_slerp: bool = False,
                    format: str | None = None) -> Style:
    """Mix 'FILE[:WEIGHT]' styles into ``output``; returns the mix."""
    parts = [(load_style(path), w) for path, w in map(parse_weighted, specs)]
    style = mix_styles(parts, use_slerp=use_slerp, name=Path(output).stem)
    save_style(style, output, format)
    return style
