"""``code encode|decode|random``: Stylecodes as short text codes."""

from __future__ import annotations

import json

from stylegrad.apps.cli.args import add_device
from stylegrad.stylecodes.codec import decode, random_code

FORMATS = ["stylegrad", "reference"]


def cmd_decode(a) -> None:
    code = decode(a.code)
    if a.json:
        print(json.dumps({"format": code.format, "version": code.version, "levels": list(code.levels)}))
    else:
        print(f"format {code.format}, version {code.version}")
        print("levels", " ".join(map(str, code.levels)))


def cmd_encode(a) -> None:
    from stylegrad.stylecodes.facade import encode_image

    print(encode_image(a.image, a.stylecodes_model, a.siglip_model, a.format, a.device))


def cmd_random(a) -> None:
    print(random_code(a.seed, a.format))


def register(sub) -> None:
    sub.add_parser("code", help="stylecodes: make, read or draw short style codes", arguments=_arguments,
                   description="Stylecodes (Rowles 2024): a style as a 21-character code (stylegrad's format) "
                   "or the reference implementation's 27-character code; both decode.")


def _arguments(p) -> None:
    code_sub = p.add_subparsers(dest="code_command", required=True, metavar="ACTION", parser_class=type(p))
    q = code_sub.add_parser("decode", help="print a code's format, version and 20 levels")
    q.add_argument("code", metavar="CODE")
    q.add_argument("--json", action="store_true", help='print {"format", "version", "levels"}')
    q.set_defaults(func=cmd_decode)
    code_sub.add_parser("encode", help="make the code of an image's style", arguments=_encode_arguments,
                        description="SigLIP features of the image -> the Stylecodes encoder -> 20 levels -> "
                        "a code. Decoding and re-encoding a code gives the same code.")
    q = code_sub.add_parser("random", help="a random code")
    q.add_argument("--seed", type=int, help="make it reproducible")
    q.add_argument("--format", choices=FORMATS, default="stylegrad",
                   help="stylegrad (21 characters, default) or reference (27)")
    q.set_defaults(func=cmd_random)


def _encode_arguments(q) -> None:
    from stylegrad.stylecodes.model import PUBLISHED_FILE, PUBLISHED_REPO, SIGLIP

    q.add_argument("image", metavar="IMAGE")
    q.add_argument("--format", choices=FORMATS, default="stylegrad",
                   help="stylegrad (21 characters with the model version, default) or reference (27)")
    q.add_argument("--stylecodes-model", metavar="ID_OR_PATH",
                   help=f"Stylecodes checkpoint (default: {PUBLISHED_REPO}, {PUBLISHED_FILE})")
    q.add_argument("--siglip-model", default=SIGLIP, metavar="ID_OR_PATH",
                   help="image encoder the codes are made with (default: %(default)s)")
    add_device(q, "cpu")
    q.set_defaults(func=cmd_encode)
