"""Say what a file is: the one recognition table that ``info``, ``load_style`` and the loaders use.

Magic bytes first (a PNG is an image whatever its name), then the container is opened as data (safetensors headers,
or a torch pickle under the allow-list of ``pickles.py``), then the rules below are tried in order and the first
that matches names the kind and format. Kinds: ``style``, ``textual-inversion``, ``lora``, ``checkpoint``,
``image``, ``other``.
"""

from __future__ import annotations

import json
import math
import os
import re
import struct
import sys
from collections.abc import Callable
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any

from stylegrad.errors import StylegradError
from stylegrad.families import Family
from stylegrad.files.safetensors_header import Header, float32_norm, float_values, read_header

if TYPE_CHECKING:  # torch is imported only for torch pickles and by the loaders: a safetensors file is read without it
    import torch

STYLE_KEY = "aesthetic_embedding"  # stylegrad's own style files
STYLE_FORMAT = "stylegrad.style"
KINDS = ("style", "textual-inversion", "lora", "ip-adapter", "hypernetwork", "checkpoint", "image", "other")

WIDTHS = {
    768: "CLIP ViT-L/14, Stable Diffusion 1.x",
    1024: "OpenCLIP ViT-H/14, Stable Diffusion 2.x",
    512: "CLIP ViT-B, not used by Stable Diffusion",
    1280: "OpenCLIP ViT-bigG/14, SDXL's second text encoder",
}


def describe_width(width: int) -> str:
    return f"{width}-wide ({WIDTHS.get(width, 'unknown encoder')})"


@dataclass
class FileInfo:
    """What a file is, with what it holds, also for files stylegrad will not use as a style."""

    path: str
    kind: str  # one of KINDS
    format: str | None  # e.g. a1111, kohya, sdxl, peft, lycoris-loha, png
    usable: bool  # usable as an aesthetic-gradient style
    detail: str
    shape: list[int] | None = None
    dtype: str | None = None
    width: int | None = None
    widths: list[int] | None = None  # a file with several parts (SDXL embeddings: 768 and 1280)
    family: str | None = None  # sd1, sd2, sdxl
    norm: float | None = None
    vectors: int | None = None  # textual inversion: vectors per trigger word
    trigger: str | None = None  # the word A1111 would activate it with (the file stem)
    name: str | None = None  # a textual inversion's own 'name' field
    step: int | None = None  # ... and its training step
    tensors: int | None = None
    metadata: dict[str, str] = field(default_factory=dict)

    def as_dict(self) -> dict[str, Any]:
        return asdict(self)


# -- containers ---------------------------------------------------------------------------------------------------


@dataclass
class _Content:
    """A file opened as data: its tensors' shapes and dtypes, a way to read one, and (pickles) the object."""

    container: str  # safetensors | torch
    shapes: dict[str, tuple[int, ...]]
    dtypes: dict[str, str]
    read: Callable[[str], torch.Tensor]
    obj: Any = None
    metadata: dict[str, str] = field(default_factory=dict)
    header: Header | None = None  # safetensors: the header, for reading a small vector without torch
    name: str = ""  # the file's name (an IP-Adapter's variant light or plus-face is told by it alone)


def _dtype_name(dtype) -> str:
    return str(dtype).replace("torch.", "")


def _is_tensor(obj: Any) -> bool:
    """A torch tensor, asked without importing torch: only a torch pickle's objects can be one, and reading a pickle
    has imported torch."""
    torch = sys.modules.get("torch")
    return torch is not None and isinstance(obj, torch.Tensor)


def _open_safetensors(path: Path) -> _Content:
    header = read_header(path)
    handle = []  # opened at the first read and kept while the content lives: one mapping for many reads

    def read(key: str) -> torch.Tensor:
        if not handle:
            from safetensors import safe_open

            handle.append(safe_open(str(path), framework="pt", device="cpu"))
        return handle[0].get_tensor(key)

    return _Content("safetensors", header.shapes, header.dtypes, read, None, header.metadata, header)


