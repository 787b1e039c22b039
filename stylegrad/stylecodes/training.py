"""Train a Stylecodes model (the paper's recipe): SD1.x and SigLIP frozen; the style encoder, decoder and control
module trained end to end with the diffusion loss, the latent passed on unquantized.

Data is a folder with ``index.csv`` or ``index.jsonl``: one (style image, prompt, target image) triple per row,
columns ``style_image``, ``prompt``, ``target_image`` (paths relative to the folder). Every random draw of step k
comes from generators seeded by (seed, k), so a run resumed from a checkpoint continues exactly as if it had never
stopped.
"""

from __future__ import annotations

import csv
import json
import math
import os
import shutil
from dataclasses import asdict, dataclass
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F
from PIL import Image
from tqdm.auto import tqdm

from stylegrad.errors import StylegradError
from stylegrad.files.hub import from_pretrained
from stylegrad.pipelines.loading import DEFAULT_MODEL
from stylegrad.stylecodes.facade import image_tokens, load_siglip
from stylegrad.stylecodes.model import (
    SIGLIP,
    StylecodesModel,
    check_state,
    load_stylecodes,
    read_checkpoint,
    save_stylecodes,
)
from stylegrad.stylecodes.unet import controlled_forward, mid_size

COLUMNS = ("style_image", "prompt", "target_image")


@dataclass
class TrainConfig:
    data: str
    out: str
    model: str = DEFAULT_MODEL
    siglip: str = SIGLIP
    init: str | None = None  # start from this Stylecodes checkpoint instead of a fresh model
    steps: int = 100_000  # the paper's defaults: 100k steps of batch 25 at lr 1e-6, 512 px
    batch_size: int = 25
    lr: float = 1e-6
    resolution: int = 512
    grad_accum: int = 1  # split each batch into this many micro-batches (same result, less memory)
    checkpoint_every: int = 1000
    seed: int = 0
    gradient_checkpointing: bool = False
    mixed_precision: str | None = None  # the autocast: None follows dtype, else no | fp16 | bf16
    autoencoder_width: int = 512
    device: str | None = None
    dtype: str | None = None  # the frozen UNet's, VAE's and text encoder's (training/precision.py's policy)


def read_index(folder: str | os.PathLike) -> list[dict]:
    """The triples, with paths made absolute; a missing column or file is a one-line error."""
    root = Path(folder)
    for name in ("index.jsonl", "index.csv"):
        if (root / name).is_file():
            path = root / name
            break
    else:
        raise StylegradError(f"no index.csv or index.jsonl in {root}")
    try:
        with path.open(newline="", encoding="utf-8") as f:
            if path.suffix == ".jsonl":
                rows = []
                for n, line in enumerate(f, 1):
                    if line.strip():
                        try:
                            rows.append(json.loads(line))
                        except ValueError as e:
                            raise StylegradError(f"{path.name} line {n} is not JSON ({e.msg})") from e
                        if not isinstance(rows[-1], dict):
                            raise StylegradError(f"{path.name} line {n} is not a JSON object")
            else:
                rows = list(csv.DictReader(f))
    except UnicodeDecodeError as e:
        raise StylegradError(f"{path} is not UTF-8 text (byte {e.start}); save it as UTF-8") from e
    if not rows:
        raise StylegradError(f"{path} has no rows")
    for i, row in enumerate(rows, 1):
        missing = [c for c in COLUMNS if c not in row or (c != "prompt" and not str(row[c] or "").strip())]
        if missing:
            raise StylegradError(f"{path.name} row {i}: missing {', '.join(sorted(set(missing)))}")
        for c in ("style_image", "target_image"):
            p = root / row[c]
            if not p.is_file():
                raise StylegradError(f"{path.name} row {i}: {c} {row[c]} not found")
            row[c] = str(p)
    return rows


def _target_pixels(path: str, size: int) -> torch.Tensor:
    with Image.open(path) as im:
        im = im.convert("RGB")
        s = size / min(im.size)
        im = im.resize((max(size, round(im.width * s)), max(size, round(im.height * s))), Image.BICUBIC)
        left, top = (im.width - size) // 2, (im.height - size) // 2
        im = im.crop((left, top, left + size, top + size))
    return torch.from_numpy(np.asarray(im, np.float32) / 127.5 - 1).permute(2, 0, 1)


