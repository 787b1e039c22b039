"""Style files: one aesthetic embedding (a mean CLIP image embedding) plus metadata.

Reads what people already share (bare ``.pt`` tensors of any dtype, shape (D,) or (1, D), saved on any device;
``.safetensors``; our own format) and refuses, with a reason, files that are something else. Nothing is
unpickled beyond plain tensors and containers (``torch.load(weights_only=True)``).
"""

from __future__ import annotations

import hashlib
import os
import pickle
import tempfile
import warnings
from dataclasses import dataclass, field
from datetime import datetime, timezone
from pathlib import Path
from typing import Any

import torch
from safetensors import safe_open
from safetensors.torch import save_file

from stylegrad import __version__
from stylegrad.errors import StylegradError
from stylegrad.aesthetic.vectors import normalize, slerp

FORMAT = "stylegrad.style"
TENSOR_KEY = "aesthetic_embedding"

WIDTHS = {
    768: "CLIP ViT-L/14, Stable Diffusion 1.x",
    1024: "OpenCLIP ViT-H/14, Stable Diffusion 2.x",
    512: "CLIP ViT-B, not used by Stable Diffusion",
    1280: "OpenCLIP ViT-bigG/14",
}


def describe_width(width: int) -> str:
    return f"{width}-wide ({WIDTHS.get(width, 'unknown encoder')})"


@dataclass(frozen=True)
class Style:
    """One aesthetic embedding. ``vector`` is stored as read; every use site takes ``direction``."""

    vector: torch.Tensor  # (D,) float32
    metadata: dict[str, str] = field(default_factory=dict)
    name: str = "style"

    @property
    def width(self) -> int:
        return self.vector.shape[0]

    @property
    def norm(self) -> float:
        return float(self.vector.norm())

    @property
    def direction(self) -> torch.Tensor:
        return normalize(self.vector.float())

    @property
    def digest(self) -> str:
        """Hash of the direction: files that differ only in scale generate the same images."""
        return hashlib.sha256(self.direction.contiguous().numpy().tobytes()).hexdigest()[:16]

    def check_width(self, width: int) -> None:
        if self.width != width:
            raise StylegradError(
                f"style '{self.name}' is {describe_width(self.width)} but the model's CLIP is "
                f"{describe_width(width)}; make the style with the CLIP model of this model's family"
            )


@dataclass
class FileInfo:
    """What a file is, also for files that cannot be used as a style."""

    path: str
    kind: str  # style | textual-inversion | lora | checkpoint | state-dict | tensor | other | corrupt
    usable: bool
    detail: str
    shape: list[int] | None = None
    dtype: str | None = None
    width: int | None = None
    norm: float | None = None
    metadata: dict[str, str] = field(default_factory=dict)

    def as_dict(self) -> dict[str, Any]:
        return {k: v for k, v in self.__dict__.items()}


def _read(path: Path) -> tuple[Any, dict[str, str], str]:
    """Return (object, metadata, container) without trusting the file."""
    with open(path, "rb") as f:
        head = f.read(8)
    if len(head) == 0:
        raise _Corrupt("the file is empty")
    if path.suffix.lower() == ".safetensors" or not (head.startswith(b"PK") or head[:1] == b"\x80"):
        try:
            with safe_open(str(path), framework="pt", device="cpu") as f:
                meta = dict(f.metadata() or {})
                return {k: f.get_tensor(k) for k in f.keys()}, meta, "safetensors"
        except Exception as e:  # safetensors raises several types for a bad header or short file
            if path.suffix.lower() == ".safetensors":
                raise _Corrupt(f"not a readable safetensors file ({_short(e)}); truncated or corrupt?") from e
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")  # torch warns about pickle protocols before refusing them
            obj = torch.load(path, map_location="cpu", weights_only=True)
    except pickle.UnpicklingError as e:
        raise _Unsafe(
            "it holds Python objects other than tensors (a training checkpoint or a pickled program?); "
            "stylegrad only loads plain tensors and does not unpickle arbitrary objects"
        ) from e
    except Exception as e:  # the unpickler raises many types for bytes that are not a torch file
        raise _Corrupt(f"not a readable torch file ({_short(e)}); truncated or corrupt?") from e
    return obj, {}, "torch"


