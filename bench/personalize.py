"""Aesthetic-gradient personalisation: the reference loop vs stylegrad, on the real SD1.x text-encoder size.

Builds CLIP ViT-L/14 (text tower 12x768 with projection, vision tower 24x1024) with random weights (speed does
not depend on the values), a typical 15-token prompt, T = 10 Adam steps, lr 1e-4. Each side runs in its own
process so its peak memory is its own; both build the same weights from the same seed.

    python bench/personalize.py            # prints a table, then one JSON line
"""

from __future__ import annotations

import argparse
import copy
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

EOS, BOS, VOCAB = 49407, 49406, 49408
STEPS, LR, PROMPT_TOKENS, SEED = 10, 1e-4, 15, 0
RUNS = 3  # timings are medians of this many runs: a shared 2-core machine is noisy


def vit_l14() -> CLIPModel:
    torch.manual_seed(SEED)
    text = dict(vocab_size=VOCAB, hidden_size=768, intermediate_size=3072, num_attention_heads=12,
                num_hidden_layers=12, max_position_embeddings=77, projection_dim=768, hidden_act="quick_gelu",
                bos_token_id=BOS, eos_token_id=EOS, pad_token_id=EOS)
    vision = dict(hidden_size=1024, intermediate_size=4096, num_attention_heads=16, num_hidden_layers=24,
                  image_size=224, patch_size=14, projection_dim=768, hidden_act="quick_gelu")
    return CLIPModel(CLIPConfig(text_config=text, vision_config=vision, projection_dim=768)).eval()


class PromptTokenizer:
    """Stands in for the CLIP tokenizer: one id per word, BOS/EOS, padded with EOS to 77 (as SD's tokenizer)."""

    eos_token_id, model_max_length = EOS, 77

    def __call__(self, texts, **_):
        rows = []
        for text in texts:
            words = [1000 + (sum(map(ord, w)) * 7919) % 40000 for w in text.split()][:75]
            rows.append([BOS] + words + [EOS] * (77 - 1 - len(words)))
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
    """The paper's loop: a fresh copy of the CLIP model, Adam over the text transformer, 77-token prompt."""
    model = copy.deepcopy(clip)
    model.requires_grad_(True)
    style = style_vector()[None] / style_vector().norm()  # (1, 768)
    optimizer = torch.optim.Adam(model.text_model.parameters(), lr=LR)
    for _ in range(STEPS):
        text = model.text_projection(model.text_model(input_ids=ids).pooler_output)  # (1, 768)
        loss = -(text / text.norm(dim=-1, keepdim=True) @ style.T).mean()
        optimizer.zero_grad()
        loss.backward()
        optimizer.step()
    with torch.no_grad():
        z = model.text_model(input_ids=ids).last_hidden_state
        clip.text_model(input_ids=negative_ids)  # the unconditional prompt, unpersonalised, as stylegrad does
        return z


def child(role: str, out: str) -> None:
    torch.set_num_threads(max(1, os.cpu_count() or 1))
    clip = vit_l14()
    tok = PromptTokenizer()
    ids = tok([PROMPT]).input_ids
    if role == "reference":
        negative_ids = tok([""]).input_ids
        base = reset_peak()  # before the warm-up: memory the allocator keeps from it still counts
        run_reference(clip, ids[:, :20], negative_ids)  # warm-up of kernels on a short run (no timing)
        times, peak = [], 0.0
        for i in range(RUNS):
            t0 = time.perf_counter()
            z = run_reference(clip, ids, negative_ids)
            times.append(time.perf_counter() - t0)
            if i == 0:
                peak = rss_mb("VmHWM") - base
        result = {"seconds": statistics.median(times), "runs": times, "peak_extra_mb": peak}
    else:
        from stylegrad import AestheticEncoder, Style, StyleOptions

        # what a pipeline holds: its own text encoder; plus the family's CLIP text tower with projection
        encoder = CLIPTextModel(clip.config.text_config).eval()
        encoder.load_state_dict(clip.text_model.state_dict())
        text_clip = CLIPTextModelWithProjection(clip.config.text_config).eval()
        text_clip.text_model.load_state_dict(clip.text_model.state_dict())
        text_clip.text_projection.load_state_dict(clip.text_projection.state_dict())
        del clip
        enc = AestheticEncoder(encoder, tok, text_clip, cache_size=8)
        style = Style(style_vector())
        options = StyleOptions(steps=STEPS, lr=LR)
        base = reset_peak()  # before the warm-up: memory the allocator keeps from it still counts
        enc.encode("warm up", style, StyleOptions(steps=1, lr=LR))
        enc.clear_cache()
        times, peak = [], 0.0
        for i in range(RUNS):
            enc.clear_cache()
            t0 = time.perf_counter()
            z, _ = enc.encode(PROMPT, style, options)
            times.append(time.perf_counter() - t0)
            if i == 0:
                peak = rss_mb("VmHWM") - base
        t0 = time.perf_counter()
        repeats = 20
        for _ in range(repeats):
            enc.encode(PROMPT, style, options)
        cached = (time.perf_counter() - t0) / repeats
        result = {"seconds": statistics.median(times), "runs": times, "peak_extra_mb": peak,
                  "cached_seconds": cached}
    torch.save(z.detach().cpu(), out)
    print(json.dumps(result))


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--role", choices=["reference", "stylegrad"], help=argparse.SUPPRESS)
    parser.add_argument("--out", help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.role:
        return child(args.role, args.out)

    results, outputs = {}, {}
    with tempfile.TemporaryDirectory() as tmp:
        for role in ("reference", "stylegrad"):
            out = os.path.join(tmp, f"{role}.pt")
            proc = subprocess.run([sys.executable, __file__, "--role", role, "--out", out],
                                  capture_output=True, text=True, check=False)
            if proc.returncode != 0:
                sys.exit(f"{role} run failed:\n{proc.stderr[-3000:]}")
            results[role] = json.loads(proc.stdout.strip().splitlines()[-1])
            outputs[role] = torch.load(out, weights_only=True)
    ref, ours = results["reference"], results["stylegrad"]
    summary = {
        "reference_s": round(ref["seconds"], 3),
        "stylegrad_s": round(ours["seconds"], 3),
        "speedup": round(ref["seconds"] / ours["seconds"], 2),
        "cached_speedup": round(ref["seconds"] / ours["cached_seconds"], 1),
        "max_abs_diff": float((outputs["reference"] - outputs["stylegrad"]).abs().max()),
        "reference_peak_mb": round(ref["peak_extra_mb"], 1),
        "stylegrad_peak_mb": round(ours["peak_extra_mb"], 1),
    }
    print(f"prompt: {PROMPT_TOKENS} tokens, T={STEPS}, lr={LR}, CLIP ViT-L/14 text tower (random weights), "
          f"{torch.get_num_threads()} threads")
    print(f"{'':12}{'seconds (median)':>18}{'peak extra MB':>16}   runs")
    for name, r in (("reference", ref), ("stylegrad", ours)):
        runs = " ".join(f"{t:.2f}" for t in r["runs"])
        print(f"{name:12}{r['seconds']:>18.3f}{r['peak_extra_mb']:>16.1f}   {runs}")
    print(f"{'cached':12}{ours['cached_seconds']:>18.5f}")
    print(json.dumps(summary))


if __name__ == "__main__":
    main()
