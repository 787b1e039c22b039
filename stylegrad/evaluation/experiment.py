"""The paper's experiment on your own prompts: generate prompt x style x steps x seed, score every image, and
write results.csv, summary.json, plots, grids and a shareable report.html.

Resumable: the folder's manifest (jobs/manifest.py) holds the settings, prompt texts and style hashes, and every
file is written atomically, so a rerun with the same arguments generates only what is missing and a rerun with
other ones is refused (steps 0 is one "no style" image that every style shares).
"""

from __future__ import annotations

import csv
import io
import json
import os
import statistics
from dataclasses import replace
from importlib import resources
from pathlib import Path

from PIL import Image

from stylegrad import __version__
from stylegrad.errors import StylegradError
from stylegrad.evaluation.metrics import ClipEmbedder, aesthetic_score, clip_score, style_similarity
from stylegrad.evaluation.predictors import AestheticPredictor
from stylegrad.evaluation.report import METRICS, plot, report
from stylegrad.files.atomic import atomic_write
from stylegrad.files.pnginfo import save_png
from stylegrad.files.styles import Style, load_style
from stylegrad.jobs.local import run_local
from stylegrad.jobs.manifest import check_manifest
from stylegrad.jobs.plan import Job, plan, safe_name
from stylegrad.jobs.records import LATER_STYLE_FIELDS, without_later_defaults
from stylegrad.pipelines.generation import Generator
from stylegrad.pipelines.grids import label_grid
from stylegrad.pipelines.request import GenerationRequest


def read_prompts(path: str | os.PathLike | None = None) -> list[str]:
    """One prompt per line; blank lines and lines starting with '#' are skipped. None: the shipped set."""
    if path is None:
        text = resources.files("stylegrad").joinpath("data/prompts.txt").read_text(encoding="utf-8")
    else:
        try:
            text = Path(path).read_text(encoding="utf-8")
        except OSError as e:
            raise StylegradError(f"cannot read prompts file {path}: {e.strerror or e}") from e
        except UnicodeDecodeError as e:
            raise StylegradError(f"prompts file {path} is not UTF-8 text (byte {e.start}); save it as UTF-8") from e
    prompts = [line.strip() for line in text.splitlines() if line.strip() and not line.lstrip().startswith("#")]
    if not prompts:
        raise StylegradError(f"no prompts in {path}")
    return prompts


def name_styles(paths: list[str]) -> dict[str, tuple[str, Style]]:
    """Each style file under its style's name, made unique (name, name-2, ...)."""
    styles: dict[str, tuple[str, Style]] = {}
    for path in paths:
        style = load_style(path)
        name, i = style.name, 2
        while name in styles:
            name, i = f"{style.name}-{i}", i + 1
        styles[name] = (path, style)
    return styles


def seeds_from(first: int, n: int) -> list[int]:
    if n < 1:
        raise StylegradError(f"seeds must be >= 1, got {n}")
    return list(range(first, first + n))


def _request_for(base: GenerationRequest, job: Job, styles: dict[str, tuple[str, Style]]) -> GenerationRequest:
    path = styles[job.style][0] if job.steps > 0 else None
    return replace(base, prompt=job.prompt, seed=job.seed, style=path,
                   style_options=replace(base.style_options, steps=job.steps))


def generate_missing(generator: Generator, jobs: list[Job], styles: dict[str, tuple[str, Style]],
                     base: GenerationRequest, out: Path, progress: bool = True, ray: dict | None = None) -> int:
    """Generate the images that do not exist yet, each with its full infotext; returns how many were made.
    ``ray``: run them on Ray instead (``run_items_ray``'s options, with ``spec`` the workers' ``WorkerSpec``)."""
    if ray is not None:
        from stylegrad.jobs.cluster import run_items_ray
        from stylegrad.jobs.storage import Storage
        from stylegrad.jobs.work import WorkItem

        options = dict(ray)
        spec = options.pop("spec")
        items = [WorkItem(_request_for(base, job, styles), job.file, f"prompt {job.prompt_index} {job.style} "
                          f"steps {job.steps} seed {job.seed}") for job in jobs]
        summary = run_items_ray(items, Storage(out), spec, progress=progress, desc="evaluate", **options)
        if summary.failed:
            label, reason = summary.failed[0]
            raise StylegradError(f"{len(summary.failed)} image(s) failed, e.g. {label}: {reason}")
        return summary.done

    def run_job(job: Job) -> None:
        ((image, text),) = generator.images(_request_for(base, job, styles))
        save_png(image, out / job.file, text)

    return run_local(jobs, out, run_job, progress, desc="evaluate")