class _Corrupt(Exception):
    pass


class _Unsafe(Exception):
    pass


def _short(e: Exception) -> str:
    text = str(e).strip().splitlines()[0] if str(e).strip() else type(e).__name__
    return text[:160]


def _is_vector(t: Any) -> bool:
    return isinstance(t, torch.Tensor) and (t.ndim == 1 or (t.ndim == 2 and t.shape[0] == 1)) and t.numel() > 1


def _classify_dict(d: dict) -> tuple[str, str, Any]:
    """(kind, detail, candidate vector or None) for a dict of tensors."""
    keys = [str(k) for k in d.keys()]
    lower = [k.lower() for k in keys]
    if TENSOR_KEY in d and _is_vector(d[TENSOR_KEY]):
        return "style", "aesthetic embedding", d[TENSOR_KEY]
    if "string_to_param" in d or "emb_params" in d or "clip_l" in d or "clip_g" in d:
        params = d.get("string_to_param") or d.get("emb_params") or d.get("clip_l")
        n = ""
        if isinstance(params, dict) and params:
            params = next(iter(params.values()))
        if isinstance(params, torch.Tensor):
            n = f" with {params.shape[0] if params.ndim == 2 else 1} vector(s) of width {params.shape[-1]}"
        return (
            "textual-inversion",
            f"a textual-inversion embedding{n}: it adds a word to the prompt, not a style "
            "(load it with the pipeline's load_textual_inversion)",
            None,
        )
    if any("lora" in k for k in lower) or any(k.endswith(".alpha") for k in lower):
        return "lora", f"a LoRA ({len(keys)} tensors): it patches model weights, not a style", None
    if "state_dict" in d or any(
        k.startswith(("model.diffusion_model.", "first_stage_model.", "cond_stage_model.")) for k in keys
    ):
        return "checkpoint", "a Stable Diffusion checkpoint (model weights), not a style", None
    if len(d) == 1 and isinstance(next(iter(d.values())), torch.Tensor):
        (k,), (v,) = zip(*d.items())
        if str(k).startswith("<") or v.ndim == 2 and v.shape[0] > 1:
            return (
                "textual-inversion",
                f"a textual-inversion embedding for the token '{k}': it adds a word to the prompt, not a style "
                "(load it with the pipeline's load_textual_inversion)",
                None,
            )
        if _is_vector(v):
            return "style", f"a single tensor '{k}'", v
    tensors = [k for k, v in d.items() if isinstance(v, torch.Tensor)]
    example = ", ".join(f"'{k}'" for k in tensors[:3])
    return "state-dict", f"a state dict with {len(tensors)} tensors ({example}...), not an aesthetic embedding", None


