"""Which large weights keep their Adam moments while a prompt tunes, and which rebuild them, from the memory there is.

Kept, a large weight costs 10 bytes a value while it tunes on the AVX-512 kernels (its float32 copy, and both
moments packed in 6 bytes, _fewrows.c says how) and 12 elsewhere (float32 moments); rebuilt from every step's
gradient factors (eos_forward.AdamMatrix), 4 bytes, with the same numbers and more arithmetic per step
(bench/personalize.py measures both). For SDXL's bigG (629 M matrix weights) that is 6.3 GB, 7.5 GB and 2.5 GB
(docs/exactness.md). The setting (``EngineSettings.memory``; by default STYLEGRAD_TUNING_MEMORY, --tuning-memory):
- ``fast``: every weight keeps its moments; ``low``: none does;
- a size such as ``6GB`` or ``800MB``: the most the tuned weights and their moments may take; as many weights as
  fit keep their moments, the rest rebuild them, so a tighter budget costs time gradually, not all at once;
- ``auto`` (default): the budget is three quarters of the memory the device has free, so a machine with room runs
  at full speed and one without neither swaps nor runs out."""

from __future__ import annotations

import re
from pathlib import Path

import torch

from stylegrad.aesthetic.products import moment_bytes
from stylegrad.errors import StylegradError
from stylegrad.notes import note

_HEADROOM = 0.75  # auto: of the free memory, the most tuning may take; the rest is for everything else
_UNITS = {"": 1, "B": 1, "KB": 2**10, "MB": 2**20, "GB": 2**30, "TB": 2**40}
_noted: set[str] = set()


def free_bytes(device: torch.device) -> int | None:
    """Memory free for new tensors on ``device``: the kernel's MemAvailable for the CPU (Linux), the driver's free
    memory plus what torch's allocator holds unused for CUDA; None where unknown."""
    if device.type == "cuda":
        free, _ = torch.cuda.mem_get_info(device)
        return free + torch.cuda.memory_reserved(device) - torch.cuda.memory_allocated(device)
    if device.type == "cpu":
        try:
            for line in Path("/proc/meminfo").read_text().splitlines():
                if line.startswith("MemAvailable:"):
                    return int(line.split()[1]) * 1024
        except OSError:
            return None
    return None


def parse_setting(setting: str | int) -> str | int:
    """"fast", "low", "auto" or a budget in bytes (an int is one already)."""
    if isinstance(setting, int) and not isinstance(setting, bool) and setting > 0:
        return setting
    text = str(setting).strip().upper().replace(" ", "").replace("IB", "B")
    named = {"FAST": "fast", "KEPT": "fast", "LOW": "low", "REBUILT": "low", "AUTO": "auto"}
    if text in named:
        return named[text]
    m = re.fullmatch(r"(\d+(?:\.\d+)?)([KMGT]?B?)", text)
    if m and float(m.group(1)) > 0:
        unit = m.group(2) if m.group(2) in _UNITS else m.group(2) + "B"
        return int(float(m.group(1)) * _UNITS[unit])
    raise StylegradError(f"tuning memory {setting!r} must be auto, fast, low or a size such as 6GB "
                         "(EngineSettings.memory, or STYLEGRAD_TUNING_MEMORY)")


def choose_moments(setting: str | int, weights: dict[str, torch.Tensor], device: torch.device) -> dict[str, str]:
    """"kept" or "rebuilt" for each of the large weights about to be tuned (by name)."""
    mode = parse_setting(setting)
    if mode in ("fast", "low"):
        return dict.fromkeys(weights, "kept" if mode == "fast" else "rebuilt")
    sizes = {name: 4 * w.numel() for name, w in weights.items()}  # bytes of each tuned float32 copy
    pair = 2 * moment_bytes(device) / 4  # the two moments, per byte of copy
    need = int((1 + pair) * sum(sizes.values()))
    if mode == "auto":
        free = free_bytes(device)
        if free is None or need <= _HEADROOM * free:
            return dict.fromkeys(weights, "kept")
        budget = int(_HEADROOM * free)
    else:
        budget = mode
    room = budget - sum(sizes.values())  # what is left for moments once every copy is made
    choice = {}
    for name, size in sizes.items():  # in layer order: the first weights keep theirs while they fit
        keep = pair * size <= room
        room -= pair * size if keep else 0
        choice[name] = "kept" if keep else "rebuilt"
    kept, copies = (sum(sizes[n] for n, c in choice.items() if c == "kept"), sum(sizes.values()))
    key = f"{device}:{need}:{budget}"
    if kept < copies and key not in _noted:  # once per device, tower size and budget
        _noted.add(key)
        note(f"tuning keeps Adam moments for {kept / copies:.0%} of the weights: all of them would take "
             f"{need / 2**30:.1f} GB and {budget / 2**30:.1f} GB may be used; the others rebuild theirs each step "
             "(the same result, more arithmetic; the engine's memory setting, or STYLEGRAD_TUNING_MEMORY, sets the budget)")
    return choice
