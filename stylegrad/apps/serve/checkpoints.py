"""The models folder's checkpoints as A1111 lists them (``/sdapi/v1/sd-models``) and as a client names one to switch
to (``sd_model_checkpoint``): by title ('name [hash]'), by name, by file name, or by its short or full hash.

The folder is read once and again on ``/sdapi/v1/refresh-checkpoints`` (as A1111 does), so listing a folder of
multi-GB files hashes each file once (the hash cache keeps it across restarts), not on every request."""

from __future__ import annotations

import threading
from dataclasses import dataclass
from pathlib import Path


@dataclass(frozen=True)
class Checkpoint:
    """One model as A1111's sd-models lists it: a file (with its hashes) or what else was loaded (a hub id, a
    diffusers folder: no hash)."""

    path: str
    sha256: str | None = None

    @property
    def name(self) -> str:
        return Path(self.path).stem or self.path or "model"

    @property
    def hash(self) -> str | None:
        return self.sha256[:10] if self.sha256 else None

    @property
    def title(self) -> str:
        return f"{self.name} [{self.hash}]" if self.hash else self.name

    def item(self) -> dict:
        return {"title": self.title, "model_name": self.name, "hash": self.hash, "sha256": self.sha256,
                "filename": self.path, "config": None}

    def answers_to(self, value: str) -> bool:
        """Whether a client's ``sd_model_checkpoint`` means this model."""
        names = {self.title, self.name, self.path, Path(self.path).name}
        hashes = {self.hash, self.sha256} - {None}
        return value in names or value.strip().lower() in hashes


def describe(model: str) -> Checkpoint:
    """The loaded model (a file is hashed once; the hash cache keeps it)."""
    from stylegrad.files.hashes import sha256_file

    return Checkpoint(model, sha256_file(model) if model and Path(model).is_file() else None)


class Checkpoints:
    """The usable checkpoint files of the models folder (none without one), listed once until ``refresh``."""

    def __init__(self, folder: str | None):
        self.folder = folder
        self._lock = threading.Lock()
        self._listed: list[Checkpoint] | None = None

    def refresh(self) -> list[Checkpoint]:
        """Read the folder again: files added, removed or changed since show as they are now."""
        found: list[Checkpoint] = []
        if self.folder:
            from stylegrad.checkpoints.library import list_models

            # files that are something else (a LoRA saved there by mistake) are not offered
            found = [describe(e.path) for e in list_models(self.folder, hashes=False) if e.usable]
        with self._lock:
            self._listed = found
        return found

    def listing(self) -> list[Checkpoint]:
        with self._lock:
            listed = self._listed
        return self.refresh() if listed is None else listed

    def find(self, value: str) -> Checkpoint | None:
        return next((c for c in self.listing() if c.answers_to(value)), None)
