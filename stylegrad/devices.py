"""One device and precision policy for every command, the Python API, the server and batch jobs.

``--device auto|cpu|cuda[:N]|mps``: auto takes CUDA, then Apple's MPS, then the CPU. ``--dtype auto|fp32|fp16|bf16``:
auto is what Stable Diffusion users run there, fp16 on CUDA and MPS, fp32 on the CPU (half precision is slow and
inexact there). A combination this machine cannot run is one line before any model loads. Tuning always runs in
float32 whatever the model's dtype (aesthetic/tuning.py); what it hands back follows the model.
"""

from __future__ import annotations

import torch

from stylegrad.errors import RequestError, StylegradError

DEVICES = "cpu, cuda, cuda:1, mps or auto"
DTYPES = {"fp32": torch.float32, "fp16": torch.float16, "bf16": torch.bfloat16}
DTYPE_NAMES = {v: k for k, v in DTYPES.items()}


def resolve_device(device: str | torch.device | None = None) -> torch.device:
    """``None``/``"auto"``: CUDA if present, else MPS, else CPU. Otherwise the named device, checked to exist here."""
    if device is None or str(device) == "auto":
        if torch.cuda.is_available():
            return torch.device("cuda")
        return torch.device("mps" if torch.backends.mps.is_available() else "cpu")
    try:
        dev = torch.device(device)
    except (RuntimeError, TypeError) as e:
        raise RequestError("device", f"unknown {{field}} '{device}' (use {DEVICES})") from e
    if dev.type == "cuda":
        if not torch.cuda.is_available():
            raise RequestError("device", f"{{field}} '{device}' requested but CUDA is not available here")
        if dev.index is not None and dev.index >= torch.cuda.device_count():
            raise RequestError("device", f"{{field}} '{device}' requested but this machine has "
                               f"{torch.cuda.device_count()} GPU(s)")
    elif dev.type == "mps":
        if not torch.backends.mps.is_available():
            raise RequestError("device", f"{{field}} '{device}' requested but MPS is not available here")
    elif dev.type not in ("cpu", "meta"):
        raise RequestError("device", f"unsupported {{field}} '{device}': stylegrad runs on {DEVICES}")
    return dev


def resolve_dtype(dtype: str | torch.dtype | None, device: torch.device) -> torch.dtype:
    """``None``/``"auto"``: fp16 on CUDA and MPS, fp32 elsewhere. Otherwise fp32, fp16 or bf16 (or a torch dtype),
    refused in one line where ``device`` cannot compute in it."""
    if dtype is None or dtype == "auto":
        return torch.float16 if device.type in ("cuda", "mps") else torch.float32
    if isinstance(dtype, torch.dtype):
        chosen = dtype
    elif str(dtype).lower() in DTYPES:
        chosen = DTYPES[str(dtype).lower()]
    else:
        raise RequestError("dtype", f"unknown {{field}} '{dtype}' (use auto, fp32, fp16 or bf16)")
    if chosen not in DTYPE_NAMES:
        raise RequestError("dtype", f"unsupported {{field}} {chosen} (use auto, fp32, fp16 or bf16)")
    if chosen is torch.bfloat16 and device.type == "cuda" and not torch.cuda.is_bf16_supported():
        gpu = torch.cuda.get_device_name(device)
        raise RequestError("dtype", f"{{field}} bf16: this GPU ({gpu}) has no bf16; use fp16 or fp32")
    if chosen is torch.bfloat16 and device.type == "mps":
        try:
            torch.ones(1, dtype=chosen, device=device)
        except (RuntimeError, TypeError) as e:
            raise RequestError("dtype", "{field} bf16: this Mac's MPS has none (macOS 14 or newer has it); "
                               "use fp16 or fp32") from e
    return chosen


def default_dtype(device: torch.device) -> torch.dtype:
    """What ``dtype="auto"`` gives on ``device``."""
    return resolve_dtype(None, device)


def dtype_name(dtype: torch.dtype) -> str:
    """fp32, fp16 or bf16: how the PNG and the CLI name a dtype."""
    try:
        return DTYPE_NAMES[dtype]
    except KeyError:
        raise StylegradError(f"unsupported dtype {dtype}") from None


def offload_hook(module: torch.nn.Module):
    """accelerate's hook that runs ``module`` somewhere else than its weights wait (model CPU offload, which
    diffusers' ``enable_model_cpu_offload`` installs on every component), or None."""
    hook = getattr(module, "_hf_hook", None)
    for h in getattr(hook, "hooks", None) or (hook,):  # a SequentialHook holds several
        if getattr(h, "execution_device", None) is not None:
            return h
    return None


def execution_device(module: torch.nn.Module) -> torch.device:
    """Where ``module`` computes: under model CPU offload its weights sit on the CPU between calls and its hook moves
    it to the hook's execution device for each forward, so that device (diffusers' ``pipe._execution_device``);
    otherwise where its weights are."""
    hook = offload_hook(module)
    if hook is not None:
        return torch.device(hook.execution_device)  # an int is a CUDA index, as accelerate reads it
    return next(module.parameters()).device


def onload(module: torch.nn.Module) -> None:
    """Under model CPU offload, ``module`` onto its execution device as its hook puts it there before a forward (the
    model before it in the pipeline's chain goes back to the CPU): read where it computes, in one copy. Nothing
    otherwise."""
    hook = offload_hook(module)
    if hasattr(hook, "prev_module_hook"):  # accelerate's CpuOffload
        hook.pre_forward(module)


def offload_models(pipe) -> None:
    """Put back on the CPU the components model CPU offload moved to its execution device for a call of a pipeline
    object of stylegrad's own (diffusers re-installs the user's hooks for that on the user's object only): each
    with its own hook's offload, so the user's pipeline keeps the very hooks it had."""
    for component in getattr(pipe, "components", {}).values():
        hook = offload_hook(component) if isinstance(component, torch.nn.Module) else None
        # accelerate's CpuOffload (it has a previous model to offload; sequential offload's hooks do not)
        if hasattr(hook, "prev_module_hook") and next(component.parameters()).device.type != "cpu":
            hook.init_hook(component)  # the module back to the CPU, as its hook does it
