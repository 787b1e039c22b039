"""``evaluate``: the paper's experiment on the user's prompts, styles and model."""

from __future__ import annotations

from pathlib import Path

from stylegrad.apps.cli.args import add_device, add_model_options, add_style_options, number_list, style_options
from stylegrad.apps.cli.batch import add_ray_options, ray_options


def cmd_evaluate(a) -> None:
    from stylegrad.evaluation.experiment import run_evaluation, seeds_from
    from stylegrad.pipelines.loading import DEFAULT_MODEL
    from stylegrad.pipelines.request import GenerationRequest

    base = GenerationRequest(prompt="", negative=a.negative, steps=a.steps, cfg=a.cfg, width=a.width,
                             height=a.height, sampler=a.sampler, clip_skip=a.clip_skip, model=a.model or DEFAULT_MODEL,
                             style_options=style_options(a, steps=0), clip_model=a.clip_model)
    ray = {"address": a.ray or None, **ray_options(a)} if a.ray is not None else None
    summary = run_evaluation(base, a.style, a.style_steps, seeds_from(a.seed, a.seeds), a.out, a.prompts,
                             a.predictor, a.device, vae=a.vae, models_dir=a.models_dir, ray=ray, dtype=a.dtype)
    for name, by_steps in summary.items():
        for k, m in sorted(by_steps.items(), key=lambda kv: int(kv[0])):
            print(f"{name:20} steps {int(k):3}  aesthetic {m['aesthetic']['mean']:.3f}  "
                  f"clip {m['clip_score']['mean']:.2f}  style {m['style_similarity']['mean']:.3f}")
    print(Path(a.out) / "report.html")


def register(sub) -> None:
    sub.add_parser("evaluate", help="measure styles: the paper's experiment on your prompts",
                   description="Generate prompt x style x steps x seed, score every image (aesthetic score, "
                   "CLIP score, style similarity) and write results.csv, summary.json, plots, grids and "
                   "report.html into --out. Rerunning the same command resumes; other settings into the same "
                   "folder are refused.", arguments=_arguments)


def _arguments(p) -> None:
    from stylegrad.evaluation.predictors import DEFAULT as DEFAULT_PREDICTOR
    from stylegrad.evaluation.predictors import KNOWN as PREDICTORS
    from stylegrad.pipelines.loading import DEFAULT_MODEL

    p.add_argument("--prompts", metavar="FILE", help="one prompt per line (default: stylegrad's shipped set)")
    p.add_argument("--style", action="append", required=True, metavar="FILE", help="style file; repeat for more")
    p.add_argument("--style-steps", type=number_list(int, minimum=0), default=[0, 5, 10, 20], metavar="LIST",
                   help="steps to compare (default 0,5,10,20)")
    add_style_options(p, exclude=("steps",), style_file=False)
    p.add_argument("--seeds", type=int, default=2, metavar="N", help="seeds per prompt (default 2)")
    p.add_argument("--seed", type=int, default=0, help="first seed (default 0)")
    add_model_options(p, DEFAULT_MODEL)
    p.add_argument("--clip-model", metavar="ID_OR_PATH", help="CLIP for the style space and the scores "
                   "(default: the model family's)")
    p.add_argument("--predictor", default=DEFAULT_PREDICTOR, metavar="NAME_OR_PATH",
                   help=f"aesthetic predictor: {', '.join(PREDICTORS)} or a .pth path (default {DEFAULT_PREDICTOR})")
    p.add_argument("--negative", default="", metavar="TEXT", help="negative prompt")
    p.add_argument("--steps", type=int, default=30, help="denoising steps (default 30)")
    p.add_argument("--cfg", type=float, default=7.5, help="guidance scale (default 7.5)")
    p.add_argument("--width", type=int, help="image width (default: the model's)")
    p.add_argument("--height", type=int, help="image height (default: the model's)")
    p.add_argument("--sampler", metavar="NAME", help="scheduler (see generate --help)")
    p.add_argument("--clip-skip", type=int, metavar="K", help="see generate --help")
    add_device(p, dtype=True, dtype_note="The model's, the scoring CLIP's and the predictor's. Style tuning always "
               "runs in fp32")
    add_ray_options(p)
    p.add_argument("--out", required=True, metavar="DIR", help="output folder (rerun into it to resume)")
    p.set_defaults(func=cmd_evaluate)
