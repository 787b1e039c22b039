"""Peak memory of a styled `generate` on the real SD1.5 architecture (random weights), before and after the CLIP
read became the projection alone.

Both sides build the same SD1.5-size pipeline in memory (UNet 860M, VAE, CLIP ViT-L/14 text encoder) and the
family's CLIP as a saved folder (random ViT-L/14, safetensors, as the hub's `openai/clip-vit-large-patch14`), then
run one styled generation (10 Adam steps, 1 denoising step at 256x256), with the CLIP read timed and measured on
its own first. "before" gets the CLIP parts the old way, by building the whole CLIPTextModelWithProjection from the
folder; "after" is today's `clip_parts`, which reads `text_projection.weight` from the safetensors file. Each side
runs in its own process; its peak is measured from the moment the pipeline is loaded, so the figure is what a
styled generation adds to a loaded pipeline. That peak is set by tuning (the tuned copies of the large weights and
their Adam moments), after the CLIP read is over, so it moves little; the CLIP read itself is what changes.

    python bench/generate_memory.py        # a table, then one JSON line
"""

from __future__ import annotations

import argparse
import json
import subprocess
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).parent))
import torch  # noqa: E402
from personalize import reset_peak, rss_mb, vit_l14  # noqa: E402


def sd15_pipeline():
    from diffusers import AutoencoderKL, DDIMScheduler, StableDiffusionPipeline, UNet2DConditionModel
    from transformers import CLIPTextModel

    from stylegrad.world.tokenizer import char_tokenizer

    torch.manual_seed(0)
    tok = char_tokenizer()
    clip = vit_l14()
    text = CLIPTextModel(clip.config.text_config).eval()
    text.load_state_dict(clip.text_model.state_dict())
    del clip
    unet = UNet2DConditionModel(cross_attention_dim=768, attention_head_dim=8, sample_size=64).eval()  # SD1.5's
    vae = AutoencoderKL(block_out_channels=(128, 256, 512, 512), layers_per_block=2, latent_channels=4,
                        down_block_types=("DownEncoderBlock2D",) * 4, up_block_types=("UpDecoderBlock2D",) * 4).eval()
    scheduler = DDIMScheduler(beta_schedule="scaled_linear", beta_start=0.00085, beta_end=0.012, clip_sample=False,
                              set_alpha_to_one=False, steps_offset=1)
    pipe = StableDiffusionPipeline(unet=unet, vae=vae, scheduler=scheduler, text_encoder=text, tokenizer=tok,
                                   safety_checker=None, feature_extractor=None, requires_safety_checker=False)
    pipe.set_progress_bar_config(disable=True)
    return pipe


def child(side: str, clip_dir: str, style_path: str, out: str) -> None:
    import stylegrad.aesthetic.tower as tower
    from stylegrad import GenerationRequest, Generator

    if side == "before":  # the previous loader: the whole CLIP text model, then its parts
        new = tower.clip_parts
        tower.clip_parts = lambda clip_model, layers, device="cpu": new(tower.load_clip_text(clip_model, device),
                                                                        layers, device)
    torch.set_num_threads(2)
    pipe = sd15_pipeline()
    loaded = reset_peak()
    start = time.perf_counter()
    generator = Generator(pipe, "sd15-random", clip_dir)
    _ = generator.encoder(clip_dir).tower  # the CLIP read, on its own first
    read_mb, read_seconds = rss_mb("VmHWM") - loaded, time.perf_counter() - start
    generator.images(GenerationRequest("a lighthouse at dusk", steps=1, width=256, height=256, style=style_path,
                                       clip_model=clip_dir))
    seconds = time.perf_counter() - start
    Path(out).write_text(json.dumps({"loaded_mb": loaded, "peak_mb": rss_mb("VmHWM"), "seconds": seconds,
                                     "clip_read_mb": read_mb, "clip_read_seconds": read_seconds}))


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--side", choices=["before", "after"], help=argparse.SUPPRESS)
    parser.add_argument("--clip", help=argparse.SUPPRESS)
    parser.add_argument("--style", help=argparse.SUPPRESS)
    parser.add_argument("--out", help=argparse.SUPPRESS)
    a = parser.parse_args()
    if a.side:
        child(a.side, a.clip, a.style, a.out)
        return
    from stylegrad import Style, save_style

    with tempfile.TemporaryDirectory() as tmp:
        clip_dir = Path(tmp) / "clip"
        vit_l14().save_pretrained(clip_dir)  # model.safetensors, 1.7 GB, as on the hub
        style = save_style(Style(torch.randn(768, generator=torch.Generator().manual_seed(1))), Path(tmp) / "s.pt")
        results = {}
        for side in ("before", "after", "before", "after"):  # alternating, two runs each; the lower peak is kept
            out = Path(tmp) / f"{side}.json"
            subprocess.run([sys.executable, __file__, "--side", side, "--clip", str(clip_dir), "--style", str(style),
                            "--out", str(out)], check=True)
            r = json.loads(out.read_text())
            r["extra_mb"] = r["peak_mb"] - r["loaded_mb"]
            if side not in results or r["extra_mb"] < results[side]["extra_mb"]:
                results[side] = r
    b, f = results["before"], results["after"]
    print(f"{'':8} {'pipeline MB':>12} {'CLIP read MB':>13} {'CLIP read s':>12} {'peak MB':>9} {'extra MB':>9} "
          f"{'seconds':>8}")
    for side, r in results.items():
        print(f"{side:8} {r['loaded_mb']:12.0f} {r['clip_read_mb']:13.0f} {r['clip_read_seconds']:12.2f} "
              f"{r['peak_mb']:9.0f} {r['extra_mb']:9.0f} {r['seconds']:8.1f}")
    print(json.dumps({"clip_read_mb_before": round(b["clip_read_mb"]), "clip_read_mb_after": round(f["clip_read_mb"]),
                      "clip_read_s_before": round(b["clip_read_seconds"], 2),
                      "clip_read_s_after": round(f["clip_read_seconds"], 2),
                      "extra_mb_before": round(b["extra_mb"]), "extra_mb_after": round(f["extra_mb"]),
                      "extra_ratio": round(f["extra_mb"] / b["extra_mb"], 3),
                      "peak_mb_before": round(b["peak_mb"]), "peak_mb_after": round(f["peak_mb"]),
                      "saved_mb": round(b["peak_mb"] - f["peak_mb"])}))


if __name__ == "__main__":
    main()