def inspect_file(path: str | os.PathLike) -> FileInfo:
    """Say what a file is and whether it can be used as a style."""
    p = Path(path)
    if not p.exists():
        raise StylegradError(f"no such file: {p}")
    if p.is_dir():
        raise StylegradError(f"{p} is a folder, not a style file")
    try:
        obj, meta, container = _read(p)
    except _Corrupt as e:
        return FileInfo(str(p), "corrupt", False, str(e))
    except _Unsafe as e:
        return FileInfo(str(p), "other", False, str(e))

    candidate = None
    if isinstance(obj, torch.Tensor):
        if _is_vector(obj):
            kind, detail, candidate = "style", f"a bare tensor in a {container} file", obj
        elif obj.ndim == 2:
            kind, detail = (
                "tensor",
                f"a tensor of shape {tuple(obj.shape)}: {obj.shape[0]} vectors, not one style "
                "(a textual-inversion embedding or unaveraged image features?)",
            )
        else:
            kind, detail = "tensor", f"a tensor of shape {tuple(obj.shape)}, not a style vector"
        shape, dtype = list(obj.shape), str(obj.dtype).replace("torch.", "")
    elif isinstance(obj, dict):
        kind, detail, candidate = _classify_dict(obj)
        shape = dtype = None
        if candidate is not None:
            shape, dtype = list(candidate.shape), str(candidate.dtype).replace("torch.", "")
    else:
        kind, detail, shape, dtype = "other", f"it holds a {type(obj).__name__}, not a tensor", None, None

    if meta.get("format") == FORMAT:
        detail = "stylegrad style"
    info = FileInfo(str(p), kind, candidate is not None, detail, shape, dtype, metadata=meta)
    if candidate is not None:
        v = candidate.detach().reshape(-1).float()
        info.width = v.shape[0]
        if not torch.isfinite(v).all():
            info.usable, info.detail = False, f"{detail} with NaN or infinite values"
        else:
            info.norm = float(v.norm())
            if info.norm == 0.0:
                info.usable, info.detail = False, f"{detail} that is all zeros (no direction)"
    return info


def load_style(path: str | os.PathLike) -> Style:
    """Load an aesthetic embedding from any file format people share; refuse anything else with a reason."""
    info = inspect_file(path)
    if not info.usable:
        raise StylegradError(f"{path} is not an aesthetic embedding: {info.detail}")
    obj, meta, _ = _read(Path(path))
    if isinstance(obj, dict):
        obj = _classify_dict(obj)[2]
    vector = obj.detach().reshape(-1).to(torch.float32).clone()
    name = meta.get("name") or Path(path).stem
    return Style(vector, meta, name)


def save_style(style: Style, path: str | os.PathLike, format: str = "safetensors") -> Path:
    """Write ``style`` atomically: ``safetensors`` with metadata, or ``pt``, a bare (1, D) fp32 tensor that the
    reference repo and the AUTOMATIC1111 extension load."""
    p = Path(path)
    if format not in ("safetensors", "pt"):
        raise StylegradError(f"unknown style format '{format}' (use safetensors or pt)")
    p.parent.mkdir(parents=True, exist_ok=True)
    tensor = style.vector.detach().to(torch.float32).reshape(1, -1).contiguous().clone()
    fd, tmp = tempfile.mkstemp(dir=p.parent, prefix=f".{p.name}.", suffix=".tmp")
    os.close(fd)
    try:
        if format == "pt":
            torch.save(tensor, tmp)
        else:
            meta = {k: str(v) for k, v in style.metadata.items()}
            meta.update(format=FORMAT, format_version="1", width=str(style.width), name=style.name)
            meta.setdefault("stylegrad_version", __version__)
            meta.setdefault("created", datetime.now(timezone.utc).isoformat(timespec="seconds"))
            save_file({TENSOR_KEY: tensor}, tmp, metadata=meta)
        os.replace(tmp, p)
    finally:
        if os.path.exists(tmp):
            os.unlink(tmp)
    return p


def mix_styles(parts: list[tuple[Style, float]], use_slerp: bool = False, name: str = "mix") -> Style:
    """Normalised weighted mean of style directions; ``use_slerp`` walks the great circle between two styles."""
    if not parts:
        raise StylegradError("nothing to mix: give at least one style")
    widths = {s.width for s, _ in parts}
    if len(widths) > 1:
        raise StylegradError(
            "cannot mix styles of different widths: " + ", ".join(f"'{s.name}' is {s.width}" for s, _ in parts)
        )
    total = sum(w for _, w in parts)
    if use_slerp:
        if len(parts) != 2:
            raise StylegradError(f"--slerp mixes exactly two styles, got {len(parts)}")
        (a, wa), (b, wb) = parts
        if wa < 0 or wb < 0 or total <= 0:
            raise StylegradError("--slerp needs non-negative weights with a positive sum")
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