def _flatten(obj: Any, prefix: str = "") -> dict[str, torch.Tensor]:
    import torch

    out: dict[str, torch.Tensor] = {}
    if isinstance(obj, torch.Tensor):
        out[prefix or "tensor"] = obj
    elif isinstance(obj, (dict, torch.nn.ParameterDict)):
        # a ParameterDict pickled by an old torch has no '_keys'; its tensors are in '_parameters' in every version
        items = obj.__dict__.get("_parameters", {}).items() if isinstance(obj, torch.nn.ParameterDict) else obj.items()
        for k, v in items:
            out.update(_flatten(v, f"{prefix}.{k}" if prefix else str(k)))
    return out


def _open_pickle(path: Path) -> _Content:
    from stylegrad.files.pickles import load_pickle

    obj = load_pickle(path)
    flat = _flatten(obj)
    shapes = {k: tuple(v.shape) for k, v in flat.items()}
    dtypes = {k: _dtype_name(v.dtype) for k, v in flat.items()}
    return _Content("torch", shapes, dtypes, flat.__getitem__, obj)


def _sniff(path: Path) -> str:
    """The container from the first bytes: png, jpeg, gif, webp, safetensors, zip, pickle, json, text, empty, unknown."""
    size = path.stat().st_size
    with open(path, "rb") as f:
        head = f.read(64)
    if not head:
        return "empty"
    if head.startswith(b"\x89PNG\r\n\x1a\n"):
        return "png"
    if head.startswith(b"\xff\xd8\xff"):
        return "jpeg"
    if head.startswith((b"GIF87a", b"GIF89a")):
        return "gif"
    if head[:4] == b"RIFF" and head[8:12] == b"WEBP":
        return "webp"
    if head.startswith(b"PK\x03\x04"):
        return "zip"
    if len(head) >= 9:  # before the pickle test: a header length of 384 starts with the byte 0x80 too
        (n,) = struct.unpack("<Q", head[:8])
        if 0 < n <= size - 8 and head[8:9] == b"{":
            return "safetensors"
    if head[:1] == b"\x80" and len(head) > 1 and head[1] <= 5:
        return "pickle"
    text = head.lstrip(b"\xef\xbb\xbf \t\r\n")
    if text[:1] in (b"{", b"["):
        return "json"
    try:
        head.decode("utf-8")
        return "text"
    except UnicodeDecodeError:
        return "unknown"


# -- the rules ----------------------------------------------------------------------------------------------------


def _family_from_width(width: int | None) -> str | None:
    return Family.of_text_width(width)


def _first(content: _Content, pattern: str) -> str | None:
    rx = re.compile(pattern)
    return next((k for k in content.shapes if rx.search(k)), None)


def _lora_family(c: _Content) -> str | None:
    """From the widths a LoRA touches: cross-attention keys (768 SD1, 1024 SD2, 2048 SDXL), else text layers."""
    if any(k.startswith(("lora_te2_", "lora_te1_")) or "text_encoder_2" in k for k in c.shapes):
        return Family.SDXL
    k = _first(c, r"attn2.*to_k.*(lora_down|lora_A|lora\.down|_lora\.down|hada_w1_b|lokr_w2)")
    if k is not None and len(c.shapes[k]) == 2:
        family = Family.of_context_width(c.shapes[k][-1])
        return family if family is not None and family.generates else None
    k = _first(c, r"q_proj.*(lora_down|lora_A|_lora\.down|hada_w1_b)|^text_encoder:\d+:down$")
    if k is not None and len(c.shapes[k]) == 2:
        return _family_from_width(c.shapes[k][-1])
    return None


def _lora(fmt: str, what: str) -> Callable[[_Content], dict]:
    def info(c: _Content) -> dict:
        family = _lora_family(c)
        dtype = next(iter(c.dtypes.values()), None)
        return dict(kind="lora", format=fmt, family=family, dtype=dtype,
                    detail=f"{what} ({len(c.shapes)} tensors): it patches model weights, not a style")
    return info


