"""``embed``, ``mix``, ``info``, ``score``: making, combining and reading the files people share."""

from __future__ import annotations

import json
import sys
from pathlib import Path

from stylegrad.apps.cli.args import add_device
from stylegrad.errors import StylegradError

LONG = 200  # metadata values longer than this are shortened in text mode (kohya's ss_tag_frequency is ~15 KB)


def cmd_embed(a) -> None:
    from stylegrad.aesthetic.embedding import BIGG, embed_to_file
    from stylegrad.families import Family

    sdxl = a.family == Family.SDXL
    clip = a.clip_model or Family(a.family).clip_model  # SDXL: CLIP-L's, the first of its two
    extra = {"clip_model_g": a.clip_model_g or BIGG} if sdxl else {}
    if a.clip_model_g and not sdxl:
        a.parser.error("--clip-model-g is for --family sdxl")
    if sdxl and (a.format or Path(a.output).suffix.lower().lstrip(".")) in ("pt", "pth", "bin"):
        raise StylegradError("an SDXL style has two parts (clip_l, clip_g): save it as .safetensors")
    style = embed_to_file(a.inputs, a.output, clip, format=a.format, name=a.name, batch_size=a.batch_size,
                          recursive=a.recursive, mean=a.mean, device=a.device, dtype=a.dtype, **extra)
    widths = f"widths {style.width} + {style.g.shape[0]}, {clip} + {extra['clip_model_g']}" if sdxl else \
        f"width {style.width}, {clip}"
    print(f"{a.output}: style from {style.metadata['num_images']} images, {widths}")


def cmd_mix(a) -> None:
    from stylegrad.files.styles import mix_style_files

    style = mix_style_files(a.styles, a.output, a.slerp, a.format)
    print(f"{a.output}: {style.metadata['method']}")


def _short(value: str) -> str:
    text = str(value)
    return text if len(text) <= LONG else f"{text[:LONG]}... ({len(text)} characters)"


def _describe(info) -> dict:
    d = info.as_dict()
    if info.kind == "image" and info.format == "png":
        from stylegrad.files.pnginfo import read_generation_info

        gen = read_generation_info(info.path)
        if gen is not None:
            d["generation"] = {k: v for k, v in gen.as_dict().items() if k != "raw"}
    return d


def _print_text(d: dict) -> None:
    from stylegrad.files.recognize import describe_width

    print(d["path"])
    print(f"  kind:    {d['kind']}{' (' + d['format'] + ')' if d['format'] else ''}"
          f"{'' if d['usable'] or d['kind'] not in ('style',) else ' (not usable as a style)'}")
    print(f"  what:    {d['detail']}")
    if d["shape"] is not None:
        print(f"  tensor:  shape {tuple(d['shape'])}, {d['dtype']}")
    elif d["dtype"] is not None:
        print(f"  dtype:   {d['dtype']}")
    if d["widths"]:
        print("  widths:  " + ", ".join(describe_width(w) for w in d["widths"]))
    elif d["width"] is not None:
        print(f"  width:   {describe_width(d['width'])}")
    for key in ("family", "vectors", "trigger", "name", "step", "norm"):
        if d[key] is not None:
            value = f"{d[key]:.4g}" if key == "norm" else d[key]
            print(f"  {key + ':':8} {value}")
    gen = d.get("generation")
    if gen:
        print(f"  made by: {gen['tool']}")
        print(f"  prompt:  {gen['prompt']}")
        if gen["negative"]:
            print(f"  negative prompt: {gen['negative']}")
        for k, v in gen["parameters"].items():
            print(f"  {k}: {_short(v)}")
        for lora in gen["loras"]:
            print(f"  LoRA:    {lora['name']} (model {lora['strength_model']}, clip {lora['strength_clip']})")
        if gen["embeddings"]:
            print(f"  embeddings: {', '.join(gen['embeddings'])}")
    for k, v in sorted(d["metadata"].items()):
        print(f"  {k}: {_short(v)}")


def cmd_info(a) -> int:
    from stylegrad.files.recognize import inspect_file

    rows, failed = [], 0
    for f in a.files:  # one unreadable file does not stop the others
        try:
            rows.append(_describe(inspect_file(f)))
        except StylegradError as e:
            failed += 1
            print(f"Error: {e}", file=sys.stderr)
    if a.json:
        print(json.dumps(rows, indent=2))
    else:
        for d in rows:
            _print_text(d)
    return 1 if failed else 0


def cmd_score(a) -> None:
    from stylegrad.evaluation.scoring import score_files

    rows = score_files(a.files, a.predictor, a.clip_model, a.device, a.dtype)
    if a.json:
        print(json.dumps(rows, indent=2))
    else:
        for r in rows:
            print(f"{r['score']:7.3f}  {r['kind']:5}  {r['file']}")


