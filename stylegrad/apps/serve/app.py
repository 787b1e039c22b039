"""``stylegrad serve``'s one process: a FastAPI app with A1111's API subset (/sdapi/v1), the native API (/v1, its
OpenAPI page at /docs) and the Gradio web UI (/), all over one ``Service`` and its job queue."""

from __future__ import annotations

import base64
import hmac
import logging
import time
from contextlib import asynccontextmanager

from fastapi import FastAPI, Request
from fastapi.routing import APIRoute
from starlette.exceptions import HTTPException

from . import a1111, a1111_lists, controlnet, native
from .bodies import BodyLimit
from .errors import ERROR_RESPONSES, PathHider, SafeJSONResponse, error, install, unexpected
from .schema import with_limits
from .service import Service

log = logging.getLogger("stylegrad.serve")

API_PREFIXES = ("/sdapi/", "/v1/", "/controlnet/")
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

    app = FastAPI(lifespan=lifespan, title="stylegrad", version=_version(), default_response_class=SafeJSONResponse,
                  responses=ERROR_RESPONSES, generate_unique_id_function=operation_id,
                  description="Aesthetic-gradient styles, stylecodes and Stable Diffusion: A1111's API subset under "
                  "/sdapi/v1, stylegrad's own under /v1, the web UI at /.")
    app.state.service = service
    hide = PathHider(settings.styles_dirs + settings.loras_dirs + settings.embeddings_dirs + settings.ipadapter_dirs
                     + settings.clip_vision_dirs
                     + ((settings.models_dir,) if settings.models_dir else ()))
    app.add_middleware(BodyLimit, limit=lambda path: body_limit(settings, path))  # inside the guard: after auth

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
            try:
                response = await call_next(request)
            except Exception as e:  # noqa: BLE001 - a bug: answered as JSON here, so the connection stays open
                response = unexpected(e, hide)
        # the path only: queries and bodies may hold prompts, and the key never appears anywhere
        log.info("%s %s %d %.0f ms", request.method, path, response.status_code, 1000 * (time.monotonic() - start))
        return response

    install(app, hide)

    @app.get("/healthz", include_in_schema=False)
    async def healthz():
        return {"ok": True, "waiting": service.queue.waiting}

    a1111.routes(app, service)
    a1111_lists.routes(app, service)
    native.routes(app, service)
    controlnet.routes(app, service)

    async def not_an_api_route(request: Request):
        """Under the API prefixes, a path no route has is a 404 and a method its route lacks a 405 (with Allow),
        in the one error shape: the web UI mounted at / never answers for them."""
        path = request.url.path
        allowed = sorted({m for r in app.routes if isinstance(r, APIRoute) and r.endpoint is not not_an_api_route
                          and r.path_regex.match(path) for m in r.methods or ()})
        if allowed:
            raise HTTPException(405, headers={"Allow": ", ".join(allowed)})
        raise HTTPException(404)

    for prefix in API_PREFIXES:
        app.add_api_route(prefix + "{rest:path}", not_an_api_route, include_in_schema=False,
                          methods=["GET", "HEAD", "POST", "PUT", "PATCH", "DELETE", "OPTIONS"])
    with_limits(app, settings, lambda path: body_limit(settings, path))
    if settings.ui:
        from .ui import mount_ui

        app = mount_ui(app, service)
    return app


def operation_id(route: APIRoute) -> str:
    """An operation's id in /openapi.json: its route's name ('txt2img', 'task_progress'), which a generated client
    makes its function's name; FastAPI's default adds the path and method ('txt2img_sdapi_v1_txt2img_post'), and
    for a lambda '_lambda_...'. The names are unique (a test holds them so)."""
    return route.name


def body_limit(settings, path: str) -> int:
    """Upload limits by route: a style takes many images, everything else at most a couple."""
    if path.startswith("/v1/styles"):
        return min(settings.max_upload_bytes * settings.max_style_images, 512 << 20)
    if settings.ipadapter_dirs and path in ("/sdapi/v1/txt2img", "/sdapi/v1/img2img", "/v1/generate"):
        return min(settings.max_upload_bytes * (2 + settings.max_ip_images), 512 << 20)  # IP-Adapter pictures too
    return settings.max_upload_bytes * 2 + (1 << 20)


def _version() -> str:
    from stylegrad import __version__

    return __version__
