"""Apply and remove a rank-32 kohya LoRA on the real SD1.5 architecture (random weights), stylegrad against
diffusers' ``load_lora_weights`` + ``fuse_lora`` + ``unfuse_lora`` (+ ``unload_lora_weights``), in the same run.

The LoRA has kohya's default targets: in the UNet every Linear/1x1 layer of the transformer blocks (proj_in/out,
attention q/k/v/out, feed-forward), in the text encoder every attention and MLP layer; rank 32, alpha 16, fp16,
written as a kohya ``.safetensors``. Each side runs in its own process on the same UNet and text encoder
(fp32, random weights, built once per process before the clock starts):

- diffusers: ``load_lora_weights(file)``, ``fuse_lora()``, ``unfuse_lora()``, ``unload_lora_weights()``;
- stylegrad: ``LoraNetwork.for_pipeline`` (read, map, check every key), enter and leave ``applied()`` (hooks on
  the UNet and the text encoder), i.e. what one generation adds.

Peak extra memory: VmHWM minus the resident set once the models are built. Also reported: the cost of a LoRA
that runs beside the weights, one UNet forward (64x64 latent, batch 2) with the hooks against plain.

    python bench/lora.py          # a table, then one JSON line
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

RANK, ALPHA = 32, 16.0


def rss_mb(field: str) -> float:
    for line in Path("/proc/self/status").read_text().splitlines():
        if line.startswith(field + ":"):
            return int(line.split()[1]) / 1024
    return float("nan")


def build():
    """A StableDiffusionPipeline with SD1.5's UNet and text encoder (random fp32 weights) and tiny VAE."""
    import torch
    from diffusers import AutoencoderKL, DDIMScheduler, StableDiffusionPipeline, UNet2DConditionModel
    from transformers import CLIPTextConfig, CLIPTextModel

    from stylegrad.checkpoints.loading import family_config
    from stylegrad.world.tokenizer import char_tokenizer

    torch.manual_seed(0)
    cfg = family_config("sd1")
    unet = UNet2DConditionModel.from_config(cfg["unet"]).eval()
    te = {k: v for k, v in cfg["text_encoder"].items() if k not in ("class", "prefix", "layout")}
    text = CLIPTextModel(CLIPTextConfig(**te)).eval()
    vae = AutoencoderKL(block_out_channels=(8,), norm_num_groups=4, latent_channels=4)
    return StableDiffusionPipeline(vae=vae, text_encoder=text, tokenizer=char_tokenizer(), unet=unet,
                                   scheduler=DDIMScheduler(), safety_checker=None, feature_extractor=None,
                                   requires_safety_checker=False)


def write_lora(pipe, path: Path) -> int:
    """kohya keys for every targeted layer; returns the file's tensor bytes."""
    import torch
    from safetensors.torch import save_file

    g = torch.Generator().manual_seed(1)
    tensors = {}

    def add(prefix, name, module):
        w = module.weight
        out, inp = w.shape[0], w.shape[1]
        key = f"{prefix}_{name.replace('.', '_')}"
        tensors[f"{key}.lora_down.weight"] = (torch.randn(RANK, inp, *w.shape[2:], generator=g) * 0.01).half()
        tensors[f"{key}.lora_up.weight"] = (torch.randn(out, RANK, *[1] * (w.dim() - 2), generator=g) * 0.01).half()
        tensors[f"{key}.alpha"] = torch.tensor(ALPHA).half()

    for name, m in pipe.unet.named_modules():
        if ".transformer_blocks." in name or name.endswith(("proj_in", "proj_out")):
            if isinstance(m, torch.nn.Linear) or (isinstance(m, torch.nn.Conv2d) and m.kernel_size == (1, 1)):
                add("lora_unet", name, m)
    for name, m in pipe.text_encoder.named_modules():
        if isinstance(m, torch.nn.Linear) and (".self_attn." in name or ".mlp." in name):
            add("lora_te", "text_model." + name, m)
    save_file(tensors, str(path))
    return sum(t.numel() * t.element_size() for t in tensors.values())


