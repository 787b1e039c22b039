"""What IP-Adapter and aesthetic gradients each add to one image, against the plain generation, in one run: on the
real SD1.5 architecture with random weights (the configs stylegrad ships, built by bench/gpu_check.py), with a
real-size random IP-Adapter (``ip-adapter_sd15``'s layout: ViT-H/14's 1024-wide image embedding, 4 tokens, every
cross-attention layer) and a real-size random OpenCLIP ViT-H/14 image encoder beside it (h94's ``image_encoder``
folder), and aesthetic gradients at T=10 (the paper's default).

Per image, through ``Generator.images`` (the call every door makes):

- ``plain``: no style;
- ``ip_first``: IP-Adapter, the first picture of the process (the adapter file read, the encoder loaded, the
  picture encoded);
- ``ip_new``: another picture (the encoder already loaded: the picture encoded);
- ``ip_cached``: a picture encoded before (its embedding read from the cache: the attention only);
- ``aesthetic``: a new prompt with a style (T=10 Adam steps on the text encoder, then the same denoising).

Time per image, the best of ``--runs`` (each run a new prompt or picture where the case says so): on the CPU the
process's CPU seconds (all its threads; what holds when other processes share the cores), the wall seconds beside;
on a GPU the wall seconds.
Memory, in a second pass with ``--memory-steps`` denoising steps (the peak is one step's plus what the method
holds): on the CPU the peak of the tensors torch ops create during the call (bench/tuning_memory.py's
AllocationTracker: activations, the adapter's weights put on the UNet, the image embeddings) and, apart, the growth
of the process's resident memory over the call (what no torch op creates: the image encoder's weights read from its
file, and aesthetic tuning's workspace, which the engine allocates itself and keeps for the next prompt); on a GPU,
torch.cuda's peak above what was allocated before the call. Extra = case − plain; ratio = case / plain. The last
line is JSON.

    python bench/ipadapter.py                 # 256x256, 10 steps (a few minutes on 2 cores)
    python bench/ipadapter.py --quick         # 128x128, 4 steps
    python bench/ipadapter.py --size tiny     # the tests' tiny configs: a smoke run in seconds"""

from __future__ import annotations

import argparse
import json
import os
import sys
import tempfile
import time
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "bench"))
sys.path.insert(0, str(ROOT / "tests"))
PROMPT = "a lighthouse on a cliff at dusk, oil painting"
T = 10
CASES = ("plain", "ip_first", "ip_new", "ip_cached", "aesthetic")
# ViT-H/14 as h94/IP-Adapter's models/image_encoder (OpenCLIP's, converted): the image side of ip-adapter_sd15
VIT_H = dict(hidden_size=1280, intermediate_size=5120, num_hidden_layers=32, num_attention_heads=16, image_size=224,
             patch_size=14, projection_dim=1024, hidden_act="gelu", layer_norm_eps=1e-5)
TINY_ENCODER = dict(hidden_size=32, intermediate_size=37, num_hidden_layers=2, num_attention_heads=4, image_size=224,
                    patch_size=32, projection_dim=16, hidden_act="gelu")


def write_encoder(folder: Path, config: dict) -> Path:
    """A random CLIPVisionModelWithProjection of ``config`` saved as a diffusers/transformers folder."""
    from transformers import CLIPVisionConfig, CLIPVisionModelWithProjection

    torch.manual_seed(5)
    CLIPVisionModelWithProjection(CLIPVisionConfig(**config)).eval().save_pretrained(folder)
    return folder


def pictures(work: Path, n: int) -> list[Path]:
    """``n`` distinct reference pictures (random 512x512 RGB, as a user's photos: each a new embedding)."""
    from PIL import Image

    g = torch.Generator().manual_seed(11)
    out = []
    for i in range(n):
        pixels = (torch.rand(512, 512, 3, generator=g) * 255).to(torch.uint8).numpy()
        out.append(work / f"picture-{i}.png")
        Image.fromarray(pixels).save(out[-1])
    return out


