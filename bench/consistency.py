"""Aesthetic gradients' "inconsistent results", measured: a fixed step count against the consistent mode
(StyleOptions.target_similarity / target_gain: each prompt tuned until its cosine to the style reaches a goal) on
the small world's 8 prompts, for its two styles (the bundled striped pictures, 12 outlined ones).

Per prompt: the text embedding's final cosine to the style (what the mode evens out), the steps it took, the
pictures' style similarity (CLIP image cosine to the style, 2 seeds) and prompt kept (the world's zero-shot probe
finds the color and shape asked for), all through world/measure.py's probe as bench/methods.py measures them.
Spread: the standard deviation across prompts of the per-prompt means (docs/methods.md's ±). Prints a table,
then one JSON line. 12 rows of 8 tunings and 16 pictures each (17 minutes on one thread of a heavily
shared 2-core machine; a few minutes on 2 free cores).

    python bench/consistency.py [--seeds 2] [--threads 2]
"""

from __future__ import annotations

import argparse
import json
import statistics
import sys
import tempfile
import time
from dataclasses import replace
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from stylegrad.aesthetic.options import CONSISTENT_DEFAULTS, StyleOptions  # noqa: E402
from stylegrad.world.measure import DEMO_LR, DENOISE, PROMPTS, split_caption, zero_shot  # noqa: E402

# (name, options): the fixed-step rows docs/methods.md shows, then the consistent mode (CONSISTENT_DEFAULTS, the
# setting bench/methods.py's row uses) and neighbours of it that show what its goal trades
VARIANTS = [
    ("no style", StyleOptions(steps=0, lr=DEMO_LR)),
    ("fixed 10 steps", StyleOptions(steps=10, lr=DEMO_LR)),
    ("fixed 20 steps", StyleOptions(steps=20, lr=DEMO_LR)),
    ("consistent (defaults)", StyleOptions(lr=DEMO_LR, **CONSISTENT_DEFAULTS)),
    ("consistent, target 0.45", StyleOptions(lr=DEMO_LR, **{**CONSISTENT_DEFAULTS, "target_similarity": 0.45})),
    ("consistent, gain 0.3", StyleOptions(steps=CONSISTENT_DEFAULTS["steps"], lr=DEMO_LR, target_gain=0.3)),
]


def measure(pipe, encoder, embedder, style, options: StyleOptions, seeds) -> dict:
    """One variant on every prompt: per-prompt numbers, their means and spreads."""
    from stylegrad.evaluation.metrics import style_similarity
    from stylegrad.pipelines.run import run_pipeline

    images, text, steps = [], [], []
    for prompt in PROMPTS:
        pe, ne = encoder.encode(prompt, style if options.active else None, options)
        sims = encoder.last_similarities
        text.append(sims[0][-1] if sims else float(torch.cosine_similarity(
            encoder.text_embedding(prompt), style.direction, dim=0)))
        steps.append(encoder.last_steps[0] if sims else 0)
        images += [run_pipeline(pipe, pe, ne, replace(DENOISE, prompt=prompt, seed=s)) for s in seeds]
    n = len(seeds)
    all_sims = style_similarity(embedder.images(images), style.direction).tolist()
    got = zero_shot(embedder, images)
    image = [statistics.fmean(all_sims[i * n:(i + 1) * n]) for i in range(len(PROMPTS))]
    kept = [statistics.fmean(split_caption(g) == split_caption(p) for g in got[i * n:(i + 1) * n])
            for i, p in enumerate(PROMPTS)]
    row = {"steps": steps, "text": text, "similarity": image, "kept": kept}
    for key in ("text", "similarity", "kept"):
        row[f"{key}_mean"], row[f"{key}_spread"] = statistics.fmean(row[key]), statistics.pstdev(row[key])
    return row


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--seeds", type=int, default=2)
    p.add_argument("--threads", type=int, default=2)
    a = p.parse_args()
    torch.set_num_threads(a.threads)
    t0 = time.perf_counter()
    from stylegrad import embed_images
    from stylegrad.world.data import write_examples
    from stylegrad.world.demo import EXAMPLES, WEIGHTS, load_world

    pipe, encoder, embedder = load_world()
    outlined = Path(tempfile.mkdtemp(prefix="stylegrad-consistency-")) / "outlined"
    write_examples(outlined, "outlined", 12, seed=321)  # bench/methods.py's second style
    styles = {name: embed_images([str(folder)], str(WEIGHTS / "clip"), progress=False, name=name)
              for name, folder in (("striped", EXAMPLES), ("outlined", outlined))}
    rows = []
    print(f"{'style':9} {'variant':24} {'text cos':>13} {'style similarity':>16} {'prompt kept':>11}  steps per prompt")
    for style_name, style in styles.items():
        for name, options in VARIANTS:
            r = measure(pipe, encoder, embedder, style, options, range(a.seeds))
            rows.append({"style": style_name, "variant": name, "options": _changed(options), **r})
            print(f"{style_name:9} {name:24} {r['text_mean']:6.3f}±{r['text_spread']:.3f} "
                  f"{r['similarity_mean']:9.3f}±{r['similarity_spread']:.3f} {r['kept_mean']:6.2f}±{r['kept_spread']:.2f}  "
                  f"{r['steps']}", flush=True)
    seconds = time.perf_counter() - t0
    print(f"({len(PROMPTS)} prompts x {a.seeds} seeds per row, lr {DEMO_LR:g}, {seconds:.0f} s)")
    print(json.dumps({"seconds": round(seconds, 1), "seeds": a.seeds, "consistent_defaults": CONSISTENT_DEFAULTS,
                      "rows": [{k: _rounded(v) for k, v in r.items()} for r in rows]}))


def _changed(options: StyleOptions) -> dict:
    default = StyleOptions()
    return {k: v for k, v in options.__dict__.items() if getattr(default, k) != v}


def _rounded(v):
    if isinstance(v, float):
        return round(v, 4)
    if isinstance(v, list):
        return [_rounded(x) for x in v]
    return v


if __name__ == "__main__":
    main()
