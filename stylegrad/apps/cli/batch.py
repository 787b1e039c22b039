"""``batch``: a JSONL file of generation requests into a folder, on this machine or on a Ray cluster."""

from __future__ import annotations

import sys

from stylegrad.apps.cli.args import add_device, add_model_options


def add_ray_options(p) -> None:
    g = p.add_argument_group("Ray (pip install \"stylegrad[ray]\")")
    g.add_argument("--ray", nargs="?", const="", default=None, metavar="ADDRESS",
                   help="run on Ray: the cluster at ADDRESS (auto, ray://HOST:10001), else $RAY_ADDRESS, else a "
                   "local Ray started for this run")
    g.add_argument("--workers", type=int, metavar="N", help="actors, each holding the model (default: one per GPU "
                   "in the cluster, else one per --cpus-per-worker CPUs, at least one per whole CPU)")
    g.add_argument("--cpus-per-worker", type=float, default=0.5, metavar="F", help="CPUs Ray reserves per actor "
                   "(default 0.5: fractional, so small nodes never deadlock)")
    g.add_argument("--gpus-per-worker", type=float, metavar="F", help="GPUs per actor (default 1 where the "
                   "cluster has GPUs)")
    g.add_argument("--threads", type=int, metavar="N", help="torch threads per actor, and of a local run (default: "
                   "an actor's whole CPUs, at least 1; locally torch's). On CPUs the pixels depend on it: the same "
                   "count gives the same bytes")
    g.add_argument("--retries", type=int, default=2, metavar="N", help="times a job is given to another worker "
                   "after its worker died (default 2)")


def ray_options(a) -> dict:
    return {"workers": a.workers, "cpus_per_worker": a.cpus_per_worker, "gpus_per_worker": a.gpus_per_worker,
            "threads": a.threads, "retries": a.retries}


def cmd_batch(a) -> int:
    from stylegrad.jobs.batch import run_batch
    from stylegrad.jobs.work import WorkerSpec
    from stylegrad.pipelines.loading import DEFAULT_MODEL

    if a.workers is not None and a.workers < 1:
        a.parser.error("--workers must be >= 1")
    if a.cpus_per_worker <= 0:
        a.parser.error("--cpus-per-worker must be > 0")
    spec = WorkerSpec(a.model or DEFAULT_MODEL, a.device, a.clip_model, a.vae, a.models_dir,
                      tuple(a.embeddings) or None, tuple(a.loras) or None, a.dtype)
    summary, _ = run_batch(a.jobs, a.out, spec, ray=a.ray is not None, address=a.ray or None,
                           **(ray_options(a) if a.ray is not None else {"threads": a.threads}))
    for line in summary.lines():
        print(line, file=sys.stderr if line.startswith("failed") else sys.stdout)
    return 1 if summary.failed else 0


def register(sub) -> None:
    sub.add_parser("batch", help="many images from a JSONL file of requests, locally or on a Ray cluster",
                   description="One generation request per line of JOBS (a JSON object with the fields of "
                   "stylegrad generate: prompt, negative, seed, n, steps, cfg, width, height, sampler, clip_skip, "
                   "style, style_options, loras, embeddings, stylecode, init_image, strength, name). Images go to "
                   "OUT/images/L00003-seed7.png (line 3) with their infotext. Rerunning the same command makes "
                   "only what is missing; a bad line is reported and the others still run.",
                   epilog='Example line: {"prompt": "a lighthouse at dusk", "seed": 1, "n": 4, '
                   '"style": "mine.safetensors", "style_options": {"steps": 10}}', arguments=_arguments)


def _arguments(p) -> None:
    from stylegrad.pipelines.loading import DEFAULT_MODEL

    p.add_argument("jobs", metavar="JOBS.jsonl", help="one JSON request per line ('#' lines are comments)")
    p.add_argument("--out", required=True, metavar="DIR_OR_URL", help="output folder, or an fsspec URL (s3://...) "
                   "every worker can reach")
    add_model_options(p, DEFAULT_MODEL)
    p.add_argument("--clip-model", metavar="ID_OR_PATH", help="CLIP for the style space (default: the family's)")
    p.add_argument("--embeddings", action="append", default=[], metavar="DIR", help="textual-inversion folder")
    p.add_argument("--loras", action="append", default=[], metavar="DIR", help="LoRA folder for <lora:NAME> tags")
    add_device(p, dtype=True)
    add_ray_options(p)
    p.set_defaults(func=cmd_batch, parser=p)
