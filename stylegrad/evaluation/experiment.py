"""The paper's experiment on your own prompts: generate prompt x style x steps x seed, score every image, and
write results.csv, summary.json, plots, grids and a shareable report.html.

Resumable: every file is written atomically, so an image that exists is complete; a restarted run with the same
arguments generates only what is missing (steps 0 is one "no style" image shared by all styles).
"""

from __future__ import annotations

import base64
import csv
import html
import io
import json
import os
import re
import statistics
import tempfile
from dataclasses import dataclass, replace
from importlib import resources
from pathlib import Path

from PIL import Image
from tqdm.auto import tqdm

from stylegrad import __version__
from stylegrad.aesthetic.encoder import AestheticEncoder
from stylegrad.errors import StylegradError
from stylegrad.pipelines.generation import Settings, label_grid, run_pipeline
from stylegrad.evaluation.metrics import ClipEmbedder, aesthetic_score, clip_score, style_similarity
from stylegrad.aesthetic.options import StyleOptions
from stylegrad.files.pnginfo import save_png
from stylegrad.evaluation.predictors import AestheticPredictor
from stylegrad.files.styles import Style

METRICS = ("aesthetic", "clip_score", "style_similarity")
LABELS = {"aesthetic": "aesthetic score", "clip_score": "CLIP score (prompt)", "style_similarity": "style similarity"}
NO_STYLE = "no-style"


def read_prompts(path: str | os.PathLike | None = None) -> list[str]:
    """One prompt per line; blank lines and lines starting with '#' are skipped. None: the shipped set."""
    if path is None:
        text = resources.files("stylegrad").joinpath("data/prompts.txt").read_text(encoding="utf-8")
    else:
        try:
            text = Path(path).read_text(encoding="utf-8")
        except OSError as e:
            raise StylegradError(f"cannot read prompts file {path}: {e.strerror}") from e
    prompts = [line.strip() for line in text.splitlines() if line.strip() and not line.lstrip().startswith("#")]
    if not prompts:
        raise StylegradError(f"no prompts in {path}")
    return prompts


@dataclass(frozen=True)
class Job:
    prompt_index: int
    prompt: str
    style: str  # style name, or NO_STYLE for steps 0
    steps: int
    seed: int
    file: str  # relative to the output folder


def _safe(name: str) -> str:
    return re.sub(r"[^A-Za-z0-9_.-]+", "_", name).strip("_") or "style"


def plan(prompts: list[str], styles: list[str], steps: list[int], seeds: list[int]) -> list[Job]:
    """Every (prompt, style, steps, seed) image; steps 0 maps to one shared no-style image."""
    jobs = []
    for i, prompt in enumerate(prompts):
        for name in styles:
            for k in steps:
                folder = f"images/{NO_STYLE}" if k == 0 else f"images/{_safe(name)}/steps{k:03d}"
                for seed in seeds:
                    jobs.append(Job(i, prompt, name, k, seed, f"{folder}/p{i:03d}-seed{seed}.png"))
    return jobs


def generate_missing(pipe, encoder: AestheticEncoder, jobs: list[Job], styles: dict[str, Style],
                     options: StyleOptions, settings: Settings, out: Path, progress: bool = True) -> int:
    """Generate the images that do not exist yet; returns how many were made."""
    for stale in out.glob("images/**/.*.tmp"):  # left by a run killed mid-write
        stale.unlink()
    todo, seen = [], set()
    for job in jobs:
        if job.file not in seen and not (out / job.file).exists():
            seen.add(job.file)
            todo.append(job)
    bar = tqdm(total=len(todo), desc="evaluate", unit="img", disable=not progress)
    for job in todo:
        style = styles[job.style] if job.steps > 0 else None
        pe, ne = encoder.encode(job.prompt, style, replace(options, steps=job.steps), settings.negative)
        s = replace(settings, prompt=job.prompt, seed=job.seed)
        image = run_pipeline(pipe, pe, ne, s)
        save_png(image, out / job.file, f"{job.prompt}\nstylegrad evaluate: style {job.style}, "
                 f"steps {job.steps}, seed {job.seed}")
        bar.update(1)
    bar.close()
    return len(todo)


