"""The personalization methods, measured on the small world instead of judged by hearsay: one run trains and
measures every method on the same pictures, prompts and seeds, and writes docs/methods.md (table, plot, grid).

Methods: no style (baseline); aesthetic gradients at 5, 10 and 20 steps; textual inversion; LoRA rank 4; Custom
Diffusion (cross-attention K/V only); DreamBooth-style UNet fine-tuning with prior preservation; the base merged
with that fine-tune at 0.5. Two styles of the world's own: the bundled striped pictures and 12 outlined ones. The
trained methods learn the word "zq" from the pictures with their content captions ("zq, a red triangle") and are
prompted "zq, a red circle"; aesthetic gradients and the baseline get the plain prompt.

For each: file size, training time, extra time per image against the baseline, style similarity (CLIP image
cosine to the style's mean embedding) and prompt kept (the world's zero-shot probe recognizes the color and shape
asked for), with their spread across prompts (the standard deviation of the per-prompt means). About 15 minutes on
2 cores. Last line JSON.

    python bench/methods.py [--out docs] [--quick]
"""

from __future__ import annotations

import argparse
import json
import shutil
import statistics
import sys
import tempfile
import time
from dataclasses import dataclass, field
from pathlib import Path

import torch
from PIL import Image

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from stylegrad.world.demo import EXAMPLES, WEIGHTS  # noqa: E402
from stylegrad.world.measure import DEMO_LR, DENOISE, PROMPTS, split_caption, zero_shot  # noqa: E402

WORD = "zq"
SEEDS = (0, 1)
# learning rates for the small world's 64-wide model: the real-model defaults (TI 5e-4, LoRA 1e-4, CD 1e-5,
# DreamBooth 5e-6) barely move it in a few hundred steps
LR = {"ti": 5e-3, "lora": 1e-2, "cd": 1e-3, "db": 1e-4}


@dataclass
class Result:
    method: str
    style: str
    file_bytes: int = 0
    train_s: float = 0.0
    extra_s_per_image: float = 0.0
    style_similarity: float = 0.0
    style_spread: float = 0.0
    prompt_kept: float = 0.0
    kept_spread: float = 0.0
    recipe: str = ""
    images: list = field(default_factory=list, repr=False)


def captioned_copy(folder: Path, out: Path) -> Path:
    """The pictures with their content captions ('a red triangle', from the file names) beside them."""
    out.mkdir(parents=True, exist_ok=True)
    for p in sorted(folder.glob("*.png")):
        _, _, color, shape = p.stem.split("-")
        shutil.copy(p, out / p.name)
        (out / p.name).with_suffix(".txt").write_text(f"a {color} {shape}")
    return out


def measure(name, style_name, images_by_prompt, embedder, style, seconds_per_image, base_s) -> Result:
    from stylegrad.evaluation.metrics import style_similarity

    sims, kept = [], []
    flat = [im for ims in images_by_prompt for im in ims]
    got = zero_shot(embedder, flat)
    all_sims = style_similarity(embedder.images(flat), style.direction).tolist()
    n = len(SEEDS)
    for p, prompt in enumerate(PROMPTS):
        sims.append(statistics.fmean(all_sims[p * n:(p + 1) * n]))
        kept.append(statistics.fmean(split_caption(g) == split_caption(prompt) for g in got[p * n:(p + 1) * n]))
    return Result(name, style_name, extra_s_per_image=seconds_per_image - base_s,
                  style_similarity=statistics.fmean(sims), style_spread=statistics.pstdev(sims),
                  prompt_kept=statistics.fmean(kept), kept_spread=statistics.pstdev(kept), images=flat)


def generate(models, prompts, words=None):
    """Images for every prompt and seed from the models' current weights; the median seconds per image (medians:
    this shared machine's hiccups move single timings by a tenth of a second)."""
    from dataclasses import replace

    from stylegrad.pipelines.generation import run_pipeline
    from stylegrad.training.models import condition

    models.pipe.set_progress_bar_config(disable=True)
    out, times = [], []
    with torch.no_grad():
        neg = condition(models, [""], words)["encoder_hidden_states"]
        for prompt in prompts:
            pos = condition(models, [prompt], words)["encoder_hidden_states"]
            row = []
            for s in SEEDS:
                t = time.perf_counter()
                row.append(run_pipeline(models.pipe, pos, neg, replace(DENOISE, prompt=prompt, seed=s)))
                times.append(time.perf_counter() - t)
            out.append(row)
    return out, statistics.median(times)


