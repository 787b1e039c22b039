"""Loading from the Hugging Face Hub or a local folder, with one-line errors when a model is not available."""

from __future__ import annotations

import os
from pathlib import Path

from stylegrad.errors import StylegradError, first_line


def from_pretrained(cls, name_or_path: str, what: str = "model", **kwargs):
    """``cls.from_pretrained`` that turns 'not downloaded / not found' into a StylegradError naming the id."""
    path = Path(name_or_path).expanduser()
    if path.exists():
        name_or_path = str(path)
    elif name_or_path.startswith((".", "/", "~")) or name_or_path.count("/") > 1:
        raise StylegradError(f"{what} folder not found: {name_or_path}")
    try:
        return cls.from_pretrained(name_or_path, **kwargs)
    except (OSError, ValueError) as e:
        raise StylegradError(explain_unavailable(name_or_path, what, e)) from e


def explain_unavailable(name: str, what: str, error: Exception) -> str:
    """One line saying why ``name`` could not be had, and what to do about it."""
    if Path(name).exists():
        return f"{what} at {name} could not be loaded: {first_line(error, 200)}"
    offline = os.environ.get("HF_HUB_OFFLINE", "0") not in ("", "0", "false", "False")
    how = (
        f"download it once with network access (`hf download {name}`), or pass a local folder"
        if offline
        else f"check the id, your network and access rights (`hf download {name}`), or pass a local folder"
    )
    return f"{what} '{name}' is not available{' offline' if offline else ''}: {how}"
