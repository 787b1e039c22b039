"""Checkpoint files one tensor at a time: a reader that never holds more than the tensor asked for, and a
safetensors writer that streams its output, so multi-GB files are merged and loaded in little memory.

safetensors is 8 bytes of header length, a JSON header (dtype, shape, byte offsets of every tensor, and string
``__metadata__``), then the tensors' bytes. Reading one tensor is one ``readinto`` at its offset (page cache, not
our memory); writing needs every tensor's size first, which the inputs' headers give before any data is read.
``.ckpt``/``.pt`` pickles go through ``pickles.load_pickle`` (``weights_only``, memory-mapped where the zip format
allows it).
"""

from __future__ import annotations

import contextlib
import json
import math
import os
import struct
from collections.abc import Iterable
from pathlib import Path

import torch

from stylegrad.errors import StylegradError
from stylegrad.files.atomic import atomic_path
from stylegrad.files.pickles import NotATorchFile, UnsafePickle, load_pickle

ST_TO_TORCH = {
    "F64": torch.float64, "F32": torch.float32, "F16": torch.float16, "BF16": torch.bfloat16, "I64": torch.int64,
    "I32": torch.int32, "I16": torch.int16, "I8": torch.int8, "U8": torch.uint8, "BOOL": torch.bool,
    "F8_E4M3": torch.float8_e4m3fn, "F8_E5M2": torch.float8_e5m2,
}
TORCH_TO_ST = {v: k for k, v in ST_TO_TORCH.items()}


class TensorFile:
    """The tensors of a checkpoint by name, with shapes and dtypes known before any is read."""

    def __init__(self, path: str | os.PathLike):
        self.path = Path(path)
        self.metadata: dict[str, str] = {}
        self._fd = None
        self._tensors: dict[str, torch.Tensor] | None = None
        with open(self.path, "rb") as f:
            head = f.read(9)
        if len(head) == 9 and head[8:9] == b"{":
            self._open_safetensors()
        else:
            self._open_pickle()

    # -- opening ---------------------------------------------------------------------------------------------------

    def _open_safetensors(self) -> None:
        f = open(self.path, "rb")  # noqa: SIM115 - kept open until close()
        try:
            (n,) = struct.unpack("<Q", f.read(8))
            header = json.loads(f.read(n))
        except (struct.error, ValueError, UnicodeDecodeError) as e:
            f.close()
            raise StylegradError(f"{self.path} is not a readable safetensors file ({type(e).__name__})") from e
        self._fd, self._base = f, 8 + n
        self.metadata = {str(k): str(v) for k, v in (header.pop("__metadata__", None) or {}).items()}
        self._entries = {}
        for key, e in header.items():
            if e["dtype"] not in ST_TO_TORCH:
                raise StylegradError(f"{self.path}: tensor {key} has dtype {e['dtype']}, which stylegrad does not read")
            self._entries[key] = (ST_TO_TORCH[e["dtype"]], tuple(e["shape"]), tuple(e["data_offsets"]))
        size = self.path.stat().st_size
        if any(self._base + end > size for _, _, (_, end) in self._entries.values()):
            raise StylegradError(f"{self.path} is truncated (its header points past the end of the file)")

    def _open_pickle(self) -> None:
        try:
            obj = load_pickle(self.path, mmap=True)
        except UnsafePickle as e:
            raise StylegradError(f"{self.path} is a pickle that asks for Python code or objects ({e}); stylegrad "
                                 "loads plain tensors only") from e
        except NotATorchFile as e:
            raise StylegradError(f"{self.path} is not a readable checkpoint ({e})") from e
        if isinstance(obj, dict) and isinstance(obj.get("state_dict"), dict):
            obj = obj["state_dict"]
        if not isinstance(obj, dict):
            raise StylegradError(f"{self.path} holds a {type(obj).__name__}, not a state dict")
        self._tensors = {k: v for k, v in obj.items() if isinstance(v, torch.Tensor)}
        self._entries = {k: (v.dtype, tuple(v.shape), None) for k, v in self._tensors.items()}

    # -- reading ---------------------------------------------------------------------------------------------------

    def keys(self) -> list[str]:
        """In file order (safetensors: by offset), the order that reads the file front to back."""
        if self._tensors is not None:
            return list(self._entries)
        return sorted(self._entries, key=lambda k: self._entries[k][2][0])

    def __contains__(self, key: str) -> bool:
        return key in self._entries

    def __len__(self) -> int:
        return len(self._entries)

    @property
    def shapes(self) -> dict[str, tuple]:
        return {k: e[1] for k, e in self._entries.items()}

    def shape(self, key: str) -> tuple:
        return self._entries[key][1]

    def dtype(self, key: str) -> torch.dtype:
        return self._entries[key][0]

    def get(self, key: str) -> torch.Tensor:
        """A tensor of its own (nothing else of the file stays in memory)."""
        if self._tensors is not None:
            return self._tensors[key]
        dtype, shape, (start, end) = self._entries[key]
        return self.read_into(key, torch.empty(end - start, dtype=torch.uint8))

    def read_into(self, key: str, buffer: torch.Tensor) -> torch.Tensor:
        """The tensor read into ``buffer`` (uint8, large enough), as a view: no allocation, for streaming loops
        that would otherwise page in fresh memory for every tensor."""
        dtype, shape, offsets = self._entries[key]
        if self._tensors is not None:
            return self._tensors[key]
        start, end = offsets
        view = buffer[: end - start]
        self._fd.seek(self._base + start)
        if end > start and self._fd.readinto(memoryview(view.numpy())) != end - start:
            raise StylegradError(f"{self.path} is truncated (tensor {key})")
        return view.view(dtype).reshape(shape)

    def close(self) -> None:
        if self._fd is not None:
            self._fd.close()
            self._fd = None
        self._tensors = None

    def __enter__(self) -> TensorFile:
        return self

    def __exit__(self, *exc) -> None:
        self.close()