def _textual_inversion(fmt: str, key: str) -> Callable[[_Content], dict]:
    def info(c: _Content) -> dict:
        shape = c.shapes[key]
        vectors = shape[0] if len(shape) == 2 else 1
        width = shape[-1]
        name = step = None
        if isinstance(c.obj, dict):
            name = c.obj.get("name") if isinstance(c.obj.get("name"), str) else None
            step = c.obj.get("step") if isinstance(c.obj.get("step"), int) else None
        return dict(kind="textual-inversion", format=fmt, shape=list(shape), dtype=c.dtypes[key], width=width,
                    vectors=vectors, family=_family_from_width(width), name=name, step=step,
                    detail=f"a textual-inversion embedding ({fmt}) with {vectors} vector(s) of width {width}: it adds "
                    "a word to the prompt, not a style")
    return info


def _ti_sdxl(c: _Content) -> dict:
    vectors = c.shapes["clip_g"][0] if len(c.shapes["clip_g"]) == 2 else 1
    widths = [c.shapes["clip_l"][-1], c.shapes["clip_g"][-1]]
    return dict(kind="textual-inversion", format="sdxl", shape=list(c.shapes["clip_g"]), dtype=c.dtypes["clip_g"],
                width=widths[0], widths=widths, vectors=vectors, family=Family.SDXL,
                detail=f"an SDXL textual-inversion embedding with {vectors} vector(s) for each text encoder "
                f"(clip_l {widths[0]}, clip_g {widths[1]}): it adds a word to the prompt, not a style")


def _checkpoint(c: _Content) -> dict:
    from stylegrad.checkpoints.families import a, classify, strip_wrapper

    prefix = strip_wrapper(c.shapes)
    kind = classify({k[len(prefix):]: s for k, s in c.shapes.items() if k.startswith(prefix)})
    width = Family(kind.family).context_width if kind.family else None
    first = next((k for k in c.shapes if k.startswith(prefix + "model.diffusion_model.")), None)
    dtype = c.dtypes.get(first) if first else next(iter(c.dtypes.values()), None)
    usable = " (--model loads it)" if kind.refusal is None else f" ({kind.refusal})" if kind.family else ""
    return dict(kind="checkpoint", format="original", family=kind.family, width=width, dtype=dtype,
                detail=f"{a(kind.label)} checkpoint ({len(c.shapes)} tensors "
                f"of model weights){usable}, not a style")


def _diffusers_weights(c: _Content) -> dict:
    return dict(kind="checkpoint", format="diffusers", dtype=next(iter(c.dtypes.values()), None),
                detail=f"weights of one diffusers model component ({len(c.shapes)} tensors), not a style")


def _style(fmt: str, key: str, what: str) -> Callable[[_Content], dict]:
    def info(c: _Content) -> dict:
        shape = c.shapes[key]
        return dict(kind="style", format=fmt, usable=True, shape=list(shape), dtype=c.dtypes[key],
                    width=shape[-1], family=_family_from_width(shape[-1]), detail=what, _vector=key)
    return info


def _sdxl_style(c: _Content) -> dict:
    widths = [c.shapes["clip_l"][-1], c.shapes["clip_g"][-1]]
    return dict(kind="style", format="stylegrad-sdxl", usable=True, shape=list(c.shapes["clip_l"]),
                dtype=c.dtypes["clip_l"], width=widths[0], widths=widths, family=Family.SDXL,
                detail=f"stylegrad SDXL style (CLIP-L {widths[0]} + bigG {widths[1]})", _vector="clip_l")


def _is_vector_shape(shape: tuple) -> bool:
    return (len(shape) == 1 or (len(shape) == 2 and shape[0] == 1)) and shape[-1] > 1


