"""AUTOMATIC1111's ``parameters`` text (its "infotext"), written and read: prompt lines, an optional
``Negative prompt:`` part, and a last line of ``Key: value`` pairs (a value holding ',' or ':' is a JSON string)."""

from __future__ import annotations

import json
import re


def _value(v) -> str:
    text = " ".join(str(v).split())
    return json.dumps(text) if any(c in text for c in ',:"') else text


def format_infotext(prompt: str, negative: str, fields: dict) -> str:
    lines = [prompt.strip()]
    if negative.strip():
        lines.append(f"Negative prompt: {negative.strip()}")
    lines.append(", ".join(f"{k}: {_value(v)}" for k, v in fields.items() if v is not None))
    return "\n".join(lines)


_PAIR = re.compile(r'\s*([\w][\w \-/().+]*?):\s*("(?:\\.|[^\\"])*"|[^,]*)(?:,|$)')


def _parse_fields(line: str) -> dict[str, str] | None:
    """The ``Key: value, ...`` line, or None if the line is not one (as A1111: three pairs or more, or all of it)."""
    fields, pos = {}, 0
    while pos < len(line):
        m = _PAIR.match(line, pos)
        if m is None or m.end() == pos:
            return None
        key, value = m.group(1).strip(), m.group(2).strip()
        if value.startswith('"') and value.endswith('"') and len(value) > 1:
            try:
                value = json.loads(value)
            except ValueError:
                pass
        fields[key] = value
        pos = m.end()
    return fields if fields else None


def parse_infotext(text: str) -> tuple[str, str, dict[str, str]]:
    """(prompt, negative prompt, fields) from an A1111 ``parameters`` text."""
    lines = text.strip().split("\n")
    fields: dict[str, str] = {}
    if lines:
        parsed = _parse_fields(lines[-1])
        if parsed is not None and (len(parsed) >= 3 or "Steps" in parsed):
            fields = parsed
            lines = lines[:-1]
    prompt, negative, in_negative = [], [], False
    for line in lines:
        if line.startswith("Negative prompt:"):
            in_negative = True
            line = line[len("Negative prompt:"):].strip()
        (negative if in_negative else prompt).append(line)
    return "\n".join(prompt).strip(), "\n".join(negative).strip(), fields
