"""Where tuning spends its time, for one large weight W and a few token rows: the products x W^T (+ b) and g W,
and an Adam step of W fused with its next product. On stylegrad's compiled kernels where they were built and the
CPU has AVX2 and FMA (_fewrows.c says why they are faster); else the products and Adam run on torch's public
calls (F.linear, torch.optim's fused Adam: adam.py). Two shortcuts into torch's private ops (oneDNN's linear, the
fused Adam kernel called directly) were measured and dropped (docs/performance.md): they did not earn their place.
Every path is within the float-rounding tier of docs/exactness.md.

Whether the kernels are used is the engine's setting (``engine.EngineSettings.kernels``, by default
STYLEGRAD_KERNELS != 0), applied for one tuning through ``kernels_enabled``; tests and benchmarks use the same
switch. ``bench/products.py`` prints each kernel's gain over torch's path."""

from __future__ import annotations

import math
from collections.abc import Iterator
from contextlib import contextmanager
from contextvars import ContextVar

import torch
import torch.nn.functional as F

from stylegrad.aesthetic.adam import AdamSettings
from stylegrad.aesthetic.pages import advise_huge
from stylegrad.aesthetic.workspace import HugeBlock


def _compiled():
    """The compiled kernels, if this install built them and this CPU can run them."""
    try:
        from . import _fewrows
    except ImportError:  # an install without a compiler, or not x86-64
        return None
    return _fewrows if _fewrows.supported() else None


_KERNELS = _compiled()
_ENABLED: ContextVar[bool] = ContextVar("stylegrad_kernels", default=True)


@contextmanager
def kernels_enabled(on: bool) -> Iterator[None]:
    """Within the block (this thread or task), the products and Adam steps use the compiled kernels only if ``on``
    (and they are built and usable here); torch's path otherwise."""
    token = _ENABLED.set(on)
    try:
        yield
    finally:
        _ENABLED.reset(token)


def active_kernels():
    """The compiled kernels' module where they are built, usable and enabled here (``kernels_enabled``); else None."""
    return _KERNELS if _ENABLED.get() else None


def kernels_isa() -> str | None:
    """The instruction set the active kernels run ("avx512" or "avx2"), None on torch's path: it decides the kept
    moments' layout (``moment_dtypes``)."""
    kernels = active_kernels()
    return None if kernels is None else kernels.isa()


_KERNEL_ROWS = 96  # compiled kernels up to here: they cover SD's 77-token prompts with room to spare
# the forward product on the kernels up to here; beyond, torch's blocked GEMM reuses each row of x across more
# rows of W and is faster (the 77-token final pass: a fused Adam step then runs alone, and torch takes the product)
_KERNEL_PRODUCT_ROWS = 32


def _fits_kernels(a: torch.Tensor, weight: torch.Tensor) -> bool:
    return (active_kernels() is not None and a.device.type == weight.device.type == "cpu"
            and a.dtype == weight.dtype == torch.float32 and a.dim() == 2 and 0 < a.shape[0] <= _KERNEL_ROWS
            and weight.is_contiguous() and not (torch.is_grad_enabled() and (a.requires_grad or weight.requires_grad)))


def linear(x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None = None) -> torch.Tensor:
    """x @ weight.T (+ bias) for (T, K) x and (O, K) weight, without autograd."""
    if (_fits_kernels(x, weight) and x.shape[1] == weight.shape[1]
            and x.shape[0] <= _KERNEL_PRODUCT_ROWS
            and (bias is None or (bias.dtype == torch.float32 and bias.is_contiguous()
                                  and bias.shape == weight.shape[:1]))):  # else torch's path, and its errors
        x = x.contiguous()
        y = x.new_empty(x.shape[0], weight.shape[0])
        active_kernels().linear(x.data_ptr(), weight.data_ptr(), 0 if bias is None else bias.data_ptr(),
                                y.data_ptr(), *x.shape, weight.shape[0])
        return y
    return F.linear(x, weight, bias)


