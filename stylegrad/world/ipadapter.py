"""An IP-Adapter for the small world, so IP-Adapter and InstantStyle are measured on the same footing as the other
methods: trained once on many pictures of the world (every style and content, ``data.dataset``), never on a style's
own pictures (that is the method: at use time the style comes from the reference pictures, without training).

The image encoder is the world's own CLIP image tower with its 64-d projection, saved as the
``CLIPVisionModelWithProjection`` folder a pipeline's ``image_encoder`` is; the adapter is the published layout
(``training/ipadapter.py``). Both are cached in a folder named after the settings, so reruns reuse them.

    python -m stylegrad.world.ipadapter --out /tmp/world-ipadapter      # a few minutes on 2 cores
"""

from __future__ import annotations

import argparse
import hashlib
import json
import tempfile
import time
from dataclasses import asdict, dataclass
from pathlib import Path

import torch

from .cache import claim, wait_for_other
from .demo import WEIGHTS

FILE = "ip-adapter_world.safetensors"
ENCODER = "image_encoder"


@dataclass(frozen=True)
class Settings:
    steps: int = 1000
    batch_size: int = 16
    lr: float = 1e-3  # the paper's 1e-4 is for SD's 768-wide model; the 64-wide world moves little at it
    images: int = 2000
    seed: int = 0

    def key(self) -> str:
        return hashlib.sha256(json.dumps(asdict(self), sort_keys=True).encode()).hexdigest()[:12]


def save_image_encoder(clip_dir: str | Path, out: str | Path) -> Path:
    """The world CLIP's image tower and projection as a CLIPVisionModelWithProjection folder, with its processor."""
    from transformers import CLIPImageProcessor, CLIPModel, CLIPVisionModelWithProjection

    clip = CLIPModel.from_pretrained(str(clip_dir))
    tower = CLIPVisionModelWithProjection(clip.config.vision_config)
    tower.vision_model.load_state_dict(clip.vision_model.state_dict())
    tower.visual_projection.load_state_dict(clip.visual_projection.state_dict())
    out = Path(out)
    tower.eval().save_pretrained(out)
    CLIPImageProcessor.from_pretrained(str(clip_dir)).save_pretrained(out)
    return out


def train_world(out: str | Path, settings: Settings = Settings(), weights: Path = WEIGHTS,
                progress: bool = True) -> dict:
    """Train the adapter on ``settings.images`` world pictures with their captions; writes ``out/FILE`` and
    ``out/ENCODER``; returns {'file', 'image_encoder', 'seconds', 'losses'}."""
    from diffusers import DDPMScheduler, StableDiffusionPipeline
    from diffusers.models.attention_processor import AttnProcessor
    from tqdm.auto import tqdm
    from transformers import CLIPVisionModelWithProjection

    from stylegrad.training.ipadapter import IPAdapter, context, drop, installed
    from stylegrad.training.step import diffusion_loss, latent_moments

    from .data import dataset
    from .train import clip_pixels, to_tensor

    out = Path(out)
    t0 = time.perf_counter()
    encoder_dir = save_image_encoder(weights / "clip", out / ENCODER)
    pipe = StableDiffusionPipeline.from_pretrained(weights / "sd")
    unet, vae, text_encoder, tok = pipe.unet.eval(), pipe.vae.eval(), pipe.text_encoder.eval(), pipe.tokenizer
    unet.set_attn_processor(AttnProcessor())  # plain attention: faster on the CPU for these few tokens
    for m in (unet, vae, text_encoder):
        m.requires_grad_(False)
    scheduler = DDPMScheduler.from_config(pipe.scheduler.config)
    tower = CLIPVisionModelWithProjection.from_pretrained(encoder_dir).eval()
    items = dataset(settings.images, 10_000 + settings.seed)  # not the UNet's own training draw
    pixels = to_tensor([im for im, _, _ in items])
    captions = [c for _, c, _ in items]
    with torch.no_grad():
        mean, std = latent_moments(vae, pixels)
        embeds = torch.cat([tower(pixel_values=clip_pixels(pixels[i:i + 512])).image_embeds
                            for i in range(0, len(pixels), 512)])
        uniq = sorted(set(captions))
        ids = tok(uniq + [""], padding="max_length", max_length=77, return_tensors="pt").input_ids
        states = torch.cat([text_encoder(ids[i:i + 256])[0] for i in range(0, len(ids), 256)])
    index = torch.tensor([uniq.index(c) for c in captions])
    empty = states[-1:]
    torch.manual_seed(settings.seed)
    adapter = IPAdapter(unet, embeds.shape[1])
    opt = torch.optim.AdamW(adapter.parameters(), lr=settings.lr, weight_decay=1e-2)
    g = torch.Generator().manual_seed(settings.seed)
    losses = []
    with installed(unet, adapter):
        for step in tqdm(range(settings.steps), desc="ip-adapter", disable=not progress):
            for group in opt.param_groups:  # warm-up, then constant (the paper's schedule is constant)
                group["lr"] = settings.lr * min(1.0, (step + 1) / 50)
            idx = torch.randint(len(items), (settings.batch_size,), generator=g)
            text, image = drop(states[index[idx]], embeds[idx], empty, g)
            loss = diffusion_loss(unet, scheduler, mean[idx], std[idx],
                                  {"encoder_hidden_states": context(adapter, text, image)}, g)
            opt.zero_grad(set_to_none=True)
            loss.backward()
            opt.step()
            losses.append(round(float(loss.detach()), 5))
    seconds = time.perf_counter() - t0
    meta = {k: str(v) for k, v in asdict(settings).items()}
    path = adapter.save(out / FILE, {**meta, "seconds": f"{seconds:.1f}", "image_encoder": "world CLIP, 64-d"})
    (out / "train.json").write_text(json.dumps({"settings": asdict(settings), "seconds": seconds, "losses": losses}))
    return {"file": path, "image_encoder": encoder_dir, "seconds": seconds, "losses": losses,
            "settings": asdict(settings)}


def cached(settings: Settings = Settings(), root: str | Path | None = None, progress: bool = True) -> dict:
    """The trained adapter for ``settings``, trained on the first call and read back after (a folder under the
    temp dir named after the settings)."""
    folder = Path(root or Path(tempfile.gettempdir()) / "stylegrad-world-ipadapter") / settings.key()
    log = folder / "train.json"
    wait_for_other(folder)
    if (folder / FILE).is_file() and log.is_file() and (folder / ENCODER / "config.json").is_file():
        done = json.loads(log.read_text())
        return {"file": folder / FILE, "image_encoder": folder / ENCODER, "seconds": done["seconds"],
                "losses": done["losses"], "settings": done["settings"]}
    marker = claim(folder)
    try:
        return train_world(folder, settings, progress=progress)
    finally:
        marker.unlink(missing_ok=True)


def main(argv=None) -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--out", required=True)
    for name, value in asdict(Settings()).items():
        p.add_argument(f"--{name.replace('_', '-')}", type=type(value), default=value)
    a = vars(p.parse_args(argv))
    out = a.pop("out")
    r = train_world(out, Settings(**a))
    print(json.dumps({"file": str(r["file"]), "seconds": round(r["seconds"], 1), "last_loss": r["losses"][-1]}))


if __name__ == "__main__":
    main()
