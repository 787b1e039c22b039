"""How the server answers what went wrong: one JSON shape for every status, ``{"error": one line, "field": the
request field it is about, or null}``, with the library's own description of the error and none of the server's
absolute paths. Bad input is a 4xx; a 500 is left for real bugs, and it too is this JSON (the connection stays
open). Both APIs and the app import this module; it imports neither."""

from __future__ import annotations

import json
import logging
import os
import re
from collections.abc import Iterable
from pathlib import Path

from fastapi import Request
from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse
from pydantic import BaseModel, Field
from starlette.exceptions import HTTPException

from stylegrad.errors import StylegradError, describe

from .jobs import Cancelled, QueueFull, ShuttingDown, TaskIdInUse

log = logging.getLogger("stylegrad.serve")

# an absolute path (POSIX, or Windows with a drive) not inside a word, a URL or a fraction: its last part is kept
_ABSOLUTE = re.compile(r"(?<![\w.~/:\\-])/(?:[^\s/'\"():,;]+/)*([^\s/'\"():,;]*)"
                       r"|(?<![\w])[A-Za-z]:\\(?:[^\s\\'\"():,;]+\\)*([^\s\\'\"():,;]*)")


class ErrorBody(BaseModel):
    """Every error this server sends, whatever its status."""

    error: str = Field(description="one line saying what went wrong and, for bad input, what is accepted")
    field: str | None = Field(None, description="the request field it is about, as the client named it, or null")


# every route may answer these; declared once for the OpenAPI document (so it shows the shape the server sends)
ERROR_RESPONSES = {status: {"model": ErrorBody, "description": what} for status, what in [
    (401, "missing or wrong API key"), (404, "no such path or task"), (405, "method not allowed"),
    (409, "cancelled, or a task id in use"), (413, "request body over the limit"),
    (422, "a bad field, named"), (429, "the queue is full: retry after Retry-After seconds"),
    (500, "a bug in stylegrad"), (503, "the server is stopping")]}
ERROR_RESPONSES[429]["headers"] = {"Retry-After": {"description": "seconds to wait", "schema": {"type": "integer"}}}
ERROR_RESPONSES[405]["headers"] = {"Allow": {"description": "the path's methods", "schema": {"type": "string"}}}


class SafeJSONResponse(JSONResponse):
    """A JSON response for any text a client sent: a lone surrogate ('\\ud800', which JSON can carry and UTF-8
    cannot) is sent escaped instead of failing the response."""

    def render(self, content) -> bytes:
        try:
            return super().render(content)
        except UnicodeEncodeError:
            return json.dumps(content, ensure_ascii=True, allow_nan=False, separators=(",", ":")).encode("ascii")


def error(status: int, message: str, field: str | None = None, headers: dict | None = None) -> JSONResponse:
    return SafeJSONResponse({"error": message, "field": field}, status_code=status, headers=headers)


class PathHider:
    """Error lines as a client may read them: a file inside a configured folder by its name there
    ('sub/x.safetensors'), any other absolute path by its last part."""

    def __init__(self, folders: Iterable[str | os.PathLike] = ()):
        roots = {str(p) for d in folders for p in (Path(d).absolute(), Path(d).resolve())}
        self.roots = sorted(roots, key=len, reverse=True)  # the deepest first: a folder inside another

    def __call__(self, message: str) -> str:
        for root in self.roots:
            message = message.replace(root.rstrip(os.sep) + os.sep, "")
        return _ABSOLUTE.sub(lambda m: m.group(1) if m.group(1) is not None else m.group(2), message)


def unexpected(e: BaseException, hide: PathHider) -> JSONResponse:
    """A bug (not the client's input): its traceback in the log, one JSON line to the client."""
    log.error("unexpected error", exc_info=e)
    return error(500, hide(describe(e)))


def install(app, hide: PathHider | None = None) -> None:
    """The app's exception handlers: a bad request field (or any user mistake) is a 422 naming it, a full queue
    429, a stopping server 503, a cancelled job or a task id in use 409, and every HTTP error of the framework
    (404, 405, 413) the same shape."""
    hide = hide or PathHider()

    @app.exception_handler(StylegradError)
    async def bad_input(request: Request, e: StylegradError):
        return error(422, hide(describe(e)), getattr(e, "field", None))

    @app.exception_handler(RequestValidationError)
    async def bad_fields(request: Request, e: RequestValidationError):
        problems = [(".".join(str(p) for p in err["loc"][1:]) or "body", err["msg"]) for err in e.errors()]
        lines = [f"{name}: {msg}" for name, msg in problems]
        return error(422, hide("; ".join(lines)) or "invalid request", problems[0][0] if problems else None)

    @app.exception_handler(HTTPException)
    async def http_error(request: Request, e: HTTPException):
        return error(e.status_code, str(e.detail), getattr(e, "field", None), headers=getattr(e, "headers", None))

    @app.exception_handler(QueueFull)
    async def full(request: Request, e: QueueFull):
        return error(429, f"busy: {e}", headers={"Retry-After": "5"})

    @app.exception_handler(ShuttingDown)
    async def stopping(request: Request, e: ShuttingDown):
        return error(503, str(e))

    @app.exception_handler(Cancelled)
    async def cancelled(request: Request, e: Cancelled):
        return error(409, str(e))

    @app.exception_handler(TaskIdInUse)
    async def in_use(request: Request, e: TaskIdInUse):
        return error(409, str(e), e.field)
