"""Huge pages for tuning's large tensors: advice to the kernel, never a change in the numbers.

Why: a tuned weight and its moments (bigG: 629 M weights, 6.3 GB kept on AVX-512, docs/exactness.md) are fresh
memory every prompt; in 4 KB pages that is two million page faults, and every pass over them walks a page table
that misses the TLB at each new page. Asked before any page is touched, Linux maps them 2 MB at a time (its
"madvise" mode, the default of most distributions). Elsewhere, or if refused, memory is ordinary memory."""

from __future__ import annotations

import ctypes
import sys

import torch

HUGE_PAGE = 2 << 20  # a transparent huge page
_MADV_HUGEPAGE = 14


def _madvise():
    """libc's madvise, on Linux; None elsewhere."""
    if not sys.platform.startswith("linux"):
        return None
    try:
        libc = ctypes.CDLL(None, use_errno=True)
        fn = libc.madvise
        fn.argtypes, fn.restype = (ctypes.c_void_p, ctypes.c_size_t, ctypes.c_int), ctypes.c_int
        return fn
    except (OSError, AttributeError):
        return None


_MADVISE = _madvise()


def advise_huge(t: torch.Tensor) -> torch.Tensor:
    """``t`` itself, its whole 2 MB pages inside advised as huge pages (CPU tensors of 4 MB or more)."""
    nbytes = t.numel() * t.element_size()
    if _MADVISE is not None and t.device.type == "cpu" and nbytes >= 2 * HUGE_PAGE:
        start = -(-t.data_ptr() // HUGE_PAGE) * HUGE_PAGE  # the whole huge pages inside the tensor
        end = (t.data_ptr() + nbytes) // HUGE_PAGE * HUGE_PAGE
        if end > start:
            _MADVISE(start, end - start, _MADV_HUGEPAGE)  # advice: a refusal changes nothing but speed
    return t
