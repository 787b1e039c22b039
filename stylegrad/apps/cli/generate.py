"""``generate``: images from a prompt, styled by an aesthetic embedding, a stylecode, or both; or again from a
stylegrad PNG (``--from``)."""

from __future__ import annotations

import sys
from pathlib import Path
from typing import TYPE_CHECKING

from stylegrad.apps.cli.args import (
    add_addon_options,
    add_device,
    add_model_options,
    add_style_options,
    number_list,
    style_options,
)

if TYPE_CHECKING:  # the modules that load models are imported by the command, not by `stylegrad --help`
    from stylegrad.pipelines.request import GenerationRequest


def _request(a) -> GenerationRequest:
    """The request of the command line, through the schema's one build (no limits but the schema's; --seed -1 is
    a random seed, as in A1111); a bad value is a RequestError that the error line names by its flag."""
    from stylegrad.pipelines.generation import request_from_png
    from stylegrad.pipelines.loading import DEFAULT_MODEL
    from stylegrad.pipelines.request import build, check

    if a.from_png:
        request = request_from_png(a.from_png, a.embeddings, a.loras, model=a.model, style=a.style,
                                   init_image=a.init_image, clip_model=a.clip_model,
                                   stylecodes_model=a.stylecodes_model, ipadapter_dirs=a.ip_adapters or None,
                                   hypernetworks_dirs=a.hypernetworks or None)
        return check(request, n=a.n)
    return build(dict(
        prompt=a.prompt, negative=a.negative, seed=a.seed, steps=a.steps, cfg=a.cfg, width=a.width, height=a.height,
        sampler=a.sampler, clip_skip=a.clip_skip, model=a.model or DEFAULT_MODEL, init_image=a.init_image,
        strength=a.strength, style=a.style, style_options=style_options(a), clip_model=a.clip_model,
        stylecode=a.stylecode, stylecode_image=a.stylecode_image, stylecode_strength=a.stylecode_strength,
        stylecode_guidance=a.stylecode_guidance, stylecodes_model=a.stylecodes_model,
        loras=tuple(a.lora), embeddings=tuple(a.embedding), weighting=a.weighting, **_ip_adapter_values(a),
        **_hypernetwork_values(a),
    ), n=a.n, random_seed_allowed=True)


def _hypernetwork_values(a) -> dict:
    """--hypernetwork NAME[:MULT] as files (a name resolved in --hypernetworks or $STYLEGRAD_HYPERNETWORKS_DIR)."""
    from stylegrad.addons.hypernetworks.library import HypernetworkLibrary

    specs = HypernetworkLibrary(a.hypernetworks or None).specs(a.hypernetwork)
    return dict(hypernetworks=tuple(f"{path}:{mult:g}" for path, mult in specs),
                hypernetwork_reading=a.hypernetwork_reading)


def _ip_adapter_values(a) -> dict:
    """The IP-Adapter flags as request fields; a name is resolved in --ip-adapters (or $STYLEGRAD_IPADAPTER_DIR)."""
    if a.ip_adapter is None:
        values = dict(ip_images=tuple(a.ip_image), ip_style=a.ip_style, ip_blocks=a.ip_blocks,
                      ip_image_encoder=a.ip_image_encoder)
        return {k: v for k, v in values.items() if v}  # given without --ip-adapter: the request refuses them
    from stylegrad.addons.ipadapter.library import AdapterLibrary

    return dict(ip_adapter=str(AdapterLibrary(a.ip_adapters or None).resolve(a.ip_adapter)),
                ip_images=tuple(a.ip_image), ip_scale=a.ip_scale, ip_style=a.ip_style, ip_blocks=a.ip_blocks,
                ip_image_encoder=a.ip_image_encoder)


def _check_addon_files(request: GenerationRequest, a) -> None:
    """A --lora or --embedding that is missing or not what it should be fails before any model loads."""
    from stylegrad.addons.embeddings import load_embedding, parse_embedding_arg
    from stylegrad.addons.lora.formats import read_lora
    from stylegrad.addons.lora.library import LoraLibrary

    for path, _, _ in LoraLibrary(a.loras).specs(request.loras):
        read_lora(path)
    for arg in request.embeddings:
        load_embedding(*parse_embedding_arg(arg))
    if request.hypernetworks:
        from stylegrad.addons.hypernetworks.formats import read_hypernetwork
        from stylegrad.addons.hypernetworks.library import parse_hypernetwork_arg

        for spec in request.hypernetworks:
            read_hypernetwork(parse_hypernetwork_arg(spec)[0], request.hypernetwork_reading)
    if request.ip_adapter is not None:  # not an adapter, or a FaceID one: one line before the model loads
        from stylegrad.addons.ipadapter.files import read_adapter

        read_adapter(request.ip_adapter)


