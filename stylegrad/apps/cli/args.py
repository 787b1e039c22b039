"""Argument types and option groups every command shares: one list type, one device option, the style options
generated from ``StyleOptions``' fields (flags, defaults and help come from the library)."""

from __future__ import annotations

import argparse
import os
import sys
from collections.abc import Callable
from dataclasses import MISSING, fields

from stylegrad.aesthetic.options import StyleOptions
from stylegrad.errors import StylegradError


class Parser(argparse.ArgumentParser):
    """argparse with a usage error as one line (exit 2) instead of the usage block, and arguments added when they are
    needed: a command's ``arguments`` function runs the first time that command parses or shows its help, so
    ``stylegrad --help`` lists every command without importing the modules its flags' defaults come from."""

    def __init__(self, *args, arguments: Callable[[Parser], None] | None = None, **kwargs):
        super().__init__(*args, **kwargs)
        self._pending = arguments

    def complete(self) -> Parser:
        """This parser with all its arguments (run once, before it parses or prints)."""
        if self._pending is not None:
            pending, self._pending = self._pending, None
            pending(self)
        return self

    def parse_known_args(self, args=None, namespace=None):
        return super(Parser, self.complete()).parse_known_args(args, namespace)

    def format_usage(self) -> str:
        return super(Parser, self.complete()).format_usage()

    def format_help(self) -> str:
        return super(Parser, self.complete()).format_help()

    def error(self, message: str):
        print(f"Error: {message} (see '{self.prog} --help')", file=sys.stderr)
        raise SystemExit(2)


def number_list(kind=int, minimum: float | None = None, length: int | None = None):
    """An argparse type for 'A,B,C' (commas or spaces)."""
    def parse(text: str):
        try:
            values = [kind(x) for x in text.replace(",", " ").split()]
        except ValueError:
            raise argparse.ArgumentTypeError(  # noqa: B904 - argparse shows this message, the cause adds nothing
                f"'{text}' is not a comma-separated list of {'whole numbers' if kind is int else 'numbers'}")
        if not values:
            raise argparse.ArgumentTypeError("the list is empty")
        if minimum is not None and any(v < minimum for v in values):
            raise argparse.ArgumentTypeError(f"'{text}': every value must be >= {minimum}")
        if length is not None and len(values) != length:
            raise argparse.ArgumentTypeError(f"'{text}': give exactly {length} values")
        return values
    parse.__name__ = "list"
    return parse


def add_device(p, default_help: str = "auto: cuda if available, else mps, else cpu", dtype: bool = False,
               dtype_note: str = "Style tuning always runs in fp32") -> None:
    """``--device`` and, for commands that load a model (``dtype``), ``--dtype``: stylegrad.devices' policy, checked
    before anything loads. ``dtype_note`` ends the ``--dtype`` help: whose precision it is, what stays float32."""
    p.add_argument("--device", metavar="DEVICE", help=f"cpu, cuda, cuda:1, mps or auto (default: {default_help})")
    if dtype:
        p.add_argument("--dtype", choices=["auto", "fp32", "fp16", "bf16"], default=None,
                       help="the model's precision (default auto: fp16 on cuda and mps, fp32 on cpu; fp32 is "
                       f"A1111's --no-half). {dtype_note}")


MODEL_HELP = ("a hub id, a diffusers folder, a .safetensors/.ckpt checkpoint (SD1.x, SD2.x, SDXL), or a "
              "checkpoint's name in --models-dir")


def add_model_options(g, default: str | None = None) -> None:
    """``--model``, ``--models-dir`` and ``--vae``: what every command that loads a model takes."""
    shown = f" (default: {default})" if default else ""
    g.add_argument("--model", default=None, metavar="MODEL", help=MODEL_HELP + shown)
    g.add_argument("--models-dir", metavar="DIR", help="folder of checkpoints that --model NAME picks from by file "
                   "name, like A1111's models/Stable-diffusion (default: $STYLEGRAD_MODELS_DIR)")
    g.add_argument("--vae", metavar="FILE", help="VAE for a single-file checkpoint, instead of the one baked in "
                   "(default: NAME.vae.safetensors beside the checkpoint, else the baked one)")


