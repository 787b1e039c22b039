"""A1111's short model hash (the first 10 hex digits of the file's sha256), computed once per file version."""

from __future__ import annotations

import hashlib
import json
import os
from pathlib import Path

from stylegrad.files.atomic import atomic_write


def _cache_file() -> Path:
    root = os.environ.get("STYLEGRAD_CACHE") or os.path.join(os.environ.get("XDG_CACHE_HOME", "~/.cache"), "stylegrad")
    return Path(root).expanduser() / "hashes.json"


def sha256_file(path: str | os.PathLike, offset: int = 0) -> str:
    """The file's sha256 (of its bytes from ``offset`` on), cached by (absolute path, size, mtime): a multi-GB
    checkpoint is read once."""
    p = Path(path).resolve()
    stat = p.stat()
    key = f"{p}|{stat.st_size}|{stat.st_mtime_ns}" + (f"|{offset}" if offset else "")
    cache_path = _cache_file()
    try:
        cache = json.loads(cache_path.read_text(encoding="utf-8"))
    except (OSError, ValueError):
        cache = {}
    if key in cache:
        return cache[key]
    digest = hashlib.sha256()
    with open(p, "rb") as f:
        f.seek(offset)
        for block in iter(lambda: f.read(1 << 20), b""):
            digest.update(block)
    cache[key] = digest.hexdigest()
    try:
        atomic_write(cache_path, json.dumps(cache, indent=0).encode())
    except Exception:  # a read-only cache folder costs a re-hash next time, nothing more
        pass
    return cache[key]


def short_hash(path: str | os.PathLike) -> str:
    """A1111's ``Model hash`` / ``TI hashes`` / ``Lora hashes`` value."""
    return sha256_file(path)[:10]
