"""A safetensors file read as data, without torch: the JSON header (names, dtypes, shapes, byte offsets and the
string ``__metadata__``), and one small float tensor's values.

safetensors is 8 bytes of header length (little endian), the JSON header, then the tensors' bytes. Saying what a
file is (``stylegrad info``), listing a models folder (``stylegrad models``) and checking a style vector need no
more than this, so they start in the time Python takes rather than the seconds importing torch takes; the loaders
read tensors through torch (``checkpoints/tensors.py``, ``safetensors.safe_open``).
"""

from __future__ import annotations

import json
import math
import os
import struct
from dataclasses import dataclass, field

# safetensors' dtype names -> torch's (what ``info`` prints, and what torch would read them as)
DTYPES = {"F16": "float16", "F32": "float32", "BF16": "bfloat16", "F64": "float64", "I64": "int64", "I32": "int32",
          "I8": "int8", "U8": "uint8", "BOOL": "bool", "I16": "int16", "F8_E4M3": "float8_e4m3fn",
          "F8_E5M2": "float8_e5m2"}


@dataclass(frozen=True)
class Header:
    """One file's header: ``entries`` maps each tensor's name to its JSON entry (dtype, shape, data_offsets)."""

    path: str
    entries: dict[str, dict]
    metadata: dict[str, str] = field(default_factory=dict)
    data_start: int = 8  # where the tensors' bytes begin: 8 + the header's length

    @property
    def shapes(self) -> dict[str, tuple[int, ...]]:
        return {k: tuple(e["shape"]) for k, e in self.entries.items()}

    @property
    def dtypes(self) -> dict[str, str]:
        """torch's name of each tensor's dtype ('float32'); an unknown one lower-cased as the file writes it."""
        return {k: DTYPES.get(e["dtype"], e["dtype"].lower()) for k, e in self.entries.items()}

    def data_end(self) -> int:
        """The offset just past the last tensor's bytes (beyond the file's size: a truncated file)."""
        return self.data_start + max((e["data_offsets"][1] for e in self.entries.values()), default=0)


def read_header(path: str | os.PathLike) -> Header:
    """The header alone: a 7 GB checkpoint is described without reading its tensors. A file that is not
    safetensors raises ``struct.error`` (too short), ``ValueError`` (not JSON; ``json.JSONDecodeError`` is one) or
    ``UnicodeDecodeError``, which callers word for their own context."""
    with open(path, "rb") as f:
        (n,) = struct.unpack("<Q", f.read(8))
        header = json.loads(f.read(n))
    if not isinstance(header, dict):
        raise ValueError("the header is not a JSON object")
    metadata = {str(k): str(v) for k, v in (header.pop("__metadata__", None) or {}).items()}
    return Header(str(path), header, metadata, 8 + n)


# struct's format letter per float dtype whose values Python reads exactly; BF16 is the top half of a float32
_FLOAT_FORMATS = {"F32": ("f", 4), "F16": ("e", 2), "BF16": ("H", 2)}


def float_values(header: Header, key: str, limit: int = 1 << 16) -> list[float] | None:
    """The values of a small float tensor (a style vector), exactly as float32 holds them; None for other dtypes,
    a tensor of more than ``limit`` values or bytes that do not match the header: callers read those through torch
    (and its reader's error)."""
    entry = header.entries[key]
    fmt = _FLOAT_FORMATS.get(entry["dtype"])
    count = math.prod(entry["shape"])
    if fmt is None or count > limit:
        return None
    letter, size = fmt
    start, end = entry["data_offsets"]
    if end - start != count * size:
        return None
    with open(header.path, "rb") as f:
        f.seek(header.data_start + start)
        raw = f.read(end - start)
    if len(raw) != end - start:
        return None
    values = struct.unpack(f"<{count}{letter}", raw)
    if entry["dtype"] == "BF16":
        values = struct.unpack(f"<{count}f", struct.pack(f"<{count}I", *(v << 16 for v in values)))
    return list(values)


def float32_norm(values: list[float]) -> float:
    """The Euclidean norm, summed exactly and rounded to float32 (the precision the vector is used in); inf or nan
    when a value is."""
    norm = math.sqrt(math.fsum(v * v for v in values))
    try:
        return struct.unpack("<f", struct.pack("<f", norm))[0]
    except OverflowError:  # beyond float32's range: infinite in float32, as torch would say
        return math.inf