def _only(c: _Content) -> tuple[str, tuple] | None:
    return next(iter(c.shapes.items())) if len(c.shapes) == 1 else None


def _has(*patterns: str) -> Callable[[_Content], bool]:
    rx = [re.compile(p) for p in patterns]
    return lambda c: any(r.search(k) for k in c.shapes for r in rx)


def _single_token(c: _Content) -> bool:
    """diffusers' format: one tensor (D,) or (N, D) named after its token, '<token>' by convention."""
    o = _only(c)
    if o is None or _is_tensor(c.obj) or len(o[1]) not in (1, 2):
        return False
    key, shape = o
    return key.startswith("<") or (len(shape) == 2 and shape[0] > 1)


def _unnamed_list(c: _Content) -> bool:
    return isinstance(c.obj, (list, tuple)) and len(c.obj) > 0 and all(_is_tensor(t) for t in c.obj)


def _list_lora(c: _Content) -> dict:
    return dict(kind="lora", format="lora-diffusion-list", dtype=_dtype_name(c.obj[0].dtype), tensors=len(c.obj),
                detail=f"a bare list of {len(c.obj)} unnamed tensors (old lora_diffusion output): without names it "
                "cannot be mapped to the model's layers")


def _ip_adapter(c: _Content) -> dict:
    from stylegrad.addons.ipadapter.shapes import adapter_shape

    try:
        shape = adapter_shape(c.shapes, c.name)
    except StylegradError as e:
        return dict(kind="ip-adapter", format=c.container, detail=str(e))
    return dict(kind="ip-adapter", format=shape.variant, family=shape.family, width=shape.image_width,
                dtype=next(iter(c.dtypes.values()), None), detail=shape.describe() + ": a reference-picture adapter "
                "(generate --ip-adapter), not a style")


def _is_ip_adapter(c: _Content) -> bool:
    from stylegrad.addons.ipadapter.shapes import is_ip_adapter

    return is_ip_adapter(c.shapes)


def _is_hypernetwork(c: _Content) -> bool:
    """A1111's hypernetwork: a dict whose integer keys (context widths) hold pairs of module state dicts."""
    if not isinstance(c.obj, dict):
        return False
    widths = [v for k, v in c.obj.items() if isinstance(k, int) and not isinstance(k, bool)]
    return bool(widths) and all(isinstance(v, (list, tuple)) and len(v) == 2 and all(isinstance(m, dict) for m in v)
                                for v in widths)


def _hypernetwork(c: _Content) -> dict:
    from stylegrad.addons.hypernetworks.formats import from_payload

    try:
        f = from_payload(c.obj, Path(c.name))
    except StylegradError as e:
        return dict(kind="hypernetwork", format="a1111", detail=f"an A1111 hypernetwork that cannot be used: {e}")
    return dict(kind="hypernetwork", format="novelai" if f.novelai else "a1111",
                name=f.settings.name, step=f.settings.step or None, dtype=next(iter(c.dtypes.values()), None),
                detail=f"an A1111 hypernetwork ({f.describe()}): generate --hypernetwork FILE:MULT or "
                "<hypernet:NAME:MULT> in a prompt, not a style")