def _device_and_dtype(a):
    """--device and --dtype, checked before any model loads; with --from, what the image was made with unless
    given (a device this machine lacks is one note, then auto)."""
    from stylegrad.devices import resolve_device, resolve_dtype
    from stylegrad.errors import StylegradError
    from stylegrad.notes import note

    device, dtype = a.device, a.dtype
    if a.from_png:
        from stylegrad.pipelines.replay import recorded_precision

        made_on, made_in = recorded_precision(a.from_png)
        if device is None and made_on:
            try:
                device = str(resolve_device(made_on))
            except StylegradError:
                note(f"{Path(a.from_png).name} was made on {made_on}, which this machine lacks: the pixels will "
                     "differ slightly (--device picks another)")
        dtype = dtype or made_in
    device = resolve_device(device)
    return device, resolve_dtype(dtype, device)


def cmd_generate(a) -> None:
    from stylegrad.files.styles import load_style
    from stylegrad.pipelines.generation import Generator

    if (a.prompt is None) == (a.from_png is None):
        a.parser.error("give a PROMPT, or --from IMAGE.png to regenerate an image")
    if a.compare and a.style is None:
        a.parser.error("--compare needs --style")
    request = _request(a)
    if request.style:
        load_style(request.style)  # a bad style file fails before any model loads
    _check_addon_files(request, a)
    if a.models_dir:
        from stylegrad.checkpoints.library import models_dir

        models_dir(a.models_dir)
    device, dtype = _device_and_dtype(a)
    generator = Generator.load(request.model, device, request.clip_model, a.siglip_model, vae=a.vae,
                               models_dir=a.models_dir, embeddings_dirs=a.embeddings, loras_dirs=a.loras, dtype=dtype,
                               hypernetworks_dirs=a.hypernetworks or None)
    if a.compare:
        print(generator.compare(request, a.compare_steps, a.out, a.n))
        return
    for path in generator.generate(request, a.out, a.n):
        print(path)
    if request.stylecode_image:
        print(f"stylecode made from {request.stylecode_image} is in the PNG metadata (stylegrad info)", file=sys.stderr)


def register(sub) -> None:
    sub.add_parser("generate", help="generate images with a style", arguments=_arguments,
                   description="Generate images with a diffusers Stable Diffusion pipeline, styled by an "
                   "aesthetic embedding (--style), a stylecode (--stylecode / --stylecode-image), or both. Every "
                   "PNG records all its settings; --from IMAGE.png makes the same image again.")


def _hypernetwork_arguments(p) -> None:
    g = p.add_argument_group("hypernetworks (A1111's)")
    g.add_argument("--hypernetwork", action="append", default=[], metavar="FILE[:MULT]",
                   help="apply an A1111 hypernetwork file (or a name in --hypernetworks) at multiplier MULT (default "
                   "1); repeat for several, chained in order before the prompt's <hypernet:NAME:MULT> tags")
    g.add_argument("--hypernetworks", action="append", default=[], metavar="DIR",
                   help="folder of hypernetworks that --hypernetwork NAME and the prompt's <hypernet:NAME:MULT> tags "
                   "pick from by file name, like A1111's models/hypernetworks (default: $STYLEGRAD_HYPERNETWORKS_DIR)")
    g.add_argument("--hypernetwork-reading", choices=["a1111", "comfyui"], default="a1111",
                   help="a file that does not say whether its activation follows the last layer (early A1111 "
                   "files): a1111 reads it as yes (default), comfyui as no")


