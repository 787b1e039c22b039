"""Files found by name in folders, as A1111 and ComfyUI keep add-ons (``models/Lora``, ``models/hypernetworks``,
``models/ipadapter``): a name is a file's stem anywhere under the folders, the first found wins, and a name is
never a path, so a prompt's tag or an API request cannot reach outside them. No torch here: the server's lists
and ``stylegrad --help`` use it."""

from __future__ import annotations

import os
from pathlib import Path

from stylegrad.errors import StylegradError


def given_or_env(folders: list[str] | None, env: str) -> list[Path]:
    """The folders given, else ``$ENV`` (one folder)."""
    if folders:
        return [Path(f).expanduser() for f in folders]
    value = os.environ.get(env)
    return [Path(value).expanduser()] if value else []


class NamedFiles:
    """One kind of add-on's folders. Subclasses set ``what`` (how errors name them) and ``extensions``, and may
    narrow ``keeps`` or ``order`` (the scan's sort key)."""

    what = "file"
    extensions: tuple[str, ...] = ()

    def __init__(self, folders: list[Path]):
        self.folders = list(folders)
        for f in self.folders:
            if not f.is_dir():
                raise StylegradError(f"{self.what} folder not found: {f}")
        self._found: dict[str, Path] | None = None

    def keeps(self, path: Path, folder: Path) -> bool:
        return True

    order = None  # sorted(key=order) over each folder's paths

    def _scan(self) -> dict[str, Path]:
        if self._found is None:
            self._found = {}
            for folder in self.folders:
                for p in sorted(folder.rglob("*"), key=self.order):
                    if p.suffix.lower() in self.extensions and p.is_file() and self.keeps(p, folder):
                        self._found.setdefault(p.stem, p)
        return self._found

    def names(self) -> list[str]:
        return sorted(self._scan())

    def find(self, name: str) -> Path | None:
        """A tag's name -> its file in the folders (a name is never a path: no traversal out of them)."""
        if "/" in name or "\\" in name or name in ("", ".", ".."):
            return None
        return self._scan().get(name)

    def resolve(self, arg: str) -> Path | None:
        """A FILE_OR_NAME argument: an existing file, else a name in the folders."""
        p = Path(arg).expanduser()
        return p if p.is_file() else self.find(arg)