def run_style(style_name: str, folder: Path, work: Path, steps: dict, log) -> list[Result]:
    from stylegrad import AestheticEncoder, StyleOptions, embed_images, save_style
    from stylegrad.evaluation.metrics import ClipEmbedder
    from stylegrad.pipelines.generation import run_pipeline
    from stylegrad.training import custom_diffusion, dreambooth, lora, textual_inversion
    from stylegrad.training.data import read_training_set
    from stylegrad.training.loop import TrainSettings, train
    from stylegrad.training.models import load_models

    sd, clip = str(WEIGHTS / "sd"), str(WEIGHTS / "clip")
    embedder = ClipEmbedder(clip)
    t = time.perf_counter()
    style = embed_images([folder], clip, name=style_name, progress=False)
    embed_s = time.perf_counter() - t
    style_file = save_style(style, work / f"{style_name}.safetensors")
    data = read_training_set([captioned_copy(folder, work / "pictures")], 32)
    worded = [f"{WORD}, {p}" for p in PROMPTS]
    results = []

    def settings(n, lr, batch=4):
        return TrainSettings(steps=n, lr=lr, batch_size=batch, resolution=32, checkpoint_every=10**9,
                             work=work / f"train-{len(results)}")

    models = load_models(sd, "cpu")
    generate(models, PROMPTS[:1])  # warm-up: the first pictures of a process are slower
    images, base_s = generate(models, PROMPTS)
    results.append(measure("no style", style_name, images, embedder, style, base_s, base_s))
    log(results[-1])

    enc = AestheticEncoder.from_pipeline(models.pipe, clip)
    for k in (5, 10, 20):
        tuning, times, imgs = [], [], []
        for prompt in PROMPTS:
            t = time.perf_counter()
            pe, ne = enc.encode(prompt, style, StyleOptions(steps=k, lr=DEMO_LR))
            tuning.append(time.perf_counter() - t)
            row = []
            for s in SEEDS:
                t = time.perf_counter()
                row.append(run_pipeline(models.pipe, pe, ne, DENOISE.__class__(**{**DENOISE.__dict__, "prompt": prompt,
                                                                                "seed": s})))
                times.append(time.perf_counter() - t)
            imgs.append(row)
        # the tuning runs once per prompt and serves every seed
        per = statistics.median(times) + statistics.fmean(tuning) / len(SEEDS)
        r = measure(f"aesthetic gradients, {k} steps", style_name, imgs, embedder, style, per, base_s)
        r.file_bytes, r.train_s, r.recipe = style_file.stat().st_size, embed_s, f"lr {DEMO_LR:g}"
        results.append(r)
        log(r)

    def trained(name, make, n, lr, words_of=None, batch=4):
        m = load_models(sd, "cpu")
        method = make(m)
        t = time.perf_counter()
        train(method, m, data, settings(n, lr, batch), resume=False, progress=False)
        train_s = time.perf_counter() - t
        files = method.export(work / f"{name.replace(' ', '-')}.safetensors", n)
        imgs, per = generate(m, worded, method.words() if words_of else None)
        r = measure(name, style_name, imgs, embedder, style, per, base_s)
        r.file_bytes = min(f.stat().st_size for f in files if f.suffix == ".safetensors")
        r.train_s, r.recipe = train_s, f"{n} steps, lr {lr:g}, batch {batch}"
        results.append(r)
        log(r)
        return m, method, train_s

    trained("textual inversion", lambda m: textual_inversion.TextualInversion(m, WORD, "striped", 1),
            steps["ti"], LR["ti"], words_of=True)
    trained("LoRA rank 4", lambda m: lora.LoRA(m, rank=4, word=WORD), steps["lora"], LR["lora"])
    trained("Custom Diffusion (K/V)", lambda m: custom_diffusion.CustomDiffusion(m, WORD), steps["cd"], LR["cd"])

    # DreamBooth: the base model's pictures of the captions' content are the prior
    base = load_models(sd, "cpu")
    base.pipe.set_progress_bar_config(disable=True)
    t = time.perf_counter()
    class_prompts = data.captions
    with torch.no_grad():
        class_images = [run_pipeline(base.pipe, *[base.pipe.encode_prompt(c, "cpu", 1, True, "")[i] for i in (0, 1)],
                                     DENOISE.__class__(**{**DENOISE.__dict__, "prompt": c, "seed": 100 + i}))
                        for i, c in enumerate(class_prompts)]
    class_s = time.perf_counter() - t
    class_pixels = torch.stack([torch.from_numpy(__import__("numpy").asarray(im.convert("RGB"), dtype="float32"))
                                .permute(2, 0, 1) / 127.5 - 1 for im in class_images])
    m, method, _ = trained("DreamBooth fine-tune", lambda m: dreambooth.DreamBooth(m, WORD, class_pixels,
                                                                                    class_prompts, batch_size=2),
                           steps["db"], LR["db"], batch=2)
    results[-1].train_s += class_s
    tuned = {k: v.detach().clone() for k, v in method.trained().items()}
    merged_models = load_models(sd, "cpu")
    base_state = dict(merged_models.unet.state_dict())
    merged_models.unet.load_state_dict(dreambooth.merge(base_state, tuned, 0.5))
    imgs, per = generate(merged_models, worded)
    r = measure("base + fine-tune merged 0.5", style_name, imgs, embedder, style, per, base_s)
    r.file_bytes, r.train_s, r.recipe = results[-1].file_bytes, results[-1].train_s, "alpha 0.5"
    results.append(r)
    log(r)
    return results


