"""The request body limit, whatever the transfer encoding: a declared ``Content-Length`` over the limit is refused
before anything is read, and a body sent without one (chunked) is counted as it arrives and refused (413) as soon
as it passes the limit, so the server never holds more of it than the limit."""

from __future__ import annotations

from collections.abc import Callable

from starlette.datastructures import Headers
from starlette.exceptions import HTTPException

from .errors import error


class BodyTooLarge(HTTPException):
    """Raised from ``receive`` when the body passes the limit: the framework hands an HTTPException on as it is."""

    def __init__(self, limit: int):
        super().__init__(413, too_large(limit), headers={"Connection": "close"})


def too_large(limit: int) -> str:
    return f"request body larger than {limit >> 20} MB" if limit >= 1 << 20 else f"request body over {limit} bytes"


class BodyLimit:
    """ASGI middleware: ``limit(path)`` bytes at most in a request's body."""

    def __init__(self, app, limit: Callable[[str], int]):
        self.app, self.limit = app, limit

    async def __call__(self, scope, receive, send):
        if scope["type"] != "http":
            return await self.app(scope, receive, send)
        limit = self.limit(scope["path"])
        declared = Headers(scope=scope).get("content-length")
        if declared is not None and declared.isdigit() and int(declared) > limit:
            return await error(413, too_large(limit), headers={"Connection": "close"})(scope, receive, send)

        received, over, started = 0, False, False

        async def counted():
            nonlocal received, over
            message = await receive()
            if message["type"] == "http.request":
                received += len(message.get("body", b""))
                if received > limit:
                    over = True
                    raise BodyTooLarge(limit)
            return message

        async def guarded(message):
            nonlocal started
            if over and not started:  # whatever the app made of the refused body, the client gets the 413
                return
            started = started or message["type"] == "http.response.start"
            await send(message)

        try:
            await self.app(scope, counted, guarded)
        except Exception:
            if not over or started:
                raise
        if over and not started:
            await error(413, too_large(limit), headers={"Connection": "close"})(scope, receive, send)
