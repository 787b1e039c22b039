"""Which large weights keep their Adam moments while a prompt tunes, and which rebuild them, from the memory there is.

Kept, a large weight costs 10 bytes a value while it tunes on the AVX-512 kernels (its float32 copy, and both
moments packed in 6 bytes, _fewrows.c says how) and 12 elsewhere (float32 moments); rebuilt from every step's
gradient factors (eos_forward.AdamMatrix), 4 bytes, with the same numbers and more arithmetic per step
(bench/personalize.py measures both). For SDXL's bigG (629 M matrix weights) that is 6.3 GB, 7.5 GB and 2.5 GB
(docs/exactness.md). The setting (``EngineSettings.memory``; by default STYLEGRAD_TUNING_MEMORY, --tuning-memory):
- ``fast``: every weight keeps its moments; ``low``: none does;
- a size such as ``6GB`` or ``800MB``: the most the tuned weights and their moments may take; as many weights as
  fit keep their moments, the rest rebuild them, so a tighter budget costs time gradually, not all at once;
- ``auto`` (default): the budget is three quarters of the memory the device has free (the CPU's available memory,
  CUDA's free memory, MPS's recommended working set less what torch holds), so a machine with room runs at full
  speed and one without neither swaps nor runs out. On an accelerator whose free memory cannot be read (an older
  torch), every weight rebuilds its moments: never a blind guess where running out is likely.

Where the moments were kept and tuning still ran out of memory (another program took it, or the guess was wrong),
tuning.personalize takes the prompt again from the start with rebuilt moments (``fall_back``: one note per device);
later prompts of that tower on that device rebuild theirs at once. On an accelerator the rebuilt moments' history of
gradient factors lives in host memory (eos_forward.AdamMatrix), so the device holds the copies and three small
scratch tiles: SDXL tunes in 2.58 GiB there with 77 tokens and 10 steps, 7.24 GiB with moments kept
(bench/tuning_memory.py prints each mode's peak)."""

from __future__ import annotations

import re
from pathlib import Path

import torch

from stylegrad.aesthetic.products import moment_bytes
from stylegrad.errors import StylegradError, is_out_of_memory
from stylegrad.notes import note

# torch's path steps a large weight a tile of rows at a time (at most this many values, at least one row), so its
# scratch (the gradient, and the two rebuilt moments) is three tiles whatever the weights' shapes: 12 MB
TILE = 1 << 20
_HEADROOM = 0.75  # auto: of the free memory, the most tuning may take; the rest is for everything else
_UNITS = {"": 1, "B": 1, "KB": 2**10, "MB": 2**20, "GB": 2**30, "TB": 2**40}
_OUT_OF_MEMORY = ("out of memory", "can't allocate memory", "not enough memory")  # MPS's, the CPU allocator's words
_noted: set[str] = set()  # notes already given
_ran_out: set[tuple[str, int]] = set()  # (device, matrix weights) of towers whose kept moments did not fit there


def free_bytes(device: torch.device) -> int | None:
    """Memory free for new tensors on ``device``, None where unknown: the kernel's MemAvailable for the CPU (Linux);
    for CUDA the driver's free memory plus what torch's allocator holds unused; for MPS the working set Metal
    recommends less what torch's tensors take (its allocator reuses its own cache)."""
    if device.type == "cuda":
        free, _ = torch.cuda.mem_get_info(device)
        return free + torch.cuda.memory_reserved(device) - torch.cuda.memory_allocated(device)
    if device.type == "mps":
        return _mps_free()
    if device.type == "cpu":
        try:
            for line in Path("/proc/meminfo").read_text().splitlines():
                if line.startswith("MemAvailable:"):
                    return int(line.split()[1]) * 1024
        except OSError:
            return None
    return None


def _mps_free() -> int | None:
    """MPS: ``recommended_max_memory`` (torch 2.3+) less ``current_allocated_memory`` (or, on torches without it,
    the driver's whole allocation); None on a torch without them."""
    mps = getattr(torch, "mps", None)
    recommended = getattr(mps, "recommended_max_memory", None)
    used = getattr(mps, "current_allocated_memory", None) or getattr(mps, "driver_allocated_memory", None)
    if recommended is None or used is None:
        return None
    return max(0, int(recommended()) - int(used()))


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
    if _tower_key(weights, device) in _ran_out:  # this tower ran out of memory here before: rebuilt at once
        mode = "low"
    if mode in ("fast", "low"):
        return dict.fromkeys(weights, "kept" if mode == "fast" else "rebuilt")
    sizes = {name: 4 * w.numel() for name, w in weights.items()}  # bytes of each tuned float32 copy
    pair = 2 * moment_bytes(device) / 4  # the two moments, per byte of copy
    need = int((1 + pair) * sum(sizes.values()))
    if mode == "auto":
        free = free_bytes(device)
        if free is None and device.type != "cpu":  # unknown on an accelerator: the mode that fits most
            _note_once(f"unknown:{device}", f"the free memory on {device} cannot be read (torch {torch.__version__}): "
                       "tuning rebuilds Adam moments each step (the same result, more arithmetic; the engine's memory "
                       "setting, or STYLEGRAD_TUNING_MEMORY, sets a budget)")
            return dict.fromkeys(weights, "rebuilt")
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
    if kept < copies:  # once per device, tower size and budget
        _note_once(f"{device}:{need}:{budget}",
                   f"tuning keeps Adam moments for {kept / copies:.0%} of the weights: all of them would take "
                   f"{need / 2**30:.1f} GB and {budget / 2**30:.1f} GB may be used; the others rebuild theirs each "
                   "step (the same result, more arithmetic; the engine's memory setting, or STYLEGRAD_TUNING_MEMORY, "
                   "sets the budget)")
    return choice


def rebuilt_bytes(weights: dict[str, torch.Tensor], device: torch.device) -> int:
    """About what tuning takes on ``device`` with every moment rebuilt: the large weights' float32 copies and the
    three scratch tiles of torch's path (``TILE``); the gradient factors' history is in host memory on an
    accelerator, and small on the CPU. For the one-line error when even that does not fit."""
    return sum(4 * w.numel() for w in weights.values()) + (3 * 4 * TILE if device.type != "cpu" else 0)


def out_of_memory(error: BaseException) -> bool:
    """Whether ``error`` is running out of memory: Python's MemoryError, torch's OutOfMemoryError (CUDA), or the
    RuntimeError MPS and the CPU allocator raise ("MPS backend out of memory", "can't allocate memory")."""
    if is_out_of_memory(error):
        return True
    text = str(error).lower()
    return isinstance(error, RuntimeError) and any(s in text for s in _OUT_OF_MEMORY)


def fall_back(weights: dict[str, torch.Tensor], device: torch.device) -> None:
    """Tuning these weights on ``device`` with kept moments ran out of memory: from now on they rebuild them there
    (``choose_moments``), said once per device."""
    _ran_out.add(_tower_key(weights, device))
    _note_once(f"ran-out:{device}", f"tuning ran out of memory on {device} with Adam moments kept; the prompt was "
               "tuned again rebuilding them each step, as later ones will be (the same result, more arithmetic; "
               "STYLEGRAD_TUNING_MEMORY=low or the engine's memory setting asks for it from the start)")


def _tower_key(weights: dict[str, torch.Tensor], device: torch.device) -> tuple[str, int]:
    return str(device), sum(w.numel() for w in weights.values())


def _note_once(key: str, message: str) -> None:
    if key not in _noted:
        _noted.add(key)
        note(message)