def score(jobs: list[Job], styles: dict[str, Style], out: Path, embedder: ClipEmbedder,
          predictor: AestheticPredictor) -> list[dict]:
    """One row per job with its three metrics; each distinct image is embedded once."""
    files = sorted({j.file for j in jobs})
    images = []
    for f in files:
        with Image.open(out / f) as im:
            images.append(im.convert("RGB"))
    image_embeds = dict(zip(files, embedder.images(images)))
    prompts = sorted({j.prompt for j in jobs})
    text_embeds = dict(zip(prompts, embedder.texts(prompts)))
    rows = []
    for j in jobs:
        e = image_embeds[j.file][None]
        rows.append({
            "prompt_index": j.prompt_index, "prompt": j.prompt, "style": j.style, "steps": j.steps,
            "seed": j.seed, "file": j.file,
            "aesthetic": float(aesthetic_score(predictor, e)[0]),
            "clip_score": float(clip_score(text_embeds[j.prompt][None], e)[0]),
            "style_similarity": float(style_similarity(e, styles[j.style].direction)[0]),
        })
    return rows


def summarize(rows: list[dict]) -> dict:
    """Mean and sample std of each metric per style and steps."""
    groups: dict[tuple[str, int], list[dict]] = {}
    for r in rows:
        groups.setdefault((r["style"], r["steps"]), []).append(r)
    summary: dict = {}
    for (name, k), rs in sorted(groups.items()):
        entry = {}
        for m in METRICS:
            values = [r[m] for r in rs]
            entry[m] = {"mean": statistics.fmean(values), "std": statistics.stdev(values) if len(values) > 1 else 0.0,
                        "n": len(values)}
        summary.setdefault(name, {})[str(k)] = entry
    return summary


def _atomic_write(path: Path, data: bytes) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=".tmp")
    try:
        with os.fdopen(fd, "wb") as f:
            f.write(data)
        os.replace(tmp, path)
    finally:
        if os.path.exists(tmp):
            os.unlink(tmp)


def write_csv(rows: list[dict], path: Path) -> None:
    buf = io.StringIO()
    writer = csv.DictWriter(buf, fieldnames=list(rows[0]))
    writer.writeheader()
    writer.writerows(rows)
    _atomic_write(path, buf.getvalue().encode())


def plot(summary: dict, path: Path) -> None:
    """Each metric against steps, one line (mean with std bars) per style."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, axes = plt.subplots(1, len(METRICS), figsize=(4.2 * len(METRICS), 3.4))
    for ax, m in zip(axes, METRICS):
        for name, by_steps in summary.items():
            ks = sorted(by_steps, key=int)
            ax.errorbar([int(k) for k in ks], [by_steps[k][m]["mean"] for k in ks],
                        yerr=[by_steps[k][m]["std"] for k in ks], marker="o", capsize=3, label=name)
        ax.set_xlabel("aesthetic-gradient steps")
        ax.set_title(LABELS[m])
        ax.grid(alpha=0.3)
    axes[0].legend(fontsize=8)
    fig.tight_layout()
    buf = io.BytesIO()
    fig.savefig(buf, format="png", dpi=110)
    plt.close(fig)
    _atomic_write(path, buf.getvalue())


def grid(jobs: list[Job], style: str, steps: list[int], out: Path, thumb: int = 192) -> Image.Image:
    """Rows: prompts (first seed); columns: steps."""
    first_seed = min(j.seed for j in jobs)
    by_key = {(j.prompt_index, j.steps): j for j in jobs if j.style == style and j.seed == first_seed}
    prompts = sorted({(j.prompt_index, j.prompt) for j in jobs})
    rows = []
    for i, _ in prompts:
        row = []
        for k in steps:
            with Image.open(out / by_key[(i, k)].file) as im:
                im = im.convert("RGB")
                im.thumbnail((thumb, thumb))
                row.append(im)
        rows.append(row)
    labels = ["no style" if k == 0 else f"{k} steps" for k in steps]
    return label_grid(rows, labels, [f"prompt {i}" for i, _ in prompts])


def _data_uri(image: Image.Image, fmt: str = "PNG") -> str:
    buf = io.BytesIO()
    image.save(buf, format=fmt, **({"quality": 88} if fmt == "JPEG" else {}))
    mime = "image/png" if fmt == "PNG" else "image/jpeg"
    return f"data:{mime};base64," + base64.b64encode(buf.getvalue()).decode()


def report(summary: dict, prompts: list[str], grids: dict[str, Image.Image], plot_path: Path, meta: dict) -> str:
    """One self-contained HTML page: settings, the summary table, the plot and the grids, all inlined."""
    e = html.escape
    head = "".join(f"<th>{e(LABELS[m])}</th>" for m in METRICS)
    body = []
    for name, by_steps in summary.items():
        for k in sorted(by_steps, key=int):
            cells = "".join(f"<td>{by_steps[k][m]['mean']:.3f} ± {by_steps[k][m]['std']:.3f}</td>" for m in METRICS)
            body.append(f"<tr><td>{e(name)}</td><td>{k}</td><td>{by_steps[k][METRICS[0]]['n']}</td>{cells}</tr>")
    with Image.open(plot_path) as im:
        plot_uri = _data_uri(im.convert("RGB"))
    grid_html = "".join(f"<h3>{e(name)}</h3><img alt='grid {e(name)}' src='{_data_uri(g, 'JPEG')}'>"
                        for name, g in grids.items())
    prompt_list = "".join(f"<li value='{i}'>{e(p)}</li>" for i, p in enumerate(prompts))
    settings = "".join(f"<tr><td>{e(str(k))}</td><td>{e(str(v))}</td></tr>" for k, v in meta.items())
    return f"""<!doctype html>
