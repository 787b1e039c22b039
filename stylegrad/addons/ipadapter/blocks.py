"""Which UNet attention blocks the reference picture acts on: everywhere (IP-Adapter), or InstantStyle's blocks.

InstantStyle (Wang et al. 2024) injects the image only in the attention layers that carry style, and optionally
layout. The blocks are the authors' and diffusers' own choices:

- SDXL (InstantStyle README and diffusers' ``set_ip_adapter_scale`` docs): style = the second transformer of up
  block 0, ``{"up": {"block_0": [0.0, 1.0, 0.0]}}``; layout = the second of down block 2,
  ``{"down": {"block_2": [0.0, 1.0]}}``.
- SD1.x (InstantStyle's ``infer_style_sd15.py``, marked experimental by its authors): style = every transformer of
  ``up_blocks.1``; layout = ``down_blocks.2`` and ``mid_block``. SD2.x has SD1's UNet layout and takes the same.

``ip_blocks`` names more blocks (or, without ``ip_style``, the only ones), as words separated by spaces or '+':
``style``, ``layout``, ``mid``, ``down``/``up`` (every block), ``up.block_N`` (every transformer of it),
``up.block_N.I`` (its I-th transformer), or ``up.block_N:0,1,0`` (diffusers' per-transformer list, each value
multiplied by ``ip_scale``). No torch here: a request's spec is checked when the request is made."""

from __future__ import annotations

import re
from dataclasses import dataclass

from stylegrad.errors import StylegradError

_BLOCK = re.compile(r"^(down|up)\.block_(\d+)(?:\.(\d+)|:([0-9.,eE+-]+))?$")


@dataclass(frozen=True)
class Block:
    """One choice: ``part`` 'down', 'up' or 'mid'; ``block`` None for every block of the part; ``index`` one
    transformer; ``scales`` diffusers' per-transformer list."""

    part: str
    block: int | None = None
    index: int | None = None
    scales: tuple[float, ...] | None = None


STYLE = {"sdxl": (Block("up", 0, 1),), "sd1": (Block("up", 1),)}
LAYOUT = {"sdxl": (Block("down", 2, 1),), "sd1": (Block("down", 2), Block("mid"))}


def _family_key(family: str) -> str:
    return "sdxl" if str(family).startswith("sdxl") else "sd1"


def parse_blocks(spec: str) -> tuple[str | Block, ...]:
    """``spec`` -> its words ('style', 'layout') and Blocks; a word that is none of the forms is one line."""
    out: list[str | Block] = []
    for word in re.split(r"[\s+]+", spec.strip()):
        if not word:
            continue
        low = word.lower()
        if low in ("style", "layout"):
            out.append(low)
        elif low in ("mid", "down", "up"):
            out.append(Block(low))
        else:
            m = _BLOCK.match(low)
            if m is None:
                raise StylegradError(f"'{word}' is not a block (style, layout, mid, down, up, up.block_0, "
                                     "up.block_0.1 or up.block_0:0,1,0)")
            scales = None
            if m.group(4) is not None:
                try:
                    scales = tuple(float(v) for v in m.group(4).split(","))
                except ValueError:
                    raise StylegradError(f"'{word}': the scales after ':' must be numbers") from None
            out.append(Block(m.group(1), int(m.group(2)), None if m.group(3) is None else int(m.group(3)), scales))
    if not out:
        raise StylegradError("names no block")
    return tuple(out)


def chosen_blocks(family: str, style: bool, spec: str | None) -> tuple[Block, ...] | None:
    """The blocks a request asks for; None: every attention layer (plain IP-Adapter)."""
    words: list[str | Block] = (["style"] if style else []) + list(parse_blocks(spec) if spec else ())
    if not words:
        return None
    key = _family_key(family)
    out: list[Block] = []
    for w in words:
        out += STYLE[key] if w == "style" else LAYOUT[key] if w == "layout" else [w]
    return tuple(dict.fromkeys(out))


def scale_config(blocks: tuple[Block, ...] | None, scale: float, transformers: dict[str, int]) -> float | dict:
    """diffusers' ``set_ip_adapter_scale`` value for ``blocks`` at ``scale``: a float (every layer) or its dict.
    ``transformers``: how many transformers a block of each part has ({'down': layers_per_block, 'up': +1})."""
    if blocks is None:
        return scale
    config: dict = {}
    for b in blocks:
        if b.part == "mid":
            config["mid"] = scale
            continue
        if b.block is None:
            config[b.part] = scale  # diffusers expands it to every block that has transformers
            continue
        n = transformers[b.part]
        if b.scales is not None:
            if len(b.scales) != n:
                raise StylegradError(f"{b.part}.block_{b.block} has {n} transformers here, the spec gives "
                                     f"{len(b.scales)} scales")
            values = [s * scale for s in b.scales]
        elif b.index is not None:
            if b.index >= n:
                raise StylegradError(f"{b.part}.block_{b.block} has {n} transformers here, no transformer {b.index}")
            values = [scale if i == b.index else 0.0 for i in range(n)]
        else:
            values = [scale] * n
        part = config.setdefault(b.part, {})
        if not isinstance(part, dict):
            continue  # the whole part was chosen already
        old = part.get(f"block_{b.block}", [0.0] * n)
        part[f"block_{b.block}"] = [max(a, v) for a, v in zip(old, values)]
    return config


def describe(blocks: tuple[Block, ...] | None) -> str:
    """The blocks as the spec reads them (the PNG's record)."""
    if blocks is None:
        return "all"
    words = []
    for b in blocks:
        w = b.part if b.block is None else f"{b.part}.block_{b.block}"
        if b.index is not None:
            w += f".{b.index}"
        if b.scales is not None:
            w += ":" + ",".join(f"{s:g}" for s in b.scales)
        words.append(w)
    return " ".join(words)