def measure(device, gen, request, track: bool) -> dict:
    """One image: its seconds, or (``track``) the peak and held bytes of the tensors the call created."""
    from gpu_check import sync

    if not track:
        sync(device)
        t, cpu = time.perf_counter(), time.process_time()
        gen.images(request)
        sync(device)
        return {"s": time.perf_counter() - t, "cpu_s": time.process_time() - cpu}
    if device.type == "cuda":
        sync(device)
        torch.cuda.reset_peak_memory_stats(device)
        before = torch.cuda.memory_allocated(device)
        gen.images(request)
        sync(device)
        return {"peak_mb": (torch.cuda.max_memory_allocated(device) - before) / 2**20,
                "held_mb": (torch.cuda.memory_allocated(device) - before) / 2**20}
    from tuning_memory import AllocationTracker

    before = rss_mb()
    with AllocationTracker() as tracker:
        gen.images(request)
    return {"peak_mb": tracker.peak[device.type] / 2**20, "held_mb": tracker.now[device.type] / 2**20,
            "rss_growth_mb": rss_mb() - before}


def rss_mb() -> float:
    """The process's resident memory: what weights read from files take (torch ops do not create them, so the
    tracker does not see them; freed heap may stay resident, so only growth is read from it)."""
    import resource

    try:
        with open("/proc/self/statm") as f:
            return int(f.read().split()[1]) * resource.getpagesize() / 2**20
    except OSError:
        import psutil

        return psutil.Process().memory_info().rss / 2**20


def one_pass(device, pipe, clip_l, files: dict, pics: list[Path], side: int, steps: int, runs: int, track: bool,
             cache: Path) -> dict[str, dict]:
    """Every case on a fresh Generator over ``pipe`` (so ``ip_first`` loads the encoder) and a fresh picture
    cache; each run a new prompt (aesthetic) or a new picture (ip_new)."""
    from stylegrad import GenerationRequest, Generator, StyleOptions

    os.environ["STYLEGRAD_CACHE"] = str(cache)
    gen = Generator(pipe, "sd15-random", clip_l)
    fresh = iter(pics)

    def request(n: int, **kw) -> GenerationRequest:
        return GenerationRequest(f"{PROMPT}, view {n}", steps=steps, width=side, height=side, seed=1, **kw)

    def ip(picture: Path) -> dict:
        return dict(ip_adapter=str(files["adapter"]), ip_images=(str(picture),), ip_scale=0.6)

    first = next(fresh)
    gen.images(GenerationRequest(PROMPT, steps=1, width=side, height=side))  # warm-up: first-call costs apart
    out: dict[str, dict] = {}
    for case in CASES:
        results = []
        for r in range(1 if case == "ip_first" else runs):
            n = len(out) * 10 + r + 1
            if case == "plain":
                req = request(n)
            elif case == "ip_first":
                req = request(n, **ip(first))
            elif case == "ip_new":
                req = request(n, **ip(next(fresh)))
            elif case == "ip_cached":
                req = request(n, **ip(first))
            else:
                req = request(n, style=str(files["style"]), style_options=StyleOptions(steps=T))
            results.append(measure(device, gen, req, track))
        key = "peak_mb" if track else "cpu_s" if device.type == "cpu" else "s"
        out[case] = min(results, key=lambda x: x[key])
    del gen
    return out