def fmt_bytes(n: int) -> str:
    return "-" if n == 0 else (f"{n / 1e6:.1f} MB" if n >= 1e6 else f"{n / 1e3:.1f} KB")


def verdict(results: list[Result]) -> list[str]:
    """Where aesthetic gradients win and lose, said from this run's numbers (regenerated with them)."""
    out = []
    for s in dict.fromkeys(r.style for r in results):
        rows = [r for r in results if r.style == s]
        base = rows[0]
        ag = [r for r in rows if r.method.startswith("aesthetic")]
        others = [r for r in rows[1:] if not r.method.startswith("aesthetic")]
        best_style = max(rows[1:], key=lambda r: r.style_similarity)
        strongest_ag = max(ag, key=lambda r: r.style_similarity)
        # a method is dominated when another is at least as stylish and keeps at least as much of the prompt
        frontier = [r for r in rows[1:] if not any(
            o is not r and o.style_similarity >= r.style_similarity and o.prompt_kept >= r.prompt_kept and
            (o.style_similarity, o.prompt_kept) != (r.style_similarity, r.prompt_kept) for o in rows[1:])]
        trained_s = [r.train_s for r in others]
        out += [f"**{s}.** Without any style the pictures score {base.style_similarity:.3f} in style similarity and "
                f"keep {base.prompt_kept:.2f} of the prompt. Aesthetic gradients move the style from "
                f"{ag[0].style_similarity:.3f} (5 steps) to {ag[-1].style_similarity:.3f} (20 steps) while prompt kept "
                f"goes from {ag[0].prompt_kept:.2f} to {ag[-1].prompt_kept:.2f}: more steps, more style, less prompt. "
                f"The most stylish method here is {best_style.method} ({best_style.style_similarity:.3f}, prompt "
                f"kept {best_style.prompt_kept:.2f}); the strongest aesthetic-gradients setting reaches "
                f"{strongest_ag.style_similarity:.3f}. Not beaten on both measures at once: "
                f"{', '.join(r.method for r in frontier)}. Aesthetic gradients need no training (a "
                f"{fmt_bytes(ag[0].file_bytes)} file made in {ag[0].train_s:.1f} s) where the trained methods took "
                f"{min(trained_s):.0f}-{max(trained_s):.0f} s and files of {fmt_bytes(min(r.file_bytes for r in others))}"
                f" to {fmt_bytes(max(r.file_bytes for r in others))}; they pay instead at generation, with the tuning "
                f"once per prompt ({strongest_ag.extra_s_per_image * 1000:+.0f} ms per image here at 20 steps, where "
                "the trained methods cost about nothing extra). Spread across prompts, style similarity varies by "
                f"±{statistics.fmean(r.style_spread for r in ag):.3f} for aesthetic gradients against "
                f"±{statistics.fmean(r.style_spread for r in others):.3f} for the trained methods, and prompt kept by "
                f"±{statistics.fmean(r.kept_spread for r in ag):.2f} against "
                f"±{statistics.fmean(r.kept_spread for r in others):.2f}.", ""]
    out.append("Timings of a fraction of a second per image are noisy on this shared 2-core machine (±0.2 s, even as "
               "medians); the small world is one small model, so the ranking, not the values, is what may carry over "
               "to SD1.5, where each method's costs grow with the model (a LoRA of rank 4 is a few MB, a fine-tune the "
               "whole UNet).")
    return out