# (test, describe): the first rule whose test matches describes the file
RULES: list[tuple[Callable[[_Content], bool], Callable[[_Content], dict]]] = [
    (lambda c: STYLE_KEY in c.shapes and _is_vector_shape(c.shapes[STYLE_KEY]),
     _style("stylegrad", STYLE_KEY, "stylegrad style")),
    (lambda c: c.metadata.get("format") == STYLE_FORMAT and {"clip_l", "clip_g"} <= set(c.shapes), _sdxl_style),
    (lambda c: isinstance(c.obj, dict) and "string_to_param" in c.obj and
     any(k.startswith("string_to_param.") for k in c.shapes),
     lambda c: _textual_inversion("a1111", next(k for k in c.shapes if k.startswith("string_to_param.")))(c)),
    (lambda c: "emb_params" in c.shapes, _textual_inversion("kohya", "emb_params")),
    (lambda c: "clip_l" in c.shapes and "clip_g" in c.shapes, _ti_sdxl),
    (_is_ip_adapter, _ip_adapter),
    (_is_hypernetwork, _hypernetwork),
    (_has(r"^(unet|text_encoder):\d+:(up|down)$"), _lora("lora-diffusion", "a cloneofsimo lora_diffusion LoRA")),
    (_has(r"\.hada_w1_a$", r"\.hada_t1$"), _lora("lycoris-loha", "a LyCORIS LoHa")),
    (_has(r"\.lokr_w1(_a)?$"), _lora("lycoris-lokr", "a LyCORIS LoKr")),
    (_has(r"^lora_(unet|te\d?)_.*\.diff$"), _lora("lycoris-full", "a LyCORIS full-weight difference")),
    (_has(r"^lora_(unet|te\d?)_.*\.on_input$"), _lora("lycoris-ia3", "a LyCORIS IA3")),
    (lambda c: _has(r"\.lora_mid\.weight$")(c) or "lycoris" in c.metadata.get("ss_network_module", ""),
     _lora("lycoris-locon", "a LyCORIS LoCon")),
    (_has(r"^lora_(unet|te\d?)_.*\.lora_(down|up)\.weight$"), _lora("kohya", "a kohya LoRA")),
    (_has(r"\.processor\.[a-z_]+_lora\.(down|up)\.weight$"),
     _lora("diffusers-attn-procs", "a diffusers attention-processor LoRA")),
    (_has(r"^(unet|text_encoder(_2)?|transformer)\..*(lora_[AB]|lora\.(down|up))\.weight$"),
     _lora("diffusers", "a diffusers LoRA")),
    (_has(r"\.lora_[AB](\.[a-z_]+)?\.weight$"), _lora("peft", "a PEFT LoRA")),
    (_has(r"^(state_dict\.)?(model\.diffusion_model|first_stage_model|cond_stage_model|conditioner\.embedders)\."),
     _checkpoint),
    (_has(r"^(down_blocks|up_blocks|mid_block|encoder\.down_blocks|text_model\.encoder)\."), _diffusers_weights),
    (_single_token, lambda c: {**_textual_inversion("diffusers", _only(c)[0])(c), "name": _only(c)[0]}),
    (lambda c: (o := _only(c)) is not None and _is_vector_shape(o[1]),
     lambda c: _style("a1111", _only(c)[0], "a bare tensor" if _is_tensor(c.obj)
                      else f"a single tensor '{_only(c)[0]}'")(c)),
    (_unnamed_list, _list_lora),
]


def _describe_unmatched(c: _Content) -> dict:
    if not c.shapes:
        what = type(c.obj).__name__ if c.obj is not None else "nothing"
        return dict(kind="other", format=c.container, detail=f"it holds a {what}, not a tensor")
    if len(c.shapes) == 1:
        key, shape = _only(c)
        return dict(kind="other", format=c.container, shape=list(shape), dtype=c.dtypes[key],
                    detail=f"a tensor of shape {tuple(shape)}, not one style vector"
                    + (f" ({shape[0]} vectors: unaveraged image features?)" if len(shape) == 2 else ""))
    examples = ", ".join(f"'{k}'" for k in list(c.shapes)[:3])
    return dict(kind="other", format=c.container,
                detail=f"a state dict with {len(c.shapes)} tensors ({examples}...), not an aesthetic embedding")


_IMAGES = {"png": "PNG", "jpeg": "JPEG", "gif": "GIF", "webp": "WebP"}


