"""The ``stylegrad`` command: a thin layer over the library, one module per command group. Results go to stdout,
progress and notes to stderr; a user error is one ``Error: ...`` line (exit 1, usage errors 2), and
``STYLEGRAD_DEBUG=1`` shows the traceback."""

from __future__ import annotations

import importlib
import os
import sys
import warnings

from stylegrad import __version__
from stylegrad.apps.cli import batch, checkpoints, codes, demo, evaluate, generate, serve, styles, train
from stylegrad.apps.cli.args import Parser
from stylegrad.apps.cli.errors import error_line

COMMAND_GROUPS = (styles, generate, batch, evaluate, checkpoints, codes, serve, train, demo)


def build_parser() -> Parser:
    parser = Parser(
        prog="stylegrad",
        description="Custom Stable Diffusion styles from a handful of images, without retraining "
        "(aesthetic gradients, Gallego 2022; Stylecodes, Rowles 2024).",
        epilog="Example: stylegrad embed my_pictures/ -o mine.safetensors && "
        "stylegrad generate 'a lighthouse at dusk' --style mine.safetensors --compare",
    )
    parser.add_argument("--version", action="version", version=f"stylegrad {__version__}")
    sub = parser.add_subparsers(dest="command", required=True, metavar="COMMAND", parser_class=Parser)
    for group in COMMAND_GROUPS:
        group.register(sub)
    return parser


def _quiet_libraries() -> None:
    """Only errors from transformers and diffusers (e.g. not the advice to install accelerate on every model load).
    Neither is imported for this: a command that never loads a model (``info``, ``models``) never pays for them."""
    warnings.filterwarnings("ignore", category=FutureWarning)
    warnings.showwarning = lambda message, *a, **k: print(f"Warning: {message}", file=sys.stderr)
    for library, variable in (("transformers", "TRANSFORMERS_VERBOSITY"), ("diffusers", "DIFFUSERS_VERBOSITY")):
        os.environ[variable] = "error"  # read when the library configures its logging, on first use
        if library in sys.modules:  # already imported (the CLI called in-process): set it directly
            importlib.import_module(f"{library}.utils.logging").set_verbosity_error()


def main(argv: list[str] | None = None) -> int:
    """Entry point of the console script; returns the exit code."""
    from stylegrad import notes

    debug = os.environ.get("STYLEGRAD_DEBUG", "") not in ("", "0")
    notes.set_handler(lambda message: print(f"Note: {message}", file=sys.stderr))
    try:
        args = build_parser().parse_args(argv)
        if not debug:
            _quiet_libraries()
        return args.func(args) or 0
    except SystemExit as e:  # argparse's --help, --version and usage errors
        return e.code if isinstance(e.code, int) else 0
    except KeyboardInterrupt:
        print("Interrupted.", file=sys.stderr)
        return 130
    except BaseException as e:  # noqa: BLE001 - every error becomes one line; STYLEGRAD_DEBUG shows the rest
        if debug:
            raise
        print(f"Error: {error_line(e)}", file=sys.stderr)
        return 1
    finally:
        notes.set_handler(None)


if __name__ == "__main__":
    sys.exit(main())
