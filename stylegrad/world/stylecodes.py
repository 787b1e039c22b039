"""A Stylecodes model for the small world, so Stylecodes is measured on the same footing as the other methods.

The recipe is the paper's and ``stylecodes/training.py``'s (the UNet frozen; the style autoencoder, decoder and
control stream trained end to end with the diffusion loss, the 20-d latent unquantized while training), on the
same modules (``StylecodesModel``, ``controlled_forward``). Two things differ, and why:
- the image tokens are the world CLIP image tower's penultimate states (64 patches + CLS, 64 wide) in place of
  SigLIP's: SigLIP has never seen this world, and the world's own tower is what it knows (the IP-Adapter row reads
  the same tower);
- the triples are made from the world's generator rather than read from an index: a target picture with its
  content caption (never naming the style) and, as the style reference, another picture of the same style with
  other content, so only the style can pass from reference to target. Everything is precomputed once (latent
  moments, text states, image tokens): ``Trainer`` re-reads and re-encodes every picture at every step, which
  costs more than the step itself at 32 pixels.
The code's autoencoder is narrower (64 wide, 256 feed-forward) than the published 512: the tokens are 64 wide.
Cached in a folder named after the settings, like the world's IP-Adapter (``world/ipadapter.py``).
"""

from __future__ import annotations

import hashlib
import json
import tempfile
import time
from dataclasses import asdict, dataclass
from pathlib import Path

import torch

from .cache import claim, wait_for_other
from .demo import WEIGHTS

FILE = "stylecodes_world.safetensors"


@dataclass(frozen=True)
class Settings:
    steps: int = 1200
    batch_size: int = 8
    lr: float = 2e-3  # the paper's 1e-6 (batch 25, 100k steps) is far too slow for a control stream trained from scratch
    images: int = 2000
    width: int = 64
    feedforward: int = 256
    seed: int = 0

    def key(self) -> str:
        return hashlib.sha256(json.dumps(asdict(self), sort_keys=True).encode()).hexdigest()[:12]


@torch.no_grad()
def image_tokens(tower, pixels: torch.Tensor) -> torch.Tensor:
    """(B, 65, 64): the world CLIP image tower's penultimate states of [-1, 1] pictures (SigLIP's stand-in)."""
    from .train import clip_pixels

    return tower(pixel_values=clip_pixels(pixels), output_hidden_states=True).hidden_states[-2]


def triples(n: int, seed: int):
    """(target pictures, their content captions, style pictures): each style picture has the target's style and
    a content of its own."""
    import numpy as np

    from .data import Scene, dataset, render, sample
    from .train import to_tensor

    items = dataset(n, seed, style_caption_p=0.0)
    rng = np.random.default_rng(seed + 1)
    styles = []
    for _, _, s in items:
        o = sample(rng)
        styles.append(render(Scene(o.shape, o.color, s.style, o.background, o.cx, o.cy, o.r)))
    return to_tensor([im for im, _, _ in items]), [c for _, c, _ in items], to_tensor(styles)


