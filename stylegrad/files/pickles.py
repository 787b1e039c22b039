"""Reading ``.pt/.bin/.ckpt`` pickles as data: ``torch.load(weights_only=True)``, with an explicit allow-list for the
old formats people still share, never ``weights_only=False``.

- ``torch.nn.ParameterDict``: the original 2022 textual-inversion files keep ``string_to_param`` as one.
- numpy's array rebuilders: tensors saved from an Apple MPS device are pickled through numpy.
- PyTorch Lightning's ``ModelCheckpoint`` callback state, pickled into the 2022 ``.ckpt`` releases of Stable
  Diffusion beside the weights: rebuilt as an empty stand-in that keeps nothing, with numpy scalars (its scores).
"""

from __future__ import annotations

import os
import pickle
import warnings

import torch

from stylegrad.errors import first_line


class UnsafePickle(Exception):
    """The pickle asks for a Python global outside the allow-list (code, or an object we do not load)."""


class NotATorchFile(Exception):
    """The bytes are not a torch pickle that can be read (truncated, corrupt, or another format)."""


class _DroppedObject:
    """Stands in for a training-time object inside a checkpoint; its state is thrown away."""

    def __setstate__(self, state) -> None:
        pass


def _allow_list() -> list:
    allowed: list = [torch.nn.ParameterDict]
    allowed += [(_DroppedObject, f"pytorch_lightning.callbacks.{name}.ModelCheckpoint")
                for name in ("model_checkpoint", "checkpoint")]
    try:
        import numpy as np
        from numpy import dtypes
        from numpy._core import multiarray
    except ImportError:  # numpy < 2 names them differently; without numpy no MPS file can be read anyway
        return allowed
    allowed += [(multiarray._reconstruct, "numpy.core.multiarray._reconstruct"), np.ndarray, np.dtype,
                (multiarray.scalar, "numpy.core.multiarray.scalar")]
    allowed += [getattr(dtypes, n) for n in dir(dtypes) if n.endswith("DType")]
    return allowed


def load_pickle(path: str | os.PathLike, mmap: bool = False):
    """The object in a torch pickle, on the CPU; only tensors, containers and the allow-list are rebuilt.
    ``mmap``: leave the tensors' bytes in the file until used (zip-format files; older ones are read whole)."""
    with open(path, "rb") as f:
        mmap = mmap and f.read(4) == b"PK\x03\x04"
    try:
        with warnings.catch_warnings(), torch.serialization.safe_globals(_allow_list()):
            warnings.simplefilter("ignore")  # torch warns about old pickle protocols before reading them
            return torch.load(path, map_location="cpu", weights_only=True, mmap=mmap)
    except pickle.UnpicklingError as e:
        text = str(e)
        if "WeightsUnpickler error" in text:  # torch's safe unpickler refused something: a global or an opcode
            if "GLOBAL " in text:
                reason = text.split("GLOBAL ", 1)[1].split(" ", 1)[0]
            else:
                reason = text.split("WeightsUnpickler error:", 1)[1].strip().splitlines()[0][:80]
            raise UnsafePickle(reason) from e
        raise NotATorchFile(first_line(e, 160)) from e
    except Exception as e:  # the unpickler raises many types for bytes that are not a torch file
        raise NotATorchFile(first_line(e, 160)) from e