def main(argv: list[str] | None = None) -> dict:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--size", choices=("real", "tiny"), default="real",
                        help="real: the shipped SD1.5 config and ViT-H/14; tiny: the tests' configs (a smoke run)")
    parser.add_argument("--quick", action="store_true", help="128x128 and 4 steps (default 256x256, 10 steps)")
    parser.add_argument("--side", type=int, help="image side (default 256, --quick 128, tiny 64)")
    parser.add_argument("--steps", type=int, help="denoising steps of the timed pass (default 10, --quick 4)")
    parser.add_argument("--memory-steps", type=int, default=2, help="denoising steps of the memory pass")
    parser.add_argument("--runs", type=int, default=1, help="timed runs per case (the best is kept)")
    parser.add_argument("--device", default="cpu", help="cpu (default), cuda, mps, auto")
    args = parser.parse_args(argv)
    tiny = args.size == "tiny"
    if tiny:
        os.environ.setdefault("STYLEGRAD_CHECKPOINT_CONFIGS", str(ROOT / "tests" / "checkpoint_configs"))
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    side = args.side or (64 if tiny else 128 if args.quick else 256)
    steps = args.steps or (4 if args.quick or tiny else 10)
    from gpu_check import build, write_style
    from ipadapter_files import adapter_tensors
    from safetensors.torch import save_file

    from stylegrad.devices import resolve_device

    device = resolve_device(args.device)
    start = time.perf_counter()
    with tempfile.TemporaryDirectory(prefix="bench-ipadapter-") as tmp:
        work = Path(tmp)
        t = time.perf_counter()
        pipe, clip_l = build("sd1", device)
        built_s = time.perf_counter() - t
        folder = work / "ipadapter"
        folder.mkdir()
        encoder = TINY_ENCODER if tiny else VIT_H
        t = time.perf_counter()
        write_encoder(folder / "image_encoder", encoder)  # found beside the adapter, as h94's layout has it
        encoder_built_s = time.perf_counter() - t
        tensors = adapter_tensors(pipe.unet, encoder["projection_dim"], tokens=4, scale=0.02)
        files = {"adapter": folder / "ip-adapter_sd15.safetensors", "style": work / "style.safetensors"}
        save_file({k: v.contiguous() for k, v in tensors.items()}, str(files["adapter"]))
        write_style(pipe, clip_l, "sd1", files["style"])
        adapter_mb = sum(v.numel() * v.element_size() for v in tensors.values()) / 2**20
        pics = pictures(work, 2 + 2 * args.runs)
        # memory first: what a method allocates once and keeps for the next call (the tuning workspace) is counted
        memory = one_pass(device, pipe, clip_l, files, pics, side, args.memory_steps, 1, True, work / "cache-mem")
        timed = one_pass(device, pipe, clip_l, files, pics, side, steps, args.runs, False, work / "cache-time")
    basis = "cpu_s" if device.type == "cpu" else "s"  # on a shared CPU, the process's CPU seconds hold under load
    plain_s, plain_mb = timed["plain"][basis], memory["plain"]["peak_mb"]
    summary = {"device": str(device), "size": args.size, "side": side, "steps": steps, "T": T,
               "memory_steps": args.memory_steps, "time_basis": "process CPU seconds" if basis == "cpu_s" else
               "wall seconds", "memory_counter": "cuda allocator" if device.type == "cuda" else
               "AllocationTracker (bench/tuning_memory.py)", "threads": torch.get_num_threads(),
               "load_average": os.getloadavg()[0] if hasattr(os, "getloadavg") else None,
               "built_s": built_s, "encoder_built_s": encoder_built_s, "adapter_mb": adapter_mb}
    print(f"SD1.5 architecture (random weights), {side}x{side}, {steps} steps, on {device} "
          f"({torch.get_num_threads()} threads, load {summary['load_average']})")
    print(f"time: {summary['time_basis']} per image; memory: {summary['memory_counter']}")
    print(f"{'case':10} {'wall s':>8} {'time':>8} {'extra':>8} {'x plain':>8} {'peak MB':>9} {'extra MB':>9} "
          f"{'x plain':>8} {'RSS +MB':>8}")
    for case in CASES:
        s, mb = timed[case][basis], memory[case]["peak_mb"]
        rss = memory[case].get("rss_growth_mb")
        row = {"wall_s": timed[case]["s"], "time": s, "extra_time": s - plain_s, "time_ratio": s / plain_s,
               "peak_mb": mb, "extra_mb": mb - plain_mb, "memory_ratio": mb / plain_mb,
               "held_mb": memory[case]["held_mb"], "rss_growth_mb": rss}
        summary[case] = row
        print(f"{case:10} {row['wall_s']:8.1f} {s:8.1f} {row['extra_time']:8.1f} {row['time_ratio']:8.2f} {mb:9.0f} "
              f"{row['extra_mb']:9.0f} {row['memory_ratio']:8.2f} {'-' if rss is None else f'{rss:8.0f}'}")
    summary["seconds"] = time.perf_counter() - start
    print(json.dumps(summary))
    return summary


if __name__ == "__main__":
    main()