def nbytes(dtype: torch.dtype, shape: Iterable[int]) -> int:
    return math.prod(shape) * torch.empty((), dtype=dtype).element_size()


class SafetensorsWriter:
    """Writes a safetensors file whose tensors are announced up front and then written one at a time, in order.
    The file appears (atomically) only when every tensor has been written."""

    def __init__(self, path: str | os.PathLike, entries: list[tuple[str, torch.dtype, tuple]],
                 metadata: dict[str, str] | None = None):
        self.path = Path(path)
        self.metadata = dict(metadata or {})
        self._tensor_header: dict = {}
        offset = 0
        self._order = []
        for key, dtype, shape in entries:
            size = nbytes(dtype, shape)
            self._tensor_header[key] = {"dtype": TORCH_TO_ST[dtype], "shape": list(shape),
                                        "data_offsets": [offset, offset + size]}
            self._order.append((key, dtype, tuple(shape), size))
            offset += size
        self._header = self._render()
        self._next = 0

    def _render(self, length: int | None = None) -> bytes:
        header = {"__metadata__": self.metadata, **self._tensor_header} if self.metadata else self._tensor_header
        raw = json.dumps(header, separators=(",", ":")).encode()
        if length is None:
            raw += b" " * (-len(raw) % 8)  # keeps the tensor data 8-byte aligned, as safetensors itself writes
        elif len(raw) > length:
            raise ValueError("the final metadata is longer than the space reserved for it")
        else:
            raw += b" " * (length - len(raw))  # the spec allows trailing spaces in the header
        return struct.pack("<Q", len(raw)) + raw

    def __enter__(self) -> SafetensorsWriter:
        self._stack = contextlib.ExitStack()
        tmp = self._stack.enter_context(atomic_path(self.path))
        self._f = self._stack.enter_context(open(tmp, "wb"))
        self._f.write(self._header)
        return self

    def write(self, key: str, tensor: torch.Tensor) -> None:
        want_key, dtype, shape, size = self._order[self._next]
        if key != want_key or tensor.dtype != dtype or tuple(tensor.shape) != shape:
            raise ValueError(f"expected {want_key} {dtype} {shape}, got {key} {tensor.dtype} {tuple(tensor.shape)}")
        if size:
            self._f.write(tensor.detach().contiguous().cpu().reshape(-1).view(torch.uint8).numpy().data)
        self._next += 1

    def __exit__(self, kind, value, tb) -> bool:
        if kind is None and self._next != len(self._order):
            error = ValueError(f"only {self._next} of {len(self._order)} tensors were written")
            self._stack.__exit__(ValueError, error, None)  # the partial file is removed
            raise error
        if kind is None:
            final = self._render(len(self._header) - 8)  # metadata set while writing (same-length values)
            if final != self._header:
                self._f.seek(0)
                self._f.write(final)
        return self._stack.__exit__(kind, value, tb)
