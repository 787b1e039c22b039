"""``stylegrad batch`` locally and on Ray, one run: 64 jobs on the small world's model (64x64, 8 steps; 16 prompts x
4 seeds, every other prompt styled at 5 tuning steps, so 32 styled images in 8 personalizations).

1. local: one process, one loaded model, torch on both cores (the reference);
2. Ray, 2 workers (fractional CPUs, 1 torch thread each): the throughput ratio against 1.;
3. Ray, 1 worker with both cores' threads: its time, less the worker's start and model load and less 1.'s time
   for the jobs alone, per job, is what Ray adds to each job (task dispatch, results over the object store).
Ray's own start (ray.init) is measured apart. The cache hit rate is the share of styled images whose tuning a
worker already had (grouping sends a personalization's seeds to one worker; 24 of 32 is the most possible).
Last line JSON.

    python bench/batch.py [--jobs 64]
"""

from __future__ import annotations

import argparse
import json
import sys
import tempfile
import time
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
from stylegrad.world.demo import HERE as WORLD  # noqa: E402

PROMPTS = ["a red circle", "a blue square", "a yellow triangle", "a green cross"]
COLORS = ["", " on white", " in the middle", " small"]


def items_for(n: int, style: str):
    from stylegrad.aesthetic.options import StyleOptions
    from stylegrad.jobs.work import WorkItem
    from stylegrad.pipelines.request import GenerationRequest

    out = []
    for p in range(n // 4):
        prompt = PROMPTS[p % 4] + COLORS[(p // 4) % 4]
        styled = p % 2 == 1
        base = GenerationRequest(prompt=prompt, steps=8, width=64, height=64, cfg=5.0, model=str(WORLD / "weights/sd"),
                                 style=style if styled else None, style_options=StyleOptions(steps=5, lr=1e-3),
                                 clip_model=str(WORLD / "weights/clip"))
        out += [WorkItem(base.with_seed(s), f"images/p{p:03d}-seed{s}.png", f"p{p} seed {s}") for s in range(4)]
    return out


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--jobs", type=int, default=64)
    a = ap.parse_args()
    import ray

    from stylegrad import embed_images, save_style
    from stylegrad.jobs.cluster import run_items_ray
    from stylegrad.jobs.local import run_items_local
    from stylegrad.jobs.storage import Storage
    from stylegrad.jobs.work import WorkerSpec

    tmp = Path(tempfile.mkdtemp(prefix="stylegrad-bench-batch-"))
    style = str(tmp / "striped.safetensors")
    save_style(embed_images([WORLD / "examples"], str(WORLD / "weights/clip"), progress=False), style)
    items = items_for(a.jobs, style)
    spec = WorkerSpec(str(WORLD / "weights/sd"), "cpu", str(WORLD / "weights/clip"))

    torch.set_num_threads(2)
    t = time.perf_counter()
    generator = spec.load()
    t_load = time.perf_counter() - t
    local = run_items_local(items, Storage(tmp / "local"), generator, progress=False)
    t_local = time.perf_counter() - t
    jobs_local = t_local - t_load
    print(f"local, 1 process, 2 threads: {len(items)} jobs in {t_local:.1f} s ({len(items) / t_local:.2f} jobs/s; "
          f"model load {t_load:.1f} s), cache hits {local.cache_hits}/{local.styled}")

    t = time.perf_counter()
    ray.init(num_cpus=2, include_dashboard=False, log_to_driver=False, configure_logging=False)
    t_init = time.perf_counter() - t
    print(f"ray.init: {t_init:.1f} s")
    t = time.perf_counter()
    two = run_items_ray(items, Storage(tmp / "ray2"), spec, workers=2, cpus_per_worker=0.5, threads=1,
                        progress=False)
    t_two = time.perf_counter() - t
    print(f"Ray, 2 workers x 1 thread: {t_two:.1f} s ({len(items) / t_two:.2f} jobs/s), cache hits "
          f"{two.cache_hits}/{two.styled}, retried {two.retried}, failed {len(two.failed)}")
    t = time.perf_counter()
    one = run_items_ray(items, Storage(tmp / "ray1"), spec, workers=1, cpus_per_worker=0.5, threads=2,
                        progress=False)
    t_one = time.perf_counter() - t
    ray.shutdown()
    overhead = (t_one - one.startup - jobs_local) / len(items)
    same = all((tmp / "ray1" / i.file).read_bytes() == (tmp / "local" / i.file).read_bytes() for i in items)
    print(f"Ray, 1 worker x 2 threads: {t_one:.1f} s (worker start and model load {one.startup:.1f} s); overhead Ray "
          f"adds per job {overhead * 1000:.0f} ms "
          f"(its images {'equal' if same else 'NOT equal'} to local's, byte for byte)")
    ratio = t_local / t_two
    print(f"throughput, Ray 2 workers / local: {ratio:.2f}x")
    print(json.dumps({"jobs": len(items), "local_s": round(t_local, 2), "ray_init_s": round(t_init, 2),
                      "ray_2_workers_s": round(t_two, 2), "ray_1_worker_s": round(t_one, 2),
                      "ray_worker_startup_s": round(one.startup, 2), "local_model_load_s": round(t_load, 2),
                      "throughput_ratio": round(ratio, 3), "ray_overhead_per_job_ms": round(overhead * 1000, 1),
                      "cache_hit_rate": round(two.cache_hits / max(1, two.styled), 3),
                      "cache_hit_rate_max": round((two.styled - two.styled // 4) / max(1, two.styled), 3),
                      "failed": len(two.failed) + len(one.failed), "ray_1_worker_bytes_equal_local": same}))


if __name__ == "__main__":
    main()
