"""One checkpoint format for every method: the trained tensors (safetensors), the optimizer's state, the random
generator's state, fp16's loss scale (the GradScaler's state: a fresh one would skip and rescale other steps) and
the step, so a resumed run continues exactly as if it had never stopped."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import torch
from safetensors.torch import load_file, save_file

from stylegrad.errors import StylegradError
from stylegrad.files.atomic import atomic_path, atomic_write


def save_tensors(out: str | Path, tensors: dict[str, torch.Tensor], metadata: dict[str, str]) -> Path:
    """A method's file: float32 tensors on the CPU, written whole."""
    out = Path(out)
    out.parent.mkdir(parents=True, exist_ok=True)
    with atomic_path(out) as tmp:
        save_file({k: v.detach().float().cpu().contiguous() for k, v in tensors.items()}, str(tmp), metadata=metadata)
    return out


def save_checkpoint(work: Path, step: int, tensors: dict[str, torch.Tensor], optimizer, generator: torch.Generator,
                    info: dict, keep: int = 2, scaler: torch.amp.GradScaler | None = None) -> Path:
    """``work/checkpoint-STEP``, written whole (a folder renamed into place); older ones beyond ``keep`` removed."""
    final = Path(work) / f"checkpoint-{step}"
    tmp = Path(work) / f".checkpoint-{step}.tmp"
    shutil.rmtree(tmp, ignore_errors=True)
    tmp.mkdir(parents=True)
    save_file({k: v.detach().contiguous().cpu() for k, v in tensors.items()}, str(tmp / "trained.safetensors"))
    with atomic_path(tmp / "optimizer.pt") as p:
        state = {"optimizer": optimizer.state_dict(), "generator": generator.get_state()}
        if scaler is not None:
            state["scaler"] = scaler.state_dict()
        torch.save(state, p)
    atomic_write(tmp / "state.json", json.dumps({"step": step, **info}, indent=1).encode())
    shutil.rmtree(final, ignore_errors=True)
    tmp.rename(final)
    for old in sorted(checkpoints(work))[:-keep]:
        shutil.rmtree(old[1], ignore_errors=True)
    return final


def checkpoints(work: Path) -> list[tuple[int, Path]]:
    out = []
    for p in Path(work).glob("checkpoint-*"):
        if p.is_dir() and p.name.split("-")[-1].isdigit() and (p / "state.json").is_file():
            out.append((int(p.name.split("-")[-1]), p))
    return sorted(out)


def load_checkpoint(path: Path, tensors: dict[str, torch.Tensor], optimizer, generator: torch.Generator,
                    scaler: torch.amp.GradScaler | None = None) -> dict:
    """Into the live tensors, optimizer, generator and scaler (when the run has one and the checkpoint kept one: an
    fp32 or bf16 checkpoint resumed in fp16 starts a fresh scale); returns the saved info (with ``step``)."""
    saved = load_file(str(path / "trained.safetensors"))
    if set(saved) != set(tensors):
        raise StylegradError(f"{path} was saved by another training setup (different trained tensors); use another "
                             "work folder or restart")
    with torch.no_grad():
        for k, t in tensors.items():
            t.copy_(saved[k])
    state = torch.load(path / "optimizer.pt", map_location="cpu", weights_only=True)
    optimizer.load_state_dict(state["optimizer"])
    generator.set_state(state["generator"])
    if scaler is not None and "scaler" in state:
        scaler.load_state_dict(state["scaler"])
    return json.loads((path / "state.json").read_text(encoding="utf-8"))
