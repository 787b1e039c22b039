"""``stylegrad serve``'s one process: a FastAPI app with A1111's API subset (/sdapi/v1), the native API (/v1, its
OpenAPI page at /docs) and the Gradio web UI (/), all over one ``Service`` and its job queue."""

from __future__ import annotations

import base64
import hmac
import logging
import time
from contextlib import asynccontextmanager

from fastapi import FastAPI, Request

from . import a1111, native
from .errors import error, install
from .service import Service

log = logging.getLogger("stylegrad.serve")

API_PREFIXES = ("/sdapi/", "/v1/")
OPEN_PATHS = ("/healthz",)


def _authorized(header: str | None, key: str) -> bool:
    """'Bearer KEY' (API clients) or HTTP Basic with KEY as the password (a browser's own login prompt)."""
    if not header:
        return False
    scheme, _, value = header.partition(" ")
    if scheme.lower() == "bearer":
        return hmac.compare_digest(value.strip().encode(), key.encode())
    if scheme.lower() == "basic":
        try:
            _, _, password = base64.b64decode(value.strip()).decode("utf-8").partition(":")
        except (ValueError, UnicodeDecodeError):
            return False
        return hmac.compare_digest(password.encode(), key.encode())
    return False


def create_app(service: Service) -> FastAPI:
    settings = service.settings
    @asynccontextmanager
    async def lifespan(app):
        yield
        service.close()  # waiting jobs are cancelled; the worker stops after the running one

    app = FastAPI(lifespan=lifespan, title="stylegrad", version=_version(),
                  description="Aesthetic-gradient styles, stylecodes and Stable Diffusion: A1111's API subset under "
                  "/sdapi/v1, stylegrad's own under /v1, the web UI at /.")
    app.state.service = service

    @app.middleware("http")
    async def guard(request: Request, call_next):
        start = time.monotonic()
        path = request.url.path
        if settings.api_key and path not in OPEN_PATHS and not _authorized(request.headers.get("authorization"),
                                                                            settings.api_key):
            api = path.startswith(API_PREFIXES)
            response = error(401, "missing or wrong API key: send 'Authorization: Bearer KEY'")
            if not api:  # the web UI: let the browser ask (any user name, the key as password)
                response.headers["WWW-Authenticate"] = 'Basic realm="stylegrad"'
        else:
            length = request.headers.get("content-length")
            limit = body_limit(settings, path)
            if length is not None and length.isdigit() and int(length) > limit:
                response = error(413, f"request body larger than {limit >> 20} MB")
            else:
                response = await call_next(request)
        # the path only: queries and bodies may hold prompts, and the key never appears anywhere
        log.info("%s %s %d %.0f ms", request.method, path, response.status_code, 1000 * (time.monotonic() - start))
        return response

    install(app)

    @app.get("/healthz", include_in_schema=False)
    async def healthz():
        return {"ok": True, "waiting": service.queue.waiting}

    a1111.routes(app, service)
    native.routes(app, service)
    if settings.ui:
        from .ui import mount_ui

        app = mount_ui(app, service)
    return app


def body_limit(settings, path: str) -> int:
    """Upload limits by route: a style takes many images, everything else at most a couple."""
    if path.startswith("/v1/styles"):
        return min(settings.max_upload_bytes * settings.max_style_images, 512 << 20)
    return settings.max_upload_bytes * 2 + (1 << 20)


def _version() -> str:
    from stylegrad import __version__

    return __version__
