"""The world-wide models a benchmark trains once (IP-Adapter, Stylecodes) are cached in a folder named after their
settings; a process training one leaves its pid there, so a second run wanting the same model waits for it rather
than training it twice on the same few cores."""

from __future__ import annotations

import os
import time
from pathlib import Path

PID = "training.pid"


def _alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    return True


def wait_for_other(folder: Path, poll: float = 10.0) -> None:
    """Return once no other live process is training into ``folder``."""
    marker = Path(folder) / PID
    while marker.is_file():
        try:
            pid = int(marker.read_text().strip() or 0)
        except (OSError, ValueError):
            return
        if pid == os.getpid() or not _alive(pid):
            return
        time.sleep(poll)


def claim(folder: Path) -> Path:
    """Mark ``folder`` as being trained into by this process."""
    folder = Path(folder)
    folder.mkdir(parents=True, exist_ok=True)
    (folder / PID).write_text(str(os.getpid()))
    return folder / PID
