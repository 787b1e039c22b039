"""Float32 as written, wherever it runs: a stylecode must not depend on the machine that made it.

A code is 20 numbers quantized to 64 levels, so any rounding of the image features or the latent can move a level:
in half precision 1 code in 6 (fp16) to 3 in 4 (bf16) changed. Codes are therefore made, and read back into the
control stream's starting map, in float32 with autocast off; on CUDA also without TF32, which PyTorch enables by
default for cuDNN convolutions (SigLIP's patch embedding) and which rounds inputs to 10 bits.
"""

from __future__ import annotations

from collections.abc import Iterator
from contextlib import contextmanager, nullcontext

import torch


@contextmanager
def exact_float32(device: torch.device | str) -> Iterator[None]:
    """Run float32 work on ``device`` as float32: no autocast region around it, no TF32 on CUDA (restored after)."""
    device = torch.device(device)
    flags = [(torch.backends.cudnn, "allow_tf32"), (torch.backends.cuda.matmul, "allow_tf32")] \
        if device.type == "cuda" else []
    saved = [(owner, name, getattr(owner, name)) for owner, name in flags]
    no_autocast = torch.amp.autocast(device.type, enabled=False) \
        if torch.amp.is_autocast_available(device.type) else nullcontext()
    try:
        for owner, name, _ in saved:
            setattr(owner, name, False)
        with no_autocast:
            yield
    finally:
        for owner, name, value in saved:
            setattr(owner, name, value)
