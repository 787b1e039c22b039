"""Stylecodes (Rowles 2024, arXiv 2411.12811): a style as a short code to paste into a prompt. Pure functions.

A code stands for a 20-dimensional latent in [-1, 1], quantized to 64 levels q = 0..63 (z = 2q/63 - 1).
- stylegrad's format (the paper's promise): 20 symbols, symbol i = ``A-Z a-z 0-9 - _`` at q_i, then one version
  digit naming the encoder/decoder weights (``1`` = the published SD1.5 model). 21 characters, URL-safe.
- The reference implementation's format: one byte per level, standard base64 with '=' stripped (27 characters).

The reference quantizer truncates (z + 1) * 31.5 in float32, which drops a level for 15 of the 64 decoded values
(2q/63 - 1 lands a hair under q in float32). ``quantize`` works in float64 and adds a 1e-4-level tolerance, so
decode-then-encode always returns the same code; it differs from the reference only for latents within 1e-4 of a
level boundary.
"""

from __future__ import annotations

import base64
import binascii
import math
import re
import struct
from dataclasses import dataclass

from stylegrad.errors import StylegradError

DIM = 20
LEVELS = 64
ALPHABET = "ABCDEFGHIJKLMNOPQRSTUVWXYZabcdefghijklmnopqrstuvwxyz0123456789-_"
VERSIONS = {1: "published Stylecodes SD1.5 model (CiaraRowles/stylecodes, stylecodes_sd15_v1.bin)"}
TOLERANCE = 1e-4  # in levels: absorbs float32 rounding of decoded latents


@dataclass(frozen=True)
class Code:
    levels: tuple[int, ...]  # DIM values in 0..63
    version: int = 1
    format: str = "stylegrad"  # or "reference"

    @property
    def latent(self) -> list[float]:
        return dequantize(self.levels)


def quantize(latent) -> tuple[int, ...]:
    """DIM floats in [-1, 1] (clipped) -> levels 0..63; stable under dequantize."""
    values = [float(v) for v in latent]
    if len(values) != DIM:
        raise StylegradError(f"a stylecode latent has {DIM} values, got {len(values)}")
    if not all(math.isfinite(v) for v in values):
        raise StylegradError("a stylecode latent must be finite")
    return tuple(min(LEVELS - 1, max(0, math.floor((v + 1.0) * 31.5 + TOLERANCE))) for v in values)


def _f32(x: float) -> float:
    return struct.unpack("f", struct.pack("f", x))[0]


def dequantize(levels) -> list[float]:
    """Levels -> latent, bit-for-bit as the reference decoder: z = float32(q) * 2 / 63 - 1 in float32 steps."""
    return [_f32(_f32(_f32(float(q)) * 2.0 / 63.0) - 1.0) for q in levels]


def encode(levels, version: int = 1, format: str = "stylegrad") -> str:
    """Levels -> code string (stylegrad's 21-character format unless ``format="reference"``)."""
    levels = tuple(int(q) for q in levels)
    if len(levels) != DIM or not all(0 <= q < LEVELS for q in levels):
        raise StylegradError(f"a stylecode has {DIM} levels in 0..{LEVELS - 1}, got {list(levels)}")
    if format == "reference":
        return base64.b64encode(bytes(levels)).decode().rstrip("=")
    if format != "stylegrad":
        raise StylegradError(f"unknown stylecode format '{format}' (stylegrad or reference)")
    if version not in VERSIONS:
        raise StylegradError(f"unknown stylecode version {version} (known: {', '.join(map(str, VERSIONS))})")
    return "".join(ALPHABET[q] for q in levels) + str(version)


def decode(code: str) -> Code:
    """Either format -> Code; a wrong length, alphabet, level or version is a one-line error."""
    code = code.strip()
    if len(code) == DIM + 1 and re.fullmatch(r"[A-Za-z0-9_-]{20}[0-9]", code):
        version = int(code[-1])
        if version not in VERSIONS:
            raise StylegradError(
                f"stylecode '{code}' was made for model version {version}; this stylegrad knows version(s) "
                f"{', '.join(map(str, VERSIONS))}"
            )
        return Code(tuple(ALPHABET.index(c) for c in code[:DIM]), version, "stylegrad")
    if len(code) in (27, 28) and re.fullmatch(r"[A-Za-z0-9+/]{27}=?", code):
        try:
            raw = base64.b64decode(code.rstrip("=") + "=", validate=True)
        except binascii.Error as e:
            raise StylegradError(f"stylecode '{code}' is not valid base64") from e
        levels = tuple(raw[:DIM])
        if any(q >= LEVELS for q in levels):
            raise StylegradError(f"stylecode '{code}' has a level above {LEVELS - 1}: {list(levels)}")
        return Code(levels, 1, "reference")
    if len(code) == DIM + 1:
        raise StylegradError(f"stylecode '{code}' has a character outside A-Z a-z 0-9 - _ or no version digit")
    raise StylegradError(
        f"stylecode '{code}' has {len(code)} characters; expected 21 (stylegrad) or 27 (reference implementation)"
    )


def parse_weighted(text: str) -> list[tuple[Code, float]]:
    """'CODE1::2 CODE2::1' -> codes with weights (default 1), like Midjourney's multi --sref."""
    parts = []
    for item in text.split():
        code, sep, weight = item.partition("::")
        try:
            w = float(weight) if sep else 1.0
        except ValueError as e:
            raise StylegradError(f"stylecode weight '{weight}' is not a number") from e
        parts.append((decode(code), w))
    if not parts:
        raise StylegradError("no stylecode given")
    if sum(w for _, w in parts) <= 0:
        raise StylegradError("stylecode weights must add up to more than 0")
    versions = {c.version for c, _ in parts}
    if len(versions) > 1:
        raise StylegradError(f"cannot blend stylecodes of different model versions: {sorted(versions)}")
    return parts


def blend(parts: list[tuple[Code, float]]) -> list[float]:
    """Weighted mean of the codes' latents (what the decoder receives for a multi-code prompt)."""
    total = sum(w for _, w in parts)
    return [sum(w * c.latent[i] for c, w in parts) / total for i in range(DIM)]


def random_code(seed: int | None = None, format: str = "stylegrad") -> str:
    import random

    rng = random.Random(seed)
    return encode([rng.randrange(LEVELS) for _ in range(DIM)], format=format)
