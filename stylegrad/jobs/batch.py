"""``stylegrad batch``: a JSONL file of requests into a folder, locally or on Ray, resumable.

The manifest records the model, the device and dtype asked for and, per image file, the request that makes it: a
rerun makes the files that are missing (lines added, or fixed), and refuses a line that now asks something else of
a file already made, or another device or dtype (fp16 and fp32 images differ)."""

from __future__ import annotations

import json
from pathlib import Path

from stylegrad.errors import RequestError, StylegradError
from stylegrad.jobs.batchfile import BadLine, read_jobs
from stylegrad.jobs.manifest import MANIFEST
from stylegrad.jobs.storage import Storage
from stylegrad.jobs.work import Summary, WorkerSpec, WorkItem

SUMMARY = "batch-summary.json"


def check_batch_manifest(storage: Storage, spec: WorkerSpec, items: list[WorkItem]) -> None:
    old_text = storage.read_text(MANIFEST)
    old = {}
    if old_text is not None:
        try:
            old = json.loads(old_text)
        except ValueError as e:
            raise StylegradError(f"cannot read {storage}/{MANIFEST}: {e}") from None
        if old.get("kind") != "batch" or old.get("model") != spec.model:
            raise RequestError("out", f"{storage} holds a run of another kind or model ({old.get('model')}); use "
                               "another {field}")
        made = old.get("precision", precision(spec))  # folders from before it was recorded: not known
        if made != precision(spec):
            raise RequestError("out", f"{storage} holds images made with device {made['device']}, dtype "
                               f"{made['dtype']} (their pixels differ from these settings'); use another {{field}}, "
                               "or the same device and dtype to resume")
    files = dict(old.get("files", {}))
    for item in items:
        if item.file in files and files[item.file] != item.digest and storage.exists(item.file):
            raise RequestError("out", f"{item.label} asks for other settings than {item.file} was made with; use "
                               "another {field}, or delete that file")
        files[item.file] = item.digest
    manifest = {"kind": "batch", "model": spec.model, "precision": precision(spec), "files": files}
    storage.write(MANIFEST, json.dumps(manifest, indent=1).encode())


def precision(spec: WorkerSpec) -> dict[str, str]:
    """The device and dtype the images are made with, as asked (auto: each worker's policy on its machine)."""
    dtype = spec.dtype
    if dtype is not None and not isinstance(dtype, str):  # a torch.dtype from the Python API: named as the CLI does
        from stylegrad.devices import dtype_name

        dtype = dtype_name(dtype)
    return {"device": str(spec.device or "auto"), "dtype": str(dtype or "auto").lower()}


def run_batch(jobs_file: str | Path, out: str, spec: WorkerSpec, *, ray: bool = False, address: str | None = None,
              progress: bool = True, **ray_options) -> tuple[Summary, list[BadLine]]:
    """Read the jobs, check the folder, make what is missing; the summary is also written to ``batch-summary.json``.
    ``ray_options``: ``run_items_ray``'s; ``threads`` also applies to a local run."""
    if not ray:  # a device or dtype this machine cannot run is one line before anything is read or loaded
        from stylegrad.devices import resolve_device, resolve_dtype

        resolve_dtype(spec.dtype, resolve_device(spec.device))
    items, bad = read_jobs(jobs_file, spec.model)
    storage = Storage(out)
    check_batch_manifest(storage, spec, items)
    if not items:
        summary = Summary()
    elif ray:
        from stylegrad.jobs.cluster import run_items_ray

        summary = run_items_ray(items, storage, spec, address=address, progress=progress, **ray_options)
    else:
        import torch

        from stylegrad.jobs.local import run_items_local

        threads = ray_options.get("threads")
        before = torch.get_num_threads()
        if threads:  # CPU results depend on the thread count: equal counts, equal bytes to Ray's workers
            torch.set_num_threads(threads)
        try:
            todo = [item for item in items if not storage.exists(item.file)]
            generator = spec.load() if todo else None
            summary = run_items_local(items, storage, generator, progress)
        finally:
            torch.set_num_threads(before)
    summary.failed = [(f"line {b.line}", b.reason) for b in bad] + summary.failed
    storage.write(SUMMARY, json.dumps(summary.as_dict(), indent=1).encode())
    return summary, bad