def _step_seed(seed: int, step: int) -> int:
    return (seed * 1_000_003 + step) % (2**63)


class Trainer:
    """Holds the frozen parts, the trained model and its optimizer; ``step(k)`` is a pure function of the state
    and (seed, k)."""

    def __init__(self, cfg: TrainConfig):
        import diffusers
        from transformers import CLIPTextModel, CLIPTokenizer

        from stylegrad.training.precision import training_precision

        self.cfg = cfg
        # the run's precision, checked before anything loads: frozen weights in its dtype, the control model float32
        self.precision = training_precision(cfg.device, cfg.dtype, cfg.mixed_precision)
        self.device = self.precision.device
        self.rows = read_index(cfg.data)
        self.unet = from_pretrained(diffusers.UNet2DConditionModel, cfg.model, "model", subfolder="unet")
        self.vae = from_pretrained(diffusers.AutoencoderKL, cfg.model, "model", subfolder="vae")
        self.text_encoder = from_pretrained(CLIPTextModel, cfg.model, "model", subfolder="text_encoder")
        self.tokenizer = from_pretrained(CLIPTokenizer, cfg.model, "model", subfolder="tokenizer")
        self.scheduler = from_pretrained(diffusers.DDPMScheduler, cfg.model, "model", subfolder="scheduler")
        self.siglip, self.processor = load_siglip(cfg.siglip)  # float32: the codes' image features (exact.py)
        for m in (self.unet, self.vae, self.text_encoder):
            m.requires_grad_(False).eval().to(self.device, self.precision.weights)
        self.siglip.requires_grad_(False).eval().to(self.device)
        if cfg.init:
            self.model = load_stylecodes(cfg.init, self.unet)
        else:
            torch.manual_seed(cfg.seed)
            self.model = StylecodesModel(self.unet, dict(input_dim=self.siglip.config.hidden_size,
                                                         width=cfg.autoencoder_width))
        self.model.to(self.device, torch.float32).train()  # what is trained is float32, whatever the UNet's dtype
        self.opt = torch.optim.AdamW(self.model.parameters(), lr=cfg.lr)
        self.scaler = torch.amp.GradScaler(self.device.type, enabled=self.precision.autocast is torch.float16)
        self.vae_scale = 2 ** (len(self.vae.config.block_out_channels) - 1)

    @torch.no_grad()
    def _batch(self, idx: list[int], gen: torch.Generator):
        rows = [self.rows[i] for i in idx]
        styles = []
        for r in rows:
            with Image.open(r["style_image"]) as im:
                styles.append(im.convert("RGB"))
        tokens = image_tokens(self.siglip, self.processor, styles)
        pixels = torch.stack([_target_pixels(r["target_image"], self.cfg.resolution) for r in rows]).to(self.device)
        dist = self.vae.encode(pixels.to(self.precision.weights)).latent_dist
        mean, std = dist.mean.float(), dist.std.float()
        latents = (mean + std * torch.randn(mean.shape, generator=gen).to(self.device))
        latents = latents * self.vae.config.scaling_factor
        ids = self.tokenizer([r["prompt"] for r in rows], padding="max_length", truncation=True,
                             max_length=self.tokenizer.model_max_length, return_tensors="pt").input_ids
        text = self.text_encoder(ids.to(self.device))[0]
        return tokens, latents, text

    def loss(self, idx: list[int], gen: torch.Generator) -> torch.Tensor:
        tokens, latents, text = self._batch(idx, gen)
        noise = torch.randn(latents.shape, generator=gen).to(self.device)
        t = torch.randint(0, self.scheduler.config.num_train_timesteps, (len(idx),), generator=gen).to(self.device)
        noisy = self.scheduler.add_noise(latents, noise, t)
        target = noise if self.scheduler.config.prediction_type == "epsilon" else \
            self.scheduler.get_velocity(latents, noise, t)
        with self.precision.context():
            auto = self.model.sref_autoencoder
            latent = auto.encode(tokens)  # no quantization while training, as in the paper
            h, w = mid_size(self.unet, self.cfg.resolution, self.cfg.resolution, self.vae_scale)
            style_map = auto.decode(latent, h, w)
            ones = torch.ones(len(idx), 1, 1, 1, device=self.device)
            pred = controlled_forward(self.unet, self.model, noisy, t, text, style_map, ones,
                                      checkpoint=self.cfg.gradient_checkpointing)
        return F.mse_loss(pred.float(), target.float())

    def step(self, k: int) -> float:
        """Training step k (0-based): the batch, noise, timesteps and dropout all come from (seed, k)."""
        torch.manual_seed(_step_seed(self.cfg.seed, k))  # dropout in the decoder
        gen = torch.Generator().manual_seed(_step_seed(self.cfg.seed, k))
        idx = torch.randint(len(self.rows), (self.cfg.batch_size,), generator=gen).tolist()
        parts = [idx[i::self.cfg.grad_accum] for i in range(self.cfg.grad_accum)]
        parts = [p for p in parts if p]
        self.opt.zero_grad(set_to_none=True)
        total = 0.0
        for part in parts:
            loss = self.loss(part, gen) * len(part) / len(idx)
            self.scaler.scale(loss).backward()
            total += float(loss.detach())
        self.scaler.unscale_(self.opt)
        torch.nn.utils.clip_grad_norm_(self.model.parameters(), 1.0)
        self.scaler.step(self.opt)
        self.scaler.update()
        return total

    @torch.no_grad()
    def eval_loss(self, seed: int = 1234, n: int | None = None) -> float:
        """The loss on the first n rows with fixed noise and timesteps, dropout off: comparable across steps."""
        self.model.eval()
        try:
            return float(self.loss(list(range(n or len(self.rows))), torch.Generator().manual_seed(seed)))
        finally:
            self.model.train()

    def save(self, k: int) -> Path:
        """Checkpoint after k steps: weights (published container) and optimizer state, written atomically."""
        folder = Path(self.cfg.out) / f"checkpoint-{k}"
        tmp = folder.with_name(folder.name + ".tmp")
        tmp.mkdir(parents=True, exist_ok=True)
        save_stylecodes(self.model, tmp / "stylecodes.safetensors")
        torch.save({"step": k, "optimizer": self.opt.state_dict(), "scaler": self.scaler.state_dict(),
                    "config": json.dumps(asdict(self.cfg))}, tmp / "training_state.pt")
        if folder.exists():
            shutil.rmtree(folder)
        os.replace(tmp, folder)
        return folder

    def resume(self) -> int:
        """Load the newest checkpoint in ``out``; returns the number of steps already done (0 if none)."""
        found = sorted(Path(self.cfg.out).glob("checkpoint-*[0-9]"), key=lambda p: int(p.name.split("-")[1]))
        if not found:
            return 0
        folder = found[-1]
        state = read_checkpoint(folder / "stylecodes.safetensors")
        check_state(self.model, state, str(folder))
        self.model.load_state_dict(state)
        extra = torch.load(folder / "training_state.pt", map_location=self.device, weights_only=True)
        self.opt.load_state_dict(extra["optimizer"])
        self.scaler.load_state_dict(extra["scaler"])
        return int(extra["step"])


def train(cfg: TrainConfig, stop_after: int | None = None, resume: bool = True) -> Path:
    """Run (or continue) training; returns the final checkpoint path. ``stop_after`` ends early after that
    many steps in total (as an interrupted run would), leaving its checkpoint to resume from."""
    if cfg.batch_size < 1 or cfg.grad_accum < 1 or cfg.steps < 1:
        raise StylegradError("steps, batch_size and grad_accum must be >= 1")
    trainer = Trainer(cfg)
    start = trainer.resume() if resume else 0
    end = min(cfg.steps, stop_after) if stop_after else cfg.steps
    bar = tqdm(range(start, end), desc="stylecodes", initial=start, total=cfg.steps, unit="step")
    avg = math.nan
    for k in bar:
        loss = trainer.step(k)
        avg = loss if math.isnan(avg) else 0.98 * avg + 0.02 * loss
        bar.set_postfix(loss=f"{avg:.4f}")
        if (k + 1) % cfg.checkpoint_every == 0 or k + 1 == end:
            trainer.save(k + 1)
    bar.close()
    final = Path(cfg.out) / "stylecodes.safetensors"
    if end == cfg.steps:
        save_stylecodes(trainer.model, final)
    return final