def input_grad(grad_out: torch.Tensor, weight: torch.Tensor) -> torch.Tensor:
    """grad_out @ weight for (T, O) grad_out and (O, K) weight: the gradient of x in x @ weight.T."""
    if _fits_kernels(grad_out, weight) and grad_out.shape[1] == weight.shape[0]:
        grad_out = grad_out.contiguous()
        gx = grad_out.new_empty(grad_out.shape[0], weight.shape[1])
        active_kernels().input_grad(grad_out.data_ptr(), weight.data_ptr(), gx.data_ptr(), grad_out.shape[0],
                                    weight.shape[1], weight.shape[0])
        return gx
    return linear(grad_out, weight.T)


def empty_huge(like: torch.Tensor, block: HugeBlock | None = None) -> torch.Tensor:
    """``torch.empty_like`` (contiguous), backed by 2 MB pages where Linux allows it (pages.py says why); from
    ``block`` if given."""
    if block is not None:
        return block.empty(like.shape, like.dtype)
    return advise_huge(torch.empty_like(like, memory_format=torch.contiguous_format))


def packed_moments() -> bool:
    """Whether the kernels in use keep Adam's moments packed (AVX-512: 6 bytes a weight for both, _fewrows.c says
    how and why) rather than as two float32 tensors."""
    return kernels_isa() == "avx512"


def moment_dtypes(device: torch.device | str) -> tuple[torch.dtype, torch.dtype]:
    """The dtypes of a float32 CPU weight's two moments as ``empty_moments`` makes them on ``device``."""
    if packed_moments() and torch.device(device).type == "cpu":
        return torch.int32, torch.int16
    return torch.float32, torch.float32


def empty_moments(weight: torch.Tensor, block: HugeBlock | None = None) -> tuple[torch.Tensor, torch.Tensor]:
    """Storage for ``weight``'s two Adam moments as the kernels in use keep them: packed, an int32 and an int16
    tensor of one value a weight; else two float32 tensors shaped like it. In 2 MB pages where Linux allows it;
    from ``block`` if given."""
    dtypes = moment_dtypes(weight.device)
    if dtypes[0] != torch.float32:
        return tuple(block.empty((weight.numel(),), dtype) if block is not None else
                     advise_huge(torch.empty(weight.numel(), dtype=dtype, device=weight.device)) for dtype in dtypes)
    return empty_huge(weight, block), empty_huge(weight, block)


def moment_bytes(device: torch.device) -> float:
    """Bytes each kept Adam moment takes per weight on ``device``: 3 where the kernels pack them, else 4."""
    return sum(dtype.itemsize for dtype in moment_dtypes(device)) / 2


def moment_values(exp_avg: torch.Tensor, exp_avg_sq: torch.Tensor, like: torch.Tensor
                  ) -> tuple[torch.Tensor, torch.Tensor]:
    """The two moments' values as float32 tensors shaped like ``like``, from either layout (tests, inspection)."""
    if exp_avg.dtype == torch.float32:
        return exp_avg.view(like.shape), exp_avg_sq.view(like.shape)
    w, h = exp_avg.to(torch.int64), exp_avg_sq.to(torch.int64) & 0xFFFF
    m, v = w & ~0xFF, (h << 16) | ((w & 0xFF) << 8)
    return (m.to(torch.int32).view(torch.float32).reshape(like.shape),  # two's complement: the same 32 bits
            ((v + 2**31) % 2**32 - 2**31).to(torch.int32).view(torch.float32).reshape(like.shape))


def carried(t: torch.Tensor) -> torch.Tensor:
    """float32 moments as the kernels in use carry them to the next step: rounded to 24 bits where packed."""
    if not packed_moments():
        return t
    return ((t.to(torch.float32).contiguous().view(torch.int32) + 0x80) & ~0xFF).view(torch.float32)


def can_fuse_adam(weight: torch.Tensor, x: torch.Tensor | None = None) -> bool:
    """Whether an Adam step of this weight (followed by a product with ``x``) can be taken by
    ``fused_adam_linear``."""
    if x is not None:
        return _fits_kernels(x, weight)
    return (active_kernels() is not None and weight.device.type == "cpu" and weight.dtype == torch.float32
            and weight.is_contiguous())


