"""A1111's prompt syntax, parsed into (text, weight) pieces, and its extra-network tags.

Emphasis, as A1111's ``parse_prompt_attention`` defines it: ``(a)`` multiplies by 1.1, ``[a]`` divides by 1.1,
``(a:1.3)`` multiplies by 1.3; brackets nest (weights multiply); ``\\(``, ``\\)``, ``\\[``, ``\\]`` and ``\\\\`` are
literal; an unclosed bracket applies to the end of the prompt; ``BREAK`` (upper case, a word of its own) ends the
current 75-token chunk. ``<lora:NAME:TE[:UNET]>`` (also ``te=``/``unet=``) names a LoRA and
``<hypernet:NAME[:MULT]>`` a hypernetwork; both are removed from the text the tokenizer reads.
"""

from __future__ import annotations

import math
import re
from dataclasses import dataclass

from stylegrad.errors import StylegradError

ROUND, SQUARE = 1.1, 1 / 1.1
BREAK = "BREAK"
MAX_MULTIPLIER = 10.0  # a LoRA's multiplier, in a tag or in 'FILE:TE:UNET': beyond it a picture is only noise

# one token of the emphasis grammar, in A1111's order of precedence
_TOKEN = re.compile(r"""
    \\\( | \\\) | \\\[ | \\\] | \\\\ | \\     # escapes, and a lone backslash kept as text
    | \( | \[                                # openers
    | :\s*([+-]?(?:\d+\.?\d*|\.\d+))\s*\)   # ':1.3)' closes a round bracket with a weight ('.' is text)
    | \) | \]                                # closers
    | [^\\()\[\]:]+                          # text
    | :                                      # a colon that is not a weight
""", re.X)
_BREAK = re.compile(r"\s*\bBREAK\b\s*", re.S)
_TAG = re.compile(r"<(\w+):([^>]+)>")


def parse_attention(text: str) -> list[tuple[str, float]]:
    """``text`` -> [(piece, weight)], neighbours of equal weight merged; ``(BREAK, -1)`` marks a chunk break.
    >>> parse_attention("a (red:1.5) [house]")
    [('a ', 1.0), ('red', 1.5), (' ', 1.0), ('house', 0.9090909090909091)]"""
    pieces: list[list] = []
    round_open: list[int] = []
    square_open: list[int] = []

    def scale(start: int, factor: float) -> None:
        for piece in pieces[start:]:
            piece[1] *= factor

    for m in _TOKEN.finditer(text):
        token, weight = m.group(0), m.group(1)
        if token.startswith("\\") and len(token) == 2:
            pieces.append([token[1], 1.0])
        elif token == "(":
            round_open.append(len(pieces))
        elif token == "[":
            square_open.append(len(pieces))
        elif weight is not None and round_open:
            scale(round_open.pop(), float(weight))
        elif token == ")" and round_open:
            scale(round_open.pop(), ROUND)
        elif token == "]" and square_open:
            scale(square_open.pop(), SQUARE)
        else:
            for i, part in enumerate(_BREAK.split(token)):
                if i > 0:
                    pieces.append([BREAK, -1.0])
                pieces.append([part, 1.0])
    for start in round_open:  # unclosed: to the end of the prompt
        scale(start, ROUND)
    for start in square_open:
        scale(start, SQUARE)

    if not pieces:
        return [("", 1.0)]
    merged: list[list] = [pieces[0]]
    for piece in pieces[1:]:
        if piece[1] == merged[-1][1] and BREAK not in (piece[0], merged[-1][0]):
            merged[-1][0] += piece[0]
        else:
            merged.append(piece)
    return [(t, w) for t, w in merged]


@dataclass(frozen=True)
class NetworkTag:
    """One ``<lora:NAME:...>`` tag: the file's name and its text-encoder and UNet multipliers."""

    name: str
    te: float = 1.0
    unet: float = 1.0

    def text(self) -> str:
        return f"<lora:{self.name}:{_num(self.te)}" + (f":{_num(self.unet)}>" if self.unet != self.te else ">")


def _num(x: float) -> str:
    return f"{x:g}"


def _parse_tag(body: str) -> NetworkTag:
    """A1111's ``<lora:NAME:A:B>`` / ``te=A unet=B`` (positional: te, then unet; unet defaults to te)."""
    name, *args = body.split(":")
    named, positional = {}, []
    for arg in args:
        if "=" in arg:
            k, v = arg.split("=", 1)
            named[k.strip()] = v
        else:
            positional.append(arg)
    try:
        te = float(named.get("te", positional[0] if positional else 1.0))
        unet = float(named.get("unet", positional[1] if len(positional) > 1 else te))
    except ValueError as e:
        raise StylegradError(f"bad LoRA tag <lora:{body}>: multipliers must be numbers") from e
    if not all(math.isfinite(m) and abs(m) <= MAX_MULTIPLIER for m in (te, unet)):
        raise StylegradError(f"bad LoRA tag <lora:{body}>: multipliers must be numbers in "
                             f"-{MAX_MULTIPLIER:g}..{MAX_MULTIPLIER:g}")
    return NetworkTag(name.strip(), te, unet)


@dataclass(frozen=True)
class HypernetTag:
    """One ``<hypernet:NAME[:MULT]>`` tag (A1111's extra network 'hypernet'; the multiplier defaults to 1)."""

    name: str
    multiplier: float = 1.0

    def text(self) -> str:
        return f"<hypernet:{self.name}:{_num(self.multiplier)}>"


def _parse_hypernet(body: str) -> HypernetTag:
    name, *args = body.split(":")
    try:
        mult = float(args[0]) if args else 1.0
    except ValueError as e:
        raise StylegradError(f"bad hypernetwork tag <hypernet:{body}>: the multiplier must be a number") from e
    if not math.isfinite(mult) or abs(mult) > MAX_MULTIPLIER:
        raise StylegradError(f"bad hypernetwork tag <hypernet:{body}>: the multiplier must be a number in "
                             f"-{MAX_MULTIPLIER:g}..{MAX_MULTIPLIER:g}")
    return HypernetTag(name.strip(), mult)


def hypernet_tags(prompt: str) -> list[HypernetTag]:
    """The prompt's ``<hypernet:...>`` tags, in order (A1111 chains them in that order)."""
    return [_parse_hypernet(m.group(2)) for m in _TAG.finditer(prompt) if m.group(1) == "hypernet"]


def extract_tags(prompt: str) -> tuple[str, list[NetworkTag]]:
    """(prompt without its ``<lora:...>``/``<lyco:...>`` and ``<hypernet:...>`` tags, the LoRA tags; the
    hypernetwork tags are read by ``hypernet_tags``). Other ``<kind:...>`` tags are left in the text, as A1111 does
    for networks it does not have."""
    tags: list[NetworkTag] = []

    def take(m: re.Match) -> str:
        if m.group(1) == "hypernet":
            _parse_hypernet(m.group(2))  # a bad one is refused like a bad LoRA tag
            return ""
        if m.group(1) not in ("lora", "lyco"):
            return m.group(0)
        tags.append(_parse_tag(m.group(2)))
        return ""

    return _TAG.sub(take, prompt), tags
