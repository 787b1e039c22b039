"""Where a batch writes: a local folder (every node of a cluster mounting it at the same path) or an fsspec URL
(``s3://``, ``gs://``, ``file://``... with the filesystem's package installed). Files appear whole or not at all,
so a file that exists is done."""

from __future__ import annotations

import os
import uuid
from pathlib import Path

from stylegrad.errors import StylegradError
from stylegrad.files.atomic import atomic_write


class Storage:
    def __init__(self, root: str | os.PathLike):
        self.root = str(root)
        self.remote = "://" in self.root
        if self.remote:
            try:
                import fsspec
            except ImportError:
                raise StylegradError(f"writing to {self.root} needs fsspec (pip install fsspec and the filesystem's "
                                     "package, e.g. s3fs)") from None
            try:
                self.fs, self.base = fsspec.core.url_to_fs(self.root)
            except (ImportError, ValueError) as e:
                raise StylegradError(f"cannot open {self.root}: {e}") from None

    def __reduce__(self):  # sent to workers by its root; each opens its own filesystem
        return (Storage, (self.root,))

    def _path(self, rel: str) -> str:
        return f"{self.base.rstrip('/')}/{rel}" if self.remote else str(Path(self.root) / rel)

    def exists(self, rel: str) -> bool:
        return self.fs.exists(self._path(rel)) if self.remote else Path(self._path(rel)).exists()

    def read_text(self, rel: str) -> str | None:
        if not self.exists(rel):
            return None
        if self.remote:
            return self.fs.cat_file(self._path(rel)).decode("utf-8")
        return Path(self._path(rel)).read_text(encoding="utf-8")

    def write(self, rel: str, data: bytes) -> None:
        """Atomically: a temporary name, then renamed (object stores put whole objects)."""
        if not self.remote:
            atomic_write(Path(self._path(rel)), data)
            return
        final = self._path(rel)
        self.fs.makedirs(final.rsplit("/", 1)[0], exist_ok=True)
        protocols = self.fs.protocol if isinstance(self.fs.protocol, tuple) else (self.fs.protocol,)
        if set(protocols) & {"s3", "s3a", "gs", "gcs", "az", "abfs", "adl"}:  # a put is whole already
            self.fs.pipe_file(final, data)
            return
        tmp = f"{final.rsplit('/', 1)[0]}/.{final.rsplit('/', 1)[1]}.{uuid.uuid4().hex}.tmp"
        self.fs.pipe_file(tmp, data)
        self.fs.mv(tmp, final)

    def local_path(self, rel: str) -> Path | None:
        return None if self.remote else Path(self._path(rel))

    def clean_partial(self) -> None:
        """Temporary files a killed run left behind."""
        if not self.remote:
            for stale in Path(self.root).glob("images/**/.*.tmp"):
                stale.unlink(missing_ok=True)

    def __str__(self) -> str:
        return self.root
