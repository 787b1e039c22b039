"""The memory tuning carves its large tensors from, kept from one prompt for the next.

Why: a prompt's tuned copies and Adam moments (SDXL's bigG: 6.3 GB on AVX-512, 7.5 GB elsewhere, docs/exactness.md)
used to be fresh memory every prompt, and the kernel zeroes each fresh page before handing it over. On the 2-core
test machine that was 3-5 s of system time a prompt, and a whole prompt ran 7% slower than one that found its
memory already mapped (2026-12-03). So the two blocks a prompt carves them from (``HugeBlock``: copies, moments)
are not unmapped when it ends but marked MADV_FREE: the kernel may take their pages back at any moment, without
writing them anywhere, and counts them as available memory; the next prompt reuses the pages it did not take.
Process memory figures (RSS) still show them until the kernel needs them. ``EngineSettings(reuse_memory=False)``
(engine.py; by default ``STYLEGRAD_REUSE_MEMORY=0``) turns this off: every prompt maps fresh memory and unmaps it
at its end. It is also off where Linux's MADV_FREE is missing, and on GPUs, whose allocator keeps its memory
anyway. bench/personalize.py prints its gain (its "stylegrad-fresh" row).

A block goes back only when nothing can still read it: every tensor carved from it holds a reference to its
mapping, and the block is reused only once the workspace's is the last. Tensors handed to the caller
(``personalize(..., keep_weights=True)``) are never carved from a reused block."""

from __future__ import annotations

import math
import mmap
import sys
import threading

import torch

from stylegrad.aesthetic.pages import HUGE_PAGE, advise_huge


def block_bytes(numel: int, dtype: torch.dtype) -> int:
    """Bytes a tensor takes in a ``HugeBlock``: its own, rounded up to a 64-byte line."""
    return -(-numel * dtype.itemsize // 64) * 64


def _padded(nbytes: int) -> int:
    """Bytes to allocate for a block of ``nbytes``: 2 MB more to align it, where it can hold a huge page."""
    return nbytes + HUGE_PAGE if nbytes >= 2 * HUGE_PAGE else nbytes


class HugeBlock:
    """Tensors carved one after another from one block of memory in 2 MB pages. Why one block: Linux maps only
    whole, aligned 2 MB pages as huge ones, so a tensor of its own keeps up to 2 MB at each end in 4 KB pages
    (500 page faults for each of bigG's 26 MB weights); here only the block's last page can be small.
    ``nbytes``: at least the sum of ``block_bytes`` of what will be carved; pages never touched cost nothing.
    ``region``: memory to carve from (``Workspace``); None, a tensor made at the first request."""

    def __init__(self, nbytes: int, device: torch.device | str = "cpu", region: _Region | None = None):
        self.nbytes, self.device, self.used, self.region = nbytes, torch.device(device), 0, region
        self._base: torch.Tensor | None = None  # every carved tensor is a view of it
        self._block: torch.Tensor | None = None

    def empty(self, shape: torch.Size | tuple[int, ...], dtype: torch.dtype) -> torch.Tensor:
        """An uninitialized contiguous tensor of ``shape`` and ``dtype``, its first byte aligned to 64."""
        numel = math.prod(shape)
        size = block_bytes(numel, dtype)
        if self.used + size > self.nbytes:
            raise ValueError(f"HugeBlock: {size} bytes asked, {self.nbytes - self.used} left")
        if self._block is None:
            self._base = (self.region.tensor() if self.region is not None else
                          torch.empty(_padded(self.nbytes), dtype=torch.uint8, device=self.device))
            skip = -self._base.data_ptr() % HUGE_PAGE if _padded(self.nbytes) > self.nbytes else 0
            self._block = advise_huge(self._base[skip:skip + self.nbytes])
        start, self.used = self.used, self.used + size
        return self._block[start:start + numel * dtype.itemsize].view(dtype).view(shape)


class _Region:
    """An anonymous private mapping that outlives the prompts using it."""

    def __init__(self, nbytes: int):
        self.nbytes = nbytes
        self.map = mmap.mmap(-1, _padded(nbytes), flags=mmap.MAP_PRIVATE | mmap.MAP_ANONYMOUS)

    def tensor(self) -> torch.Tensor:
        """The whole mapping as a uint8 tensor (``_padded``)."""
        return torch.frombuffer(self.map, dtype=torch.uint8)

    def in_use(self) -> bool:
        """Whether a tensor still reads the mapping: torch holds a reference to it for as long as any view of
        ``tensor()`` lives (not a buffer export, so ``mmap.close`` would not refuse)."""
        return sys.getrefcount(self.map) > 2  # this object's, and the argument's

    def lazy_free(self) -> None:
        self.map.madvise(mmap.MADV_FREE)  # the contents may go; the next touch finds them or a zeroed page

    def close(self) -> None:
        """Drop the mapping: Python unmaps it once no tensor holds it any more."""
        self.map = None


class Workspace:
    """At most one free region of each kind ("copies", "moments"), the largest released so far."""

    def __init__(self):
        self._free: dict[str, _Region] = {}
        self._lock = threading.Lock()
        self.reused = 0  # leases served from a kept region (tests, bench)

    @staticmethod
    def enabled(device: torch.device) -> bool:
        """Whether memory can be kept between prompts on ``device`` (Linux's MADV_FREE, the CPU)."""
        return device.type == "cpu" and sys.platform.startswith("linux") and hasattr(mmap, "MADV_FREE")

    def lease(self, kind: str, nbytes: int, device: torch.device, reuse: bool = True) -> HugeBlock:
        """A block of at least ``nbytes`` for one prompt's tensors of ``kind``; ``give_back`` when it is done.
        ``reuse`` False: fresh memory, unmapped when given back (``EngineSettings.reuse_memory``)."""
        if not (reuse and self.enabled(device)):
            return HugeBlock(nbytes, device)
        with self._lock:
            region = self._free.pop(kind, None)
            if region is not None and region.nbytes >= nbytes:
                self.reused += 1
            else:
                if region is not None:
                    region.close()
                region = None
        return HugeBlock(nbytes, device, region or _Region(nbytes))

    def give_back(self, block: HugeBlock | None, kind: str) -> None:
        """Keep ``block``'s region for the next prompt, if no tensor carved from it is left."""
        if block is None or block.region is None:
            return
        block._base = block._block = None
        region, block.region = block.region, None
        if region.in_use():
            return  # still read somewhere: the mapping goes with that tensor
        region.lazy_free()
        with self._lock:
            kept = self._free.get(kind)
            if kept is None or kept.nbytes <= region.nbytes:
                self._free[kind] = region
                region, kept = kept, None
        if region is not None:
            region.close()

    def clear(self) -> None:
        """Unmap the kept regions now."""
        with self._lock:
            regions, self._free = list(self._free.values()), {}
        for region in regions:
            region.close()


WORKSPACE = Workspace()
