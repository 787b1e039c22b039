"""A models folder as A1111 keeps one (``models/Stable-diffusion``): checkpoints picked by file stem, listed with
their family, size and A1111's short hash."""

from __future__ import annotations

import os
import struct
from dataclasses import asdict, dataclass
from pathlib import Path

from stylegrad.checkpoints.families import (
    CHECKPOINT_SUFFIXES,
    VAE_SUFFIXES,
    CheckpointKind,
    classify,
    strip_wrapper,
)
from stylegrad.errors import RequestError, StylegradError
from stylegrad.families import Family
from stylegrad.files.safetensors_header import DTYPES, read_header

MODELS_DIR_ENV = "STYLEGRAD_MODELS_DIR"


def models_dir(given: str | os.PathLike | None = None) -> Path | None:
    """``--models-dir`` if given, else ``$STYLEGRAD_MODELS_DIR``, else none."""
    value = given or os.environ.get(MODELS_DIR_ENV)
    if not value:
        return None
    folder = Path(value).expanduser()
    if not folder.is_dir():
        raise StylegradError(f"models folder not found: {folder}")
    return folder


def _candidates(folder: Path) -> list[Path]:
    files = [p for p in folder.rglob("*") if p.is_file() and p.suffix.lower() in CHECKPOINT_SUFFIXES
             and not p.name.lower().endswith(VAE_SUFFIXES) and not p.name.startswith(".")]
    return sorted(files)


def resolve_model(model: str, folder: str | os.PathLike | None = None) -> str:
    """What ``--model`` names: an existing path as is; else a checkpoint in the models folder whose stem (or name,
    or path inside the folder) is ``model``; else ``model`` unchanged (a hub id)."""
    if Path(model).expanduser().exists():
        return str(Path(model).expanduser())
    root = models_dir(folder)
    bare = "/" not in model and "\\" not in model  # hub ids are owner/name
    if root is None:
        if bare:
            raise RequestError("models_dir", f"model '{model}' is not a file, a folder or a hub id; to pick a "
                               f"checkpoint by name give a models folder as {{field}} (or set {MODELS_DIR_ENV})")
        return model
    wanted = model.lower()
    matches = [p for p in _candidates(root) if wanted in (p.stem.lower(), p.name.lower(),
                                                          str(p.relative_to(root)).lower(),
                                                          str(p.relative_to(root).with_suffix("")).lower())]
    if len(matches) > 1:  # the same stem twice: prefer safetensors, as A1111 lists both and users pick the safe one
        safe = [p for p in matches if p.suffix == ".safetensors"]
        matches = safe if len(safe) == 1 else matches
    if len(matches) > 1:
        names = ", ".join(str(p.relative_to(root)) for p in matches)
        raise StylegradError(f"'{model}' matches several files in {root}: {names}; name one of them")
    if not matches and bare:
        raise StylegradError(f"no checkpoint named '{model}' in {root} (stylegrad models lists them)")
    return str(matches[0]) if matches else model


@dataclass
class ModelEntry:
    name: str
    path: str
    family: str | None
    variant: str
    size_mb: float
    hash: str | None
    usable: bool
    detail: str

    def as_dict(self) -> dict:
        return asdict(self)


def list_models(folder: str | os.PathLike | None = None, hashes: bool = True, progress=None) -> list[ModelEntry]:
    """Every checkpoint file in the models folder; files that are something else (a LoRA saved there by mistake)
    are listed as not usable, with what they are."""
    from stylegrad.files.hashes import short_hash

    root = models_dir(folder)
    if root is None:
        raise RequestError("models_dir", f"no models folder: give one as {{field}} or set {MODELS_DIR_ENV}")
    entries = []
    files = _candidates(root)
    for p in progress(files) if progress else files:
        try:
            kind = checkpoint_kind(p)
            family, variant = kind.family, kind.variant
            usable, detail = kind.refusal is None, kind.refusal or kind.label
        except StylegradError as e:
            family, variant, usable, detail = None, "-", False, str(e).split(": ", 1)[-1]
        entries.append(ModelEntry(p.stem, str(p), family, variant, round(p.stat().st_size / 2**20, 1),
                                  short_hash(p) if hashes else None, usable, detail))
    return entries


def checkpoint_kind(path: Path) -> CheckpointKind:
    """What a checkpoint file holds, as ``loading.open_checkpoint`` says it (the same refusals), but from a
    safetensors header alone: listing a folder of multi-GB files reads a few KB of each and never imports torch.
    Pickles (.ckpt/.pt) are opened through torch's weights_only reader."""
    with open(path, "rb") as f:
        head = f.read(9)
    if len(head) < 9 or head[8:9] != b"{":
        from stylegrad.checkpoints.loading import open_checkpoint

        tf, _, kind = open_checkpoint(path)
        tf.close()
        return kind
    try:
        header = read_header(path)
    except (struct.error, ValueError, UnicodeDecodeError) as e:
        raise StylegradError(f"{path} is not a readable safetensors file ({type(e).__name__})") from e
    for key, entry in header.entries.items():
        if entry["dtype"] not in DTYPES:
            raise StylegradError(f"{path}: tensor {key} has dtype {entry['dtype']}, which stylegrad does not read")
    if header.data_end() > path.stat().st_size:
        raise StylegradError(f"{path} is truncated (its header points past the end of the file)")
    shapes = header.shapes
    prefix = strip_wrapper(shapes)
    return classify({k[len(prefix):]: s for k, s in shapes.items() if k.startswith(prefix)})


def family_name(family: str | None) -> str:
    return Family(family).label if family else "-"
