"""The OpenAPI document with this server's limits in it: the request models are shared by every server, the limits
are each server's (its flags), so they are written into the document when it is first asked for. A generated
client then knows the largest width, the most steps and images, the longest prompt."""

from __future__ import annotations

from stylegrad.pipelines.limits import MAX_SEED

from .settings import ServeSettings


def _bound(prop: dict, **bounds) -> None:
    """Bounds on a property, or on the non-null branch of an optional one (pydantic's anyOf)."""
    for branch in prop.get("anyOf", [prop]):
        if branch.get("type") in ("integer", "number", "string"):
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
                     "n": {"minimum": 1, "maximum": s.max_images}, "prompt": text, "negative": text},
        "StyleFields": {"steps": {"minimum": 0, "maximum": s.max_style_steps}},
        "CodeRequest": {"seed": seed, "steps": {"minimum": 1, "maximum": s.max_steps}, "width": side, "height": side},
        "Txt2Img": a1111, "Img2Img": {**a1111, "denoising_strength": {"exclusiveMinimum": 0, "maximum": 1}},
    }


def with_limits(app, settings: ServeSettings) -> None:
    """``app.openapi`` writes ``settings``' limits into the models' schemas (once, as FastAPI caches it)."""
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
        return app.openapi_schema

    app.openapi = openapi
