"""The ``stylegrad`` command: a thin layer over the library. Results go to stdout, progress and warnings to
stderr; a user error is one ``Error: ...`` line and exit code 1 (STYLEGRAD_DEBUG=1 shows the traceback)."""

from __future__ import annotations

import argparse
import json
import os
import sys
import warnings
from pathlib import Path

from stylegrad import __version__
from stylegrad.errors import StylegradError
from stylegrad.aesthetic.options import StyleOptions

H = StyleOptions.help


def _add_stylecodes_model_options(g) -> None:
    g.add_argument("--stylecodes-model", metavar="ID_OR_PATH",
                   help="Stylecodes checkpoint: hub id, folder, .bin or .safetensors (default: CiaraRowles/stylecodes, "
                   "stylecodes_sd15_v1.bin)")
    g.add_argument("--siglip-model", default="google/siglip-base-patch16-224", metavar="ID_OR_PATH",
                   help="image encoder the codes are made with (default: %(default)s)")


def _add_style_options(p: argparse.ArgumentParser) -> None:
    g = p.add_argument_group("style (aesthetic gradients)")
    g.add_argument("--style", metavar="FILE", help="aesthetic embedding (.safetensors or .pt); omit for no style")
    g.add_argument("--style-steps", type=int, default=10, metavar="N", help=H("steps") + " (default 10)")
    g.add_argument("--style-lr", type=float, default=1e-4, metavar="LR", help=H("lr") + " (default 1e-4)")
    g.add_argument("--style-weight", type=float, default=1.0, metavar="W", help=H("weight") + " (default 1)")
    g.add_argument("--style-slerp", action="store_true", help=H("slerp"))
    g.add_argument("--style-text", metavar="TEXT", help=H("text"))
    g.add_argument("--style-text-angle", type=float, default=0.1, metavar="A", help=H("text_angle") + " (0.1)")
    g.add_argument("--style-text-negative", action="store_true", help=H("text_negative"))
    g.add_argument("--style-regularization", type=float, default=0.0, metavar="L", help=H("regularization"))
    g.add_argument("--style-target-similarity", type=float, metavar="C", help=H("target_similarity"))
    g.add_argument("--style-negative", action="store_true", help=H("personalize_negative"))


def _style_options(a: argparse.Namespace) -> StyleOptions:
    return StyleOptions(
        steps=a.style_steps, lr=a.style_lr, weight=a.style_weight, slerp=a.style_slerp, text=a.style_text,
        text_angle=a.style_text_angle, text_negative=a.style_text_negative, regularization=a.style_regularization,
        target_similarity=a.style_target_similarity, personalize_negative=a.style_negative,
    )


def _output_format(requested: str | None, out: Path) -> str:
    """--format wins; otherwise the output suffix decides (.pt/.pth/.bin -> pt)."""
    return requested or ("pt" if out.suffix.lower() in (".pt", ".pth", ".bin") else "safetensors")


def cmd_embed(a: argparse.Namespace) -> None:
    from stylegrad.aesthetic.embedding import embed_images
    from stylegrad.files.styles import save_style
    from stylegrad.aesthetic.tower import FAMILIES

    clip = a.clip_model or FAMILIES[a.family].clip_model
    out = Path(a.output)
    fmt = _output_format(a.format, out)
    style = embed_images(a.inputs, clip, batch_size=a.batch_size, recursive=a.recursive, mean=a.mean,
                         device=a.device, name=a.name or out.stem)
    save_style(style, out, fmt)
    print(f"{out}: style from {style.metadata['num_images']} images, width {style.width}, {clip}")


def _parse_weighted(spec: str) -> tuple[str, float]:
    path, sep, weight = spec.rpartition(":")
    if sep and path and not Path(spec).exists():
        try:
            return path, float(weight)
        except ValueError:
            pass
    return spec, 1.0


def cmd_mix(a: argparse.Namespace) -> None:
    from stylegrad.files.styles import load_style, mix_styles, save_style

    parts = [(load_style(path), w) for path, w in map(_parse_weighted, a.styles)]
    out = Path(a.output)
    fmt = _output_format(a.format, out)
    style = mix_styles(parts, use_slerp=a.slerp, name=out.stem)
    save_style(style, out, fmt)
    print(f"{out}: {style.metadata['method']}")


