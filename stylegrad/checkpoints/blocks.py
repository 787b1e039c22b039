"""Block-weighted merging: one multiplier per UNet block instead of one for the whole model.

The blocks are the original UNet's: ``input_blocks.N`` (IN00...), ``middle_block`` (M00), ``output_blocks.N``
(OUT00...). SD1.x/SD2.x have 12 + 1 + 12 = 25, SDXL 9 + 1 + 9 = 19. As the Merge Block Weighted extension and
supermerger count them, the UNet's ``time_embed`` (and SDXL's ``label_emb``) go with IN00 and its final ``out.``
layers with the last OUT block; everything outside the UNet (text encoders, VAE) takes BASE, which is ``--alpha``
unless the list gives one more number first.
"""

from __future__ import annotations

import re

from stylegrad.errors import StylegradError
from stylegrad.families import Family

COUNTS = {Family.SD1: (12, 12), Family.SD2: (12, 12), Family.SDXL: (9, 9)}  # input, output blocks
_BLOCK = re.compile(r"^model\.diffusion_model\.(input_blocks|middle_block|output_blocks)\.(\d+)\.")


def block_names(family: str) -> list[str]:
    n_in, n_out = COUNTS[family]
    return [f"IN{i:02d}" for i in range(n_in)] + ["M00"] + [f"OUT{i:02d}" for i in range(n_out)]


def block_of(key: str, family: str) -> str | None:
    """The block a key belongs to, or None for BASE (everything outside the UNet)."""
    n_in, n_out = COUNTS[family]
    m = _BLOCK.match(key)
    if m:
        kind, n = m[1], int(m[2])
        return {"input_blocks": f"IN{n:02d}", "middle_block": "M00", "output_blocks": f"OUT{n:02d}"}[kind]
    if key.startswith(("model.diffusion_model.time_embed.", "model.diffusion_model.label_emb.")):
        return "IN00"
    if key.startswith("model.diffusion_model.out."):
        return f"OUT{n_out - 1:02d}"
    if key.startswith("model.diffusion_model."):
        return "M00"  # no other UNet keys exist in SD1/SD2/SDXL; keep any stray one with the middle
    return None


def _ramp(n: int, start: float, end: float) -> list[float]:
    return [start + (end - start) * i / (n - 1) for i in range(n)] if n > 1 else [end]


def preset(name: str, family: str) -> list[float]:
    """Named weight lists, built for the family's block count (the names are supermerger's and MBW's)."""
    n_in, n_out = COUNTS[family]
    presets = {
        "FLAT_25": [0.25] * (n_in + 1 + n_out),
        "FLAT_50": [0.5] * (n_in + 1 + n_out),
        "FLAT_75": [0.75] * (n_in + 1 + n_out),
        "IN_ONLY": [1.0] * n_in + [0.0] + [0.0] * n_out,  # B's composition, A's detail
        "OUT_ONLY": [0.0] * n_in + [0.0] + [1.0] * n_out,  # A's composition, B's detail and colour
        "MID_ONLY": [0.0] * n_in + [1.0] + [0.0] * n_out,
        "GRAD_V": _ramp(n_in, 1.0, 0.0) + [0.0] + _ramp(n_out, 0.0, 1.0),  # B at both ends, A in the middle
        "GRAD_A": _ramp(n_in, 0.0, 1.0) + [1.0] + _ramp(n_out, 1.0, 0.0),  # A at both ends, B in the middle
        "SMOOTHSTEP": [t * t * (3 - 2 * t) for t in _ramp(n_in + 1 + n_out, 0.0, 1.0)],
        "REVERSE_SMOOTHSTEP": [1 - t * t * (3 - 2 * t) for t in _ramp(n_in + 1 + n_out, 0.0, 1.0)],
    }
    key = name.strip().upper().replace("-", "_")
    if key not in presets:
        raise StylegradError(f"unknown block-weight preset '{name}' (choose from {', '.join(presets)})")
    return presets[key]


PRESET_NAMES = ("FLAT_25", "FLAT_50", "FLAT_75", "IN_ONLY", "OUT_ONLY", "MID_ONLY", "GRAD_V", "GRAD_A", "SMOOTHSTEP",
                "REVERSE_SMOOTHSTEP")


def parse_block_weights(text: str, family: str, base: float) -> tuple[float, dict[str, float]]:
    """(BASE, {block: weight}) from 'PRESET', or N comma-separated numbers (N = blocks, or blocks + 1 with BASE
    first)."""
    names = block_names(family)
    text = text.strip()
    if re.fullmatch(r"[A-Za-z_\-]+", text):
        values = preset(text, family)
    else:
        try:
            values = [float(v) for v in re.split(r"[,\s]+", text) if v]
        except ValueError as e:
            raise StylegradError(f"block weights must be {len(names)} numbers or a preset name, got '{text}'") from e
        if len(values) == len(names) + 1:
            base, values = values[0], values[1:]
        elif len(values) != len(names):
            raise StylegradError(f"{family} has {len(names)} blocks ({names[0]}..{names[-1]}): give {len(names)} "
                                 f"weights, or {len(names) + 1} with BASE first; got {len(values)}")
    return base, dict(zip(names, values))