def child(side: str, path: str) -> None:
    import torch

    from stylegrad.addons.lora.network import LoraNetwork  # imported before the baseline, like diffusers

    torch.set_num_threads(min(2, os.cpu_count() or 1))
    pipe = build()
    if side == "diffusers":
        import peft  # noqa: F401 - load_lora_weights imports it; its import is not the LoRA's cost
        from diffusers.loaders import lora_pipeline  # noqa: F401
    base = rss_mb("VmRSS")
    start = time.perf_counter()
    if side == "diffusers":
        pipe.load_lora_weights(path, adapter_name="bench")
        pipe.fuse_lora()
        pipe.unfuse_lora()
        pipe.unload_lora_weights()
        seconds = time.perf_counter() - start
        extra = {}
    else:
        net = LoraNetwork.for_pipeline(pipe, [(path, 1.0, 1.0)])
        with net.applied():
            pass
        seconds = time.perf_counter() - start
        peak = rss_mb("VmHWM") - base
        x = torch.randn(2, 4, 64, 64)
        t, cond = torch.tensor([500, 500]), torch.randn(2, 77, 768)
        with torch.no_grad():
            pipe.unet(x, t, cond)  # warm
            t0 = time.perf_counter()
            plain = pipe.unet(x, t, cond).sample
            t1 = time.perf_counter()
            with net.applied():
                hooked = pipe.unet(x, t, cond).sample
            t2 = time.perf_counter()
        extra = {"unet_forward_plain_s": t1 - t0, "unet_forward_with_lora_s": t2 - t1,
                 "lora_changes_output": float((hooked - plain).abs().max()), "patches": len(net.patches)}
        print(json.dumps({"seconds": seconds, "peak_extra_mb": peak, **extra}))
        return
    print(json.dumps({"seconds": seconds, "peak_extra_mb": rss_mb("VmHWM") - base, **extra}))


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--child", choices=["diffusers", "stylegrad"])
    p.add_argument("--file")
    a = p.parse_args()
    if a.child:
        child(a.child, a.file)
        return
    with tempfile.TemporaryDirectory() as tmp:
        path = Path(tmp) / "rank32.safetensors"
        lora_mb = write_lora(build(), path) / 2**20
        results = {}
        for side in ("diffusers", "stylegrad"):
            proc = subprocess.run([sys.executable, __file__, "--child", side, "--file", str(path)],
                                  capture_output=True, text=True, env={**os.environ, "TQDM_DISABLE": "1"})
            if proc.returncode:
                sys.exit(f"{side} failed:\n{proc.stderr[-3000:]}")
            results[side] = json.loads(proc.stdout.strip().splitlines()[-1])
    d, s = results["diffusers"], results["stylegrad"]
    print(f"LoRA: rank {RANK}, {s['patches']} layers, {lora_mb:.1f} MB of tensors (fp16)")
    print(f"{'side':<10} {'apply+remove s':>15} {'peak extra MB':>14}")
    for side, r in results.items():
        print(f"{side:<10} {r['seconds']:>15.2f} {r['peak_extra_mb']:>14.1f}")
    print(f"UNet forward, 64x64 latent, batch 2: plain {s['unet_forward_plain_s']:.2f} s, "
          f"with the LoRA beside the weights {s['unet_forward_with_lora_s']:.2f} s")
    summary = {"lora_mb": round(lora_mb, 1), "diffusers_s": round(d["seconds"], 3),
               "stylegrad_s": round(s["seconds"], 3), "time_ratio": round(s["seconds"] / d["seconds"], 4),
               "diffusers_peak_extra_mb": round(d["peak_extra_mb"], 1),
               "stylegrad_peak_extra_mb": round(s["peak_extra_mb"], 1),
               "stylegrad_peak_over_lora_size": round(s["peak_extra_mb"] / lora_mb, 3),
               "unet_forward_overhead": round(s["unet_forward_with_lora_s"] / s["unet_forward_plain_s"], 3)}
    print(json.dumps(summary))


if __name__ == "__main__":
    main()