def score(jobs: list[Job], styles: dict[str, tuple[str, Style]], out: Path, embedder: ClipEmbedder,
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
            "style_similarity": float(style_similarity(e, styles[j.style][1].direction)[0]),
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


def write_csv(rows: list[dict], path: Path) -> None:
    buf = io.StringIO()
    writer = csv.DictWriter(buf, fieldnames=list(rows[0]))
    writer.writeheader()
    writer.writerows(rows)
    atomic_write(path, buf.getvalue().encode())


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


def manifest(base: GenerationRequest, prompts: list[str], styles: dict[str, tuple[str, Style]], steps: list[int],
             seeds: list[int]) -> dict:
    """Everything the images of an evaluation depend on."""
    settings = without_later_defaults(
        {k: v for k, v in base.__dict__.items() if k not in ("prompt", "seed", "style", "style_options")})
    options = without_later_defaults({k: v for k, v in base.style_options.__dict__.items() if k != "steps"},
                                     LATER_STYLE_FIELDS)
    return {"settings": settings, "style_options": options, "prompts": prompts,
            "styles": {n: s.digest for n, (_, s) in styles.items()}, "style_steps": sorted(set(steps)), "seeds": seeds}


def evaluate(generator: Generator, embedder: ClipEmbedder, predictor: AestheticPredictor, prompts: list[str],
             style_files: list[str], steps: list[int], seeds: list[int], base: GenerationRequest, out: str | Path,
             progress: bool = True, ray: dict | None = None) -> dict:
    """Run the whole experiment into ``out`` (resuming what a same-settings run left there); returns the summary.
    ``base`` holds every generation setting but prompt, seed, style and steps."""
    out = Path(out)
    if not style_files:
        raise StylegradError("evaluate needs at least one style")
    if not steps or any(k < 0 for k in steps):
        raise StylegradError(f"style steps must be whole numbers >= 0, got {steps}")
    styles = name_styles(style_files)
    for _, s in styles.values():
        s.check_width(embedder.width)
    predictor.check_width(embedder.width)
    steps = sorted(set(steps))
    check_manifest(out, manifest(base, prompts, styles, steps, seeds))
    jobs = plan(prompts, list(styles), steps, seeds)
    generate_missing(generator, jobs, styles, base, out, progress, ray)
    rows = score(jobs, styles, out, embedder, predictor)
    write_csv(rows, out / "results.csv")
    summary = summarize(rows)
    meta = {
        "stylegrad_version": __version__, "prompts": len(prompts), "seeds": " ".join(map(str, seeds)),
        "styles": ", ".join(f"{n} ({s.digest})" for n, (_, s) in styles.items()),
        "style_steps": " ".join(map(str, steps)), "style_lr": base.style_options.lr, "denoising_steps": base.steps,
        "cfg": base.cfg, "negative": base.negative, "model": base.model, "clip_model": embedder.name,
        "predictor": predictor.name,
    }
    atomic_write(out / "summary.json", json.dumps({"settings": meta, "summary": summary}, indent=2).encode())
    plot(summary, out / "plots" / "metrics.png")
    grids = {}
    for name in styles:
        grids[name] = grid(jobs, name, steps, out)
        buf = io.BytesIO()
        grids[name].save(buf, format="PNG")
        atomic_write(out / "grids" / f"{safe_name(name)}.png", buf.getvalue())
    atomic_write(out / "report.html", report(summary, prompts, grids, out / "plots" / "metrics.png", meta).encode())
    return summary


def run_evaluation(base: GenerationRequest, style_files: list[str], steps: list[int], seeds: list[int],
                   out: str | Path, prompts_file: str | None = None, predictor: str | None = None,
                   device: str | None = None, progress: bool = True, vae: str | None = None,
                   models_dir: str | None = None, ray: dict | None = None, dtype: str | None = None) -> dict:
    """``evaluate`` with everything loaded from names: the prompts, the model (``base.model``), the evaluation
    CLIP (``base.clip_model`` or the family's) and the predictor. ``device`` and ``dtype`` (stylegrad.devices'
    policy): where and in what precision the model, the evaluation CLIP and the predictor run. ``ray``: generate
    on Ray (``run_items_ray``'s options; the workers load the same model, in the same dtype), then score here."""
    from stylegrad.aesthetic.tower import detect_family
    from stylegrad.devices import execution_device, resolve_device, resolve_dtype
    from stylegrad.evaluation.predictors import DEFAULT, load_predictor

    asked_device = device  # the workers' (None: each picks its own GPU)
    device = resolve_device(device)  # bad input fails before anything loads
    resolved = resolve_dtype(dtype, device)
    prompts = read_prompts(prompts_file)
    styles = name_styles(style_files)  # a bad style file or changed settings fail before any model loads
    check_manifest(Path(out), manifest(base, prompts, styles, steps, seeds), write=False)
    pred = load_predictor(predictor or DEFAULT)
    generator = Generator.load(base.model, device, base.clip_model, vae=vae, models_dir=models_dir, dtype=resolved)
    generator.check(replace(base, style=style_files[0]))  # an SDXL model is refused before any image
    clip = base.clip_model or detect_family(generator.pipe.text_encoder).clip_model
    where = execution_device(generator.pipe.unet)
    embedder = ClipEmbedder(clip, where, dtype=resolved)
    pred.to(where, resolved)
    if ray is not None:
        from stylegrad.jobs.work import WorkerSpec

        ray = {**ray, "spec": WorkerSpec(str(generator.model or base.model), asked_device, base.clip_model,
                                         vae, models_dir, dtype=dtype)}
    return evaluate(generator, embedder, pred, prompts, style_files, steps, seeds, base, out, progress, ray)
