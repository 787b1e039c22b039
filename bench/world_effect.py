"""The paper's claim, measured on the bundled small world: style similarity and prompt fidelity against the number
of aesthetic-gradient steps, and what the regularizer and the target similarity change.

Reference in the same run: the unstyled images (0 steps). Ratios are style-similarity gain over it and fidelity
kept relative to it. Prompts x seeds images per row; the style is made from the bundled striped examples.

    python bench/world_effect.py            # prints the table, then one JSON line
"""

from __future__ import annotations

import argparse
import json
import statistics
import time
from dataclasses import replace

import torch

from stylegrad import StyleOptions, embed_images
from stylegrad.world.demo import EXAMPLES, WEIGHTS, load_world
from stylegrad.world.measure import DEMO_LR, PROMPTS, measure_effect


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--seeds", type=int, default=4)
    p.add_argument("--threads", type=int, default=2)
    a = p.parse_args()
    torch.set_num_threads(a.threads)
    t0 = time.perf_counter()
    pipe, encoder, embedder = load_world()
    style = embed_images([str(EXAMPLES)], str(WEIGHTS / "clip"), progress=False, name="striped")
    base = StyleOptions(lr=DEMO_LR)
    variants = [("plain", base, (0, 2, 5, 10, 20))]
    variants += [(f"regularization {lam:g}", replace(base, regularization=lam), (10, 20)) for lam in (10.0, 100.0)]
    variants += [(f"target similarity {c:g}", replace(base, target_similarity=c), (20,)) for c in (0.3, 0.4)]
    table = []
    reference = None
    for name, options, steps in variants:
        rows = measure_effect(pipe, encoder, embedder, style, PROMPTS, range(a.seeds), steps, options)
        for r in rows:
            per_prompt = [statistics.fmean(r_sim) for r_sim in _per_prompt(r, embedder, style, a.seeds)]
            row = {"variant": name, "steps": r.steps, "style_similarity": round(r.style_similarity, 4),
                   "prompt_kept": round(r.accuracy, 4), "shape": round(r.shape_accuracy, 4),
                   "color": round(r.color_accuracy, 4),
                   "similarity_spread": round(statistics.pstdev(per_prompt), 4)}
            if name == "plain" and r.steps == 0:
                reference = row
            table.append(row)
    for row in table:
        row["similarity_gain"] = round(row["style_similarity"] - reference["style_similarity"], 4)
        row["prompt_kept_ratio"] = round(row["prompt_kept"] / reference["prompt_kept"], 3)
    head = f"{'variant':24} {'steps':>5} {'style sim':>9} {'gain':>7} {'spread':>7} {'kept':>5} {'ratio':>5} " \
           f"{'shape':>5} {'color':>6}"
    print(head)
    for r in table:
        print(f"{r['variant']:24} {r['steps']:>5} {r['style_similarity']:>9.3f} {r['similarity_gain']:>+7.3f} "
              f"{r['similarity_spread']:>7.3f} {r['prompt_kept']:>5.2f} {r['prompt_kept_ratio']:>5.2f} "
              f"{r['shape']:>5.2f} {r['color']:>6.2f}")
    print(f"({len(PROMPTS)} prompts x {a.seeds} seeds per row, lr {DEMO_LR:g}, {time.perf_counter() - t0:.0f} s)")
    print(json.dumps({"lr": DEMO_LR, "prompts": len(PROMPTS), "seeds": a.seeds, "rows": table}))


def _per_prompt(row, embedder, style, seeds: int):
    """Style similarity of each prompt's images (spread across prompts: does the target even them out?)."""
    from stylegrad.evaluation.metrics import style_similarity

    sims = style_similarity(embedder.images(row.images), style.direction).tolist()
    return [sims[i : i + seeds] for i in range(0, len(sims), seeds)]


if __name__ == "__main__":
    main()