def register(sub) -> None:
    sub.add_parser("embed", help="make a style file from images", arguments=_embed_arguments,
                   description="Average the CLIP image embeddings of images into a style file.")
    sub.add_parser("mix", help="mix styles into one", description="Normalized weighted mean of styles.",
                   arguments=_mix_arguments)
    sub.add_parser("info", help="say what a file is", arguments=_info_arguments,
                   description="What any file is (style, textual inversion, LoRA, checkpoint, image, other), "
                   "with its shape, dtype, width(s), family and metadata; for PNGs the generation parameters "
                   "written by AUTOMATIC1111, ComfyUI, NovelAI, kohya sd-scripts or stylegrad.")
    sub.add_parser("score", help="aesthetic score of images and style files", arguments=_score_arguments,
                   description="Score images (through the CLIP image encoder) and style files (directly: a "
                   "style is already a CLIP image embedding) with a published aesthetic predictor.")


def _embed_arguments(p) -> None:
    from stylegrad.aesthetic.embedding import BIGG, MEANS
    from stylegrad.families import Family

    one_tower = (Family.SD1, Family.SD2)
    p.add_argument("inputs", nargs="+", metavar="IMAGES_OR_DIRS", help="image files and/or folders of images")
    p.add_argument("-o", "--output", required=True, metavar="STYLE", help="output file (.safetensors or .pt)")
    p.add_argument("--clip-model", metavar="ID_OR_PATH", help="CLIP model (default: the family's CLIP)")
    p.add_argument("--family", choices=[f.value for f in (*one_tower, Family.SDXL)], default="sd1",
                   help="model family the style is for: " + ", ".join(f"{f.value} = {f.clip_models[0]}"
                                                                      for f in one_tower)
                   + f", sdxl = both {Family.SDXL.clip_models[0]} and {BIGG} (two image towers; bigG's is 1.8 B "
                   "parameters, about 3.7 GB in fp16) (default sd1)")
    p.add_argument("--clip-model-g", metavar="ID_OR_PATH", help=f"--family sdxl: the bigG CLIP (default: {BIGG})")
    p.add_argument("--batch-size", type=int, default=16, metavar="N", help="images per batch (default 16)")
    p.add_argument("--recursive", action="store_true", help="also read images in sub-folders")
    p.add_argument("--mean", choices=list(MEANS), default="normalized",
                   help="; ".join(f"{k}: {v}" for k, v in MEANS.items()) + ". Same direction, so the same images "
                   "(default normalized)")
    p.add_argument("--format", choices=["safetensors", "pt"],
                   help="safetensors with metadata, or pt: a bare (1, D) tensor for the reference repo and the A1111 "
                   "extension (default: from the output suffix)")
    p.add_argument("--name", help="style name stored in the file (default: output file name)")
    add_device(p, dtype=True, dtype_note="The CLIP image tower's; the style is summed in fp32 or better and saved "
               "in fp32")
    p.set_defaults(func=cmd_embed, parser=p)


def _mix_arguments(p) -> None:
    p.add_argument("styles", nargs="+", metavar="STYLE[:WEIGHT]", help="style files with optional weights")
    p.add_argument("-o", "--output", required=True, metavar="STYLE", help="output file")
    p.add_argument("--slerp", action="store_true", help="spherical interpolation (exactly two styles)")
    p.add_argument("--format", choices=["safetensors", "pt"], help="output format (default: from the suffix)")
    p.set_defaults(func=cmd_mix)


def _info_arguments(p) -> None:
    p.add_argument("files", nargs="+", metavar="FILE")
    p.add_argument("--json", action="store_true", help="machine-readable output")
    p.set_defaults(func=cmd_info)


def _score_arguments(p) -> None:
    from stylegrad.evaluation.predictors import DEFAULT as DEFAULT_PREDICTOR
    from stylegrad.evaluation.predictors import KNOWN as PREDICTORS

    p.add_argument("files", nargs="+", metavar="FILE", help="images and/or style files")
    p.add_argument("--predictor", default=DEFAULT_PREDICTOR, metavar="NAME_OR_PATH",
                   help=f"{', '.join(PREDICTORS)} or a .pth path (default {DEFAULT_PREDICTOR}, the LAION aesthetic "
                   "score)")
    p.add_argument("--clip-model", metavar="ID_OR_PATH", help="CLIP for images (default: the predictor's)")
    add_device(p, "cpu", dtype=True, dtype_note="The CLIP image tower's and the predictor's; scores are fp32")
    p.add_argument("--json", action="store_true", help='print [{"file", "kind", "score"}, ...]')
    p.set_defaults(func=cmd_score)