def _recognize(path: Path) -> tuple[FileInfo, _Content | None, str | None]:
    """(info, opened content, key of the style vector or None)."""
    def other(fmt, detail):
        return FileInfo(str(path), "other", fmt, False, detail), None, None

    sniffed = _sniff(path)
    if sniffed in _IMAGES:
        return FileInfo(str(path), "image", sniffed, False, f"a {_IMAGES[sniffed]} image, not a style "
                        "(make a style from images with `stylegrad embed`)"), None, None
    if sniffed == "empty":
        return other(None, "the file is empty")
    if sniffed == "json":
        text = path.read_bytes()[:1 << 20].decode("utf-8", "replace")
        hint = " (a PEFT adapter config: its weights sit beside it in adapter_model.safetensors)" \
            if '"peft_type"' in text else ""
        return other("json", f"JSON text, not a model file{hint}")
    if sniffed == "text":
        return other("text", "a text file, not a model file")
    if sniffed == "unknown":
        return other(None, "not a file format stylegrad reads (no safetensors, torch or image signature)")
    if sniffed == "safetensors":
        try:
            content = _open_safetensors(path)
        except (ValueError, struct.error, json.JSONDecodeError, UnicodeDecodeError) as e:
            return other("safetensors", f"not a readable safetensors file ({type(e).__name__}); truncated or corrupt?")
    else:
        from stylegrad.files.pickles import NotATorchFile, UnsafePickle

        try:
            content = _open_pickle(path)
        except UnsafePickle as e:
            return other("torch", f"a pickle that asks for Python code or objects ({e}); stylegrad loads plain "
                         "tensors only and does not unpickle anything else")
        except NotATorchFile as e:
            what = "zip archive" if sniffed == "zip" else "pickle"
            return other(sniffed, f"a {what} that is not a readable torch file ({e}); truncated or corrupt?")
        except (ValueError, struct.error, UnicodeDecodeError) as e:
            return other("safetensors", f"not a readable safetensors file ({type(e).__name__}); truncated or corrupt?")
    content.name = path.name
    for test, describe in RULES:
        if test(content):
            fields = describe(content)
            break
    else:
        fields = _describe_unmatched(content)
    key = fields.pop("_vector", None)
    fields.setdefault("usable", False)
    kind, fmt, usable, detail = fields.pop("kind"), fields.pop("format"), fields.pop("usable"), fields.pop("detail")
    info = FileInfo(str(path), kind, fmt, usable, detail, metadata=dict(content.metadata), **fields)
    info.tensors = info.tensors or len(content.shapes)
    if info.kind == "textual-inversion":
        info.trigger = path.stem
    return info, content, key


def _vector_values(content: _Content, key: str) -> list[float]:
    """The style vector's values as float32 holds them: from the file's bytes for a safetensors float vector, so
    ``info`` on a style never imports torch; through torch otherwise."""
    values = float_values(content.header, key) if content.header is not None else None
    if values is None:
        values = content.read(key).detach().reshape(-1).float().tolist()
    return values


def inspect_file(path: str | os.PathLike) -> FileInfo:
    """What a file is and whether it can be used as a style."""
    info, content, key = open_file(path)
    return info


def open_file(path: str | os.PathLike) -> tuple[FileInfo, _Content | None, str | None]:
    """``inspect_file`` plus the opened content and the key of the style vector, for the loaders."""
    p = Path(path).expanduser()
    if not p.exists():
        raise StylegradError(f"no such file: {p}")
    if p.is_dir():
        raise StylegradError(f"{p} is a folder, not a file")
    try:
        info, content, key = _recognize(p)
    except OSError as e:
        raise StylegradError(f"cannot read {p}: {e.strerror or e}") from e
    if key is not None:
        values = _vector_values(content, key)
        if not all(math.isfinite(v) for v in values):
            info.usable, info.detail = False, f"{info.detail} with NaN or infinite values"
        else:
            info.norm = float32_norm(values)
            if info.norm == 0.0:
                info.usable, info.detail = False, f"{info.detail} that is all zeros (no direction)"
    if info.metadata.get("format") == STYLE_FORMAT and info.format != "stylegrad-sdxl":
        info.detail = "stylegrad style"
    return info, content, key
