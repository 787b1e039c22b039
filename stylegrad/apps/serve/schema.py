"""The OpenAPI document with this server's limits in it: the request models are shared by every server, the limits
are each server's (its flags), so they are written into the document when it is first asked for. A generated
client then knows the largest width, the most steps and images, the longest prompt; and each generation endpoint
has an example body within those limits (what a client or a fuzzer such as schemathesis tries first)."""

from __future__ import annotations

from collections.abc import Callable

from stylegrad.pipelines.limits import MAX_SEED
from stylegrad.pipelines.request import MAX_IP_SCALE

from .settings import ServeSettings


def _bound(prop: dict, **bounds) -> None:
    """Bounds on a property, or on the non-null branch of an optional one (pydantic's anyOf)."""
    for branch in prop.get("anyOf", [prop]):
        if branch.get("type") in ("integer", "number", "string", "array"):
            branch.update(bounds)


def limits_by_model(s: ServeSettings) -> dict[str, dict[str, dict]]:
    """model name -> field -> its bounds here (None: no bound on this server)."""
    side = {"minimum": 8, "maximum": s.max_side, "multipleOf": 8}
    text = {"maxLength": s.max_prompt_chars}
    seed = {"minimum": 0, "maximum": MAX_SEED}
    a1111 = {"seed": {"minimum": -1, "maximum": MAX_SEED}, "steps": {"minimum": 1, "maximum": s.max_steps},
             "width": side, "height": side,
             "batch_size": {"maximum": s.max_images}, "n_iter": {"maximum": s.max_images}, "prompt": text,
             "negative_prompt": text}
    return {
        "Generate": {"seed": seed, "steps": {"minimum": 1, "maximum": s.max_steps}, "width": side, "height": side,
                     "n": {"minimum": 1, "maximum": s.max_images}, "prompt": text, "negative": text,
                     "ip_images": {"maxItems": s.max_ip_images}, "ip_scale": {"minimum": 0, "maximum": MAX_IP_SCALE}},
        "StyleFields": {"steps": {"minimum": 0, "maximum": s.max_style_steps}},
        "CodeRequest": {"seed": seed, "steps": {"minimum": 1, "maximum": s.max_steps}, "width": side, "height": side},
        "Txt2Img": a1111, "Img2Img": {**a1111, "denoising_strength": {"exclusiveMinimum": 0, "maximum": 1}},
    }


