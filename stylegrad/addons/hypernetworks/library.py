"""Hypernetworks by name: ``--hypernetwork FILE_OR_NAME[:MULT]`` and the prompt's ``<hypernet:NAME:MULT>`` tags,
resolved inside the hypernetwork folders only (``--hypernetworks DIR``, ``$STYLEGRAD_HYPERNETWORKS_DIR``; A1111's
``models/hypernetworks``), by file stem; hashed as A1111 hashes them (the first 10 hex digits of the file's
sha256)."""

from __future__ import annotations

import math
import os
from pathlib import Path

from stylegrad.errors import StylegradError

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


class HypernetworkLibrary:
    def __init__(self, folders: list[str] | None = None):
        self.folders = [Path(f).expanduser() for f in (folders or [])]
        env = os.environ.get(ENV)
        if env and not folders:
            self.folders.append(Path(env).expanduser())
        for f in self.folders:
            if not f.is_dir():
                raise StylegradError(f"hypernetwork folder not found: {f}")
        self._found: dict[str, Path] | None = None

    def _scan(self) -> dict[str, Path]:
        if self._found is None:
            self._found = {}
            for folder in self.folders:
                for p in sorted(folder.rglob("*"), key=lambda p: str(p).lower()):
                    if p.suffix.lower() in EXTENSIONS and p.is_file() and p.stem != "None":  # A1111 skips None.pt
                        self._found.setdefault(p.stem, p)
        return self._found

    def names(self) -> list[str]:
        return sorted(self._scan(), key=str.lower)

    def listing(self) -> dict[str, Path]:
        return dict(sorted(self._scan().items(), key=lambda kv: kv[0].lower()))

    def find(self, name: str) -> Path | None:
        """A tag's name -> its file in the folders (a name is never a path: no traversal out of them)."""
        if "/" in name or "\\" in name or name in ("", ".", ".."):
            return None
        return self._scan().get(name)

    def resolve(self, arg: str) -> Path | None:
        p = Path(arg).expanduser()
        return p if p.is_file() else self.find(arg)

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
