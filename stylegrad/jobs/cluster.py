"""The same work items on a Ray cluster: one actor per GPU (or per ``cpus_per_worker`` on CPU nodes) loads the
pipeline once and takes items; items that share a personalization go to one actor together, so its encoder's cache
pays; each actor writes its images itself, atomically, to storage every node reaches.

Nothing lost, nothing twice: an item is done when its file exists. If an actor dies, the items it held are given
to the others (and a replacement actor is started); an item whose workers keep dying fails after ``retries``
tries, with that reason. A job that raises is reported, not retried: it would fail the same way again. A killed
driver leaves files that exist or do not; rerunning the command does what is missing."""

from __future__ import annotations

import os
import time
from collections import deque

from tqdm.auto import tqdm

from stylegrad.errors import StylegradError
from stylegrad.jobs.local import grouped
from stylegrad.jobs.storage import Storage
from stylegrad.jobs.work import Summary, WorkerSpec, WorkItem, one_line, render

KILL_HOOK = "STYLEGRAD_TEST_KILL_WORKER_AFTER"  # tests: worker 0 exits after this many images, once
# the driver's settings that workers read from their environment
FORWARDED = (KILL_HOOK, "HF_HUB_OFFLINE", "STYLEGRAD_CACHE", "STYLEGRAD_TUNING_MEMORY", "STYLEGRAD_KERNELS",
             "STYLEGRAD_KERNELS_ISA", "STYLEGRAD_REUSE_MEMORY")  # the engine's defaults (aesthetic/engine.py)


class BatchWorker:
    """A Ray actor: one loaded pipeline, items run one at a time."""

    def __init__(self, spec: WorkerSpec, storage: Storage, threads: int | None, rank: int):
        import torch

        if threads:
            torch.set_num_threads(threads)
        self.generator = spec.load()
        self.storage, self.rank, self.made = storage, rank, 0
        self.seen: set[tuple] = set()
        self.kill_after = int(os.environ.get(KILL_HOOK, "0") or 0) if rank == 0 else 0

    def ready(self) -> bool:
        return True

    def run(self, item: WorkItem) -> tuple[str, str | None, bool]:
        """(status 'done' or 'failed', the reason, whether this worker had tuned this personalization before)."""
        hit = item.group in self.seen
        if self.storage.exists(item.file):  # done by a worker that died before it could say so
            return "done", None, hit
        try:
            data = render(self.generator, item)
        except Exception as e:  # noqa: BLE001 - the driver reports it; the worker goes on
            return "failed", one_line(e), hit
        self.storage.write(item.file, data)
        self.seen.add(item.group)
        self.made += 1
        if self.kill_after and self.made >= self.kill_after:
            os._exit(1)  # the test hook: die mid-run, as a lost node would
        return "done", None, hit


def _ray():
    try:
        import ray
    except ImportError:
        raise StylegradError('running on Ray needs Ray: pip install "stylegrad[ray]"') from None
    return ray


def connect(address: str | None) -> bool:
    """Join the cluster at ``address`` ('auto', 'ray://HOST:10001', an IP:port), else $RAY_ADDRESS, else start a
    local Ray on this machine. Returns whether this call started it (and so should stop it)."""
    ray = _ray()
    if ray.is_initialized():
        return False
    address = address or os.environ.get("RAY_ADDRESS") or None
    try:
        if address is None:
            ray.init(include_dashboard=False, log_to_driver=False, configure_logging=False)
        else:
            ray.init(address=address, log_to_driver=False, configure_logging=False)
    except (ConnectionError, RuntimeError, ValueError) as e:
        raise StylegradError(f"cannot reach the Ray cluster at {address or 'a new local Ray'}: {one_line(e)}") from None
    return True


def chunks(items: list[WorkItem], size: int) -> list[list[WorkItem]]:
    """Runs of at most ``size`` items of one personalization each: one actor takes a whole run."""
    out, current = [], []
    for item in grouped(items):
        if current and (item.group != current[0].group or len(current) == size):
            out.append(current)
            current = []
        current.append(item)
    return out + ([current] if current else [])


