"""stylegrad's compiled few-row kernels vs torch's, on the 72 large weights of the SD1.x text encoder.

Per tuning step, at 17 token rows (a 15-word prompt): the forward products, the input-gradient products, and an
Adam step followed by the next forward product (fused on the kernels, with their moments: packed on AVX-512; on
torch: gradient product into a reused buffer, torch's fused Adam on float32 moments, torch's product); then the
same step at step 10 with rebuilt moments (every step's gradient formed again from its factors; on torch into
reused buffers, as tuning does there). Random weights: the speed does not depend on the values. Timings are
medians over rounds in which the two sides take turns; each prints GFLOP/s and the ratio to torch's. Where the
CPU has AVX-512 the kernels run on both instruction sets (AVX-512 packs the kept moments in 6 bytes a weight,
AVX2 keeps them as float32): the gain of each, and the time the packing costs.

(torch's path used two shortcuts into private ops until 2026-12-07, oneDNN's linear and the fused Adam kernel
called directly; measured here at 0.92x and 1.01x, they were dropped.) Then the huge pages tuning asks for
(aesthetic/pages.py): fresh memory the size of four bigG weights written and read twice, with and without.

    python bench/products.py            # a table, then one JSON line
"""

from __future__ import annotations

import json
import os
import statistics
import sys
import time

import torch

sys.path.insert(0, os.path.join(os.path.dirname(__file__), ".."))
from stylegrad.aesthetic import products  # noqa: E402
from stylegrad.aesthetic.adam import AdamSettings, adam_step  # noqa: E402
from stylegrad.aesthetic.pages import advise_huge  # noqa: E402

ROWS, ROUNDS, LR, REBUILT_STEP = 17, 7, 1e-4, 10
ADAM = AdamSettings(lr=LR)
SHAPES = [(768, 768)] * 4 + [(3072, 768), (768, 3072)]  # q, k, v, out, fc1, fc2 of one layer


def matrices() -> list[dict]:
    torch.manual_seed(0)
    out = []
    for _ in range(12):
        for o, k in SHAPES:
            w = torch.randn(o, k) * 0.02
            out.append(dict(w=w, m=torch.zeros_like(w), v=torch.zeros_like(w), b=torch.randn(o),
                            kept=tuple(t.zero_() for t in products.empty_moments(w)),
                            x=torch.randn(ROWS, k), g=torch.randn(ROWS, o), step=torch.ones(()),
                            history=[(torch.randn(ROWS, o), torch.randn(ROWS, k)) for _ in range(REBUILT_STEP)]))
    return out


def main() -> None:
    kernels = products._KERNELS
    if kernels is None:
        sys.exit("stylegrad's compiled kernels are not built or not usable here (setup.py)")
    summary, default = {}, kernels.isa()
    for isa in ("avx512", "avx2"):
        try:
            kernels.use(isa)
        except ValueError:
            continue  # this CPU has no AVX-512
        summary[isa] = kernel_gains(isa)
    kernels.use(default)
    if len(summary) == 2:  # the price of AVX-512's packed moments, and what the wider vectors give back
        print(f"one kept step on AVX-512 (moments packed in 6 bytes) vs AVX2 (float32, 8 bytes): "
              f"{summary['avx2']['kept_step_ms'] / summary['avx512']['kept_step_ms']:.2f}x")
    summary["huge_pages_speedup"] = huge_pages()
    print(json.dumps(summary))


