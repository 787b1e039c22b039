"""Aesthetic-gradient personalization: the method vs stylegrad's engine, on the real SD1.x (or SDXL) text-encoder size.

The reference is the method itself (stylegrad/aesthetic/method.py, ``tune_text_encoder``), given the whole CLIP
model to copy as the paper's code does; its difference to stylegrad is checked against the contract's full-size
tolerance (contract.FULL_SIZE_ATOL, docs/exactness.md).

Builds CLIP ViT-L/14 (text tower 12x768 with projection, vision tower 24x1024) with random weights (speed does
not depend on the values), a typical 15-token prompt, T = 10 Adam steps, lr 1e-4. Each side runs in its own
process so its peak memory is its own; both build the same weights from the same seed. Every timed run is a fresh
process (load, warm up, run once), and the sides take turns, alternating which goes first, so the shared VM's speed
drift, which reaches 30% within an hour, falls on both alike instead of on whichever ran second. One side never
runs while the other is loaded: measured, a merely idle process holding the reference's memory slowed stylegrad by
25% on this VM.

With ``--family sdxl``: SDXL's two text towers (CLIP-L 12x768 without its projection, which comes from the CLIP
ViT-L/14 text model as for SD1.x; OpenCLIP bigG 32x1280 with its projection; random weights), both tuned towards
their own style vectors. The reference copies both towers fresh and runs torch.optim.Adam over each text
transformer, then computes what ``encode_prompt`` would from the tuned towers (penultimate states of both,
concatenated; bigG's pooled text embedding). Both outputs are compared. The SD1.x figures are measured in the same
run, before the SDXL ones.

stylegrad runs in both memory modes: "stylegrad" keeps Adam's moments (STYLEGRAD_TUNING_MEMORY=fast),
"stylegrad-low" rebuilds them from every step's gradient factors (=low): the same bits, only the tuned copies,
more arithmetic. The timed prompt is a process's second (after the warm-up), so it finds the memory the first one
tuned in (aesthetic/workspace.py), as every prompt after the first of a batch or a server does;
"stylegrad-fresh" (fast, STYLEGRAD_REUSE_MEMORY=0) maps fresh memory instead, as a process's first prompt does.

For SD1.x it also prints the gain of each of the engine's optimisations, each turned off alone against
"stylegrad": "stylegrad-torch" (STYLEGRAD_KERNELS=0: torch's products and Adam instead of the compiled kernels),
"stylegrad-avx2" (where the CPU has AVX-512: the AVX2 kernels, whose moments are float32 instead of packed in 6
bytes), "stylegrad-4k" (no huge pages asked for), besides kept vs rebuilt moments ("stylegrad-low") and memory
kept between prompts ("stylegrad-fresh").

    python bench/personalize.py                 # prints a table, then one JSON line
    python bench/personalize.py --family sdxl   # SD1.x, then SDXL (about 40 minutes on 2 cores)
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import torch
from transformers import CLIPConfig, CLIPModel, CLIPTextModel, CLIPTextModelWithProjection

sys.path.insert(0, os.path.join(os.path.dirname(__file__), ".."))
from stylegrad.aesthetic.contract import FULL_SIZE_ATOL  # noqa: E402

EOS, BOS, VOCAB = 49407, 49406, 49408
STEPS, LR, PROMPT_TOKENS, SEED = 10, 1e-4, 15, 0
RUNS = 5  # timings are medians of this many runs: a shared 2-core machine is noisy (+-20% run to run)


def vit_l14() -> CLIPModel:
    torch.manual_seed(SEED)
    text = dict(vocab_size=VOCAB, hidden_size=768, intermediate_size=3072, num_attention_heads=12,
                num_hidden_layers=12, max_position_embeddings=77, projection_dim=768, hidden_act="quick_gelu",
                bos_token_id=BOS, eos_token_id=EOS, pad_token_id=EOS)
    vision = dict(hidden_size=1024, intermediate_size=4096, num_attention_heads=16, num_hidden_layers=24,
                  image_size=224, patch_size=14, projection_dim=768, hidden_act="quick_gelu")
    return CLIPModel(CLIPConfig(text_config=text, vision_config=vision, projection_dim=768)).eval()


class PromptTokenizer:
    """Stands in for the CLIP tokenizer: one id per word, BOS/EOS, padded to 77 (with EOS, as SD's tokenizer)."""

    bos_token_id, eos_token_id, model_max_length = BOS, EOS, 77
    pad_token_id = EOS

    def __len__(self) -> int:
        return VOCAB

    def get_vocab(self) -> dict:
        return {}

    def _words(self, text: str) -> list[int]:
        return [1000 + (sum(map(ord, w)) * 7919) % 40000 for w in text.split()]

    def __call__(self, texts, add_special_tokens=True, **_):
        if isinstance(texts, str) and not add_special_tokens:
            return type("Tokens", (), {"input_ids": self._words(texts)})()
        texts = [texts] if isinstance(texts, str) else texts  # as a tokenizer takes one text or a batch
        rows = []
        for text in texts:
            words = self._words(text)[:75]
            rows.append([BOS] + words + [EOS] + [self.pad_token_id] * (77 - 2 - len(words)))
        return type("Tokens", (), {"input_ids": torch.tensor(rows)})()


PROMPT = " ".join(f"word{i}" for i in range(PROMPT_TOKENS))


def rss_mb(field: str) -> float:
    for line in Path("/proc/self/status").read_text().splitlines():
        if line.startswith(field + ":"):
            return int(line.split()[1]) / 1024
    return float("nan")


def reset_peak() -> float:
    Path("/proc/self/clear_refs").write_text("5")  # resets VmHWM to the current RSS
    return rss_mb("VmRSS")


def style_vector() -> torch.Tensor:
    g = torch.Generator().manual_seed(1)
    return torch.randn(768, generator=g)


def run_reference(clip: CLIPModel, ids: torch.Tensor, negative_ids: torch.Tensor) -> torch.Tensor:
    """The method: a fresh copy of the whole CLIP model, Adam over the text transformer, 77-token prompt."""
    from stylegrad.aesthetic.method import tune_text_encoder

    z = tune_text_encoder(clip, ids, style_vector(), steps=STEPS, lr=LR).hidden
    with torch.no_grad():
        clip.text_model(input_ids=negative_ids)  # the unconditional prompt, unpersonalized, as stylegrad does
    return z


class Side:
    """One side of the comparison, loaded and warmed up; ``run`` personalizes the prompt once."""

    def __init__(self, role: str):
        clip = vit_l14()
        self.tok = PromptTokenizer()
        self.ids = self.tok([PROMPT]).input_ids
        self.role = role
        if role == "reference":
            import stylegrad.aesthetic.method  # noqa: F401 (imported before the memory baseline, as stylegrad is)

            self.clip, self.negative_ids = clip, self.tok([""]).input_ids
            self.base = reset_peak()  # before the warm-up: memory the allocator keeps from it still counts
            run_reference(clip, self.ids[:, :20], self.negative_ids)  # warm-up of kernels on a short run
            return
        from stylegrad import AestheticEncoder, Style, StyleOptions

        # what a pipeline holds: its own text encoder; plus the family's CLIP text tower with projection
        encoder = CLIPTextModel(clip.config.text_config).eval()
        encoder.load_state_dict(clip.text_model.state_dict())
        text_clip = CLIPTextModelWithProjection(clip.config.text_config).eval()
        text_clip.text_model.load_state_dict(clip.text_model.state_dict())
        text_clip.text_projection.load_state_dict(clip.text_projection.state_dict())
        del clip
        self.enc = AestheticEncoder(encoder, self.tok, text_clip, cache_size=8)
        self.style, self.options = Style(style_vector()), StyleOptions(steps=STEPS, lr=LR)
        self.base = reset_peak()  # before the warm-up: memory the allocator keeps from it still counts
        self.enc.encode("warm up", self.style, self.options)  # a shorter prompt, all steps: kernels and allocator

    def run(self) -> tuple[float, torch.Tensor]:
        t0 = time.perf_counter()
        if self.role == "reference":
            z = run_reference(self.clip, self.ids, self.negative_ids)
        else:
            self.enc.clear_cache()
            z, _ = self.enc.encode(PROMPT, self.style, self.options)
        return time.perf_counter() - t0, z

    def cached(self) -> float:
        """Seconds per repeat of a prompt already personalized (the seed sweep / batch case)."""
        self.enc.encode(PROMPT, self.style, self.options)
        repeats, t0 = 20, time.perf_counter()
        for _ in range(repeats):
            self.enc.encode(PROMPT, self.style, self.options)
        return (time.perf_counter() - t0) / repeats


def bigg_text() -> CLIPTextModelWithProjection:
    """OpenCLIP ViT-bigG/14's text tower with its projection, as SDXL's text_encoder_2 (random weights)."""
    from transformers import CLIPTextConfig

    torch.manual_seed(SEED + 1)
    cfg = CLIPTextConfig(vocab_size=VOCAB, hidden_size=1280, intermediate_size=5120, num_attention_heads=20,
                         num_hidden_layers=32, max_position_embeddings=77, projection_dim=1280, hidden_act="gelu",
                         bos_token_id=BOS, eos_token_id=EOS, pad_token_id=0)
    return CLIPTextModelWithProjection(cfg).eval()


class PadTokenizer(PromptTokenizer):
    """tokenizer_2: pads with '!' (id 0) after the EOS, as SDXL's second tokenizer."""

    pad_token_id = 0


def style_g() -> torch.Tensor:
    return torch.randn(1280, generator=torch.Generator().manual_seed(2))


def run_reference_sdxl(towers, ids) -> tuple[torch.Tensor, torch.Tensor]:
    """The method on fresh copies of both towers, one after the other, each towards its style part; then the
    penultimate states of both (concatenated) and bigG's pooled text embedding, as encode_prompt computes them."""
    from stylegrad.aesthetic.method import tune_text_encoder

    hidden = []
    for (model, target), tokens in zip(towers, ids):
        tuned = tune_text_encoder(model, tokens, target, steps=STEPS, lr=LR, layer=-2, final_norm=False)
        hidden.append(tuned.hidden)
    return torch.cat(hidden, dim=-1), tuned.text_embedding  # bigG's, the last


class SideXL(Side):
    def __init__(self, role: str, towers: str = "both"):
        clip = vit_l14()
        text_l = CLIPTextModelWithProjection(clip.config.text_config).eval()
        text_l.text_model.load_state_dict(clip.text_model.state_dict())
        text_l.text_projection.load_state_dict(clip.text_projection.state_dict())
        del clip
        text_g = bigg_text()
        self.role, self.tok, self.tok2 = role, PromptTokenizer(), PadTokenizer()
        self.ids = (self.tok([PROMPT]).input_ids, self.tok2([PROMPT]).input_ids)
        if role == "reference":
            import stylegrad.aesthetic.method  # noqa: F401 (imported before the memory baseline, as stylegrad is)

            self.towers = ((text_l, style_vector()), (text_g, style_g()))
            self.base = reset_peak()
            run_reference_sdxl(self.towers, tuple(i[:, :20] for i in self.ids))
            return
        from types import SimpleNamespace

        from stylegrad import Style, StyleOptions
        from stylegrad.aesthetic.sdxl import SDXLAestheticEncoder

        encoder = CLIPTextModel(text_l.config).eval()  # SDXL's text_encoder: CLIP-L without its projection
        encoder.load_state_dict(text_l.text_model.state_dict())
        pipe = SimpleNamespace(text_encoder=encoder, text_encoder_2=text_g, tokenizer=self.tok, tokenizer_2=self.tok2,
                               config=SimpleNamespace(force_zeros_for_empty_prompt=True))
        self.enc = SDXLAestheticEncoder(pipe, text_l, cache_size=8)
        self.style = Style(style_vector(), g=style_g())
        self.options = StyleOptions(steps=STEPS, lr=LR, towers=towers)
        self.base = reset_peak()
        self.enc.encode("warm up", self.style, self.options)

    def run(self) -> tuple[float, torch.Tensor]:
        t0 = time.perf_counter()
        if self.role == "reference":
            z, pooled = run_reference_sdxl(self.towers, self.ids)
        else:
            self.enc.clear_cache()
            e = self.enc.encode(PROMPT, self.style, self.options)
            z, pooled = e.prompt_embeds, e.pooled_prompt_embeds
        return time.perf_counter() - t0, torch.cat([z.reshape(-1), pooled.reshape(-1)])



def child(role: str, out: str, family: str = "sd1", towers: str = "both", small_pages: bool = False) -> None:
    """One timed run (after a warm-up) in a fresh process; stylegrad's also times a cached repeat. ``small_pages``:
    no huge pages are asked for (the huge-page advice's gain)."""
    torch.set_num_threads(max(1, os.cpu_count() or 1))
    if small_pages:
        from stylegrad.aesthetic import pages

        pages._MADVISE = None
    side = SideXL(role, towers) if family == "sdxl" else Side(role)
    seconds, z = side.run()
    result = {"seconds": seconds, "peak_extra_mb": rss_mb("VmHWM") - side.base}
    if role == "stylegrad":
        sims = side.enc.last_similarities  # of the timed run: a cached repeat records none
        result["cos"] = {k: [v[0][0], v[0][-1]] for k, v in sims.items()} if isinstance(sims, dict) else \
            {"l": [sims[0][0], sims[0][-1]]}
        result["cached_seconds"] = side.cached()
    torch.save(z.detach().cpu(), out)
    print(json.dumps(result))


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--role", choices=["reference", "stylegrad"], help=argparse.SUPPRESS)
    parser.add_argument("--out", help=argparse.SUPPRESS)
    parser.add_argument("--small-pages", action="store_true", help=argparse.SUPPRESS)
    parser.add_argument("--family", choices=["sd1", "sdxl"], default="sd1",
                        help="sdxl: also SDXL's two text towers, both tuned (SD1.x first, in the same run)")
    parser.add_argument("--runs", type=int, default=None, help=f"runs per side (default {RUNS}; 3 for SDXL)")
    parser.add_argument("--towers", nargs="?", const="all", default=None,
                        help="with --family sdxl: only stylegrad, once per tower choice (l, g, both): seconds, peak "
                        "extra memory and each tower's cosine to its style before and after tuning")
    parser.add_argument("--budget", metavar="SIZE", help="with --family sdxl: also stylegrad under this tuning memory "
                        "budget (STYLEGRAD_TUNING_MEMORY=SIZE, e.g. 5GB): some weights keep their moments, the rest "
                        "rebuild them")
    args = parser.parse_args()
    if args.role:
        return child(args.role, args.out, args.family, args.towers or "both", args.small_pages)
    if args.towers:
        return towers_table()
    summary = compare("sd1", args.runs or RUNS)
    if args.family == "sdxl":
        summary = {"sd1": summary, "sdxl": compare("sdxl", args.runs or 3, args.budget)}
    print(json.dumps(summary))


def towers_table() -> None:
    rows = {}
    with tempfile.TemporaryDirectory() as tmp:
        for towers in ("l", "g", "both"):
            proc = subprocess.run([sys.executable, __file__, "--role", "stylegrad", "--out", os.path.join(tmp, "z.pt"),
                                   "--family", "sdxl", "--towers", towers], capture_output=True, text=True)
            if proc.returncode != 0:
                sys.exit(f"run failed:\n{proc.stderr[-3000:]}")
            rows[towers] = json.loads(proc.stdout.strip().splitlines()[-1])
    print(f"SDXL, T={STEPS}, lr={LR}, {PROMPT_TOKENS}-token prompt: one stylegrad run per tower choice")
    print(f"{'towers':8}{'seconds':>10}{'peak extra MB':>16}   cos to style (before -> after)")
    for towers, r in rows.items():
        cos = ", ".join(f"{k}: {a:.4f} -> {b:.4f}" for k, (a, b) in r["cos"].items())
        print(f"{towers:8}{r['seconds']:>10.2f}{r['peak_extra_mb']:>16.1f}   {cos}")
    print(json.dumps({t: {"seconds": round(r["seconds"], 2), "peak_extra_mb": round(r["peak_extra_mb"], 1),
                          "cos": r["cos"]} for t, r in rows.items()}))


# stylegrad runs in both of its memory modes (aesthetic/memory.py), each set explicitly, not by "auto"
MODES = {"stylegrad": "fast", "stylegrad-low": "low", "stylegrad-fresh": "fast"}
ENV = {"stylegrad-fresh": {"STYLEGRAD_REUSE_MEMORY": "0"}}  # the memory of the last prompt is not reused
# SD1.x: each other optimisation of the engine turned off alone (module docstring)
ABLATIONS = {"stylegrad-torch": {"STYLEGRAD_KERNELS": "0"}, "stylegrad-avx2": {"STYLEGRAD_KERNELS_ISA": "avx2"},
             "stylegrad-4k": {}}
ARGS = {"stylegrad-4k": ["--small-pages"]}


def _default_isa() -> str | None:
    from stylegrad.aesthetic import products

    return products.kernels_isa()


def compare(family: str, n_runs: int, budget: str | None = None) -> dict:
    modes = dict(MODES)
    if budget:  # a memory budget (memory.py): as many weights keep their moments as fit in it
        modes[f"stylegrad-{budget}"] = budget
    ablations = {}
    if family == "sd1" and _default_isa() is not None:  # the kernels are here: each optimisation can be taken away
        ablations = {role: env for role, env in ABLATIONS.items() if role != "stylegrad-avx2" or
                     _default_isa() == "avx512"}
    modes.update(dict.fromkeys(ablations, "fast"))
    roles = ("reference", *modes)
    runs = {role: [] for role in roles}
    peak, cached, outputs = {}, [], {}
    with tempfile.TemporaryDirectory() as tmp:
        for i in range(n_runs):  # alternating who goes first: the VM's drift falls on both sides alike
            for role in roles if i % 2 == 0 else roles[::-1]:
                out = os.path.join(tmp, f"{role}.pt")
                env = {**os.environ, "STYLEGRAD_TUNING_MEMORY": modes.get(role, "auto"), **ENV.get(role, {}),
                       **ablations.get(role, {})}
                proc = subprocess.run([sys.executable, __file__, "--role", role.split("-")[0], "--out", out, "--family",
                                       family, *ARGS.get(role, [])], capture_output=True, text=True, check=False,
                                      env=env)
                if proc.returncode != 0:
                    sys.exit(f"{role} run failed:\n{proc.stderr[-3000:]}")
                r = json.loads(proc.stdout.strip().splitlines()[-1])
                runs[role].append(r["seconds"])
                peak.setdefault(role, r["peak_extra_mb"])
                cached += [r["cached_seconds"]] if "cached_seconds" in r else []
                outputs[role] = torch.load(out, weights_only=True)
    cached = statistics.median(cached)
    ref, ours = statistics.median(runs["reference"]), statistics.median(runs["stylegrad"])
    low = statistics.median(runs["stylegrad-low"])
    summary = {
        "reference_s": round(ref, 3),
        "stylegrad_s": round(ours, 3),
        "speedup": round(ref / ours, 2),
        "cached_speedup": round(ref / cached, 1),
        "max_abs_diff": float((outputs["reference"] - outputs["stylegrad"]).abs().max()),
        "reference_peak_mb": round(peak["reference"], 1),
        "stylegrad_peak_mb": round(peak["stylegrad"], 1),
        "peak_ratio": round(peak["stylegrad"] / peak["reference"], 3),
        "low_memory": {  # STYLEGRAD_TUNING_MEMORY=low: moments rebuilt from the gradients' factors
            "stylegrad_s": round(low, 3),
            "speedup": round(ref / low, 2),
            "max_abs_diff": float((outputs["reference"] - outputs["stylegrad-low"]).abs().max()),
            "same_as_fast": bool(torch.equal(outputs["stylegrad"], outputs["stylegrad-low"])),
            "stylegrad_peak_mb": round(peak["stylegrad-low"], 1),
            "peak_ratio": round(peak["stylegrad-low"] / peak["reference"], 3),
        },
    }
    fresh = statistics.median(runs["stylegrad-fresh"])
    summary["fresh_memory"] = {"stylegrad_s": round(fresh, 3), "speedup": round(ref / fresh, 2),
                               "same_as_fast": bool(torch.equal(outputs["stylegrad"], outputs["stylegrad-fresh"])),
                               "stylegrad_peak_mb": round(peak["stylegrad-fresh"], 1),
                               "peak_ratio": round(peak["stylegrad-fresh"] / peak["reference"], 3)}
    if budget:
        role = f"stylegrad-{budget}"
        summary["budget"] = {"budget": budget, "stylegrad_s": round(statistics.median(runs[role]), 3),
                             "speedup": round(ref / statistics.median(runs[role]), 2),
                             "same_as_fast": bool(torch.equal(outputs["stylegrad"], outputs[role])),
                             "stylegrad_peak_mb": round(peak[role], 1),
                             "peak_ratio": round(peak[role] / peak["reference"], 3)}
    towers = "SDXL's CLIP-L + bigG text towers" if family == "sdxl" else "CLIP ViT-L/14 text tower"
    print(f"prompt: {PROMPT_TOKENS} tokens, T={STEPS}, lr={LR}, {towers} (random weights), "
          f"{torch.get_num_threads()} threads, {n_runs} interleaved runs per side")
    print(f"{'':15}{'seconds (median)':>18}{'speedup':>9}{'peak extra MB':>16}{'peak ratio':>12}   runs")
    for name in roles:
        med = statistics.median(runs[name])
        times = " ".join(f"{t:.2f}" for t in runs[name])
        print(f"{name:15}{med:>18.3f}{ref / med:>9.2f}{peak[name]:>16.1f}{peak[name] / peak['reference']:>12.3f}"
              f"   {times}")
    print(f"{'cached':15}{cached:>18.5f}")
    summary["within_contract"] = max(summary["max_abs_diff"], summary["low_memory"]["max_abs_diff"]) < FULL_SIZE_ATOL
    print(f"max |stylegrad - reference| {summary['max_abs_diff']:.2e} (contract: < {FULL_SIZE_ATOL:g}, "
          f"docs/exactness.md: {'holds' if summary['within_contract'] else 'BROKEN'}); low memory gives the same "
          f"bits as fast: {summary['low_memory']['same_as_fast']}; fresh memory too: "
          f"{summary['fresh_memory']['same_as_fast']}")
    summary["gains"] = gains(runs, peak, outputs, ablations)
    return summary


# each optimisation and the row that runs without it
GAINS = {"compiled kernels": "stylegrad-torch", "AVX-512 packed moments": "stylegrad-avx2",
         "huge pages": "stylegrad-4k", "memory kept between prompts": "stylegrad-fresh",
         "kept moments (vs rebuilt)": "stylegrad-low"}


def gains(runs: dict, peak: dict, outputs: dict, ablations: dict) -> dict:
    """Each optimisation's gain: "stylegrad" against the same run with that one optimisation off, in seconds and
    peak memory (above 1: the optimisation pays); printed, and returned for the JSON line."""
    ours, out = statistics.median(runs["stylegrad"]), {}
    print(f"{'each optimisation, off alone':32}{'time gain':>10}{'memory gain':>13}   same bits")
    for name, role in GAINS.items():
        if role not in runs:
            continue
        time_gain, memory_gain = statistics.median(runs[role]) / ours, peak[role] / peak["stylegrad"]
        same = bool(torch.equal(outputs["stylegrad"], outputs[role]))
        out[name] = {"time": round(time_gain, 2), "memory": round(memory_gain, 2), "same_bits": same}
        print(f"{name:32}{time_gain:>9.2f}x{memory_gain:>12.2f}x   {same}")
    return out


if __name__ == "__main__":
    main()
