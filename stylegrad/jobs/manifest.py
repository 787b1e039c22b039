"""What a batch folder was made with, written before the first image: a rerun with the same settings resumes, a
rerun with other settings into the same folder is refused (else old images would pass for new ones)."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

from stylegrad.errors import StylegradError
from stylegrad.files.atomic import atomic_write

MANIFEST = "manifest.json"


def _differences(old: Any, new: Any, path: str = "") -> list[str]:
    if isinstance(old, dict) and isinstance(new, dict):
        out = []
        for k in list(old) + [k for k in new if k not in old]:
            where = f"{path}.{k}" if path else str(k)
            if k not in old:
                out.append(f"{where} (new)")
            elif k not in new:
                out.append(f"{where} (missing)")
            else:
                out += _differences(old[k], new[k], where)
        return out
    if isinstance(old, list) and isinstance(new, list) and len(old) == len(new):
        return [d for i, (a, b) in enumerate(zip(old, new)) for d in _differences(a, b, f"{path}[{i}]")]
    return [] if old == new else [f"{path}: {_short(old)} -> {_short(new)}"]


def _short(v: Any) -> str:
    text = json.dumps(v)
    return text if len(text) <= 60 else text[:57] + "..."


def check_manifest(out: Path, settings: dict[str, Any], write: bool = True) -> None:
    """For an existing folder, refuse settings that differ from its manifest; for a new one, write it (unless
    ``write`` is False: a check before anything is loaded)."""
    path = Path(out) / MANIFEST
    settings = json.loads(json.dumps(settings))  # as it would read back
    if path.is_file():
        try:
            old = json.loads(path.read_text(encoding="utf-8"))
        except (OSError, ValueError) as e:
            raise StylegradError(f"cannot read {path}: {e}") from e
        diffs = _differences(old, settings)
        if diffs:
            more = f" and {len(diffs) - 3} more" if len(diffs) > 3 else ""
            raise StylegradError(f"{out} holds a run with other settings ({'; '.join(diffs[:3])}{more}); "
                                 "use another output folder, or the same settings to resume")
        return
    if Path(out).is_dir() and any((Path(out) / "images").glob("**/*.png")):
        raise StylegradError(f"{out} holds images but no {MANIFEST}; use another output folder")
    if write:
        atomic_write(path, json.dumps(settings, indent=2).encode())