def _worker_count(ray, workers: int | None, cpus_per_worker: float, gpus_per_worker: float) -> int:
    """One per GPU; on CPU nodes one per ``cpus_per_worker`` CPUs (whole ones: an actor's torch threads need them)."""
    resources = ray.cluster_resources()
    if workers:
        return workers
    if gpus_per_worker:
        return int(resources.get("GPU", 0) // gpus_per_worker)
    return max(1, int(resources.get("CPU", 1) // max(1.0, cpus_per_worker)))


class _Pool:
    """The actors, how many items each holds, and their replacements when one dies (at most ``budget``)."""

    def __init__(self, actor_class, spec: WorkerSpec, storage: Storage, threads: int, n: int, budget: int):
        self.actor_class, self.spec, self.storage, self.threads = actor_class, spec, storage, threads
        self.ranks = 0
        self.actors = {i: self._new() for i in range(n)}
        self.load = dict.fromkeys(self.actors, 0)  # items in flight per actor (a dead one stays until drained)
        self.budget = budget

    def _new(self):
        self.ranks += 1
        return self.actor_class.remote(self.spec, self.storage, self.threads, self.ranks - 1)

    def idle(self) -> list[int]:
        return [a for a, k in self.load.items() if k == 0 and a in self.actors]

    def submit(self, aid: int, item: WorkItem):
        self.load[aid] += 1
        return self.actors[aid].run.remote(item)

    def returned(self, aid: int) -> None:
        self.load[aid] -= 1
        if aid not in self.actors and self.load[aid] == 0:
            del self.load[aid]

    def lost(self, aid: int) -> None:
        """The actor died: forget it (its other items come back failed too) and start another, within budget."""
        if aid not in self.actors:
            return
        del self.actors[aid]
        if self.budget > 0:
            self.budget -= 1
            new = max(self.load) + 1
            self.actors[new], self.load[new] = self._new(), 0

    def kill(self, ray) -> None:
        for actor in self.actors.values():
            ray.kill(actor)


def run_items_ray(items: list[WorkItem], storage: Storage, spec: WorkerSpec, *, address: str | None = None,
                  workers: int | None = None, cpus_per_worker: float = 0.5, gpus_per_worker: float | None = None,
                  threads: int | None = None, retries: int = 2, chunk: int = 8, progress: bool = True,
                  desc: str = "images") -> Summary:
    """Every item whose file is missing, on Ray actors. ``workers``: default one per GPU in the cluster, else one
    per ``cpus_per_worker`` (at least 1) of the cluster's CPUs.
    ``cpus_per_worker``: fractional by default, since whole-CPU actors can deadlock a small node."""
    ray = _ray()
    from ray.exceptions import RayActorError

    storage.clean_partial()
    start = time.perf_counter()
    todo = [item for item in items if not storage.exists(item.file)]
    summary = Summary(already=len(items) - len(todo))
    if not todo:
        return summary
    started = connect(address)
    try:
        if gpus_per_worker is None:
            gpus_per_worker = 1.0 if ray.cluster_resources().get("GPU", 0) else 0.0
        n = _worker_count(ray, workers, cpus_per_worker, gpus_per_worker)
        if n < 1:
            raise StylegradError("no worker fits the cluster (check workers and gpus_per_worker)")
        env = {k: os.environ[k] for k in FORWARDED if k in os.environ}
        actor_class = ray.remote(num_cpus=cpus_per_worker, num_gpus=gpus_per_worker, max_restarts=0)(BatchWorker)
        if env:
            actor_class = actor_class.options(runtime_env={"env_vars": env})
        pool = _Pool(actor_class, spec, storage, threads or max(1, int(cpus_per_worker)), n, retries * n)
        summary.workers = n
        try:
            ray.get([actor.ready.remote() for actor in pool.actors.values()])  # a model that cannot load fails here
        except RayActorError as e:
            raise StylegradError(f"the workers could not load the model: {one_line(e)[:300]}") from None
        summary.startup = time.perf_counter() - start
        queue, tries, inflight = deque(chunks(todo, chunk)), {}, {}  # inflight: ref -> (actor id, item)
        with tqdm(total=len(todo), desc=desc, unit="img", disable=not progress) as bar:
            while queue or inflight:
                for aid in pool.idle():
                    if not queue:
                        break
                    for item in queue.popleft():
                        inflight[pool.submit(aid, item)] = (aid, item)
                for ref in ray.wait(list(inflight), num_returns=1)[0]:
                    aid, item = inflight.pop(ref)
                    try:
                        status, reason, hit = ray.get(ref)
                    except RayActorError as e:
                        pool.lost(aid)
                        tries[item.file] = tries.get(item.file, 0) + 1
                        if tries[item.file] > retries:
                            summary.failed.append((item.label, f"its worker died {tries[item.file]} times "
                                                               f"({one_line(e)[:80]})"))
                            bar.update(1)
                        else:
                            summary.retried += 1
                            queue.appendleft([item])
                    else:
                        summary.styled += item.request.styled
                        summary.cache_hits += hit and item.request.styled
                        if status == "done":
                            summary.done += 1
                        else:
                            summary.failed.append((item.label, reason))
                        bar.update(1)
                    pool.returned(aid)
                if not pool.actors:
                    raise StylegradError("every worker died; see the Ray logs (ray logs cluster)")
        pool.kill(ray)
    finally:
        if started:
            ray.shutdown()
    summary.seconds = time.perf_counter() - start
    return summary
