"""What a user can get wrong, and the one line that describes any error: the CLI prints it after ``Error:``, the
server sends it as its JSON error, and batch runs record it per failed image. Importing this module imports
nothing heavy (no torch): the CLI reads it before it knows whether a command needs torch."""

from __future__ import annotations

import sys


class StylegradError(Exception):
    """A problem with the user's input (a file, a model id, an option), not a bug in stylegrad."""


class RequestError(StylegradError):
    """One field of a generation request that cannot be served. ``field`` is the schema's name (``width``,
    ``style_options.lr``, ``loras[0]``); each front door may rename it to what its clients wrote (``--width``,
    ``aesthetic_lr``, ``Style learning rate``) with ``renamed``. ``problem`` reads after the field's name ("must be
    ..."), or holds ``{field}`` where the name goes."""

    def __init__(self, field: str, problem: str):
        self.field, self.problem = field, problem
        text = problem.replace("{field}", field) if "{field}" in problem else f"{field} {problem}"
        super().__init__(text)

    def renamed(self, field: str) -> RequestError:
        """The same problem under the door's name for the field."""
        error = RequestError(field, self.problem)
        error.__cause__ = self.__cause__
        return error


def first_line(error: BaseException, limit: int | None = None) -> str:
    """The first line of an exception's message (its type's name when it has none), at most ``limit`` characters."""
    text = str(error).strip()
    line = text.splitlines()[0] if text else type(error).__name__
    return line[:limit] if limit else line


def is_out_of_memory(error: BaseException) -> bool:
    """Python's MemoryError or torch's OutOfMemoryError (checked only when torch is already loaded)."""
    if isinstance(error, MemoryError):
        return True
    torch = sys.modules.get("torch")
    oom = getattr(torch, "OutOfMemoryError", None) if torch is not None else None
    return oom is not None and isinstance(error, oom)


OUT_OF_MEMORY = "out of memory: try a smaller width/height or fewer images, fewer style steps, or another device"


def _os_error(e: OSError) -> str:
    what = e.strerror or first_line(e)
    return f"{what}: {e.filename}" if e.filename else what


def _unicode(e: UnicodeDecodeError) -> str:
    return f"a file is not UTF-8 text ({e.reason} at byte {e.start}); save it as UTF-8"


# (exception type, its line): the first type that matches wins, so subclasses come first
_TABLE: list[tuple[type[BaseException], object]] = [
    (StylegradError, first_line),
    (UnicodeDecodeError, _unicode),
    (OSError, _os_error),
]


def describe(error: BaseException) -> str:
    """One line for any exception: the user's mistake as stylegrad words it, a file system or encoding problem as
    the user can act on it, anything else as a possible bug."""
    if is_out_of_memory(error):
        return OUT_OF_MEMORY
    for kind, line in _TABLE:
        if isinstance(error, kind):
            return line(error)
    return (f"unexpected {type(error).__name__}: {first_line(error, 300)} (a bug in stylegrad? STYLEGRAD_DEBUG=1 "
            "shows the traceback to report)")
