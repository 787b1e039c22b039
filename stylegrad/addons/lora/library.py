"""LoRAs by name: ``--lora FILE_OR_NAME:W`` and the prompt's ``<lora:NAME:W>`` tags, resolved inside the LoRA
folders only (``--loras DIR``, ``$STYLEGRAD_LORAS_DIR``; A1111's ``models/Lora``), by file stem."""

from __future__ import annotations

import os
from pathlib import Path

from stylegrad.errors import StylegradError
from stylegrad.files.folders import NamedFiles, given_or_env
from stylegrad.files.hashes import sha256_file

EXTENSIONS = (".safetensors", ".pt", ".ckpt", ".bin")
ENV = "STYLEGRAD_LORAS_DIR"


def parse_lora_arg(text: str) -> tuple[str, float, float]:
    """``FILE_OR_NAME[:TE[:UNET]]`` -> (file or name, text-encoder multiplier, UNet multiplier)."""
    parts = text.split(":")
    numbers: list[float] = []
    while len(parts) > 1 and len(numbers) < 2:
        try:
            numbers.insert(0, float(parts[-1]))
        except ValueError:
            break
        parts.pop()
    te = numbers[0] if numbers else 1.0
    unet = numbers[1] if len(numbers) > 1 else te
    return ":".join(parts), te, unet


class LoraLibrary(NamedFiles):
    what = "LoRA"
    extensions = EXTENSIONS

    def __init__(self, folders: list[str] | None = None):
        super().__init__(given_or_env(folders, ENV))

    def specs(self, args) -> list[tuple[str, float, float]]:
        """``--lora`` arguments -> (file, text-encoder multiplier, UNet multiplier); a missing one is an error."""
        out = []
        for arg in args:
            name, te, unet = parse_lora_arg(arg)
            path = self.resolve(name)
            if path is None:
                where = ", ".join(map(str, self.folders)) or "(none set: loras_dirs)"
                raise StylegradError(f"LoRA not found: {name} (not a file, nor a name in the LoRA folders {where})")
            out.append((str(path), te, unet))
        return out


def lora_hash(path: str | os.PathLike) -> str:
    """A1111's ``Lora hashes`` value: the first 12 hex digits of the sha256 of a safetensors file's tensor data
    (the header skipped, sd-webui-additional-networks' hash), or of the whole file for other formats."""
    p = Path(path)
    if p.suffix.lower() == ".safetensors":
        with open(p, "rb") as f:
            n = int.from_bytes(f.read(8), "little")
        return sha256_file(p, offset=8 + n)[:12]
    return sha256_file(p)[:12]
