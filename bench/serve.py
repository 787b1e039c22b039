"""``stylegrad serve`` under load: the server with the small world's model on 127.0.0.1 (its own process), 8
concurrent clients sending 200 txt2img requests in all (A1111's API, each with its own seed; every 4th styled with
the aesthetic fields), bounded in count and time.

Prints one request's time alone (the reference), then p50/p95 latency, throughput, errors, the server's memory
after the first request and at the end; targets: 0 failed or lost requests, memory at the end within 10% of after
the first request, p95 <= 8 x one request alone. Runs the server twice: --batch 1 (the default: every image the
same pixels as `generate`; one model, first come first served, so with 8 clients each request waits for the 7
ahead of it and p95 is at least 8 x the time of one request under load) and --batch 4 (waiting requests with the
same settings run as one batch; images equal up to float rounding). Last line JSON.

    python bench/serve.py [--requests 200] [--clients 8] [--batch 4]
"""

from __future__ import annotations

import argparse
import json
import os
import socket
import statistics
import subprocess
import sys
import tempfile
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import httpx

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
from stylegrad.world.demo import HERE as WORLD  # noqa: E402

SIDE, STEPS = 64, 8


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def rss_mb(pid: int) -> float:
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith("VmRSS:"):
            return int(line.split()[1]) / 1024
    return float("nan")


def body(i: int) -> dict:
    b = {"prompt": "a red triangle on a white background", "seed": i, "steps": STEPS, "width": SIDE, "height": SIDE,
         "sampler_name": "Euler a", "cfg_scale": 5.0}
    if i % 4 == 3:
        b["alwayson_scripts"] = {"Aesthetic embeddings": {"args": [1.0, 5, 0.001, False, "striped"]}}
    return b


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--requests", type=int, default=200)
    parser.add_argument("--clients", type=int, default=8)
    parser.add_argument("--batch", default="1,4", help="the server's --batch values to run, one server each "
                        "(default 1,4: exact pixels, then batches of 4)")
    parser.add_argument("--timeout", type=float, default=1800, help="seconds for the whole load (default 1800)")
    args = parser.parse_args()
    summaries = {}
    for batch in (int(b) for b in args.batch.split(",")):
        summaries[f"batch_{batch}"] = run_one(args, batch)
    print(json.dumps(summaries))


def run_one(args, batch: int) -> dict:
    weights = WORLD / "weights"
    with tempfile.TemporaryDirectory() as tmp:
        styles = Path(tmp) / "styles"
        styles.mkdir()
        subprocess.run([sys.executable, "-m", "stylegrad", "embed", str(WORLD / "examples"), "-o",
                        str(styles / "striped.safetensors"), "--clip-model", str(weights / "clip")],
                       check=True, capture_output=True)
        port = free_port()
        server = subprocess.Popen(
            [sys.executable, "-m", "stylegrad", "serve", "--model", str(weights / "sd"), "--clip-model",
             str(weights / "clip"), "--styles", str(styles), "--port", str(port), "--no-ui",
             "--queue", str(args.clients * 2), "--batch", str(batch)],
            stderr=subprocess.DEVNULL, env={**os.environ, "HF_HUB_OFFLINE": "1"})
        base = f"http://127.0.0.1:{port}"
        try:
            with httpx.Client(base_url=base, timeout=600) as client:
                deadline = time.monotonic() + 120
                while True:
                    try:
                        if client.get("/healthz").status_code == 200:
                            break
                    except httpx.TransportError:
                        pass
                    if time.monotonic() > deadline or server.poll() is not None:
                        sys.exit("the server did not start")
                    time.sleep(0.5)
                client.post("/sdapi/v1/txt2img", json=body(10_000)).raise_for_status()  # warm-up
                client.post("/sdapi/v1/txt2img", json=body(10_003)).raise_for_status()  # warm-up, styled
                mem_first = rss_mb(server.pid)
                alone = []
                for i in (20_000, 20_001, 20_002, 20_003):  # one request alone, plain and styled as in the mix
                    t = time.perf_counter()
                    client.post("/sdapi/v1/txt2img", json=body(i)).raise_for_status()
                    alone.append(time.perf_counter() - t)
                single = statistics.mean(alone)

            def one(i: int):
                t = time.perf_counter()
                try:
                    with httpx.Client(base_url=base, timeout=args.timeout) as c:
                        r = c.post("/sdapi/v1/txt2img", json=body(i))
                    ok = r.status_code == 200 and len(r.json()["images"]) == 1
                    return time.perf_counter() - t, ok, None if ok else f"{r.status_code} {r.text[:100]}"
                except Exception as e:  # noqa: BLE001 - counted as a failure
                    return time.perf_counter() - t, False, repr(e)[:100]

            start = time.perf_counter()
            with ThreadPoolExecutor(args.clients) as pool:
                results = list(pool.map(one, range(args.requests), timeout=args.timeout))
            wall = time.perf_counter() - start
            mem_end = rss_mb(server.pid)
        finally:
            server.terminate()
            server.wait(30)
    latencies = sorted(t for t, _, _ in results)
    failed = [why for _, ok, why in results if not ok]
    p50 = statistics.median(latencies)
    p95 = latencies[max(0, int(round(0.95 * len(latencies))) - 1)]
    summary = {
        "requests": args.requests, "clients": args.clients, "batch": batch, "failed": len(failed),
        "lost": args.requests - len(results),
        "single_s": round(single, 3), "p50_s": round(p50, 3), "p95_s": round(p95, 3),
        "p95_over_single": round(p95 / single, 2), "throughput_rps": round(args.requests / wall, 2),
        "mem_after_first_mb": round(mem_first, 1), "mem_end_mb": round(mem_end, 1),
        "mem_growth": round(mem_end / mem_first - 1, 4),
    }
    print(f"small world model, {SIDE}x{SIDE}, {STEPS} steps, every 4th request styled (5 Adam steps); "
          f"{args.clients} clients, {args.requests} requests, server --batch {batch}")
    print(f"one request alone {single:.3f} s; under load p50 {p50:.3f} s, p95 {p95:.3f} s ({p95 / single:.1f}x alone; "
          f"target <= 8), {summary['throughput_rps']} requests/s")
    print(f"failed {len(failed)}, lost {summary['lost']} (target 0); server memory {mem_first:.0f} MB after the "
          f"first request, {mem_end:.0f} MB at the end ({100 * summary['mem_growth']:+.1f}%; target within 10%)")
    for why in failed[:5]:
        print("  failure:", why)
    return summary


if __name__ == "__main__":
    main()
