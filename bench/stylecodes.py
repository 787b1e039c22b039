"""Stylecodes cost on the real SD1.5 architecture (random weights: speed and memory do not depend on the values).

1. Time per denoising step (one UNet call on a classifier-free-guidance batch of 2, 64x64 latents, CPU fp32):
   the base UNet alone vs base + the Stylecodes control stream. Medians of --runs calls after one warm-up.
2. Loading a checkpoint built from ../shared/fixtures/stylecodes/reference_state_dict.json (every key and shape
   of the published model, random fp16 values), in both published containers: stylegrad's strict loader
   (meta-device build, tensors cast one at a time) vs the published code's way (build the model with random
   initialization, read the whole file, load_state_dict). Load time and peak extra memory, each in its own process.

3. With ``--precision N``, only this: how many of N random images get a different code when the Stylecodes model
   is loaded beside a UNet in fp16 or bf16 than beside a float32 one (the tests' tiny model, CPU half precision):
   a code must not depend on the machine that made it.

    python bench/stylecodes.py                # prints a table, then one JSON line
    python bench/stylecodes.py --precision 200
"""

from __future__ import annotations

import argparse
import json
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import torch

MANIFEST = Path(__file__).resolve().parents[2] / "shared" / "fixtures" / "stylecodes" / "reference_state_dict.json"


def rss_mb(field: str) -> float:
    for line in Path("/proc/self/status").read_text().splitlines():
        if line.startswith(field + ":"):
            return int(line.split()[1]) / 1024
    return float("nan")


def reset_peak() -> None:
    Path("/proc/self/clear_refs").write_text("5")  # resets VmHWM to the current RSS


def base_unet(manifest: dict):
    from diffusers import UNet2DConditionModel

    cfg = {k: v for k, v in manifest["build"]["base_unet"].items() if k not in ("class", "param_count")}
    torch.manual_seed(0)
    return UNet2DConditionModel(**cfg).eval()


def step_times(manifest: dict, runs: int, size: int) -> dict:
    from stylegrad.stylecodes.model import StylecodesModel
    from stylegrad.stylecodes.unet import StylecodeUNet

    unet = base_unet(manifest)
    torch.manual_seed(1)
    control = StylecodesModel(unet).eval()
    g = torch.Generator().manual_seed(2)
    x = torch.randn(2, 4, size, size, generator=g)
    ctx = torch.randn(2, 77, 768, generator=g)
    with torch.no_grad():
        styled = StylecodeUNet(unet, control, torch.rand(1, 20, generator=g) * 2 - 1, 1.0)

        def timed(fn) -> float:
            fn()
            times = []
            for _ in range(runs):
                t = time.perf_counter()
                fn()
                times.append(time.perf_counter() - t)
            return statistics.median(times)

        base_s = timed(lambda: unet(x, 500, ctx))
        styled_s = timed(lambda: styled(x, 500, ctx))
    return {"base_step_s": base_s, "stylecodes_step_s": styled_s}


def write_checkpoints(manifest: dict, folder: Path) -> dict[str, Path]:
    from safetensors.torch import save_file

    g = torch.Generator().manual_seed(3)
    state = {k: (torch.randn(shape, generator=g) * 0.02).half() for k, shape, _ in manifest["tensors"]}
    paths = {"bin": folder / "stylecodes_sd15_v1.bin", "safetensors": folder / "stylecodes_sd15_v1.safetensors"}
    torch.save({"controlnet": state}, paths["bin"])
    save_file({f"controlnet.{k}": v for k, v in state.items()}, str(paths["safetensors"]))
    return paths


def load_once(manifest: dict, path: Path, how: str) -> dict:
    """Runs in its own process: peak memory is measured from the moment the base UNet exists."""
    unet = base_unet(manifest)
    reset_peak()
    start_mb = rss_mb("VmRSS")
    t = time.perf_counter()
    if how == "stylegrad":
        from stylegrad.stylecodes.model import load_stylecodes

        model = load_stylecodes(str(path), unet)
    else:  # the published code: a randomly initialized model, then the whole file, then a non-strict copy
        from stylegrad.stylecodes.model import StylecodesModel

        model = StylecodesModel(unet)
        if path.suffix == ".safetensors":
            from safetensors.torch import load_file

            state = {k[len("controlnet."):]: v for k, v in load_file(str(path)).items()}
        else:
            state = torch.load(path, map_location="cpu", weights_only=True)["controlnet"]
        model.load_state_dict(state, strict=False)
        del state
        model.eval()
    seconds = time.perf_counter() - t
    n = sum(p.numel() for p in model.parameters())
    return {"load_s": seconds, "peak_extra_mb": rss_mb("VmHWM") - start_mb, "params": n}


