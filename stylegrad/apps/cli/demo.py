"""``demo``: the paper's experiment on the small world bundled with stylegrad, offline."""

from __future__ import annotations

from stylegrad.apps.cli.args import number_list


def cmd_demo(a) -> None:
    from stylegrad.world.demo import run_demo

    if a.seeds < 1:
        a.parser.error(f"--seeds must be >= 1, got {a.seeds}")
    run_demo(a.out, a.style_steps, a.seeds, log=print)
    print("\nOn your pictures: stylegrad embed DIR -o mine.safetensors (SD1.x: CLIP ViT-L/14, 1.7 GB download), "
          "then stylegrad generate PROMPT --style mine.safetensors. For SDXL: embed --family sdxl also reads "
          "OpenCLIP ViT-bigG/14's image tower (about 10 GB), and tuning bigG's text tower holds 6.3 GB "
          "(7.5 GB without AVX-512) while a prompt is personalized, or 2.5 GB with --tuning-memory low (slower, "
          "the same result; auto chooses by free memory; docs/performance.md has the figures).")


def register(sub) -> None:
    sub.add_parser("demo", help="see aesthetic gradients work, offline, in about a minute",
                   description="Runs the paper's experiment on the small world bundled with stylegrad (a CLIP "
                   "and a text-to-image model trained on procedural shapes): a style is embedded from bundled "
                   "striped images; the same prompts and seeds are generated without it and with it at each "
                   "step count. Writes grid.png and results.json (style similarity and shape/color fidelity "
                   "per steps) and prints the table.", arguments=_arguments)


def _arguments(p) -> None:
    from stylegrad.world import STEPS

    p.add_argument("--out", default="stylegrad-demo", metavar="DIR", help="output folder (default: %(default)s)")
    p.add_argument("--style-steps", type=number_list(int, minimum=0), default=list(STEPS), metavar="LIST",
                   help=f"steps to compare (default {','.join(map(str, STEPS))})")
    p.add_argument("--seeds", type=int, default=2, metavar="N", help="seeds per prompt, 8 prompts (default 2)")
    p.set_defaults(func=cmd_demo, parser=p)