def cmd_info(a: argparse.Namespace) -> None:
    from stylegrad.files.styles import describe_width, inspect_file

    infos = [inspect_file(f) for f in a.files]
    if a.json:
        print(json.dumps([i.as_dict() for i in infos], indent=2))
        return
    for info in infos:
        print(f"{info.path}")
        print(f"  kind:   {info.kind}{'' if info.usable else ' (not usable as a style)'}")
        print(f"  what:   {info.detail}")
        if info.shape is not None:
            print(f"  tensor: shape {tuple(info.shape)}, {info.dtype}")
        if info.width is not None:
            print(f"  width:  {describe_width(info.width)}")
        if info.norm is not None:
            print(f"  norm:   {info.norm:.4g}")
        for k, v in sorted(info.metadata.items()):
            print(f"  {k}: {v}")


def _check_generation(a: argparse.Namespace) -> None:
    """Checks shared by the commands that run a pipeline, before any model is loaded."""
    if a.steps < 1:
        raise StylegradError("--steps must be >= 1")
    for name in ("width", "height"):
        v = getattr(a, name)
        if v is not None and (v < 8 or v % 8):
            raise StylegradError(f"--{name} must be a positive multiple of 8, got {v}")


def cmd_generate(a: argparse.Namespace) -> None:
    from stylegrad.aesthetic.encoder import AestheticEncoder
    from stylegrad.pipelines.generation import Settings, compare, generate, load_init_image, load_pipeline
    from stylegrad.files.styles import load_style

    options = _style_options(a)
    style = load_style(a.style) if a.style else None
    if a.compare and style is None:
        raise StylegradError("--compare needs --style")
    _check_generation(a)
    if a.n < 1:
        raise StylegradError("--n must be >= 1")
    if not 0.0 < a.strength <= 1.0:
        raise StylegradError(f"--strength must be in (0, 1], got {a.strength}")
    if a.stylecode_strength < 0:
        raise StylegradError(f"--stylecode-strength must be >= 0, got {a.stylecode_strength}")
    if a.stylecode and a.style_image:
        raise StylegradError("give --stylecode or --style-image, not both")
    if a.stylecode:
        from stylegrad.stylecodes.codec import parse_weighted

        parse_weighted(a.stylecode)  # a bad code fails before any model loads
    style_image = load_init_image(a.style_image, None, None) if a.style_image else None
    init = load_init_image(a.init_image, a.width, a.height)
    pipe = load_pipeline(a.model, a.device, a.sampler)
    pipe.set_progress_bar_config(desc="denoising", leave=False)
    encoder = AestheticEncoder.from_pipeline(pipe, a.clip_model)
    settings = Settings(a.prompt, a.negative, a.steps, a.cfg, a.width, a.height, a.seed, a.strength)
    extra = {}
    if a.stylecode or style_image is not None:
        pipe, extra = _with_stylecode(pipe, a, style_image)
    out = Path(a.out)
    if a.compare:
        sweep = [int(x) for x in a.compare_steps.split(",") if x.strip()]
        path = compare(pipe, encoder, settings, style, options, sweep, out, a.n, init, a.clip_skip, extra)
        print(path)
        return
    for path in generate(pipe, encoder, settings, style, options, out, a.n, a.model, init, a.clip_skip, extra):
        print(path)


def _with_stylecode(pipe, a: argparse.Namespace, style_image):
    """The pipeline with the Stylecodes control stream, and the PNG fields that record the code."""
    from stylegrad.stylecodes.facade import Stylecodes

    sc = Stylecodes.load(pipe.unet, a.stylecodes_model, a.siglip_model if style_image is not None else None)
    codes = a.stylecode or sc.code_for(style_image)
    if style_image is not None:
        print(f"stylecode {codes} (from {a.style_image})", file=sys.stderr)
    styled = sc.pipeline(pipe, codes, a.stylecode_strength, a.stylecode_guidance)
    styled.set_progress_bar_config(desc="denoising", leave=False)
    fields = {"Stylecode": codes, "Stylecode strength": a.stylecode_strength}
    if a.stylecode_guidance:
        fields["Stylecode guidance"] = True
    return styled, fields