def write_docs(results: list[Result], out: Path, seconds: float, quick: bool) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    from stylegrad.pipelines.grids import label_grid

    folder = out / "methods"
    folder.mkdir(parents=True, exist_ok=True)
    styles = list(dict.fromkeys(r.style for r in results))
    fig, axes = plt.subplots(1, len(styles), figsize=(6 * len(styles), 4.5), squeeze=False)
    for ax, s in zip(axes[0], styles):
        for r in [r for r in results if r.style == s]:
            ax.errorbar(r.prompt_kept, r.style_similarity, xerr=r.kept_spread, yerr=r.style_spread, fmt="o",
                        capsize=3, label=r.method)
        ax.set_xlabel("prompt kept (probe accuracy)")
        ax.set_ylabel("style similarity")
        ax.set_title(f"style: {s}")
    axes[0][0].legend(fontsize=7, loc="best")
    fig.tight_layout()
    fig.savefig(folder / "plot.png", dpi=110)
    plt.close(fig)
    first = [r for r in results if r.style == styles[0]]
    rows = [[r.images[p * len(SEEDS)].resize((64, 64), Image.NEAREST) for p in range(len(PROMPTS))] for r in first]
    label_grid(rows, [p[2:] for p in PROMPTS], [r.method for r in first]).save(folder / "grid.png")

    lines = ["# The personalization methods, measured", "",
             "Generated by `python bench/methods.py` (the small world, 2 CPU cores, "
             f"{time.strftime('%Y-%m-%d')}, {seconds / 60:.0f} minutes{', --quick' if quick else ''}); rerun it to "
             "regenerate this page, the plot and the grid.", "",
             "Every method personalizes the same bundled world model (docs/world.md) towards the same pictures, and "
             f"is measured on the same {len(PROMPTS)} prompts x {len(SEEDS)} seeds. Style similarity: CLIP image "
             "cosine to the style pictures' mean embedding. Prompt kept: share of images in which the world's "
             "zero-shot probe finds the color and shape the prompt asked for. ± is the spread across prompts (the "
             "standard deviation of the per-prompt means): the \"inconsistent results\" claim, measured. Trained "
             f"methods learn the word `{WORD}` from the pictures with their content captions and are prompted "
             f"`{WORD}, a red circle`; aesthetic gradients and the baseline get the plain prompt. Extra time per "
             "image: the median time of one picture against the baseline's median, plus, for aesthetic gradients, the "
             "tuning (once per prompt) shared by the prompt's seeds.", ""]
    for s in styles:
        lines += [f"## Style: {s}", "", "| method | recipe | file | training | extra time / image | style similarity"
                  " | prompt kept |", "|---|---|---|---|---|---|---|"]
        for r in [r for r in results if r.style == s]:
            train_s = "-" if r.train_s == 0 else f"{r.train_s:.1f} s"
            lines.append(f"| {r.method} | {r.recipe or '-'} | {fmt_bytes(r.file_bytes)} | {train_s} | "
                         f"{r.extra_s_per_image * 1000:+.0f} ms"
                         f" | {r.style_similarity:.3f} ± {r.style_spread:.3f} | {r.prompt_kept:.2f} ± "
                         f"{r.kept_spread:.2f} |")
        lines.append("")
    lines += ["![style similarity against prompt kept](methods/plot.png)", "",
              f"The same seed across methods (style {styles[0]}; rows: methods, columns: prompts):", "",
              "![grid](methods/grid.png)", "", "## Where aesthetic gradients win and where they lose", "",
              *verdict(results), ""]
    (out / "methods.md").write_text("\n".join(lines))


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--out", default=str(ROOT / "docs"), help="where methods.md and methods/ go")
    ap.add_argument("--quick", action="store_true", help="few training steps: a smoke run, not the figures")
    a = ap.parse_args()
    torch.set_num_threads(2)
    steps = {"ti": 20, "lora": 20, "cd": 20, "db": 10} if a.quick else {"ti": 400, "lora": 400, "cd": 300, "db": 300}
    if a.quick:
        global PROMPTS, SEEDS
        PROMPTS, SEEDS = PROMPTS[:4], (0,)
    t0 = time.perf_counter()
    tmp = Path(tempfile.mkdtemp(prefix="stylegrad-methods-"))
    from stylegrad.world.data import write_examples

    outlined = tmp / "outlined"
    write_examples(outlined, "outlined", 12, seed=321)

    def log(r: Result) -> None:
        print(f"{r.style:9} {r.method:32} file {fmt_bytes(r.file_bytes):>9} train {r.train_s:6.1f} s  extra "
              f"{r.extra_s_per_image * 1000:+6.0f} ms  style {r.style_similarity:.3f}±{r.style_spread:.3f}  kept "
              f"{r.prompt_kept:.2f}±{r.kept_spread:.2f}", flush=True)

    results = run_style("striped", EXAMPLES, tmp / "striped", steps, log)
    results += run_style("outlined", outlined, tmp / "outlined-work", steps, log)
    seconds = time.perf_counter() - t0
    write_docs(results, Path(a.out), seconds, a.quick)
    print(json.dumps({"seconds": round(seconds, 1), "rows": [
        {k: (round(v, 4) if isinstance(v, float) else v) for k, v in r.__dict__.items() if k != "images"}
        for r in results]}))


if __name__ == "__main__":
    main()
