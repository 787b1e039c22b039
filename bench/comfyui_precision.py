"""ComfyUI with a half-precision CLIP: how much of a prompt's tuning reaches the conditioning.

The tiny SD1 world, the tests' ComfyUI stand-in (tests/comfy_standin.py, checked against ComfyUI's source), the
Aesthetic CLIP Text Encode node at its defaults (10 steps, lr 1e-4). For a CLIP stored in bf16 and in fp16: how many
layer-norm elements the tuning moved (on the same rounded weights held in float32) still differ from the original
in the weights ComfyUI runs with, and the conditioning's largest distance to that float32 result.

    python bench/comfyui_precision.py        # one line per dtype, then one JSON line
"""

from __future__ import annotations

import json
import sys
import tempfile
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "tests"))


def measure(dtype: torch.dtype, pipe, clip_dir: str, style) -> dict:
    from comfy_standin import _cast, encode, run_node, sd1_clip

    from stylegrad.apps.comfyui import nodes

    half = sd1_clip(pipe.text_encoder, pipe.tokenizer, dtype=dtype)
    reference = sd1_clip(pipe.text_encoder, pipe.tokenizer, dtype=dtype)
    with torch.inference_mode():
        reference.cond_stage_model.to(torch.float32)
    args = dict(text="a red house by the sea", style=style, steps=10, lr=1e-4, weight=1.0, towers="both",
                clip_model=clip_dir)
    cond, styled = run_node(nodes.AestheticCLIPTextEncode, clip=half, **args)
    cond_ref, styled_ref = run_node(nodes.AestheticCLIPTextEncode, clip=reference, **args)
    keys = [k for k in reference.cond_stage_model.state_dict() if "layer_norm" in k]

    def used(clip) -> dict:
        out = {}
        with clip.patcher.patched():
            for key in keys:
                module, name = key.rsplit(".", 1)
                w, b = _cast(clip.cond_stage_model.get_submodule(module), torch.float32, torch.device("cpu"))
                out[key] = w if name == "weight" else b
        return out

    a, b, c, d = used(styled_ref), used(reference), used(styled), used(half)
    moved = sum(int((a[k] != b[k]).sum()) for k in keys)
    survived = sum(int(((a[k] != b[k]) & (c[k] != d[k])).sum()) for k in keys)
    plain = encode(reference, args["text"])[0][0]
    return {"layer_norm_moved": moved, "layer_norm_surviving": survived,
            "conditioning_error": float((cond[0][0] - cond_ref[0][0]).abs().max()),
            "style_effect": float((cond_ref[0][0] - plain).abs().max())}


def main() -> None:
    from comfy_standin import install_folder_paths
    from diffusers import StableDiffusionPipeline
    from tiny import save_world

    from stylegrad import Style

    torch.set_num_threads(2)
    with tempfile.TemporaryDirectory() as tmp:
        install_folder_paths(str(Path(tmp) / "ComfyUI"))
        clip_dir, sd_dir = save_world(Path(tmp) / "world")
        pipe = StableDiffusionPipeline.from_pretrained(sd_dir, safety_checker=None, requires_safety_checker=False)
        style = Style(torch.randn(24, generator=torch.Generator().manual_seed(1)), name="mine")
        result = {}
        for dtype in (torch.bfloat16, torch.float16):
            name = str(dtype).removeprefix("torch.")
            result[name] = r = measure(dtype, pipe, str(clip_dir), style)
            print(f"{name:9} layer-norm differences surviving {r['layer_norm_surviving']}/{r['layer_norm_moved']}; "
                  f"conditioning vs float32 {r['conditioning_error']:.2e} (style effect {r['style_effect']:.2f})",
                  file=sys.stderr)
    print(json.dumps(result))


if __name__ == "__main__":
    main()