def cmd_score(a: argparse.Namespace) -> None:
    from stylegrad.aesthetic.embedding import IMAGE_SUFFIXES
    from stylegrad.evaluation.metrics import ClipEmbedder, aesthetic_score
    from stylegrad.evaluation.predictors import load_predictor
    from stylegrad.files.styles import load_style

    predictor = load_predictor(a.predictor)
    images = [f for f in a.files if Path(f).suffix.lower() in IMAGE_SUFFIXES]
    results = {}
    for f in a.files:
        if f not in images:  # a style is already a CLIP image embedding: score it directly
            style = load_style(f)
            predictor.check_width(style.width)
            results[f] = ("style", float(aesthetic_score(predictor, style.vector[None])[0]))
    if images:
        from PIL import Image

        embedder = ClipEmbedder(a.clip_model or predictor.clip_model or "openai/clip-vit-large-patch14",
                                a.device or "cpu")
        predictor.check_width(embedder.width)
        pics = []
        for f in images:
            try:
                with Image.open(f) as im:
                    pics.append(im.convert("RGB"))
            except (OSError, ValueError) as e:
                raise StylegradError(f"cannot read image {f}: {e}") from e
        for f, v in zip(images, aesthetic_score(predictor, embedder.images(pics))):
            results[f] = ("image", float(v))
    rows = [{"file": f, "kind": results[f][0], "score": results[f][1]} for f in a.files]
    if a.json:
        print(json.dumps(rows, indent=2))
    else:
        for r in rows:
            print(f"{r['score']:7.3f}  {r['kind']:5}  {r['file']}")


def cmd_evaluate(a: argparse.Namespace) -> None:
    from stylegrad.aesthetic.encoder import AestheticEncoder
    from stylegrad.evaluation.experiment import evaluate, read_prompts, seeds_from
    from stylegrad.pipelines.generation import Settings, load_pipeline
    from stylegrad.evaluation.metrics import ClipEmbedder
    from stylegrad.evaluation.predictors import load_predictor
    from stylegrad.files.styles import load_style

    _check_generation(a)
    prompts = read_prompts(a.prompts)
    styles = {}
    for path in a.style:
        style = load_style(path)
        name, i = style.name, 2
        while name in styles:
            name, i = f"{style.name}-{i}", i + 1
        styles[name] = style
    try:
        steps = [int(x) for x in a.style_steps.split(",") if x.strip()]
    except ValueError as e:
        raise StylegradError(f"--style-steps takes a comma-separated list of whole numbers, got {a.style_steps!r}") from e
    seeds = seeds_from(a.seed, a.seeds)
    predictor = load_predictor(a.predictor)
    pipe = load_pipeline(a.model, a.device, a.sampler)
    pipe.set_progress_bar_config(disable=True)
    encoder = AestheticEncoder.from_pipeline(pipe, a.clip_model)
    from stylegrad.aesthetic.tower import detect_family

    clip = a.clip_model or detect_family(pipe.text_encoder).clip_model
    embedder = ClipEmbedder(clip, pipe.device)
    settings = Settings("", a.negative, a.steps, a.cfg, a.width, a.height)
    options = StyleOptions(lr=a.style_lr)
    out = Path(a.out)
    summary = evaluate(pipe, encoder, embedder, predictor, prompts, styles, steps, seeds, settings, options, out)
    for name, by_steps in summary.items():
        for k, m in sorted(by_steps.items(), key=lambda kv: int(kv[0])):
            print(f"{name:20} steps {int(k):3}  aesthetic {m['aesthetic']['mean']:.3f}  "
                  f"clip {m['clip_score']['mean']:.2f}  style {m['style_similarity']['mean']:.3f}")
    print(out / "report.html")


def cmd_code_decode(a: argparse.Namespace) -> None:
    from stylegrad.stylecodes.codec import decode

    code = decode(a.code)
    if a.json:
        print(json.dumps({"format": code.format, "version": code.version, "levels": list(code.levels)}))
    else:
        print(f"format {code.format}, version {code.version}")
        print("levels", " ".join(map(str, code.levels)))