def _arguments(p) -> None:
    from stylegrad.pipelines.loading import DEFAULT_MODEL, SAMPLERS
    from stylegrad.stylecodes.model import PUBLISHED_FILE, PUBLISHED_REPO, SIGLIP

    p.add_argument("prompt", nargs="?", metavar="PROMPT")
    p.add_argument("--from", dest="from_png", metavar="IMAGE.png",
                   help="make a stylegrad PNG again from its metadata, the same pixels (--model, --vae, --style, "
                   "--init-image, --clip-model, --stylecodes-model, --out, --device, --dtype override; other settings "
                   "come from the image). An A1111 PNG gives its prompt and settings, its LoRAs and embeddings by name from "
                   "--loras/--embeddings; what cannot be reproduced is listed")
    add_style_options(p)
    add_addon_options(p)
    _hypernetwork_arguments(p)
    _ip_adapter_arguments(p)
    g = p.add_argument_group("stylecode (Stylecodes, SD1.x)")
    g.add_argument("--stylecode", metavar="CODE", help="a style code, or several with weights: 'CODE1::2 CODE2::1'")
    g.add_argument("--stylecode-image", metavar="IMG", help="make the code from this image, then use it")
    g.add_argument("--stylecode-strength", type=float, default=1.0, metavar="S",
                   help="how strongly the code acts; 0 = the plain model (default 1)")
    g.add_argument("--stylecode-guidance", action="store_true",
                   help="give the style to the conditional half only, so guidance strengthens it (the reference "
                   "gives it to both halves)")
    g.add_argument("--stylecodes-model", metavar="ID_OR_PATH",
                   help=f"Stylecodes checkpoint: hub id, folder, .bin or .safetensors (default: {PUBLISHED_REPO}, "
                   f"{PUBLISHED_FILE})")
    g.add_argument("--siglip-model", metavar="ID_OR_PATH",
                   help=f"image encoder codes are made with (default: {SIGLIP})")
    g = p.add_argument_group("generation")
    g.add_argument("--negative", default="", metavar="TEXT", help="negative prompt")
    add_model_options(g, DEFAULT_MODEL)
    g.add_argument("--clip-model", metavar="ID_OR_PATH",
                   help="CLIP model whose projection defines the style space (default: the family's)")
    g.add_argument("--seed", type=int, default=0, help="seed of the first image, 0..4294967295 or -1 for a random "
                   "one; image i uses seed+i (default 0)")
    g.add_argument("--steps", type=int, default=30, help="denoising steps (default 30)")
    g.add_argument("--cfg", type=float, default=7.5, help="classifier-free guidance scale (default 7.5)")
    g.add_argument("--width", type=int, help="image width (default: the model's)")
    g.add_argument("--height", type=int, help="image height (default: the model's)")
    g.add_argument("--n", type=int, default=1, help="number of images (default 1)")
    g.add_argument("--sampler", metavar="NAME", help="scheduler, by short or A1111 name: " + ", ".join(
        f"{s} ({a1111})" for s, (_, a1111, _) in SAMPLERS.items()) + " (default: the model's)")
    g.add_argument("--clip-skip", type=int, metavar="K", help="use the text encoder's states K layers before the "
                   "last (diffusers' clip_skip; A1111's 'Clip skip' is K + 1)")
    g.add_argument("--init-image", metavar="IMG", help="start from this image (img2img)")
    g.add_argument("--strength", type=float, default=0.75, help="img2img strength (default 0.75)")
    add_device(g, dtype=True)
    g.add_argument("--out", default="outputs", metavar="DIR", help="output folder (default: outputs)")
    g.add_argument("--compare", action="store_true",
                   help="write one labelled grid: no style, then the style at each of --compare-steps")
    g.add_argument("--compare-steps", type=number_list(int, minimum=0), default=[5, 10, 20], metavar="LIST",
                   help="steps sweep (default 5,10,20)")
    p.set_defaults(func=cmd_generate, parser=p)


def _ip_adapter_arguments(p) -> None:
    g = p.add_argument_group("IP-Adapter (reference pictures; InstantStyle)")
    g.add_argument("--ip-adapter", metavar="FILE_OR_NAME",
                   help="an IP-Adapter file (.safetensors or .bin: base, light, plus, full; SD1.x or SDXL), or its "
                   "name in --ip-adapters")
    g.add_argument("--ip-image", action="extend", nargs="+", default=[], metavar="IMG",
                   help="reference picture(s); several are averaged. Without it, --style serves as the picture "
                   "where its CLIP space is the adapter's (an SDXL style's bigG part for ip-adapter_sdxl)")
    g.add_argument("--ip-scale", type=float, default=1.0, metavar="S",
                   help="how strongly the pictures act, 0..10 (default 1)")
    g.add_argument("--ip-style", action="store_true",
                   help="InstantStyle: the pictures act on the style blocks only (SDXL: up block 0's second "
                   "transformer; SD1.x: up block 1)")
    g.add_argument("--ip-blocks", metavar="SPEC",
                   help="more blocks (with --ip-style) or the only ones: 'layout' (SDXL: down block 2's second "
                   "transformer; SD1.x: down block 2 and mid), 'mid', 'up.block_0', 'up.block_0.1' or "
                   "'up.block_0:0,1,0', several separated by spaces")
    g.add_argument("--ip-image-encoder", metavar="PATH_OR_ID",
                   help="the CLIP vision encoder: a folder, a .safetensors (ComfyUI's clip_vision) or a hub id "
                   "(default: image_encoder or clip_vision beside the adapter, else h94/IP-Adapter's)")
    g.add_argument("--ip-adapters", action="append", default=[], metavar="DIR",
                   help="folder of IP-Adapter files that --ip-adapter NAME picks from, like ComfyUI's "
                   "models/ipadapter (default: $STYLEGRAD_IPADAPTER_DIR)")