def examples(s: ServeSettings) -> dict[str, dict]:
    """path -> a request body this server answers with an image: a prompt, a size and steps within its limits."""
    import base64
    import io

    from PIL import Image

    side = max(8, min(512, s.max_side) // 8 * 8)
    steps = min(20, s.max_steps)
    prompt = "a lighthouse on a cliff at dusk, oil painting"[:s.max_prompt_chars]
    negative = "blurry"[:s.max_prompt_chars]
    buf = io.BytesIO()
    Image.new("RGB", (8, 8), (90, 120, 160)).save(buf, format="PNG")  # resized to the picture's size
    start = base64.b64encode(buf.getvalue()).decode()
    strength = 0.75 if int(steps * 0.75) >= 1 else 1.0  # at least one denoising step
    a1111 = {"prompt": prompt, "negative_prompt": negative, "seed": 1, "steps": steps, "cfg_scale": 7.0,
             "width": side, "height": side, "sampler_name": "Euler a", "batch_size": 1, "n_iter": 1}
    return {
        "/sdapi/v1/txt2img": a1111,
        "/sdapi/v1/img2img": {**a1111, "init_images": [start], "denoising_strength": strength},
        "/v1/generate": {"prompt": prompt, "negative": negative, "seed": 1, "steps": steps, "cfg": 7.0,
                         "width": side, "height": side, "sampler": "euler_a", "n": 1},
    }


def ip_examples(s: ServeSettings) -> dict[str, dict]:
    """path -> a request body with a reference picture through the first IP-Adapter of this server's folder, as
    stylegrad's clients and A1111's (a ControlNet unit) send it; none where the folder holds no adapter."""
    from .folders import IPADAPTER_SUFFIXES, listing

    adapters = listing(s.ipadapter_dirs, IPADAPTER_SUFFIXES)
    if not adapters:
        return {}
    name = sorted(adapters)[0]
    bodies = examples(s)
    picture = bodies["/sdapi/v1/img2img"]["init_images"][0]
    unit = {"enabled": True, "module": "ip-adapter_clip_sd15", "model": name, "weight": 0.6, "image": picture}
    return {"/sdapi/v1/txt2img": {**bodies["/sdapi/v1/txt2img"], "alwayson_scripts": {"controlnet": {"args": [unit]}}},
            "/v1/generate": {**bodies["/v1/generate"], "ip_adapter": name, "ip_images": [picture], "ip_scale": 0.6}}


def server_limits(s: ServeSettings) -> dict[str, int | None]:
    """Every limit of this server by its flag's name: a request's and the uploads' (as /v1/info gives them)."""
    return {**s.limits.as_dict(), **{k: getattr(s, k) for k in ("max_upload_bytes", "max_style_images",
                                                                "max_image_pixels", "max_waiting", "max_ip_images")}}


def _document_limits(schema: dict, s: ServeSettings, body_limit: Callable[[str], int]) -> None:
    """The limits no field bound states: all of them under ``info.x-limits``, each operation's body limit in its
    413 answer, the images of one style upload as its ``files``' maxItems."""
    schema["info"]["x-limits"] = server_limits(s)
    for path, operations in schema.get("paths", {}).items():
        for operation in operations.values():
            too_big = operation.get("responses", {}).get("413")
            if too_big is not None:
                too_big["description"] = f"request body over this path's limit here: {body_limit(path)} bytes"
    files = schema.get("components", {}).get("schemas", {}).get("Body_make_style", {}).get("properties", {}).get(
        "files")
    if files is not None:
        files.update(minItems=1, maxItems=s.max_style_images)


def _binary_uploads(schema: dict) -> None:
    """An uploaded file's schema also says ``format: binary``: pydantic writes only OpenAPI 3.1's
    contentMediaType, which generators (openapi-python-client) read as a plain string and send as text."""
    for model in schema.get("components", {}).get("schemas", {}).values():
        for prop in model.get("properties", {}).values():
            for branch in (prop, prop.get("items", {})):
                if branch.get("type") == "string" and branch.get("contentMediaType") == "application/octet-stream":
                    branch["format"] = "binary"


def with_limits(app, settings: ServeSettings, body_limit: Callable[[str], int]) -> None:
    """``app.openapi`` writes ``settings``' limits into the models' schemas and the document, and an example body
    within them into each generation endpoint (once, as FastAPI caches it)."""
    original = app.openapi

    def openapi() -> dict:
        if app.openapi_schema is None:
            schema = original()
            models = schema.get("components", {}).get("schemas", {})
            for model, fields in limits_by_model(settings).items():
                props = models.get(model, {}).get("properties", {})
                for name, bounds in fields.items():
                    if name in props:
                        _bound(props[name], **{k: v for k, v in bounds.items() if v is not None})
            for path, body in examples(settings).items():
                media = schema.get("paths", {}).get(path, {}).get("post", {}).get("requestBody", {}).get(
                    "content", {}).get("application/json")
                if media is not None:
                    media["examples"] = {"within_limits": {"summary": "a small request within this server's "
                                                           "limits", "value": body}}
            for path, body in ip_examples(settings).items():
                media = schema["paths"][path]["post"]["requestBody"]["content"]["application/json"]
                media["examples"]["ip_adapter"] = {"summary": "a reference picture through this server's "
                                                   "IP-Adapter", "value": body}
            _document_limits(schema, settings, body_limit)
            _binary_uploads(schema)
        return app.openapi_schema

    app.openapi = openapi
