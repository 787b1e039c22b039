"""How long stylegrad takes to start, against ``python -c "import torch"`` on the same machine in the same run.

Each case is a fresh process, timed from start to exit (wall clock); the cases are interleaved, repetition after
repetition, so a machine that gets busier or quieter during the run shifts them alike, and each case's median is
compared with the median of importing torch:

- ``import torch``: the reference, the least any command that needs torch pays;
- ``stylegrad --help``: target at most 0.5x the reference (issue 34);
- ``stylegrad info STYLE.safetensors`` (a (1, 768) style file this script writes): target at most 1x;
- ``stylegrad models --models-dir DIR`` (a folder holding one small SD1-shaped checkpoint);
- ``python -c "import stylegrad"``.

    python bench/startup.py              # 7 repetitions: a table, then one JSON line
    python bench/startup.py --repeat 15
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import statistics
import struct
import subprocess
import sys
import tempfile
import time
from pathlib import Path

TARGETS = {"help": 0.5, "info": 1.0}  # the issue's: at most this many times the time of importing torch


def write_safetensors(path: Path, tensors: dict[str, tuple[tuple[int, ...], float]], metadata: dict | None = None):
    """A float32 safetensors file written by hand (each tensor filled with one value), so the benchmark itself
    never imports torch."""
    header, blobs, offset = {}, [], 0
    for name, (shape, value) in tensors.items():
        count = 1
        for n in shape:
            count *= n
        blob = struct.pack(f"<{count}f", *([value] * count))
        header[name] = {"dtype": "F32", "shape": list(shape), "data_offsets": [offset, offset + len(blob)]}
        blobs.append(blob)
        offset += len(blob)
    if metadata:
        header["__metadata__"] = metadata
    text = json.dumps(header).encode()
    text += b" " * (-len(text) % 8)  # the data starts 8-byte aligned, as safetensors writes it
    path.write_bytes(struct.pack("<Q", len(text)) + text + b"".join(blobs))


def stylegrad_command() -> list[str]:
    script = shutil.which("stylegrad") or str(Path(sys.executable).parent / "stylegrad")
    return [script] if Path(script).is_file() else [sys.executable, "-m", "stylegrad"]


def run_once(argv: list[str], env: dict) -> float:
    start = time.perf_counter()
    proc = subprocess.run(argv, env=env, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True)
    seconds = time.perf_counter() - start
    if proc.returncode != 0:
        raise SystemExit(f"{' '.join(argv)} failed ({proc.returncode}): {proc.stderr.strip()[-500:]}")
    return seconds


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--repeat", type=int, default=7, help="repetitions of every case (default 7)")
    args = ap.parse_args()

    with tempfile.TemporaryDirectory(prefix="stylegrad-startup-") as tmp:
        tmp = Path(tmp)
        style = tmp / "mine.safetensors"
        write_safetensors(style, {"aesthetic_embedding": ((1, 768), 0.036)}, {"format": "stylegrad.style"})
        models = tmp / "models"
        models.mkdir()
        unet = "model.diffusion_model."
        write_safetensors(models / "tiny_sd1.safetensors", {  # what families.py reads an SD1 checkpoint by
            unet + "input_blocks.0.0.weight": ((8, 4, 3, 3), 0.0),
            unet + "input_blocks.1.1.transformer_blocks.0.attn2.to_k.weight": ((8, 768), 0.0),
            "cond_stage_model.transformer.text_model.final_layer_norm.weight": ((768,), 1.0),
            "first_stage_model.decoder.conv_out.weight": ((3, 4, 3, 3), 0.0),
        })
        env = {**os.environ, "HF_HUB_OFFLINE": "1", "STYLEGRAD_CACHE": str(tmp / "cache"), "STYLEGRAD_DEBUG": ""}
        cli = stylegrad_command()
        cases = {
            "torch": [sys.executable, "-c", "import torch"],
            "help": [*cli, "--help"],
            "info": [*cli, "info", str(style)],
            "models": [*cli, "models", "--models-dir", str(models)],
            "import": [sys.executable, "-c", "import stylegrad"],
        }
        for argv in cases.values():  # warm the page cache and .pyc files once, untimed
            run_once(argv, env)
        times: dict[str, list[float]] = {name: [] for name in cases}
        for _ in range(args.repeat):
            for name, argv in cases.items():
                times[name].append(run_once(argv, env))

    reference = statistics.median(times["torch"])
    labels = {"torch": 'python -c "import torch"', "help": "stylegrad --help", "info": "stylegrad info STYLE.safetensors",
              "models": "stylegrad models --models-dir DIR", "import": 'python -c "import stylegrad"'}
    print(f"{'':36} {'median s':>9} {'min s':>7} {'x torch':>8}  target")
    summary: dict[str, object] = {"repeat": args.repeat, "python": sys.version.split()[0]}
    for name, values in times.items():
        median = statistics.median(values)
        ratio = median / reference
        target = TARGETS.get(name)
        verdict = "" if target is None else f"<= {target}x {'met' if ratio <= target else 'MISSED'}"
        print(f"{labels[name]:36} {median:9.3f} {min(values):7.3f} {ratio:8.2f}  {verdict}")
        summary[f"{name}_s"] = round(median, 3)
        if name != "torch":
            summary[f"{name}_ratio"] = round(ratio, 3)
    summary["targets_met"] = all(summary[f"{name}_ratio"] <= t for name, t in TARGETS.items())
    print(json.dumps(summary))


if __name__ == "__main__":
    main()
