"""A JSONL file of generation requests, one per line, with the fields of ``stylegrad generate`` (and of the
server's ``/v1/generate``): A1111's "prompts from file", done properly. A bad line is one error naming it; the
other lines still run."""

from __future__ import annotations

import json
from dataclasses import dataclass, fields
from pathlib import Path

from stylegrad.aesthetic.options import StyleOptions
from stylegrad.errors import StylegradError
from stylegrad.jobs.plan import safe_name
from stylegrad.jobs.work import WorkItem
from stylegrad.pipelines.request import GenerationRequest

REQUEST_FIELDS = {f.name for f in fields(GenerationRequest)} - {"model", "style_options"}
STYLE_FIELDS = {f.name for f in fields(StyleOptions)}
PATH_FIELDS = ("style", "init_image", "stylecode_image", "clip_model", "stylecodes_model")
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
    """(the request, how many images, the file-name stem asked for) from one line's object."""
    if not isinstance(data, dict):
        raise StylegradError(f"a line must be a JSON object like {EXAMPLE}")
    data = dict(data)
    if "model" in data and data.pop("model") not in (None, model):
        raise StylegradError("the model is the batch's (--model): a line cannot ask for another")
    n, name = data.pop("n", 1), data.pop("name", None)
    if not isinstance(n, int) or n < 1:
        raise StylegradError(f"n must be a whole number >= 1, got {n!r}")
    options = data.pop("style_options", None) or {}
    for key in [k for k in data if k.startswith("style_") and k.removeprefix("style_") in STYLE_FIELDS]:
        options[key.removeprefix("style_")] = data.pop(key)  # the CLI's flat --style-steps as style_steps
    unknown = sorted(set(data) - REQUEST_FIELDS) + sorted(f"style_options.{k}" for k in set(options) - STYLE_FIELDS)
    if unknown:
        raise StylegradError(f"unknown field {unknown[0]} (the fields of stylegrad generate: prompt, negative, seed, "
                             "n, steps, cfg, width, height, sampler, clip_skip, style, style_options, loras, "
                             "embeddings, stylecode, init_image, strength, ...)")
    if not isinstance(data.get("prompt"), str):
        raise StylegradError("prompt is missing (a string)")
    for key in PATH_FIELDS:
        if key in data:
            data[key] = _resolve(data[key], base)
    for key in ("loras", "embeddings"):
        if key in data:
            if isinstance(data[key], str):
                data[key] = [data[key]]
            data[key] = tuple(_resolve(v, base) for v in data[key])
    if "betas" in options:
        options["betas"] = tuple(options["betas"])
    try:
        request = GenerationRequest(model=model, style_options=StyleOptions(**options), **data)
    except TypeError as e:
        raise StylegradError(f"a field has the wrong type ({e})") from None
    return request, n, name


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
