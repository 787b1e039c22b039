"""Replaying a PNG: the request a stylegrad (or A1111) image records, read back for ``generate --from``, with a
note for each thing the image asks for that cannot be had here."""

from __future__ import annotations

from dataclasses import replace
from pathlib import Path

from stylegrad.errors import StylegradError
from stylegrad.files.infotext import parse_infotext
from stylegrad.files.pnginfo import read_generation_info
from stylegrad.files.styles import load_style
from stylegrad.notes import note
from stylegrad.pipelines.request import GenerationRequest, expected_style_digest, foreign_notes, request_from_infotext


def request_from_png(path: str | Path, embeddings_dirs: list[str] | None = None, loras_dirs: list[str] | None = None,
                     *, ipadapter_dirs: list[str] | None = None, hypernetworks_dirs: list[str] | None = None,
                     **overrides) -> GenerationRequest:
    """The request a stylegrad PNG records (an A1111 PNG gives its settings), with ``overrides`` (e.g. ``model=``,
    ``style=``) that are not None. What the image asks for and cannot be had here (a sampler with no equivalent,
    a LoRA or embedding missing from the folders or different from the one used) is noted, one line each."""
    info = read_generation_info(path)
    if info is None or info.tool not in ("stylegrad", "automatic1111"):
        raise StylegradError(f"{path} has no generation parameters stylegrad can regenerate from")
    request = request_from_infotext(info.raw)
    for line in foreign_notes(info.raw) + _addon_notes(info.raw, embeddings_dirs, loras_dirs) + \
            _hypernetwork_notes(request.prompt, info.raw, hypernetworks_dirs):
        note(f"{Path(path).name}: {line}")
    changes = {k: v for k, v in overrides.items() if v is not None}
    if "style" in changes and request.style is None:
        raise StylegradError(f"{path} was made without a style, so a style cannot replace its own")
    request = replace(request, **changes)
    if request.ip_adapter is not None:  # its file by path or name, its pictures and their hashes
        from stylegrad.addons.ipadapter.replay import replay_ip_adapter

        request, ip_notes = replay_ip_adapter(request, parse_infotext(info.raw)[2], ipadapter_dirs)
        for line in ip_notes:
            note(f"{Path(path).name}: {line}")
    if request.style is not None:
        digest = expected_style_digest(info.raw)
        style = load_style(request.style)
        if digest and style.digest != digest:
            raise StylegradError(f"style file {request.style} is not the one {path} was made with "
                                 f"(hash {style.digest}, the image records {digest})")
    return request


def _recorded(value: str | None) -> dict[str, str]:
    """A1111's 'name: hash, name: hash' fields."""
    return dict(part.rsplit(": ", 1) for part in (value or "").split(", ") if ": " in part)


def _addon_notes(text: str, embeddings_dirs, loras_dirs) -> list[str]:
    from stylegrad.addons.embeddings import EmbeddingLibrary
    from stylegrad.addons.lora.library import LoraLibrary, lora_hash

    _, _, f = parse_infotext(text)
    notes = []
    embeddings, loras = EmbeddingLibrary(embeddings_dirs), LoraLibrary(loras_dirs)
    for name, digest in _recorded(f.get("TI hashes")).items():
        e = embeddings.get(name)
        if e is None:
            notes.append(f"embedding '{name}' is not in the embeddings folders: its word is read as plain text")
        elif e.short_hash != digest:
            notes.append(f"embedding '{name}' differs from the one the image was made with ({e.short_hash}, "
                         f"the image records {digest})")
    for name, digest in _recorded(f.get("Lora hashes")).items():
        found = loras.find(name)
        if found is not None and lora_hash(found) != digest:
            notes.append(f"LoRA '{name}' differs from the one the image was made with ({lora_hash(found)}, the "
                         f"image records {digest})")
    return notes


def _hypernetwork_notes(prompt: str, text: str, dirs) -> list[str]:
    """The prompt's hypernetworks (old A1111 'Hypernet' lines are tags by now) missing from the folders, or not the
    files the image records ('Hypernet hashes': A1111's short hash)."""
    from stylegrad.addons.hypernetworks.library import HypernetworkLibrary, hypernetwork_hash
    from stylegrad.prompts.syntax import hypernet_tags

    library, recorded = HypernetworkLibrary(dirs), _recorded(parse_infotext(text)[2].get("Hypernet hashes"))
    notes = []
    for tag in hypernet_tags(prompt):
        found = library.find(tag.name)
        if found is None:
            notes.append(f"hypernetwork '{tag.name}' is not in the hypernetwork folders: generated without it")
        elif recorded.get(tag.name, hypernetwork_hash(found)) != hypernetwork_hash(found):
            notes.append(f"hypernetwork '{tag.name}' differs from the one the image was made with "
                         f"({hypernetwork_hash(found)}, the image records {recorded[tag.name]})")
    return notes


def recorded_precision(path: str | Path) -> tuple[str | None, str | None]:
    """(device type, dtype name) a stylegrad PNG was made with, None for what it does not record (A1111's, older
    ones): ``generate --from`` uses them unless told otherwise, since fp16 and fp32 give different pixels."""
    info = read_generation_info(path)
    if info is None:
        return None, None
    _, _, f = parse_infotext(info.raw)
    return f.get("Device") or None, f.get("Dtype") or None
