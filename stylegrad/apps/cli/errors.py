"""The CLI's error table (the ``hf`` CLI's pattern): each kind of exception a user can cause, as one line."""

from __future__ import annotations

from stylegrad.errors import StylegradError


def _first_line(e: BaseException) -> str:
    text = str(e).strip()
    return text.splitlines()[0] if text else type(e).__name__


def _os_error(e: OSError) -> str:
    what = e.strerror or _first_line(e)
    return f"{what}: {e.filename}" if e.filename else what


def _unicode(e: UnicodeDecodeError) -> str:
    return f"a file is not UTF-8 text ({e.reason} at byte {e.start}); save it as UTF-8"


def _memory(e: BaseException) -> str:
    return "out of memory: try a smaller --width/--height or --n, fewer --style-steps, or another --device"


# (exception type, one line): the first type that matches wins, so subclasses come first
TABLE: list[tuple[type[BaseException], object]] = [
    (StylegradError, _first_line),
    (UnicodeDecodeError, _unicode),
    (MemoryError, _memory),
    (OSError, _os_error),
]


def error_line(e: BaseException) -> str:
    import torch

    if isinstance(e, torch.OutOfMemoryError):
        return _memory(e)
    for kind, line in TABLE:
        if isinstance(e, kind):
            return line(e)
    return (f"unexpected {type(e).__name__}: {_first_line(e)[:300]} (a bug in stylegrad? STYLEGRAD_DEBUG=1 shows "
            "the traceback to report)")
