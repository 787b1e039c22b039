"""Notes for the user (skipped files, truncated prompts): printed by the CLI itself, so ``PYTHONWARNINGS=ignore``
cannot hide them; in Python they are ``warnings`` of type ``StylegradNote`` unless a handler is set."""

from __future__ import annotations

import warnings
from collections.abc import Callable


class StylegradNote(UserWarning):
    """Something the user should know that is not an error."""


_handler: Callable[[str], None] | None = None


def set_handler(handler: Callable[[str], None] | None) -> None:
    global _handler
    _handler = handler


def note(message: str) -> None:
    if _handler is not None:
        _handler(message)
    else:
        warnings.warn(StylegradNote(message), stacklevel=2)
