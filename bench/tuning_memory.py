"""The extra accelerator memory aesthetic-gradient tuning takes, per memory mode, on the real SD1.5 and SDXL text
encoders (CLIP ViT-L/14, 123 M parameters; SDXL's CLIP-L and OpenCLIP bigG, 695 M), built from the configs stylegrad
ships (stylegrad/checkpoints/configs) in fp16, as a GPU user's pipeline holds them.

No accelerator is needed: the towers are built on the ``meta`` device, the accelerator's stand-in, and tuned there
through ``personalize`` exactly as on a GPU (torch's path: no compiled kernels, the rebuilt moments' history in host
memory). ``AllocationTracker`` counts every tensor storage created while tuning runs, per device, and keeps the
peak: the float32 copies, Adam's moments, the scratch tiles, the gradient factors, the activations kept for the
backward pass, the outputs. meta tensors have shapes but no values, so this is exact accounting of what tuning asks
for, not an allocator's measurement: CUDA's caching allocator rounds blocks up (to 512 bytes, in 2 MB or 20 MB
segments), a few percent more on tensors this large. ``bench/gpu_check.py`` measures the same on a GPU with
``torch.cuda.max_memory_allocated``.

Modes: ``fast`` (every large weight keeps its moments), ``low`` (every one rebuilds them), and ``auto`` as it decides
on a 12 GB card with the fp16 pipeline loaded (free memory = the card less the CUDA context and the pipeline's
weights; auto's budget is 3/4 of it). The prompt runs up to its end-of-text token at ``--tokens`` (77,
the worst case, by default) and ``--steps`` Adam steps (10, the default). SDXL's towers are tuned one after the
other, as the encoder does, so its peak is over both. The target (issue 35): SDXL both towers in <= 4 GB of extra
accelerator memory.

    python bench/tuning_memory.py                # a table, then one JSON line
    python bench/tuning_memory.py --tokens 20    # a typical prompt
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import os
import sys
import time
import warnings
import weakref
from collections import Counter
from pathlib import Path
from unittest import mock

import torch
from torch.utils._python_dispatch import TorchDispatchMode
from torch.utils._pytree import tree_leaves

sys.path.insert(0, os.path.join(os.path.dirname(__file__), ".."))
from stylegrad.aesthetic import memory  # noqa: E402
from stylegrad.aesthetic.adam import AdamSettings  # noqa: E402
from stylegrad.aesthetic.engine import EngineSettings  # noqa: E402
from stylegrad.aesthetic.eos_forward import is_matrix  # noqa: E402
from stylegrad.aesthetic.tower import ClipParts, TextTower  # noqa: E402
from stylegrad.aesthetic.tuning import personalize  # noqa: E402
from stylegrad.notes import StylegradNote  # noqa: E402

CONFIGS = Path(__file__).resolve().parents[1] / "stylegrad" / "checkpoints" / "configs"
GB = 2**30
TARGET = 4 * GB  # issue 35: SDXL both-tower tuning in <= 4 GB of extra accelerator memory
CONTEXT = GB // 2  # what a CUDA context takes outside torch's allocator, about
CARDS = {"auto-12GB": 12 * GB}


class AllocationTracker(TorchDispatchMode):
    """Live bytes of the tensor storages created inside the block, per device type, and the peak of each.

    A storage is counted when an op's output has one that none of its inputs has (a view, an in-place or out= op
    adds nothing), and uncounted when it is freed (a weakref finalizer on the storage: torch keeps a storage's
    Python object as long as the storage lives). Works on any device, meta included."""

    def __init__(self):
        super().__init__()
        self.live: dict[int, tuple[str, int]] = {}
        self.now: Counter[str] = Counter()
        self.peak: Counter[str] = Counter()

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        kwargs = kwargs or {}
        out = func(*args, **kwargs)
        inputs = {t.untyped_storage()._cdata for t in tree_leaves((args, kwargs)) if isinstance(t, torch.Tensor)}
        for t in tree_leaves(out):
            if not isinstance(t, torch.Tensor):
                continue
            storage = t.untyped_storage()
            key = storage._cdata
            if key in inputs or key in self.live:
                continue
            device, nbytes = t.device.type, storage.nbytes()
            self.live[key] = (device, nbytes)
            self.now[device] += nbytes
            self.peak[device] = max(self.peak[device], self.now[device])
            weakref.finalize(storage, self._freed, key)
        return out

    def _freed(self, key: int) -> None:
        device, nbytes = self.live.pop(key)
        self.now[device] -= nbytes


def _config(family: str) -> dict:
    return json.loads((CONFIGS / f"{family}.json").read_text(encoding="utf-8"))


def text_tower(cfg: dict, *, sdxl: bool, device: str = "meta", dtype: torch.dtype = torch.float16,
               layers: int | None = None) -> TextTower:
    """A ``TextTower`` for one text-encoder config (stylegrad/checkpoints/configs), its tensors on ``device`` in
    ``dtype`` (random values where the device has any), ``layers`` deep if given. Towers without a projection
    (CLIP-L) get CLIP ViT-L/14's, as stylegrad reads it from that model's file."""
    from transformers import CLIPTextConfig, CLIPTextModel, CLIPTextModelWithProjection

    fields = {k: v for k, v in cfg.items() if k not in ("class", "prefix", "layout")}
    if layers is not None:
        fields["num_hidden_layers"] = layers
    config = CLIPTextConfig(**fields)
    cls = CLIPTextModelWithProjection if cfg["class"] == "CLIPTextModelWithProjection" else CLIPTextModel
    with torch.device(device):
        encoder = cls(config).to(dtype).eval()
    projection = (encoder.text_projection.weight.detach() if cls is CLIPTextModelWithProjection else
                  torch.empty(config.projection_dim, config.hidden_size, device=device))
    parts = ClipParts(projection, {}, config.num_hidden_layers, config.hidden_size)
    return TextTower(encoder, parts, config.eos_token_id, sdxl=sdxl)


def prompt_ids(tower: TextTower, tokens: int, seed: int = 0) -> torch.Tensor:
    """(1, 77) ids whose first end-of-text token is the ``tokens``-th: BOS, random words, EOS, padding."""
    g = torch.Generator().manual_seed(seed)
    words = torch.randint(0, tower.eos_token_id - 2, (tokens - 2,), generator=g)
    eos = torch.tensor([tower.eos_token_id])
    pad = eos.repeat(77 - tokens)
    return torch.cat([torch.tensor([tower.eos_token_id - 1]), words, eos, pad])[None]


def tune_tracked(towers: list[TextTower], *, memory_setting: str | int, tokens: int, steps: int,
                 free: int | None = None) -> tuple[AllocationTracker, dict[str, str]]:
    """Tune each tower in turn (as the encoder does for SDXL) under the tracker; ``free``: the free memory auto
    sees on the device. Returns the tracker and the moments chosen for the last tower (by weight)."""
    engine = EngineSettings(memory=memory_setting, kernels=False, reuse_memory=False)
    chosen: dict[str, str] = {}
    real = memory.choose_moments

    def choose(*args):
        chosen.clear()
        chosen.update(real(*args))
        return chosen.copy()

    with mock.patch.object(memory, "free_bytes", lambda device: free), \
            mock.patch("stylegrad.aesthetic.eos_forward.choose_moments", choose), \
            mock.patch.object(AdamSettings, "optimizer", _small_tensors_optimizer), \
            mock.patch.object(memory, "_noted", set()), AllocationTracker() as tracker:
        for tower in towers:
            target = torch.nn.functional.normalize(torch.ones(1, tower.width), dim=-1)
            adam = AdamSettings.for_device(torch.device("cuda"), 1e-4)  # CUDA's: torch's fused Adam
            personalize(tower, prompt_ids(tower, tokens), target, steps=steps, adam=adam, engine=engine)
    return tracker, chosen


_OPTIMIZER = AdamSettings.optimizer


def _small_tensors_optimizer(self: AdamSettings, params: list[torch.Tensor]) -> torch.optim.Adam:
    """torch.optim.Adam refuses its fused kernel on meta tensors (the large weights' steps take it: it has a meta
    form): the small tensors (a few MB on bigG) step with its foreach kernel there."""
    meta = any(p.is_meta for p in params)
    return _OPTIMIZER(dataclasses.replace(self, fused=False) if meta else self, params)


def matrix_weights(tower: TextTower) -> int:
    return sum(t.numel() for name, t in tower.base.items() if is_matrix(name))


def pipeline_bytes(family: str) -> int:
    """The fp16 pipeline's weights (UNet, VAE, text encoders), from the shipped configs."""
    from diffusers import AutoencoderKL, UNet2DConditionModel

    cfg = _config(family)
    with torch.device("meta"):
        models = [UNet2DConditionModel.from_config(cfg["unet"]), AutoencoderKL.from_config(cfg["vae"])]
    params = sum(p.numel() for m in models for p in m.parameters())
    text = [cfg[k] for k in ("text_encoder", "text_encoder_2") if k in cfg]
    params += sum(sum(t.numel() for t in text_tower(c, sdxl=False).base.values()) for c in text)
    params += sum(c["projection_dim"] * c["hidden_size"] for c in text if c["class"] == "CLIPTextModelWithProjection")
    return 2 * params


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--tokens", type=int, default=77, help="the prompt's tokens up to its end-of-text (2-77)")
    parser.add_argument("--steps", type=int, default=10, help="Adam steps")
    args = parser.parse_args(argv)
    warnings.simplefilter("ignore", StylegradNote)  # auto's notes: the table says what it kept

    families = {
        "sd1.5": [text_tower(_config("sd1")["text_encoder"], sdxl=False)],
        "sdxl": [text_tower(_config("sdxl")[k], sdxl=True) for k in ("text_encoder", "text_encoder_2")],
    }
    rows, result = [], {"tokens": args.tokens, "steps": args.steps, "device": "meta (accelerator stand-in)"}
    for family, towers in families.items():
        pipe = pipeline_bytes("sdxl" if family == "sdxl" else "sd1")
        weights = max(matrix_weights(t) for t in towers)
        modes: list[tuple[str, str | int, int | None]] = [("fast", "fast", None), ("low", "low", None)]
        modes += [(name, "auto", card - CONTEXT - pipe) for name, card in CARDS.items()]
        fast = None
        for name, setting, free in modes:
            start = time.perf_counter()
            tracker, chosen = tune_tracked(towers, memory_setting=setting, tokens=args.tokens, steps=args.steps,
                                           free=free)
            device, host = tracker.peak["meta"], tracker.peak["cpu"]
            fast = device if name == "fast" else fast
            kept = sum(c == "kept" for c in chosen.values()) / max(1, len(chosen))
            entry = {"device_peak": device, "host_peak": host, "vs_fast": device / fast, "vs_pipeline": device / pipe,
                     "bytes_per_matrix_weight": device / weights, "kept_share": kept,
                     "budget": None if free is None else int(0.75 * free), "seconds": time.perf_counter() - start}
            result[f"{family}:{name}"] = entry
            rows.append((family, name, entry))
        result[f"{family}:pipeline_fp16"] = pipe
    low = result["sdxl:low"]["device_peak"]
    result["sdxl_low_within_target"] = low <= TARGET

    print(f"prompt of {args.tokens} tokens up to its end-of-text, {args.steps} Adam steps; tuning on the meta device "
          "(an accelerator's path), fp16 towers from stylegrad/checkpoints/configs")
    print(f"{'family':7} {'mode':10} {'device peak':>12} {'host peak':>10} {'B/weight':>9} {'kept':>5} "
          f"{'x fast':>7} {'x fp16 pipe':>11} {'budget':>9}")
    for family, name, e in rows:
        budget = "" if e["budget"] is None else f"{e['budget'] / GB:.2f} GiB"
        print(f"{family:7} {name:10} {e['device_peak'] / GB:8.2f} GiB {e['host_peak'] / GB:6.2f} GiB "
              f"{e['bytes_per_matrix_weight']:9.2f} {e['kept_share']:5.0%} {e['vs_fast']:7.2f} "
              f"{e['vs_pipeline']:11.2f} {budget:>9}")
    for family in families:
        print(f"{family} fp16 pipeline (UNet, VAE, text encoders): {result[f'{family}:pipeline_fp16'] / GB:.2f} GiB")
    print(f"SDXL both towers, low: {low / GB:.2f} GiB extra on the device; target <= 4 GiB: "
          f"{'met' if result['sdxl_low_within_target'] else 'NOT met'}")
    print(json.dumps(result))


if __name__ == "__main__":
    main()
