"""``models`` (what the models folder holds) and ``merge`` (A1111's Checkpoint Merger)."""

from __future__ import annotations

import json
import sys

from stylegrad.apps.cli.args import add_lora_options
from stylegrad.checkpoints.blocks import PRESET_NAMES, block_names
from stylegrad.checkpoints.library import MODELS_DIR_ENV, family_name, list_models, resolve_model


def cmd_models(a) -> None:
    from tqdm.auto import tqdm

    entries = list_models(a.models_dir, hashes=not a.no_hash,
                          progress=lambda files: tqdm(files, desc="hashing", unit="file", leave=False))
    if a.json:
        print(json.dumps([e.as_dict() for e in entries], indent=2))
        return
    if not entries:
        print("no checkpoint files (.safetensors, .ckpt) in the models folder", file=sys.stderr)
        return
    width = max(len(e.name) for e in entries)
    for e in entries:
        what = family_name(e.family) if e.usable else f"not usable: {e.detail}"
        size = f"{e.size_mb / 1024:6.2f} GB" if e.size_mb >= 1024 else f"{e.size_mb:6.1f} MB"
        print(f"{e.name:{width}}  {e.hash or '-':10}  {size}  {what}")


def cmd_merge(a) -> None:
    b = resolve_model(a.b, a.models_dir) if a.b else None
    c = resolve_model(a.c, a.models_dir) if a.c else None
    from stylegrad.addons.lora.library import LoraLibrary
    from stylegrad.checkpoints.merge import merge_checkpoints

    loras = LoraLibrary(a.loras).specs(a.lora)
    method = a.method or ("none" if b is None and loras else "weighted-sum")
    out = merge_checkpoints(resolve_model(a.a, a.models_dir), b, c, out=a.out, method=method, alpha=a.alpha,
                            block_weights=a.block_weights, fp16=a.fp16, bake_vae=a.bake_vae, discard=a.discard,
                            loras=loras)
    print(out)


def register(sub) -> None:
    sub.add_parser("models", help="list the checkpoints in the models folder", arguments=_models_arguments,
                   description="List the single-file checkpoints in the models folder (--models-dir or "
                   f"${MODELS_DIR_ENV}): name (what --model takes), A1111's short hash, size and family. "
                   "Hashes are computed once per file and cached.")
    sd, xl = block_names("sd1"), block_names("sdxl")
    sub.add_parser(
        "merge", help="merge checkpoints (A1111's Checkpoint Merger)", arguments=_merge_arguments,
        description="Merge Stable Diffusion checkpoints as A1111's Checkpoint Merger does: weighted sum "
        "A*(1-M) + B*M, add difference A + (B-C)*M, or none (A alone: convert, prune with --discard, bake a VAE, "
        "--fp16). Only the models' own weights are merged; A decides the keys and dtypes. An inpainting or "
        "instruct-pix2pix A with a normal B blends the shared input channels. Tensors are streamed one at a time, "
        "so merging needs little memory. The output records A1111's sd_merge_recipe / sd_merge_models metadata.",
        epilog=f"Block weights (--block-weights): {len(sd)} numbers for SD1.x/SD2.x ({sd[0]}..{sd[11]}, {sd[12]}, "
        f"{sd[13]}..{sd[-1]}), {len(xl)} for SDXL ({xl[0]}..{xl[8]}, M00, {xl[10]}..{xl[-1]}), optionally with BASE "
        "(text encoder and VAE) first; otherwise BASE is --alpha. time_embed goes with IN00, the final out layers "
        f"with the last OUT block. Presets: {', '.join(PRESET_NAMES)}. "
        "Example: stylegrad merge base.safetensors style.safetensors --alpha 0.4 -o mix.safetensors; "
        "stylegrad merge base.safetensors --lora detail.safetensors:0.6 -o baked.safetensors")


def _models_arguments(p) -> None:
    p.add_argument("--models-dir", metavar="DIR", help=f"the folder (default: ${MODELS_DIR_ENV})")
    p.add_argument("--json", action="store_true", help="print JSON")
    p.add_argument("--no-hash", action="store_true", help="skip hashing (fast listing of new files)")
    p.set_defaults(func=cmd_models)


def _merge_arguments(p) -> None:
    from stylegrad.checkpoints.merge import METHODS

    p.add_argument("a", metavar="A", help="primary model (file, or name in --models-dir)")
    p.add_argument("b", metavar="B", nargs="?", help="secondary model")
    p.add_argument("c", metavar="C", nargs="?", help="tertiary model (add difference: B - C is added)")
    p.add_argument("--method", choices=list(METHODS), default=None,
                   help="interpolation (default: weighted-sum; add-difference needs C; none takes A alone, the "
                   "default with --lora and no B)")
    add_lora_options(p, "bake a LoRA/LyCORIS file (or a name in --loras) into the result")
    p.add_argument("--alpha", type=float, default=0.3, metavar="M", help="multiplier M (default 0.3, as A1111)")
    p.add_argument("--block-weights", metavar="LIST_OR_PRESET", help="a weight per UNet block (see below)")
    p.add_argument("--fp16", action="store_true", help="save as half precision")
    p.add_argument("--bake-vae", metavar="FILE", help="replace the VAE with this one (original layout)")
    p.add_argument("--discard", metavar="REGEX", help="drop the weights whose names match, e.g. '^model_ema\\.'")
    p.add_argument("-o", "--out", required=True, metavar="OUT",
                   help="OUT.safetensors (original layout: A1111, ComfyUI and --model load it), or a folder name "
                   "without suffix for a diffusers folder")
    p.add_argument("--models-dir", metavar="DIR", help=f"where A, B, C are looked up by name (default: ${MODELS_DIR_ENV})")
    p.set_defaults(func=cmd_merge)
