"""The engine's settings: how ``personalize`` computes the method (method.py), never what it computes.

Three choices, each trading time for memory or portability within docs/exactness.md's contract:
- ``memory``: the large weights' Adam moments kept (``"fast"``), rebuilt each step from the gradients' factors
  (``"low"``), as many kept as fit in a byte budget (an int, or a size such as ``"6GB"``), or ``"auto"`` (a budget
  of 3/4 of the free memory); memory.py. The same bits on the compiled kernels.
- ``kernels``: stylegrad's compiled few-row kernels and fused Adam where built (products.py, _fewrows.c), else
  torch's; float rounding apart.
- ``reuse_memory``: keep a prompt's tuning memory for the next prompt (workspace.py). The same bits.

Pass one explicitly (``personalize(..., engine=)``, ``AestheticEncoder(..., engine=)``); without one, each tuning
reads its default from the environment: STYLEGRAD_TUNING_MEMORY (``--tuning-memory``), STYLEGRAD_KERNELS=0,
STYLEGRAD_REUSE_MEMORY=0."""

from __future__ import annotations

import os
from collections.abc import Iterator, Mapping
from contextlib import contextmanager
from dataclasses import dataclass

from stylegrad.aesthetic.memory import parse_setting
from stylegrad.aesthetic.products import kernels_enabled


@dataclass(frozen=True)
class EngineSettings:
    """How tuning runs: ``memory`` ("fast", "low", "auto" or a byte budget, normalized on construction: a size
    such as "6GB" becomes its bytes), ``kernels``, ``reuse_memory`` (module docstring)."""

    memory: str | int = "auto"
    kernels: bool = True
    reuse_memory: bool = True

    def __post_init__(self):
        object.__setattr__(self, "memory", parse_setting(self.memory))  # refused here, with the accepted forms

    @classmethod
    def from_environment(cls, environ: Mapping[str, str] | None = None) -> EngineSettings:
        """The defaults, from STYLEGRAD_TUNING_MEMORY (default auto), STYLEGRAD_KERNELS and STYLEGRAD_REUSE_MEMORY
        (on unless "0")."""
        env = os.environ if environ is None else environ
        return cls(memory=env.get("STYLEGRAD_TUNING_MEMORY", "auto"), kernels=env.get("STYLEGRAD_KERNELS", "1") != "0",
                   reuse_memory=env.get("STYLEGRAD_REUSE_MEMORY", "1") != "0")

    @contextmanager
    def applied(self) -> Iterator[EngineSettings]:
        """Within the block, the products and Adam steps follow ``kernels`` (products.kernels_enabled); memory and
        reuse are read from this object by ``TunedWeights``."""
        with kernels_enabled(self.kernels):
            yield self


def resolve(engine: EngineSettings | None) -> EngineSettings:
    """``engine``, or the environment's defaults when None (read at each call, so a changed variable counts)."""
    return EngineSettings.from_environment() if engine is None else engine
