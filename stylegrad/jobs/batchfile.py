"""A JSONL file of generation requests, one per line, with the fields of ``stylegrad generate`` (and of the
server's ``/v1/generate``): A1111's "prompts from file", done properly. A bad line is one error naming it; the
other lines still run."""

from __future__ import annotations

import json
from dataclasses import dataclass, fields
from pathlib import Path

from stylegrad.aesthetic.options import StyleOptions
from stylegrad.errors import RequestError, StylegradError
from stylegrad.jobs.plan import safe_name
from stylegrad.jobs.work import WorkItem
from stylegrad.pipelines.request import GenerationRequest, build

STYLE_FIELDS = {f.name for f in fields(StyleOptions)}
PATH_FIELDS = ("style", "init_image", "stylecode_image", "clip_model", "stylecodes_model", "ip_adapter", "ip_image_encoder")
EXAMPLE = ('{"prompt": "a lighthouse at dusk", "seed": 1, "n": 4, "style": "styles/mine.safetensors", '
           '"style_options": {"steps": 10}}')


@dataclass(frozen=True)
class BadLine:
    line: int
    reason: str


def _resolve(value, base: Path):
    """A relative path that exists beside the jobs file is read from there, else as given (the working folder)."""
    if isinstance(value, str) and value and not Path(value).is_absolute() and (base / value).exists():
        return str(base / value)
    return value


def request_from_fields(data: dict, model: str, base: Path) -> tuple[GenerationRequest, int, str | None]:
    """(the request, how many images, the file-name stem asked for) from one line's object, through the one build
    (a bad field is a ``RequestError`` naming it)."""
    if not isinstance(data, dict):
        raise StylegradError(f"a line must be a JSON object like {EXAMPLE}")
    data = dict(data)
    if "model" in data and data.pop("model") not in (None, model):
        raise RequestError("model", "is the batch's: a line cannot ask for another")
    n, name = data.pop("n", 1), data.pop("name", None)
    options = data.pop("style_options", None) or {}
    if not isinstance(options, dict):
        raise RequestError("style_options", f"must be an object like {{\"steps\": 10}}, got {options!r}"[:200])
    for key in [k for k in data if k.startswith("style_") and k.removeprefix("style_") in STYLE_FIELDS]:
        options[key.removeprefix("style_")] = data.pop(key)  # the CLI's flat --style-steps as style_steps
    for key in PATH_FIELDS:
        if key in data:
            data[key] = _resolve(data[key], base)
    for key in ("loras", "embeddings", "ip_images"):
        if isinstance(data.get(key), str):
            data[key] = [data[key]]
        if isinstance(data.get(key), list):
            data[key] = tuple(_resolve(v, base) for v in data[key])
    return build({**data, "model": model, "style_options": options}, n=n), n, name


def read_jobs(path: str | Path, model: str) -> tuple[list[WorkItem], list[BadLine]]:
    """Every image the file asks for (``n`` per line, seeds ``seed .. seed+n-1``) and the lines that cannot run.
    Files: ``images/L00003-seed7.png`` (line 3), or ``images/NAME-seed7.png`` with a line's ``"name"``."""
    path = Path(path)
    try:
        lines = path.read_text(encoding="utf-8").splitlines()
    except (OSError, UnicodeDecodeError) as e:
        raise StylegradError(f"cannot read {path}: {e}") from None
    items, bad, files = [], [], {}
    for number, text in enumerate(lines, 1):
        if not text.strip() or text.lstrip().startswith("#"):
            continue
        try:
            request, n, name = request_from_fields(json.loads(text), model, path.parent)
            stem = safe_name(str(name)) if name else f"L{number:05d}"
            for i in range(n):
                file = f"images/{stem}-seed{request.seed + i}.png"
                if file in files:
                    raise StylegradError(f"writes {file}, as line {files[file]} does (give each a different name "
                                         "or seed)")
                files[file] = number
                items.append(WorkItem(request.with_seed(request.seed + i), file, f"line {number}"))
        except json.JSONDecodeError as e:
            bad.append(BadLine(number, f"not JSON ({e.msg} at column {e.colno})"))
        except StylegradError as e:
            bad.append(BadLine(number, str(e)))
    if not items and not bad:
        raise StylegradError(f"{path} has no jobs (one JSON object per line, e.g. {EXAMPLE})")
    return items, bad