def cmd_code_encode(a: argparse.Namespace) -> None:
    from stylegrad.pipelines.generation import load_init_image
    from stylegrad.stylecodes.facade import Stylecodes

    image = load_init_image(a.image, None, None)
    sc = Stylecodes.load(None, a.stylecodes_model, a.siglip_model, device=a.device)
    print(sc.code_for(image, a.format))


def cmd_demo(a: argparse.Namespace) -> None:
    from stylegrad.world.demo import run_demo

    steps = [int(x) for x in a.style_steps.split(",") if x.strip()]
    if a.seeds < 1 or any(k < 0 for k in steps):
        raise StylegradError("--seeds must be >= 1 and --style-steps >= 0")
    run_demo(a.out, steps, a.seeds, log=print)


def cmd_train_stylecodes(a: argparse.Namespace) -> None:
    from stylegrad.stylecodes.training import TrainConfig, train

    cfg = TrainConfig(data=a.data, out=a.out, model=a.model, siglip=a.siglip_model, init=a.init, steps=a.steps,
                      batch_size=a.batch_size, lr=a.lr, resolution=a.resolution, grad_accum=a.grad_accum,
                      checkpoint_every=a.checkpoint_every, seed=a.seed,
                      gradient_checkpointing=a.gradient_checkpointing, mixed_precision=a.mixed_precision,
                      autoencoder_width=a.autoencoder_width, device=a.device)
    print(train(cfg, resume=not a.restart))