def _moments_fit(moments: list[torch.Tensor], weight: torch.Tensor) -> bool:
    if packed_moments():
        return all(t.shape == (weight.numel(),) and t.dtype == dtype and t.is_contiguous() and t.device == weight.device
                   for t, dtype in zip(moments, (torch.int32, torch.int16)))
    return all(t.shape == weight.shape and t.dtype == torch.float32 and t.is_contiguous() and t.device == weight.device
               for t in moments)


def fused_adam_linear(source: torch.Tensor, weight: torch.Tensor, exp_avg: torch.Tensor | None,
                      exp_avg_sq: torch.Tensor | None, grad_out: torch.Tensor, x_prev: torch.Tensor,
                      x: torch.Tensor | None, bias: torch.Tensor | None, *, first: bool, keep: bool, step: int,
                      adam: AdamSettings, history: list[tuple[torch.Tensor, torch.Tensor]] | None = None
                      ) -> torch.Tensor | None:
    """One Adam step (torch.optim.Adam's maths with ``adam``'s settings, step number ``step``) of ``source`` into
    ``weight`` (the same tensor after the first step) with grad = grad_out^T @ x_prev, then x @ weight.T (+ bias);
    ``x`` None: the step alone. The moments are laid out as ``empty_moments`` makes them.
    ``first``: the moments are zero and not read. ``keep``: the moments are updated (else no step follows;
    at a first step that is not kept they may be None). ``history``: the moments are not stored but rebuilt from
    every step's gradient factors (grad_out, x_prev), oldest first, the last being this step's; then the moments
    are None, ``first`` is True and ``keep`` False."""
    out_features, in_features = weight.shape
    rows = 0 if x is None else x.shape[0]
    grad_out, x_prev = (t.to(torch.float32).contiguous() for t in (grad_out, x_prev))
    x = None if x is None else x.to(torch.float32).contiguous()
    moments = [t for t in (exp_avg, exp_avg_sq) if t is not None]
    factors = history or [(grad_out, x_prev)]
    # the kernel reads and writes through raw pointers: every shape is checked here
    if not ((_fits_kernels(x, weight) and x.shape[1] == in_features if x is not None
             else can_fuse_adam(weight) and not (torch.is_grad_enabled() and weight.requires_grad))
            and source.shape == weight.shape
            and source.dtype == torch.float32 and source.is_contiguous() and source.device == weight.device
            and all(g.shape[1] == out_features and xp.shape[1] == in_features and g.shape[0] == xp.shape[0]
                    == grad_out.shape[0] > 0 and g.dtype == xp.dtype == torch.float32 and g.is_contiguous()
                    and xp.is_contiguous() for g, xp in factors)
            and ((first and not keep) or len(moments) == 2)
            and (history is None or (not moments and first and not keep and history[-1][0] is grad_out))
            and _moments_fit(moments, weight)
            and (bias is None or (bias.shape == (out_features,) and bias.dtype == torch.float32
                                  and bias.is_contiguous()))):
        raise ValueError("fused_adam_linear: shapes, dtypes or layouts the kernel does not take (see can_fuse_adam)")
    fused = x is not None and rows <= _KERNEL_PRODUCT_ROWS
    y = x.new_empty(rows, out_features) if fused else None
    rebuilt = ()
    if history is not None:
        pointers = torch.tensor([[g.data_ptr(), xp.data_ptr()] for g, xp in history], dtype=torch.int64).T.contiguous()
        rebuilt = (len(history), pointers[0].data_ptr(), pointers[1].data_ptr())
    active_kernels().adam_linear(
        source.data_ptr(), weight.data_ptr(), 0 if exp_avg is None else exp_avg.data_ptr(),
        0 if exp_avg_sq is None else exp_avg_sq.data_ptr(), grad_out.data_ptr(), x_prev.data_ptr(),
        x.data_ptr() if fused else 0, 0 if bias is None else bias.data_ptr(), y.data_ptr() if fused else 0,
        grad_out.shape[0], rows if fused else 0, weight.shape[1], weight.shape[0], int(first), int(keep),
        adam.lr / (1 - adam.beta1 ** step), 1 / math.sqrt(1 - adam.beta2 ** step), adam.eps, adam.beta1, adam.beta2,
        *rebuilt)
    return y if fused or x is None else linear(x, weight, bias)