def kernel_gains(isa: str) -> dict:
    """Each kind of per-step work on the kernels (on ``isa``) against torch's path: prints the table, returns the
    ratios."""
    mats = matrices()  # the kept moments in this instruction set's layout
    scratch: dict = {}

    def forward(on):
        for d in mats:
            products.linear(d["x"], d["w"], d["b"])

    def input_grad(on):
        for d in mats:
            products.input_grad(d["g"], d["w"])

    def adam_then_forward(on):
        for d in mats:
            if on:
                products.fused_adam_linear(d["w"], d["w"], *d["kept"], d["g"], d["x"], d["x"], d["b"],
                                           first=False, keep=True, step=2, adam=ADAM)
            else:
                buf = scratch.setdefault(d["w"].shape, torch.empty_like(d["w"]))
                torch.mm(d["g"].T, d["x"], out=buf)
                adam_step(d["w"], buf, d["m"], d["v"], d["step"], ADAM)  # torch's fused Adam, as tuning calls it
                products.linear(d["x"], d["w"], d["b"])

    def rebuilt_then_forward(on):
        for d in mats:
            g, xp = d["history"][-1]
            if on:
                products.fused_adam_linear(d["w"], d["w"], None, None, g, xp, d["x"], d["b"], first=True, keep=False,
                                           step=REBUILT_STEP, adam=ADAM, history=d["history"])
            else:  # the moments into reused buffers from the earlier steps' factors, then this step
                buf, m, v = (scratch.setdefault((role, d["w"].shape), torch.empty_like(d["w"])) for role in "gmv")
                m.zero_(), v.zero_()
                for gs, xs in d["history"][:-1]:
                    torch.mm(gs.T, xs, out=buf)
                    m.mul_(ADAM.beta1).add_(buf, alpha=1 - ADAM.beta1)
                    v.mul_(ADAM.beta2).addcmul_(buf, buf, value=1 - ADAM.beta2)
                torch.mm(g.T, xp, out=buf)
                adam_step(d["w"], buf, m, v, torch.full((), REBUILT_STEP - 1.0), ADAM)
                products.linear(d["x"], d["w"], d["b"])

    params = sum(d["w"].numel() for d in mats)
    cases = {"forward": (forward, 2 * ROWS * params), "input gradient": (input_grad, 2 * ROWS * params),
             "Adam + next forward": (adam_then_forward, 4 * ROWS * params),
             f"rebuilt Adam, step {REBUILT_STEP}": (rebuilt_then_forward, 2 * ROWS * params * (REBUILT_STEP + 1))}
    times = {(name, on): [] for name in cases for on in (True, False)}
    for i in range(ROUNDS):
        for name, (fn, _) in cases.items():
            for on in ((True, False) if i % 2 == 0 else (False, True)):
                with products.kernels_enabled(on):
                    t0 = time.perf_counter()
                    fn(on)
                    times[name, on].append(time.perf_counter() - t0)

    print(f"SD1.x text encoder, 72 large weights ({params / 1e6:.0f} M parameters), {ROWS} rows, "
          f"{torch.get_num_threads()} threads, medians of {ROUNDS} interleaved rounds; kernels on {isa}")
    print(f"{'per step':26}{'kernels ms':>12}{'GFLOP/s':>9}{'torch ms':>10}{'GFLOP/s':>9}{'ratio':>8}")
    summary = {}
    for name, (_, flop) in cases.items():
        ours, theirs = statistics.median(times[name, True]), statistics.median(times[name, False])
        print(f"{name:26}{ours * 1e3:>12.1f}{flop / ours / 1e9:>9.0f}{theirs * 1e3:>10.1f}{flop / theirs / 1e9:>9.0f}"
              f"{theirs / ours:>7.2f}x")
        summary[name.replace(" + ", "_").replace(",", "").replace(" ", "_") + "_speedup"] = round(theirs / ours, 2)
    step = [n for n in cases if not n.startswith("rebuilt")]  # one tuning step with kept moments
    total = sum(statistics.median(times[n, False]) for n in step) / sum(statistics.median(times[n, True])
                                                                          for n in step)
    summary["step_speedup"] = round(total, 2)
    summary["kept_step_ms"] = round(1e3 * sum(statistics.median(times[n, True]) for n in step), 1)
    return summary


def huge_pages() -> float:
    """Seconds to fill fresh memory the size of four of bigG's 5120 x 1280 weights and stream it twice, in 4 KB
    pages over in 2 MB ones (the ratio). Four: more than glibc's largest mmap threshold (32 MB), so each round
    gets fresh pages from the kernel, as a prompt's tuned copies do without the workspace (workspace.py)."""
    shape, rounds = (4 * 5120, 1280), 2 * ROUNDS
    times: dict[bool, list[float]] = {True: [], False: []}
    for i in range(rounds):
        for advised in ((True, False) if i % 2 == 0 else (False, True)):
            t0 = time.perf_counter()
            t = torch.empty(shape)
            if advised:
                advise_huge(t)
            t.fill_(1.0)  # the first touch: page faults
            for _ in range(2):
                t.mul_(0.5)  # passes over it: TLB misses
            del t
            times[advised].append(time.perf_counter() - t0)
    plain, huge = statistics.median(times[False]), statistics.median(times[True])
    print(f"fresh {shape[0]}x{shape[1]} floats, fill + 2 passes: 4 KB pages {plain * 1e3:.1f} ms, "
          f"huge pages {huge * 1e3:.1f} ms ({plain / huge:.2f}x)")
    return round(plain / huge, 2)


if __name__ == "__main__":
    main()