def add_lora_options(g, what: str, tags: str = "") -> None:
    """``--lora FILE:W`` (repeatable) and ``--loras DIR``."""
    g.add_argument("--lora", action="append", default=[], metavar="FILE:W",
                   help=f"{what} at multiplier W (default 1); FILE:TE:UNET sets the text-encoder and UNet "
                   f"multipliers apart; repeat for several{tags}")
    g.add_argument("--loras", action="append", default=[], metavar="DIR",
                   help="folder of LoRAs that --lora NAME (and the prompt's <lora:NAME:W> tags) pick from by file "
                   "name, like A1111's models/Lora (default: $STYLEGRAD_LORAS_DIR)")


def add_addon_options(p) -> None:
    """LoRAs and textual-inversion embeddings, as A1111 users have them."""
    g = p.add_argument_group("LoRAs and embeddings")
    add_lora_options(g, "apply a LoRA/LyCORIS file (or a name in --loras)", ". The prompt's <lora:NAME:W> tags work too")
    g.add_argument("--embedding", action="append", default=[], metavar="FILE[:TOKEN]",
                   help="a textual-inversion embedding, active where the prompt writes its file name (or TOKEN)")
    g.add_argument("--embeddings", action="append", default=[], metavar="DIR",
                   help="folder of textual-inversion embeddings, like A1111's embeddings/: a file name written "
                   "in the prompt or negative prompt activates that file (default: $STYLEGRAD_EMBEDDINGS_DIR)")
    g.add_argument("--no-weighting", dest="weighting", action="store_false",
                   help="read the prompt as plain text: no A1111 emphasis ((word:1.2), [word]) or BREAK")


def _flag(name: str) -> str:
    return "--style-" + name.replace("_", "-")


def _tuning_memory(text: str) -> str:
    from stylegrad.aesthetic.memory import parse_setting

    try:
        parse_setting(text)
    except StylegradError as e:
        raise argparse.ArgumentTypeError(str(e)) from None
    return text


def add_style_options(p, exclude: tuple[str, ...] = (), style_file: bool = True) -> argparse._ArgumentGroup:
    """``--style FILE`` and ``--style-<field>`` for every field of StyleOptions (aesthetic gradients' prefix)."""
    g = p.add_argument_group("style (aesthetic gradients)")
    if style_file:
        g.add_argument("--style", metavar="FILE", help="aesthetic embedding (.safetensors or .pt); omit for no style")
    for f in fields(StyleOptions):
        if f.name in exclude:
            continue
        default = f.default if f.default is not MISSING else f.default_factory()
        help_text = f.metadata["help"]
        if isinstance(default, bool):
            g.add_argument(_flag(f.name), dest=f"style_{f.name}", action="store_true", help=help_text)
            continue
        if isinstance(default, tuple):
            kind = number_list(float, length=len(default))
            shown = ",".join(map(str, default))
        else:
            kind = type(default) if default is not None else (str if f.name == "text" else float)
            shown = default
        g.add_argument(_flag(f.name), dest=f"style_{f.name}", type=kind, default=default,
                       metavar=f.name.split("_")[-1].upper(),
                       help=help_text + ("" if default is None else f" (default: {shown})"))
    g.add_argument("--tuning-memory", type=_tuning_memory, default=None, metavar="auto|fast|low|SIZE",
                   help="Adam's moments while a prompt tunes: fast keeps them (10 bytes a weight with AVX-512, 12 "
                   "elsewhere: 6.3 or 7.5 GB for SDXL's bigG), low rebuilds them each step (4 bytes a weight, the "
                   "same result, slower), a size such as "
                   "6GB keeps as many as fit in it; auto: a size of 3/4 of the free memory (default: "
                   "$STYLEGRAD_TUNING_MEMORY, else auto)")
    return g


def style_options(a: argparse.Namespace, **overrides) -> StyleOptions:
    if getattr(a, "tuning_memory", None):  # read where tuning starts, in this process and in Ray workers
        os.environ["STYLEGRAD_TUNING_MEMORY"] = a.tuning_memory
    values = {f.name: getattr(a, f"style_{f.name}") for f in fields(StyleOptions) if hasattr(a, f"style_{f.name}")}
    values.update(overrides)
    if "betas" in values:
        values["betas"] = tuple(values["betas"])
    return StyleOptions(**values)
