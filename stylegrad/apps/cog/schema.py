"""The OpenAPI schema Cog validates a predictor's inputs against, made from the predictor itself.

Cog's Go CLI writes ``.cog/openapi_schema.json`` at ``cog build`` (parsing the predictor's source); the Python
server (``python -m cog.server.http``) only reads that file, and without it validates nothing. So a deployment
without Docker, and the tests, write it here: cog's own inspector reads ``run``'s signature (types, defaults,
``Input`` constraints) and the document is laid out as the Go CLI lays it out (``Input`` with ``x-order``, one enum
component per input with choices, the prediction envelope). ``COG_OPENAPI_SCHEMA=.cog/openapi_schema.json cog
build`` puts this same file in an image.

    python -m stylegrad.apps.cog.schema [OUT]     (default OUT: .cog/openapi_schema.json)
"""

from __future__ import annotations

import json
import sys
from pathlib import Path

PREDICTOR = "stylegrad.apps.cog.predictor"
DEFAULT_OUT = Path(".cog") / "openapi_schema.json"
OK = {"description": "Successful Response", "content": {"application/json": {"schema": {}}}}
INVALID = {"description": "Validation Error",
           "content": {"application/json": {"schema": {"$ref": "#/components/schemas/HTTPValidationError"}}}}


def _number(value):
    """A bound as the Go CLI writes it (-1, not -1.0)."""
    return int(value) if isinstance(value, float) and value.is_integer() else value


def _title(name: str) -> str:
    return name.replace("_", " ").title()


def _inputs(info) -> tuple[dict, dict]:
    """(the ``Input`` component, the enum components of inputs with choices)."""
    from cog import _adt as adt

    properties, required, enums = {}, [], {}
    for name, field in info.inputs.items():
        ft = field.type
        nullable = ft.repetition in (adt.Repetition.OPTIONAL, adt.Repetition.OPTIONAL_REPEATED)
        prop: dict = {"x-order": field.order}
        if field.choices is not None:
            enums[name] = {"title": name, "description": "An enumeration.", "enum": list(field.choices),
                           "type": ft.primitive.json_type()["type"]}
            prop["allOf"] = [{"$ref": f"#/components/schemas/{name}"}]
        else:
            prop["title"] = _title(name)
            prop.update(ft.json_type())
        if field.default is not None or nullable:
            prop["default"] = ft.json_encode(field.default) if field.default is not None else None
        elif ft.repetition in (adt.Repetition.REQUIRED, adt.Repetition.REPEATED):
            required.append(name)
        if nullable:
            prop["nullable"] = True
        for key, value in (("description", field.description), ("minimum", _number(field.ge)),
                           ("maximum", _number(field.le)),
                           ("minLength", field.min_length), ("maxLength", field.max_length),
                           ("pattern", field.regex), ("deprecated", field.deprecated or None)):
            if value is not None:
                prop[key] = value
        properties[name] = prop
    schema = {"title": "Input", "type": "object", "properties": properties}
    if required:
        schema["required"] = required
    return schema, enums


def openapi_schema(module: str = PREDICTOR, name: str = "Predictor") -> dict:
    """The whole OpenAPI 3.0.2 document of predictor ``module:name``."""
    import cog
    from cog._inspector import create_predictor  # cog's reading of a predictor, as its server reads it

    info = create_predictor(module, name)
    inputs, enums = _inputs(info)
    ref = "#/components/schemas/"
    envelope = {"input": {"$ref": ref + "Input"}, "output": {"$ref": ref + "Output"},
                **{k: {"title": _title(k), "type": "string"} for k in ("id", "version")},
                **{k: {"title": _title(k), "type": "string", "format": "date-time"}
                   for k in ("created_at", "started_at", "completed_at")},
                **{k: {"title": _title(k), "type": "string"} for k in ("status", "error", "logs")},
                "metrics": {"title": "Metrics", "type": "object"}}
    schemas = {
        "Input": inputs, "Output": info.output.json_type(), **enums,
        "PredictionRequest": {"title": "PredictionRequest", "type": "object",
                              "properties": {"id": {"title": "Id", "type": "string"}, "input": {"$ref": ref + "Input"}}},
        "PredictionResponse": {"title": "PredictionResponse", "type": "object", "properties": envelope},
        "Status": {"title": "Status", "description": "An enumeration.", "type": "string",
                   "enum": ["starting", "processing", "succeeded", "canceled", "failed"]},
        "HTTPValidationError": {"title": "HTTPValidationError", "type": "object", "properties": {
            "detail": {"title": "Detail", "type": "array", "items": {"$ref": ref + "ValidationError"}}}},
        "ValidationError": {"title": "ValidationError", "type": "object", "required": ["loc", "msg", "type"],
                            "properties": {
                                "loc": {"title": "Location", "type": "array",
                                        "items": {"anyOf": [{"type": "string"}, {"type": "integer"}]}},
                                "msg": {"title": "Message", "type": "string"},
                                "type": {"title": "Error Type", "type": "string"}}},
    }
    body = {"content": {"application/json": {"schema": {"$ref": ref + "PredictionRequest"}}}}
    predict = {"summary": "Predict", "description": "Run a single prediction on the model",
               "operationId": "predict_predictions_post", "requestBody": body,
               "responses": {"200": {"description": "Successful Response", "content": {"application/json": {
                   "schema": {"$ref": ref + "PredictionResponse"}}}}, "422": INVALID}}
    cancel = {"summary": "Cancel", "operationId": "cancel_predictions__prediction_id__cancel_post",
              "parameters": [{"required": True, "schema": {"title": "Prediction Id", "type": "string"},
                              "name": "prediction_id", "in": "path"}],
              "responses": {"200": OK, "422": INVALID}}
    paths = {"/": {"get": {"summary": "Root", "operationId": "root__get", "responses": {"200": OK}}},
             "/health-check": {"get": {"summary": "Healthcheck", "operationId": "healthcheck_health_check_get",
                                       "responses": {"200": OK}}},
             "/predictions": {"post": predict}, "/predictions/{prediction_id}/cancel": {"post": cancel}}
    return {"openapi": "3.0.2", "info": {"title": "Cog", "version": cog.__version__}, "paths": paths,
            "components": {"schemas": schemas}}


def write(out: str | Path = DEFAULT_OUT) -> Path:
    from stylegrad.files.atomic import atomic_write

    return atomic_write(out, json.dumps(openapi_schema(), indent=1).encode() + b"\n")


def main(argv: list[str] | None = None) -> int:
    from stylegrad.errors import StylegradError, describe

    args = sys.argv[1:] if argv is None else argv
    if len(args) > 1 or any(a.startswith("-") for a in args):
        print(__doc__.strip().splitlines()[-1].strip(), file=sys.stderr)
        return 2
    try:
        print(write(args[0] if args else DEFAULT_OUT))
    except (StylegradError, ImportError) as e:
        print(f"Error: {describe(e)}", file=sys.stderr)
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())
