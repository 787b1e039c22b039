"""IP-Adapter files by name, and the folders stylegrad looks in for them and their image encoders.

``--ip-adapter NAME`` is a file, or a file stem in the ipadapter folders: ``--ip-adapters DIR`` (repeatable) or
``$STYLEGRAD_IPADAPTER_DIR``, else the folders ComfyUI and A1111 keep them in beside the models folder
(``$STYLEGRAD_MODELS_DIR/../ipadapter``, ``../ControlNet``) where those exist. A name never leaves the folders.
No torch here: the server and ``stylegrad models``-like listings use it."""

from __future__ import annotations

import os
from pathlib import Path

from stylegrad.errors import StylegradError
from stylegrad.files.folders import NamedFiles

ENV = "STYLEGRAD_IPADAPTER_DIR"
EXTENSIONS = (".safetensors", ".bin", ".pt", ".pth")
_BESIDE_MODELS = ("ipadapter", "ControlNet")


def default_folders() -> list[Path]:
    """``$STYLEGRAD_IPADAPTER_DIR`` (os.pathsep-separated), else the models folder's ipadapter siblings."""
    env = os.environ.get(ENV)
    if env:
        return [Path(f).expanduser() for f in env.split(os.pathsep) if f]
    models = os.environ.get("STYLEGRAD_MODELS_DIR")
    if not models:
        return []
    parent = Path(models).expanduser().parent
    return [parent / name for name in _BESIDE_MODELS if (parent / name).is_dir()]


class AdapterLibrary(NamedFiles):
    what = "IP-Adapter"
    extensions = EXTENSIONS

    def __init__(self, folders: list[str] | None = None):
        super().__init__([Path(f).expanduser() for f in folders] if folders else default_folders())

    def keeps(self, path: Path, folder: Path) -> bool:
        return folder.name.lower() != "controlnet" or "ip" in path.name.lower()  # A1111's folder holds others

    def find(self, name: str) -> Path | None:
        return super().find(name) or (super().find(Path(name).stem) if Path(name).stem != name else None)

    def resolve(self, arg: str) -> Path:
        """``--ip-adapter``'s FILE_OR_NAME: an existing file, else a name in the folders; else one line."""
        found = super().resolve(arg)
        if found is None:
            where = ", ".join(map(str, self.folders)) or f"none set: --ip-adapters or ${ENV}"
            raise StylegradError(f"IP-Adapter not found: {arg} (not a file, nor a name in the ipadapter folders: "
                                 f"{where})")
        return found

    def clip_vision_folders(self, adapter: Path) -> list[Path]:
        """Where an adapter's image encoder may sit: beside it (h94's ``image_encoder``), a ``clip_vision``
        folder beside it or beside its folder (ComfyUI's ``models/clip_vision``), and those of the folders."""
        out = [adapter.parent / "image_encoder", adapter.parent / "clip_vision", adapter.parent.parent / "clip_vision"]
        for f in self.folders:
            out += [f / "image_encoder", f / "clip_vision", f.parent / "clip_vision"]
        return list(dict.fromkeys(out))  # those that exist are searched; all are named when none has it