<html><head><meta charset="utf-8"><title>stylegrad evaluation</title>
<style>body{{font-family:sans-serif;margin:2em;max-width:1400px}}table{{border-collapse:collapse;margin:1em 0}}
td,th{{border:1px solid #ccc;padding:4px 8px;text-align:right}}td:first-child{{text-align:left}}img{{max-width:100%}}
</style></head><body>
<h1>stylegrad evaluation</h1>
<p>Mean ± standard deviation over prompts and seeds. Aesthetic score: the predictor's 1–10 rating of each image.
CLIP score: 100 × cosine of prompt and image (prompt fidelity). Style similarity: cosine of image and style.</p>
<table><tr><th>style</th><th>steps</th><th>n</th>{head}</tr>{''.join(body)}</table>
<img alt="metrics against steps" src="{plot_uri}">
<h2>Grids (first seed)</h2>{grid_html}
<h2>Prompts</h2><ol start="0">{prompt_list}</ol>
<h2>Settings</h2><table>{settings}</table>
</body></html>"""


def evaluate(pipe, encoder: AestheticEncoder, embedder: ClipEmbedder, predictor: AestheticPredictor,
             prompts: list[str], styles: dict[str, Style], steps: list[int], seeds: list[int],
             settings: Settings, options: StyleOptions, out: Path, progress: bool = True) -> dict:
    """Run the whole experiment into ``out``; returns the summary."""
    if not styles:
        raise StylegradError("evaluate needs at least one --style")
    if not steps or any(k < 0 for k in steps):
        raise StylegradError(f"--style-steps must be whole numbers >= 0, got {steps}")
    for s in styles.values():
        s.check_width(embedder.width)
    predictor.check_width(embedder.width)
    steps = sorted(set(steps))
    jobs = plan(prompts, list(styles), steps, seeds)
    generate_missing(pipe, encoder, jobs, styles, options, settings, out, progress)
    rows = score(jobs, styles, out, embedder, predictor)
    write_csv(rows, out / "results.csv")
    summary = summarize(rows)
    meta = {
        "stylegrad_version": __version__, "prompts": len(prompts), "seeds": " ".join(map(str, seeds)),
        "styles": ", ".join(f"{n} ({s.digest})" for n, s in styles.items()),
        "style_steps": " ".join(map(str, steps)), "style_lr": options.lr, "denoising_steps": settings.steps,
        "cfg": settings.cfg, "negative": settings.negative, "clip_model": embedder.name,
        "predictor": predictor.name,
    }
    _atomic_write(out / "summary.json", json.dumps({"settings": meta, "summary": summary}, indent=2).encode())
    plot(summary, out / "plots" / "metrics.png")
    grids = {}
    for name in styles:
        grids[name] = grid(jobs, name, steps, out)
        buf = io.BytesIO()
        grids[name].save(buf, format="PNG")
        _atomic_write(out / "grids" / f"{_safe(name)}.png", buf.getvalue())
    page = report(summary, prompts, grids, out / "plots" / "metrics.png", meta)
    _atomic_write(out / "report.html", page.encode())
    return summary


def seeds_from(first: int, n: int) -> list[int]:
    if n < 1:
        raise StylegradError(f"--seeds must be >= 1, got {n}")
    return list(range(first, first + n))


