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
        raise StylegradError('--ray needs Ray: pip install "stylegrad[ray]"') from None
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
        gpus = ray.cluster_resources().get("GPU", 0)
        if gpus_per_worker is None:
            gpus_per_worker = 1.0 if gpus else 0.0
        cpus = ray.cluster_resources().get("CPU", 1)
        # one per GPU; on CPU nodes one per --cpus-per-worker CPUs (whole ones: an actor's torch threads need them)
        n = workers or (int(gpus // gpus_per_worker) if gpus_per_worker else max(1, int(cpus // max(1.0, cpus_per_worker))))
        if n < 1:
            raise StylegradError("no worker fits the cluster (check --workers and --gpus-per-worker)")
        threads = threads or max(1, int(cpus_per_worker))
        env = {k: os.environ[k] for k in (KILL_HOOK, "HF_HUB_OFFLINE", "STYLEGRAD_CACHE") if k in os.environ}
        actor_class = ray.remote(num_cpus=cpus_per_worker, num_gpus=gpus_per_worker, max_restarts=0)(BatchWorker)
        if env:
            actor_class = actor_class.options(runtime_env={"env_vars": env})
        next_rank = 0

        def new_actor():
            nonlocal next_rank
            next_rank += 1
            return actor_class.remote(spec, storage, threads, next_rank - 1)

        actors = {i: new_actor() for i in range(n)}
        summary.workers = n
        try:
            ray.get([actor.ready.remote() for actor in actors.values()])  # every model loaded: a bad one fails here
        except RayActorError as e:
            raise StylegradError(f"the workers could not load the model: {one_line(e)[:300]}") from None
        summary.startup = time.perf_counter() - start
        queue = deque(chunks(todo, chunk))
        tries: dict[str, int] = {}
        inflight: dict = {}  # ref -> (actor id, item)
        load = dict.fromkeys(actors, 0)  # items in flight per actor
        replacements = 0
        with tqdm(total=len(todo), desc=desc, unit="img", disable=not progress) as bar:
            while queue or inflight:
                for aid in [a for a, k in load.items() if k == 0]:
                    if not queue:
                        break
                    for item in queue.popleft():
                        inflight[actors[aid].run.remote(item)] = (aid, item)
                        load[aid] += 1
                ready, _ = ray.wait(list(inflight), num_returns=1)
                for ref in ready:
                    aid, item = inflight.pop(ref)
                    load[aid] -= 1
                    try:
                        status, reason, hit = ray.get(ref)
                    except RayActorError as e:
                        if aid in actors:  # its first lost item: replace the worker
                            del actors[aid]
                            if replacements < retries * n:
                                replacements += 1
                                aid_new = max(load) + 1
                                actors[aid_new], load[aid_new] = new_actor(), 0
                        tries[item.file] = tries.get(item.file, 0) + 1
                        if tries[item.file] > retries:
                            summary.failed.append((item.label, f"its worker died {tries[item.file]} times "
                                                               f"({one_line(e)[:80]})"))
                            bar.update(1)
                        else:
                            summary.retried += 1
                            queue.appendleft([item])
                        if aid not in actors and load.get(aid) == 0:
                            del load[aid]
                        continue
                    if aid not in actors and load.get(aid) == 0:
                        del load[aid]
                    if item.request.styled:
                        summary.styled += 1
                        summary.cache_hits += hit
                    if status == "done":
                        summary.done += 1
                    else:
                        summary.failed.append((item.label, reason))
                    bar.update(1)
                if not actors:
                    raise StylegradError("every worker died; see the Ray logs (ray logs cluster)")
        for actor in actors.values():
            ray.kill(actor)
    finally:
        if started:
            ray.shutdown()
    summary.seconds = time.perf_counter() - start
    return summary
