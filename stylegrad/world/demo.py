"""``stylegrad demo``: the paper's experiment on the bundled small world, offline, in about a minute.

A style is embedded from the bundled striped example images; the same prompts and seeds are generated without it
and with it at several step counts; the grid, ``results.json`` and a printed table show style similarity rising
while the shapes and colors asked for survive.
"""

from __future__ import annotations

import json
import time
from pathlib import Path

from PIL import Image

from stylegrad.aesthetic.options import StyleOptions
from stylegrad.pipelines.grids import label_grid

from .measure import DEMO_LR, PROMPTS, STEPS, measure_effect

HERE = Path(__file__).resolve().parent
WEIGHTS = HERE / "weights"
EXAMPLES = HERE / "examples"


def load_world(weights: Path = WEIGHTS):
    """(pipeline, aesthetic encoder, evaluation CLIP) of the small world, from the bundled weights."""
    from diffusers import StableDiffusionPipeline

    from stylegrad.aesthetic.encoder import AestheticEncoder
    from stylegrad.errors import StylegradError
    from stylegrad.evaluation.metrics import ClipEmbedder

    if not (weights / "sd" / "model_index.json").is_file():
        raise StylegradError(f"the small world's weights are missing from {weights} (retrain: see docs/world.md)")
    pipe = StableDiffusionPipeline.from_pretrained(weights / "sd")  # float32: the world is CPU-sized
    pipe.set_progress_bar_config(disable=True)
    encoder = AestheticEncoder.from_pipeline(pipe, str(weights / "clip"))
    return pipe, encoder, ClipEmbedder(str(weights / "clip"))


def run_demo(out: str | Path = "stylegrad-demo", steps=STEPS, seeds: int = 2, prompts=PROMPTS,
             lr: float = DEMO_LR, log=print) -> dict:
    """Write ``grid.png`` and ``results.json`` into ``out``; return the results."""
    from stylegrad.aesthetic.embedding import embed_images

    t0 = time.perf_counter()
    out = Path(out)
    out.mkdir(parents=True, exist_ok=True)
    pipe, encoder, embedder = load_world()
    style = embed_images([str(EXAMPLES)], str(WEIGHTS / "clip"), name="striped", progress=False)
    steps = sorted({0, *steps})
    rows = measure_effect(pipe, encoder, embedder, style, prompts, range(seeds), steps, StyleOptions(lr=lr))
    labels = ["no style" if k == 0 else f"{k} steps" for k in steps]
    grid_rows, row_labels = [], []
    for p, prompt in enumerate(prompts):
        for s in range(min(seeds, 2)):
            i = p * seeds + s
            grid_rows.append([r.images[i].resize((96, 96), Image.NEAREST) for r in rows])
            row_labels.append(f"{prompt[2:]}, seed {s}")
    label_grid(grid_rows, labels, row_labels).save(out / "grid.png")
    results = {
        "style": f"striped: {len(list(EXAMPLES.glob('*.png')))} bundled images",
        "prompts": list(prompts), "seeds": seeds, "lr": lr,
        "rows": [{"steps": r.steps, "style_similarity": round(r.style_similarity, 4), "accuracy": round(r.accuracy, 4),
                  "shape_accuracy": round(r.shape_accuracy, 4), "color_accuracy": round(r.color_accuracy, 4)}
                 for r in rows],
        "seconds": round(time.perf_counter() - t0, 1),
    }
    (out / "results.json").write_text(json.dumps(results, indent=2))
    log(f"{'steps':>5}  {'style similarity':>16}  {'prompt kept':>11}  {'shape':>5}  {'color':>6}")
    for r in results["rows"]:
        log(f"{r['steps']:>5}  {r['style_similarity']:>16.3f}  {r['accuracy']:>11.2f}  {r['shape_accuracy']:>5.2f}  "
            f"{r['color_accuracy']:>6.2f}")
    log(f"{out / 'grid.png'}  {out / 'results.json'}  ({results['seconds']} s)")
    return results