def child(args) -> None:
    manifest = json.loads(MANIFEST.read_text())
    torch.set_num_threads(args.threads)
    if args.child == "step":
        out = step_times(manifest, args.runs, args.size)
    else:
        out = load_once(manifest, Path(args.path), args.child)
    print(json.dumps(out))


def run_child(*extra: str) -> dict:
    r = subprocess.run([sys.executable, __file__, *extra], capture_output=True, text=True)
    if r.returncode:
        sys.exit(f"benchmark child failed:\n{r.stderr[-2000:]}")
    return json.loads(r.stdout.strip().splitlines()[-1])


def code_precision(n: int) -> dict:
    """Codes of n random 32x32 images from files saved as a user's would be, loaded beside a UNet in each dtype."""
    import copy

    import numpy as np
    from PIL import Image

    sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "tests"))
    from tiny import tiny_clip, tiny_pipeline, tiny_siglip, tiny_stylecodes

    from stylegrad.stylecodes.facade import Stylecodes
    from stylegrad.stylecodes.model import save_stylecodes

    rng = np.random.default_rng(0)
    images = [Image.fromarray(rng.integers(0, 256, (32, 32, 3), dtype=np.uint8)) for _ in range(n)]
    unet = tiny_pipeline(tiny_clip(0)).unet
    codes = {}
    with tempfile.TemporaryDirectory() as tmp:
        ckpt = save_stylecodes(tiny_stylecodes(unet), Path(tmp) / "sc.safetensors")
        siglip, processor = tiny_siglip()
        siglip.save_pretrained(Path(tmp) / "siglip")
        processor.save_pretrained(Path(tmp) / "siglip")
        for dtype in (torch.float32, torch.float16, torch.bfloat16):
            sc = Stylecodes.load(copy.deepcopy(unet).to(dtype), str(ckpt), str(Path(tmp) / "siglip"))
            codes[str(dtype).removeprefix("torch.")] = [sc.code_for(im) for im in images]
    return {f"codes_differing_{name}": sum(a != b for a, b in zip(got, codes["float32"]))
            for name, got in codes.items() if name != "float32"} | {"images": n}


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--runs", type=int, default=3)
    p.add_argument("--size", type=int, default=64, help="latent size (64 = 512 px)")
    p.add_argument("--threads", type=int, default=2)
    p.add_argument("--precision", type=int, metavar="N", help="only count codes differing in fp16/bf16 over N images")
    p.add_argument("--child", choices=["step", "stylegrad", "reference"], help=argparse.SUPPRESS)
    p.add_argument("--path", help=argparse.SUPPRESS)
    args = p.parse_args()
    if args.child:
        return child(args)
    if args.precision:
        torch.set_num_threads(args.threads)
        result = code_precision(args.precision)
        print(f"codes differing from float32's over {args.precision} images: fp16 {result['codes_differing_float16']}, "
              f"bf16 {result['codes_differing_bfloat16']}", file=sys.stderr)
        print(json.dumps(result))
        return
    if not MANIFEST.is_file():
        sys.exit(f"needs {MANIFEST} (the shared fixtures beside the repo)")
    common = ["--threads", str(args.threads), "--runs", str(args.runs), "--size", str(args.size)]
    step = run_child("--child", "step", *common)
    print(f"denoising step, batch 2, {args.size}x{args.size} latents: base {step['base_step_s']:.2f} s, "
          f"base + Stylecodes {step['stylecodes_step_s']:.2f} s", file=sys.stderr)
    loads = {}
    with tempfile.TemporaryDirectory() as tmp:
        paths = write_checkpoints(json.loads(MANIFEST.read_text()), Path(tmp))
        for container, path in paths.items():
            for how in ("stylegrad", "reference"):
                loads[f"{how}_{container}"] = r = run_child("--child", how, "--path", str(path), *common)
                print(f"load {container:12} {how:9}: {r['load_s']:6.2f} s, peak extra {r['peak_extra_mb']:7.0f} MB",
                      file=sys.stderr)
    result = {
        "base_step_s": round(step["base_step_s"], 3),
        "stylecodes_step_s": round(step["stylecodes_step_s"], 3),
        "step_ratio": round(step["stylecodes_step_s"] / step["base_step_s"], 3),
    }
    for container in ("bin", "safetensors"):
        ours, ref = loads[f"stylegrad_{container}"], loads[f"reference_{container}"]
        result.update({
            f"load_{container}_s": round(ours["load_s"], 2),
            f"reference_load_{container}_s": round(ref["load_s"], 2),
            f"load_{container}_speedup": round(ref["load_s"] / ours["load_s"], 2),
            f"load_{container}_peak_mb": round(ours["peak_extra_mb"]),
            f"reference_load_{container}_peak_mb": round(ref["peak_extra_mb"]),
        })
    print(json.dumps(result))


if __name__ == "__main__":
    main()
