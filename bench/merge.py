"""`stylegrad merge` (add difference) on three SD1.5-size checkpoints against loading all three and merging in memory.

Three files with the real SD1.5 single-file layout and shapes (UNet, VAE, CLIP ViT-L/14 text encoder: 1.07 B
values, random fp16, about 2.1 GB each) are written to a temporary folder. Then, each in its own process and in
the same run:

- reference: ``safetensors.torch.load_file`` on A, B and C, ``A + (B - C) * M`` per tensor (float32 maths, fp16
  result), ``save_file`` of the result: what a merge script does;
- stylegrad: ``merge_checkpoints(A, B, C, method="add-difference")``, which also hashes the three inputs for the
  A1111 merge metadata (no hash cache: a fresh cache folder).

Peak extra memory is the process's peak resident set (VmHWM) minus its resident set after the imports. The two
outputs are compared tensor by tensor.

    python bench/merge.py              # a table, then one JSON line
    python bench/merge.py --keep DIR   # write the inputs to DIR and keep them (needs ~9 GB free)
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "tests"))  # the original-layout key mapping the tests write checkpoints with
M = 0.7


def rss_mb(field: str) -> float:
    for line in Path("/proc/self/status").read_text().splitlines():
        if line.startswith(field + ":"):
            return int(line.split()[1]) / 1024
    return float("nan")


def sd15_layout() -> list[tuple[str, tuple]]:
    """(key, shape) of an SD1.5 checkpoint, from the shipped configs built on the meta device."""
    import torch
    from ckpt_layout import unet_key, vae_key
    from diffusers import AutoencoderKL, UNet2DConditionModel
    from transformers import CLIPTextConfig, CLIPTextModel

    from stylegrad.checkpoints.loading import family_config

    cfg = family_config("sd1")
    with torch.device("meta"):
        unet = UNet2DConditionModel.from_config(cfg["unet"])
        vae = AutoencoderKL.from_config(cfg["vae"])
        te = {k: v for k, v in cfg["text_encoder"].items() if k not in ("class", "prefix", "layout")}
        text = CLIPTextModel(CLIPTextConfig(**te))
    out = [("model.diffusion_model." + unet_key(k, unet.config), tuple(v.shape)) for k, v in unet.state_dict().items()]
    for k, v in vae.state_dict().items():
        key, conv = vae_key(k, 4)
        out.append(("first_stage_model." + key, tuple(v.shape) + ((1, 1) if conv else ())))
    out += [("cond_stage_model.transformer.text_model." + k, tuple(v.shape)) for k, v in text.state_dict().items()]
    return out


def write_inputs(folder: Path) -> list[Path]:
    import torch

    from stylegrad.checkpoints.tensors import SafetensorsWriter

    layout = sd15_layout()
    paths = []
    for i, name in enumerate("ABC"):
        path = folder / f"{name}.safetensors"
        g = torch.Generator().manual_seed(i)
        with SafetensorsWriter(path, [(k, torch.float16, s) for k, s in layout]) as w:
            for k, s in layout:
                w.write(k, (torch.randn(s, generator=g) * 0.05).half())
        paths.append(path)
    return paths


def run_reference(a: str, b: str, c: str, out: str) -> None:
    from safetensors.torch import load_file, save_file

    A, B, C = load_file(a), load_file(b), load_file(c)
    merged = {k: (v.float() + (B[k].float() - C[k].float()) * M).half() if k in B and k in C else v
              for k, v in A.items()}
    save_file(merged, out)


def run_stylegrad(a: str, b: str, c: str, out: str) -> None:
    from stylegrad.checkpoints.merge import merge_checkpoints

    merge_checkpoints(a, b, c, out=out, method="add-difference", alpha=M, progress=False)


def child(side: str, files: list[str], out: str) -> None:
    import safetensors.torch  # noqa: F401
    import torch  # noqa: F401 - imports are not the merge's memory

    import stylegrad.checkpoints.merge  # noqa: F401

    base = rss_mb("VmRSS")
    t0 = time.perf_counter()
    (run_reference if side == "reference" else run_stylegrad)(*files, out)
    seconds = time.perf_counter() - t0
    print(json.dumps({"seconds": seconds, "peak_extra_mb": rss_mb("VmHWM") - base}))


def compare(x: Path, y: Path) -> float:
    from stylegrad.checkpoints.tensors import TensorFile

    worst = 0.0
    with TensorFile(x) as fx, TensorFile(y) as fy:
        assert sorted(fx.keys()) == sorted(fy.keys())
        for k in fx.keys():
            worst = max(worst, float((fx.get(k).float() - fy.get(k).float()).abs().max()))
    return worst


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--child", nargs=5, help=argparse.SUPPRESS)
    ap.add_argument("--keep", metavar="DIR", help="write the inputs here and keep them")
    a = ap.parse_args()
    if a.child:
        child(a.child[0], a.child[1:4], a.child[4])
        return
    folder = Path(a.keep) if a.keep else Path(tempfile.mkdtemp(prefix="stylegrad-merge-bench-"))
    folder.mkdir(parents=True, exist_ok=True)
    try:
        t0 = time.perf_counter()
        files = [folder / f"{n}.safetensors" for n in "ABC"]
        if not all(f.is_file() for f in files):
            files = write_inputs(folder)
        print(f"inputs: 3 x {files[0].stat().st_size / 2**30:.2f} GiB in {time.perf_counter() - t0:.0f} s",
              file=sys.stderr)
        env = {**os.environ, "STYLEGRAD_CACHE": str(folder / "cache"), "TQDM_DISABLE": "1"}
        results = {}
        for side in ("reference", "stylegrad"):
            out = folder / f"out-{side}.safetensors"
            proc = subprocess.run([sys.executable, __file__, "--child", side, *map(str, files), str(out)],
                                  capture_output=True, text=True, env=env, check=True)
            results[side] = json.loads(proc.stdout.strip().splitlines()[-1])
        diff = compare(folder / "out-reference.safetensors", folder / "out-stylegrad.safetensors")
    finally:
        if not a.keep:
            for p in folder.rglob("*"):
                if p.is_file():
                    p.unlink()
            for p in sorted(folder.rglob("*"), reverse=True):
                p.rmdir()
            folder.rmdir()
    ref, ours = results["reference"], results["stylegrad"]
    print(f"{'':10} {'seconds':>8} {'peak extra MB':>14}")
    for side in ("reference", "stylegrad"):
        print(f"{side:10} {results[side]['seconds']:8.1f} {results[side]['peak_extra_mb']:14.0f}")
    summary = {
        "reference_s": round(ref["seconds"], 2), "stylegrad_s": round(ours["seconds"], 2),
        "time_ratio": round(ours["seconds"] / ref["seconds"], 3),
        "reference_peak_extra_mb": round(ref["peak_extra_mb"]), "stylegrad_peak_extra_mb": round(ours["peak_extra_mb"]),
        "memory_ratio": round(ours["peak_extra_mb"] / ref["peak_extra_mb"], 4), "max_abs_diff": diff,
    }
    print(json.dumps(summary))


if __name__ == "__main__":
    main()