def cmd_code_random(a: argparse.Namespace) -> None:
    from stylegrad.stylecodes.codec import random_code

    print(random_code(a.seed, a.format))


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="stylegrad",
        description="Custom Stable Diffusion styles from a handful of images, without retraining "
        "(aesthetic gradients, Gallego 2022).",
        epilog="Example: stylegrad embed my_pictures/ -o mine.safetensors && "
        "stylegrad generate 'a lighthouse at dusk' --style mine.safetensors --compare",
    )
    parser.add_argument("--version", action="version", version=f"stylegrad {__version__}")
    sub = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")

    p = sub.add_parser("code", help="stylecodes: make, read or draw short style codes",
                       description="Stylecodes (Rowles 2024): a style as a 21-character code (stylegrad's format) "
                       "or the reference implementation's 27-character code; both decode.")
    code_sub = p.add_subparsers(dest="code_command", required=True, metavar="ACTION")
    q = code_sub.add_parser("decode", help="print a code's format, version and 20 levels")
    q.add_argument("code", metavar="CODE")
    q.add_argument("--json", action="store_true", help='print {"format", "version", "levels"}')
    q.set_defaults(func=cmd_code_decode)
    q = code_sub.add_parser("encode", help="make the code of an image's style",
                            description="SigLIP features of the image -> the Stylecodes encoder -> 20 levels -> "
                            "a code. Decoding and re-encoding a code gives the same code.")
    q.add_argument("image", metavar="IMAGE")
    q.add_argument("--format", choices=["stylegrad", "reference"], default="stylegrad",
                   help="stylegrad (21 characters with the model version, default) or reference (27)")
    _add_stylecodes_model_options(q)
    q.add_argument("--device", help="cpu, cuda, ... (default cpu)")
    q.set_defaults(func=cmd_code_encode)
    q = code_sub.add_parser("random", help="a random code")
    q.add_argument("--seed", type=int, help="make it reproducible")
    q.add_argument("--format", choices=["stylegrad", "reference"], default="stylegrad",
                   help="stylegrad (21 characters, default) or reference (27)")
    q.set_defaults(func=cmd_code_random)

    p = sub.add_parser("demo", help="see aesthetic gradients work, offline, in about a minute",
                       description="Runs the paper's experiment on the small world bundled with stylegrad (a CLIP "
                       "and a text-to-image model trained on procedural shapes): a style is embedded from bundled "
                       "striped images; the same prompts and seeds are generated without it and with it at each "
                       "step count. Writes grid.png and results.json (style similarity and shape/colour fidelity "
                       "per steps) and prints the table.")
    p.add_argument("--out", default="stylegrad-demo", metavar="DIR", help="output folder (default: %(default)s)")
    p.add_argument("--style-steps", default="0,2,5,10,20", metavar="LIST", help="steps to compare (default 0,2,5,10,20)")
    p.add_argument("--seeds", type=int, default=2, metavar="N", help="seeds per prompt, 8 prompts (default 2)")
    p.set_defaults(func=cmd_demo)

    p = sub.add_parser("train", help="train models (stylecodes)")
    train_sub = p.add_subparsers(dest="train_command", required=True, metavar="WHAT")
    q = train_sub.add_parser("stylecodes", help="train a Stylecodes model on (style image, prompt, target) triples",
                             description="The Stylecodes paper's recipe: SD and SigLIP frozen; the style encoder, "
                             "decoder and control module trained end to end with the diffusion loss. DATA holds "
                             "index.csv or index.jsonl with columns style_image, prompt, target_image. Checkpoints go "
                             "to OUT/checkpoint-N; rerunning the same command resumes exactly.")
    q.add_argument("data", metavar="DATA", help="folder with index.csv or index.jsonl and the images")
    q.add_argument("--out", required=True, metavar="DIR", help="checkpoints and the final stylecodes.safetensors")
    q.add_argument("--model", default="stable-diffusion-v1-5/stable-diffusion-v1-5", metavar="ID_OR_PATH",
                   help="the frozen SD1.x model (default: %(default)s)")
    q.add_argument("--siglip-model", default="google/siglip-base-patch16-224", metavar="ID_OR_PATH",
                   help="the frozen image encoder (default: %(default)s)")
    q.add_argument("--init", metavar="CKPT", help="start from this Stylecodes checkpoint (default: a fresh model)")
    q.add_argument("--steps", type=int, default=100_000, help="optimizer steps (default 100000, the paper)")
    q.add_argument("--batch-size", type=int, default=25, help="triples per step (default 25, the paper)")
    q.add_argument("--lr", type=float, default=1e-6, help="AdamW learning rate (default 1e-6, the paper)")
    q.add_argument("--resolution", type=int, default=512, help="target image size in pixels (default 512)")
    q.add_argument("--grad-accum", type=int, default=1, metavar="K",
                   help="split each batch into K micro-batches: same update, less memory (default 1)")
    q.add_argument("--gradient-checkpointing", action="store_true", help="recompute activations: less memory")
    q.add_argument("--mixed-precision", choices=["no", "fp16", "bf16"], default="no",
                   help="autocast on CUDA (default no; CPU always trains in fp32)")
    q.add_argument("--checkpoint-every", type=int, default=1000, metavar="N", help="steps between checkpoints")
    q.add_argument("--seed", type=int, default=0, help="seed of the data order, noise and initialisation")
    q.add_argument("--autoencoder-width", type=int, default=512, help="style encoder width (512 as published)")
    q.add_argument("--restart", action="store_true", help="ignore checkpoints in --out and start over")
    q.add_argument("--device", help="cpu, cuda, ... (default: cuda if available)")
    q.set_defaults(func=cmd_train_stylecodes)

    p = sub.add_parser("embed", help="make a style file from images",
                       description="Average the CLIP image embeddings of images into a style file.")
    p.add_argument("inputs", nargs="+", metavar="IMAGES_OR_DIRS", help="image files and/or folders of images")
    p.add_argument("-o", "--output", required=True, metavar="STYLE", help="output file (.safetensors or .pt)")
    p.add_argument("--clip-model", metavar="ID_OR_PATH", help="CLIP model (default: the family's CLIP)")
    p.add_argument("--family", choices=["sd1", "sd2"], default="sd1",
                   help="model family the style is for: sd1 = openai/clip-vit-large-patch14 (default), "
                   "sd2 = laion/CLIP-ViT-H-14-laion2B-s32B-b79K")
    p.add_argument("--batch-size", type=int, default=16, metavar="N", help="images per batch (default 16)")
    p.add_argument("--recursive", action="store_true", help="also read images in sub-folders")
    p.add_argument("--mean", choices=["normalized", "raw"], default="normalized",
                   help="normalized (default, the paper): unit-length mean; raw: plain mean as the reference "
                   "script and the A1111 extension write. Same direction, so the same images.")
    p.add_argument("--format", choices=["safetensors", "pt"],
                   help="safetensors with metadata (default), or pt: a bare (1, D) tensor for the reference repo "
                   "and the A1111 extension (default from the output suffix)")
    p.add_argument("--name", help="style name stored in the file (default: output file name)")
    p.add_argument("--device", help="cpu, cuda, ... (default: cuda if available)")
    p.set_defaults(func=cmd_embed)

    p = sub.add_parser("mix", help="mix styles into one", description="Normalised weighted mean of styles.")
    p.add_argument("styles", nargs="+", metavar="STYLE[:WEIGHT]", help="style files with optional weights")
    p.add_argument("-o", "--output", required=True, metavar="STYLE", help="output file")
    p.add_argument("--slerp", action="store_true", help="spherical interpolation (exactly two styles)")
    p.add_argument("--format", choices=["safetensors", "pt"], help="output format (default from suffix)")
    p.set_defaults(func=cmd_mix)

    p = sub.add_parser("info", help="say what a file is", description="Kind, width, dtype, norm and metadata "
                       "of style files, and what any other file is.")
    p.add_argument("files", nargs="+", metavar="FILE")
    p.add_argument("--json", action="store_true", help="machine-readable output")
    p.set_defaults(func=cmd_info)

    p = sub.add_parser("generate", help="generate images with a style",
                       description="Generate images with a diffusers Stable Diffusion pipeline, styled by an "
                       "aesthetic embedding (--style), a stylecode (--stylecode / --style-image), or both.")
    p.add_argument("prompt", metavar="PROMPT")
    _add_style_options(p)
    g = p.add_argument_group("stylecode (Stylecodes, SD1.x)")
    g.add_argument("--stylecode", metavar="CODE", help="a style code, or several with weights: 'CODE1::2 CODE2::1'")
    g.add_argument("--style-image", metavar="IMG", help="make the code from this image, then use it")
    g.add_argument("--stylecode-strength", type=float, default=1.0, metavar="S",
                   help="how strongly the code acts; 0 = the plain model (default 1)")
    g.add_argument("--stylecode-guidance", action="store_true",
                   help="give the style to the conditional half only, so guidance strengthens it (the reference "
                   "gives it to both halves)")
    _add_stylecodes_model_options(g)
    g = p.add_argument_group("generation")
    g.add_argument("--negative", default="", metavar="TEXT", help="negative prompt")
    g.add_argument("--model", default="stable-diffusion-v1-5/stable-diffusion-v1-5", metavar="ID_OR_PATH",
                   help="diffusers model: hub id or local folder (default: %(default)s)")
    g.add_argument("--clip-model", metavar="ID_OR_PATH",
                   help="CLIP model whose projection defines the style space (default: the family's)")
    g.add_argument("--seed", type=int, default=0, help="seed of the first image; image i uses seed+i (default 0)")
    g.add_argument("--steps", type=int, default=30, help="denoising steps (default 30)")
    g.add_argument("--cfg", type=float, default=7.5, help="classifier-free guidance scale (default 7.5)")
    g.add_argument("--width", type=int, help="image width (default: the model's)")
    g.add_argument("--height", type=int, help="image height (default: the model's)")
    g.add_argument("--n", type=int, default=1, help="number of images (default 1)")
    g.add_argument("--sampler", help="scheduler: ddim, pndm, euler, euler_a, dpmpp_2m, unipc, lms "
                   "(default: the model's)")
    g.add_argument("--clip-skip", type=int, help="use the hidden states this many layers before the last")
    g.add_argument("--init-image", metavar="IMG", help="start from this image (img2img)")
    g.add_argument("--strength", type=float, default=0.75, help="img2img strength (default 0.75)")
    g.add_argument("--device", help="cpu, cuda, ... (default: cuda if available); fp16 on CUDA, fp32 otherwise")
    g.add_argument("--out", default="outputs", metavar="DIR", help="output folder (default: outputs)")
    g.add_argument("--compare", action="store_true",
                   help="write one labelled grid: no style, then the style at each of --compare-steps")
    g.add_argument("--compare-steps", default="5,10,20", metavar="LIST", help="steps sweep (default 5,10,20)")
    p.set_defaults(func=cmd_generate)

    p = sub.add_parser("score", help="aesthetic score of images and style files",
                       description="Score images (through the CLIP image encoder) and style files (directly: a "
                       "style is already a CLIP image embedding) with a published aesthetic predictor.")
    p.add_argument("files", nargs="+", metavar="FILE", help="images and/or style files")
    p.add_argument("--predictor", default="laion-l14", metavar="NAME_OR_PATH",
                   help="laion-l14 (default, the LAION aesthetic score), sac-l14, sac-b16, sac-b32, or a .pth path")
    p.add_argument("--clip-model", metavar="ID_OR_PATH", help="CLIP for images (default: the predictor's)")
    p.add_argument("--device", help="cpu, cuda, ... (default cpu)")
    p.add_argument("--json", action="store_true", help='print [{"file", "kind", "score"}, ...]')
    p.set_defaults(func=cmd_score)

    p = sub.add_parser("evaluate", help="measure styles: the paper's experiment on your prompts",
                       description="Generate prompt x style x steps x seed, score every image (aesthetic score, "
                       "CLIP score, style similarity) and write results.csv, summary.json, plots, grids and "
                       "report.html into --out. Restarting with the same arguments resumes.")
    p.add_argument("--prompts", metavar="FILE", help="one prompt per line (default: stylegrad's shipped set)")
    p.add_argument("--style", action="append", required=True, metavar="FILE", help="style file; repeat for more")
    p.add_argument("--style-steps", default="0,5,10,20", metavar="LIST", help="steps to compare (default 0,5,10,20)")
    p.add_argument("--style-lr", type=float, default=1e-4, metavar="LR", help=H("lr") + " (default 1e-4)")
    p.add_argument("--seeds", type=int, default=2, metavar="N", help="seeds per prompt (default 2)")
    p.add_argument("--seed", type=int, default=0, help="first seed (default 0)")
    p.add_argument("--model", default="stable-diffusion-v1-5/stable-diffusion-v1-5", metavar="ID_OR_PATH",
                   help="diffusers model (default: %(default)s)")
    p.add_argument("--clip-model", metavar="ID_OR_PATH", help="CLIP for the style space and the scores "
                   "(default: the model family's)")
    p.add_argument("--predictor", default="laion-l14", metavar="NAME_OR_PATH", help="aesthetic predictor "
                   "(default laion-l14)")
    p.add_argument("--negative", default="", metavar="TEXT", help="negative prompt")
    p.add_argument("--steps", type=int, default=30, help="denoising steps (default 30)")
    p.add_argument("--cfg", type=float, default=7.5, help="guidance scale (default 7.5)")
    p.add_argument("--width", type=int, help="image width (default: the model's)")
    p.add_argument("--height", type=int, help="image height (default: the model's)")
    p.add_argument("--sampler", help="scheduler (see generate --help)")
    p.add_argument("--device", help="cpu, cuda, ... (default: cuda if available)")
    p.add_argument("--out", required=True, metavar="DIR", help="output folder (reused to resume)")
    p.set_defaults(func=cmd_evaluate)
    return parser


def _show_warning(message, category, filename, lineno, file=None, line=None):
    print(f"Warning: {message}", file=sys.stderr)


def main(argv: list[str] | None = None) -> int:
    """Entry point of the console script; returns the exit code."""
    args = build_parser().parse_args(argv)
    debug = os.environ.get("STYLEGRAD_DEBUG", "") not in ("", "0")
    if not debug:
        warnings.showwarning = _show_warning
        warnings.filterwarnings("ignore", category=FutureWarning)
        from transformers.utils import logging as tlog

        tlog.set_verbosity_error()
        from diffusers.utils import logging as dlog

        dlog.set_verbosity_error()  # e.g. the advice to install accelerate, on every model load
    try:
        args.func(args)
    except StylegradError as e:
        if debug:
            raise
        print(f"Error: {e}", file=sys.stderr)
        return 1
    except KeyboardInterrupt:
        print("Interrupted.", file=sys.stderr)
        return 130
    return 0


if __name__ == "__main__":
    sys.exit(main())