def train_world(out: str | Path, settings: Settings = Settings(), weights: Path = WEIGHTS,
                progress: bool = True) -> dict:
    """Train on ``settings.images`` triples; writes ``out/FILE``; returns {'file', 'seconds', 'losses'}."""
    import torch.nn.functional as F
    from diffusers import DDPMScheduler, StableDiffusionPipeline
    from diffusers.models.attention_processor import AttnProcessor
    from tqdm.auto import tqdm
    from transformers import CLIPVisionModel

    from stylegrad.stylecodes.model import StylecodesModel, save_stylecodes
    from stylegrad.stylecodes.unet import controlled_forward, mid_size
    from stylegrad.training.step import latent_moments

    out = Path(out)
    t0 = time.perf_counter()
    pipe = StableDiffusionPipeline.from_pretrained(weights / "sd")
    unet, vae, text_encoder, tok = pipe.unet.eval(), pipe.vae.eval(), pipe.text_encoder.eval(), pipe.tokenizer
    for m in (unet, vae, text_encoder):
        m.requires_grad_(False)
    unet.set_attn_processor(AttnProcessor())  # plain attention: faster on the CPU for these few tokens
    scheduler = DDPMScheduler.from_config(pipe.scheduler.config)
    tower = CLIPVisionModel.from_pretrained(weights / "clip").eval()
    targets, captions, style_pictures = triples(settings.images, 20_000 + settings.seed)
    with torch.no_grad():
        mean, std = latent_moments(vae, targets)
        tokens = torch.cat([image_tokens(tower, style_pictures[i:i + 512]) for i in range(0, len(targets), 512)])
        uniq = sorted(set(captions))
        ids = tok(uniq, padding="max_length", max_length=77, return_tensors="pt").input_ids
        states = text_encoder(ids)[0]
    index = torch.tensor([uniq.index(c) for c in captions])
    torch.manual_seed(settings.seed)
    model = StylecodesModel(unet, dict(input_dim=tokens.shape[-1], width=settings.width,
                                       feedforward=settings.feedforward, max_len=256)).train()
    model.control_model.set_attn_processor(AttnProcessor())
    opt = torch.optim.AdamW(model.parameters(), lr=settings.lr)
    g = torch.Generator().manual_seed(settings.seed)
    side = targets.shape[-1]
    h, w = mid_size(unet, side, side, 2 ** (len(vae.config.block_out_channels) - 1))
    losses = []
    for step in tqdm(range(settings.steps), desc="stylecodes", disable=not progress):
        for group in opt.param_groups:
            group["lr"] = settings.lr * min(1.0, (step + 1) / 50)
        idx = torch.randint(len(targets), (settings.batch_size,), generator=g)
        latents = mean[idx] + std[idx] * torch.randn(mean[idx].shape, generator=g)
        noise = torch.randn(latents.shape, generator=g)
        t = torch.randint(0, scheduler.config.num_train_timesteps, (len(idx),), generator=g)
        auto = model.sref_autoencoder
        style_map = auto.decode(auto.encode(tokens[idx]), h, w)  # unquantized, as the paper trains
        ones = torch.ones(len(idx), 1, 1, 1)
        pred = controlled_forward(unet, model, scheduler.add_noise(latents, noise, t), t, states[index[idx]],
                                  style_map, ones)
        loss = F.mse_loss(pred, noise)
        opt.zero_grad(set_to_none=True)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
        opt.step()
        losses.append(round(float(loss.detach()), 5))
    seconds = time.perf_counter() - t0
    model.eval()
    path = save_stylecodes(model, out / FILE)
    (out / "train.json").write_text(json.dumps({"settings": asdict(settings), "seconds": seconds, "losses": losses}))
    return {"file": path, "seconds": seconds, "losses": losses, "settings": asdict(settings)}


def cached(settings: Settings = Settings(), root: str | Path | None = None, progress: bool = True) -> dict:
    """The trained model for ``settings``: trained on the first call, read back after."""
    folder = Path(root or Path(tempfile.gettempdir()) / "stylegrad-world-stylecodes") / settings.key()
    log = folder / "train.json"
    wait_for_other(folder)
    if (folder / FILE).is_file() and log.is_file():
        done = json.loads(log.read_text())
        return {"file": folder / FILE, "seconds": done["seconds"], "losses": done["losses"],
                "settings": done["settings"]}
    marker = claim(folder)
    try:
        return train_world(folder, settings, progress=progress)
    finally:
        marker.unlink(missing_ok=True)


def stylecodes_for(file: str | Path, unet, weights: Path = WEIGHTS):
    """``Stylecodes`` reading ``file`` for ``unet``, with the world CLIP image tower as its image encoder."""
    from transformers import CLIPImageProcessor, CLIPVisionModel

    from stylegrad.stylecodes.facade import Stylecodes
    from stylegrad.stylecodes.model import load_stylecodes

    model = load_stylecodes(str(file), unet)
    tower = CLIPVisionModel.from_pretrained(weights / "clip").eval()
    return Stylecodes(model.sref_autoencoder, model, tower, CLIPImageProcessor.from_pretrained(weights / "clip"))
