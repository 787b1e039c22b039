"""How the server answers what went wrong: one JSON shape, ``{"error": one line, "field": the field or null}``
(plus ``fields`` for a body that does not parse), with the library's own description of the error. Both APIs
and the app import it; it imports neither."""

from __future__ import annotations

from fastapi import Request
from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse

from stylegrad.errors import StylegradError, describe

from .jobs import Cancelled, QueueFull, ShuttingDown


def error(status: int, message: str, field: str | None = None, **extra) -> JSONResponse:
    return JSONResponse({"error": message, "field": field, **extra}, status_code=status)


def install(app) -> None:
    """The app's exception handlers: a bad request field (or any user mistake) is a 422 naming it, a full queue
    429, a stopping server 503, a cancelled job 409."""

    @app.exception_handler(StylegradError)
    async def bad_input(request: Request, e: StylegradError):
        return error(422, describe(e), getattr(e, "field", None))

    @app.exception_handler(RequestValidationError)
    async def bad_fields(request: Request, e: RequestValidationError):
        problems = [(".".join(str(p) for p in err["loc"][1:]) or "body", err["msg"]) for err in e.errors()]
        lines = [f"{name}: {msg}" for name, msg in problems]
        return error(422, "; ".join(lines) or "invalid request", problems[0][0] if problems else None, fields=lines)

    @app.exception_handler(QueueFull)
    async def full(request: Request, e: QueueFull):
        return JSONResponse({"error": f"busy: {e}", "field": None}, status_code=429, headers={"Retry-After": "5"})

    @app.exception_handler(ShuttingDown)
    async def stopping(request: Request, e: ShuttingDown):
        return error(503, str(e))

    @app.exception_handler(Cancelled)
    async def cancelled(request: Request, e: Cancelled):
        return error(409, str(e))
