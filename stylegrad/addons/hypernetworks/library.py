"""Hypernetworks by name: ``--hypernetwork FILE_OR_NAME[:MULT]`` and the prompt's ``<hypernet:NAME:MULT>`` tags,
resolved inside the hypernetwork folders only (``--hypernetworks DIR``, ``$STYLEGRAD_HYPERNETWORKS_DIR``; A1111's
``models/hypernetworks``), by file stem; hashed as A1111 hashes them (the first 10 hex digits of the file's
sha256)."""

from __future__ import annotations

import math
import os
from pathlib import Path

from stylegrad.errors import StylegradError
from stylegrad.files.folders import NamedFiles, given_or_env

EXTENSIONS = (".pt", ".pth", ".ckpt", ".bin")  # A1111 lists *.pt; ComfyUI's folder takes the other pickles too
ENV = "STYLEGRAD_HYPERNETWORKS_DIR"
MAX_MULTIPLIER = 10.0


def parse_hypernetwork_arg(text: str) -> tuple[str, float]:
    """``FILE_OR_NAME[:MULT]`` -> (file or name, multiplier; 1 when not given)."""
    name, sep, last = text.rpartition(":")
    if sep:
        try:
            return name, float(last)
        except ValueError:
            pass
    return text, 1.0


def check_multiplier(value: float, what: str) -> float:
    if not math.isfinite(value) or abs(value) > MAX_MULTIPLIER:
        raise StylegradError(f"{what}: the multiplier must be a number in -{MAX_MULTIPLIER:g}..{MAX_MULTIPLIER:g}")
    return value


class HypernetworkLibrary(NamedFiles):
    what = "hypernetwork"
    extensions = EXTENSIONS
    order = staticmethod(lambda p: str(p).lower())

    def __init__(self, folders: list[str] | None = None):
        super().__init__(given_or_env(folders, ENV))

    def keeps(self, path: Path, folder: Path) -> bool:
        return path.stem != "None"  # A1111 skips None.pt

    def names(self) -> list[str]:
        return sorted(self._scan(), key=str.lower)

    def listing(self) -> dict[str, Path]:
        return dict(sorted(self._scan().items(), key=lambda kv: kv[0].lower()))

    def specs(self, args) -> list[tuple[str, float]]:
        """``--hypernetwork`` arguments -> (file, multiplier); a missing one is an error."""
        out = []
        for arg in args:
            name, mult = parse_hypernetwork_arg(arg)
            path = self.resolve(name)
            if path is None:
                where = ", ".join(map(str, self.folders)) or "(none set: hypernetworks_dirs)"
                raise StylegradError(f"hypernetwork not found: {name} (not a file, nor a name in the hypernetwork "
                                     f"folders {where})")
            out.append((str(path), check_multiplier(mult, f"hypernetwork {name}")))
        return out


def hypernetwork_hash(path: str | os.PathLike) -> str:
    """A1111's short hash of a hypernetwork (``Hypernetwork.shorthash``): sha256 of the whole file, 10 digits."""
    from stylegrad.files.hashes import short_hash

    return short_hash(path)
