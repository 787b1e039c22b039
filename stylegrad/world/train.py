"""Train the small world on a CPU: a CLIP, a VAE and a text-conditioned UNet, saved as a CLIP folder and a
diffusers StableDiffusionPipeline folder.

    python -m stylegrad.world.train --out /tmp/world      # about 45 minutes on 2 cores (docs/world.md)

Reproducible from ``--seed``: data, initialization and batches all come from seeded generators.
"""

from __future__ import annotations

import argparse
import json
import math
import time
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F
from tqdm.auto import tqdm

from .data import SIZE, caption_facts, dataset, scene_facts
from .tokenizer import char_tokenizer

HIDDEN = 64
LATENT = 8  # 8x8x8 latents: eight channels keep stripes and outlines that four lost; the UNet barely notices


def to_tensor(images) -> torch.Tensor:
    """PIL images -> (B, 3, H, W) in [-1, 1]."""
    return torch.from_numpy(np.stack([np.asarray(im, np.float32) for im in images])).permute(0, 3, 1, 2) / 127.5 - 1


def build_clip(tok):
    from transformers import CLIPConfig, CLIPModel

    text = dict(vocab_size=len(tok), hidden_size=HIDDEN, intermediate_size=4 * HIDDEN, num_attention_heads=4,
                num_hidden_layers=3, max_position_embeddings=77, projection_dim=HIDDEN, hidden_act="quick_gelu",
                bos_token_id=tok.bos_token_id, eos_token_id=tok.eos_token_id, pad_token_id=tok.pad_token_id)
    vision = dict(hidden_size=HIDDEN, intermediate_size=4 * HIDDEN, num_attention_heads=4, num_hidden_layers=3,
                  image_size=SIZE, patch_size=4, projection_dim=HIDDEN, hidden_act="quick_gelu")
    return CLIPModel(CLIPConfig(text_config=text, vision_config=vision, projection_dim=HIDDEN))


def clip_pixels(images: torch.Tensor) -> torch.Tensor:
    """[-1, 1] images -> CLIP's normalization (the processor we save does the same from PIL)."""
    mean = torch.tensor([0.48145466, 0.4578275, 0.40821073]).view(1, 3, 1, 1)
    std = torch.tensor([0.26862954, 0.26130258, 0.27577711]).view(1, 3, 1, 1)
    return ((images + 1) / 2 - mean) / std


def _fact_codes(facts: list[dict[str, str]]) -> torch.Tensor:
    """(N, 5) integer codes of color, shape, style, background and size; -1 where a caption says nothing."""
    keys = ("color", "shape", "style", "background", "size")
    vocab = {k: {} for k in keys}
    return torch.tensor([[vocab[k].setdefault(f[k], len(vocab[k])) if k in f else -1 for k in keys] for f in facts])


def train_clip(tok, images: torch.Tensor, captions: list[str], scenes, steps: int, seed: int):
    """Contrastive training where every caption that is true of an image counts as a positive for it ("a red
    circle" fits a striped red circle too), so the zero-shot probe's plain captions learn every style."""
    torch.manual_seed(seed)
    model = build_clip(tok).train()
    opt = torch.optim.AdamW(model.parameters(), lr=1e-3, weight_decay=0.01)
    uniq = sorted(set(captions))
    cap_ids = torch.tensor([uniq.index(c) for c in captions])
    codes = _fact_codes([caption_facts(c) for c in uniq] + [scene_facts(s) for s in scenes])
    cap_codes, scene_codes = codes[: len(uniq)], codes[len(uniq):]
    # The loss reads the EOS state, which causal attention makes independent of later tokens: pad to the longest.
    ids_all = tok(uniq, padding="longest", return_tensors="pt").input_ids
    g = torch.Generator().manual_seed(seed)
    bar = tqdm(range(steps), desc="clip")
    for step in bar:
        lr = 1e-3 * min(1.0, (step + 1) / 100) * 0.5 * (1 + math.cos(math.pi * step / steps))
        for group in opt.param_groups:
            group["lr"] = lr
        idx = torch.randint(len(captions), (256,), generator=g)
        px = clip_pixels(images[idx])
        out = model(input_ids=ids_all[cap_ids[idx]], pixel_values=px, return_loss=False)
        cc, sc = cap_codes[cap_ids[idx]], scene_codes[idx]
        fit = ((cc[:, None, :] == -1) | (cc[:, None, :] == sc[None, :, :])).all(-1).float()  # (caption, image)
        loss = 0.5 * (torch.sum(-fit / fit.sum(1, keepdim=True) * F.log_softmax(out.logits_per_text, 1), 1).mean()
                      + torch.sum(-fit.T / fit.sum(0)[:, None] * F.log_softmax(out.logits_per_image, 1), 1).mean())
        opt.zero_grad()
        loss.backward()
        opt.step()
        bar.set_postfix(loss=f"{loss.item():.3f}")
    return model.eval()


def build_vae():
    from diffusers import AutoencoderKL

    return AutoencoderKL(in_channels=3, out_channels=3, latent_channels=LATENT, block_out_channels=(16, 32, 32),
                         down_block_types=("DownEncoderBlock2D",) * 3, up_block_types=("UpDecoderBlock2D",) * 3,
                         layers_per_block=1, norm_num_groups=16, sample_size=SIZE)


def train_vae(images: torch.Tensor, steps: int, seed: int, position: int = 0):
    torch.manual_seed(seed)
    vae = build_vae().train()
    opt = torch.optim.AdamW(vae.parameters(), lr=1e-3)
    g = torch.Generator().manual_seed(seed + 1)
    bar = tqdm(range(steps), desc="vae", position=position)
    for step in bar:
        for group in opt.param_groups:
            group["lr"] = 1e-3 * 0.5 * (1 + math.cos(math.pi * step / steps))
        x = images[torch.randint(len(images), (64,), generator=g)]
        post = vae.encode(x).latent_dist
        rec = vae.decode(post.sample()).sample
        kl = post.kl().mean() / x[0].numel()
        loss = F.mse_loss(rec, x) + 1e-4 * kl
        opt.zero_grad()
        loss.backward()
        opt.step()
        bar.set_postfix(mse=f"{F.mse_loss(rec, x).item():.4f}")
    vae.eval()
    with torch.no_grad():
        lat = torch.cat([vae.encode(images[i : i + 256]).latent_dist.mean for i in range(0, min(2048, len(images)), 256)])
    vae.register_to_config(scaling_factor=float(1.0 / lat.std()))
    return vae


def refine_decoder(vae, images: torch.Tensor, steps: int, seed: int, lr: float = 1e-3, position: int = 0):
    """Train the decoder alone (encoder frozen), so latents, and a UNet trained on them, stay valid while the
    pictures get sharper: the small decoder underfits long before the latents run out of information."""
    torch.manual_seed(seed)
    vae.requires_grad_(False)
    decoder = [vae.post_quant_conv, vae.decoder]
    params = [p for m in decoder for p in m.parameters()]
    for p in params:
        p.requires_grad_(True)
    vae.train()
    opt = torch.optim.AdamW(params, lr=lr)
    g = torch.Generator().manual_seed(seed + 3)
    with torch.no_grad():  # the encoder is frozen: its posteriors are computed once, not at every step
        post = [vae.encode(images[i : i + 512]).latent_dist for i in range(0, len(images), 512)]
        mean, std = torch.cat([d.mean for d in post]), torch.cat([d.std for d in post])
    bar = tqdm(range(steps), desc="decoder", position=position)
    for step in bar:
        for group in opt.param_groups:
            group["lr"] = lr * min(1.0, (step + 1) / 50) * 0.5 * (1 + math.cos(math.pi * step / steps))
        idx = torch.randint(len(images), (64,), generator=g)
        x = images[idx]
        mu = mean[idx]
        z = mu + std[idx] * torch.randn(mu.shape, generator=g)
        rec = vae.decode(z).sample
        loss = F.l1_loss(rec, x) + F.mse_loss(rec, x)  # L1 keeps edges and thin strokes sharper than MSE alone
        opt.zero_grad()
        loss.backward()
        opt.step()
        bar.set_postfix(mse=f"{F.mse_loss(rec, x).item():.4f}")
    vae.requires_grad_(False)
    return vae.eval()


def build_unet():
    from diffusers import UNet2DConditionModel

    return UNet2DConditionModel(
        sample_size=SIZE // 4, in_channels=LATENT, out_channels=LATENT, block_out_channels=(48, 96), layers_per_block=1,
        down_block_types=("CrossAttnDownBlock2D", "CrossAttnDownBlock2D"),
        up_block_types=("CrossAttnUpBlock2D", "CrossAttnUpBlock2D"), cross_attention_dim=HIDDEN,
        attention_head_dim=2, norm_num_groups=16,  # diffusers reads this as 2 heads: 24- and 48-wide, not 6 and 12
    )


def scheduler_config() -> dict:
    return dict(num_train_timesteps=1000, beta_schedule="scaled_linear", beta_start=0.00085, beta_end=0.012,
                clip_sample=False, set_alpha_to_one=False, steps_offset=1, prediction_type="epsilon")


def train_unet(latents: torch.Tensor, cond: torch.Tensor, cap_idx: torch.Tensor, uncond: torch.Tensor,
               steps: int, seed: int, batch: int = 64, widen=None):
    """Epsilon prediction; 10% of captions dropped to the empty prompt for classifier-free guidance. ``widen(step)``
    runs before each step (the two-process recipe uses it to take more threads)."""
    from diffusers import DDPMScheduler

    torch.manual_seed(seed)
    from diffusers.models.attention_processor import AttnProcessor

    unet = build_unet().train()
    # Plain matmul-softmax attention: on 64 or 16 queries, CPU's fused attention kernel costs more than it saves.
    unet.set_attn_processor(AttnProcessor())
    cfg = scheduler_config()
    sched = DDPMScheduler(**{k: v for k, v in cfg.items() if k not in ("set_alpha_to_one", "steps_offset")})
    opt = torch.optim.AdamW(unet.parameters(), lr=5e-4, weight_decay=0.01)
    ema = {k: v.detach().clone() for k, v in unet.state_dict().items()}
    g = torch.Generator().manual_seed(seed + 2)
    bar = tqdm(range(steps), desc="unet")
    for step in bar:
        if widen is not None:
            widen(step)
        for group in opt.param_groups:
            group["lr"] = 5e-4 * min(1.0, (step + 1) / 200) * (0.5 * (1 + math.cos(math.pi * step / steps)) * 0.9 + 0.1)
        idx = torch.randint(len(latents), (batch,), generator=g)
        x0 = latents[idx]
        noise = torch.randn(x0.shape, generator=g)
        t = torch.randint(0, 1000, (batch,), generator=g)
        xt = sched.add_noise(x0, noise, t)
        c = cond[cap_idx[idx]].clone()
        drop = torch.rand(batch, generator=g) < 0.1
        c[drop] = uncond
        pred = unet(xt, t, encoder_hidden_states=c).sample
        loss = F.mse_loss(pred, noise)
        opt.zero_grad()
        loss.backward()
        torch.nn.utils.clip_grad_norm_(unet.parameters(), 1.0)
        opt.step()
        with torch.no_grad():
            decay = min(0.999, (1 + step) / (10 + step))
            for k, v in unet.state_dict().items():
                ema[k].mul_(decay).add_(v.detach(), alpha=1 - decay)
        bar.set_postfix(loss=f"{loss.item():.4f}")
    unet.load_state_dict(ema)
    return unet.eval()


# The recipe in two single-threaded processes, because two threads in one process are only 1.3-1.5x faster than one
# while two processes each run at full speed (docs/world.md). Process A: CLIP, then UNet; process B: VAE, then the
# decoder refinement. A's UNet runs this many steps on its own share of threads, then waits for B and takes every
# thread: a fixed step, not "whenever B finishes", because the thread count changes float rounding and a retrain
# must repeat bit for bit. 850 steps is about B's lead over A on 2 cores.
WIDEN_AT_UNET_STEP = 850


def _data(a):
    items = dataset(a.images, a.seed)
    return (to_tensor([im for im, _, _ in items]), [c for _, c, _ in items], [s for _, _, s in items],
            char_tokenizer())


def _clip_part(out: Path, a, data) -> None:
    from transformers import CLIPImageProcessorPil

    images, captions, scenes, tok = data
    clip = train_clip(tok, images, captions, scenes, a.clip_steps, a.seed)
    clip.save_pretrained(out / "clip")
    tok.save_pretrained(out / "clip")
    CLIPImageProcessorPil(size={"shortest_edge": SIZE}, crop_size={"height": SIZE, "width": SIZE},
                          resample=3).save_pretrained(out / "clip")


def _unet_part(out: Path, a, data, vae_dir: Path, widen=None):
    """The UNet on the saved CLIP's text tower and the latents of the VAE in ``vae_dir``."""
    from diffusers import AutoencoderKL
    from transformers import CLIPModel, CLIPTextModel

    images, captions, _, tok = data
    clip = CLIPModel.from_pretrained(out / "clip").eval()
    vae = AutoencoderKL.from_pretrained(vae_dir).eval()
    text_encoder = CLIPTextModel(clip.config.text_config).eval()
    text_encoder.load_state_dict(clip.text_model.state_dict())
    with torch.no_grad():
        lat = torch.cat([vae.encode(images[i : i + 512]).latent_dist.mean for i in range(0, len(images), 512)])
        lat = lat * vae.config.scaling_factor
        uniq = sorted(set(captions))
        ids = tok(uniq + [""], padding="max_length", max_length=77, return_tensors="pt").input_ids
        hid = text_encoder(ids).last_hidden_state
    cap_idx = torch.tensor([uniq.index(c) for c in captions])
    unet = train_unet(lat, hid[:-1], cap_idx, hid[-1], a.unet_steps, a.seed, widen=widen)
    return unet, text_encoder


def _save_pipeline(out: Path, vae_dir: Path, unet, text_encoder, tok) -> None:
    from diffusers import AutoencoderKL, DDIMScheduler, StableDiffusionPipeline

    vae = AutoencoderKL.from_pretrained(vae_dir).eval()
    pipe = StableDiffusionPipeline(vae=vae, text_encoder=text_encoder, tokenizer=tok, unet=unet,
                                   scheduler=DDIMScheduler(**scheduler_config()), safety_checker=None,
                                   feature_extractor=None, requires_safety_checker=False)
    pipe.save_pretrained(out / "sd")


def _vae_and_decoder(out: Path, a, threads: int, vae_ready, times) -> None:
    """Process B: the VAE (saved to vae_tmp, which A's UNet needs), then the decoder refinement (vae_refined)."""
    torch.set_num_threads(threads)
    t0 = time.time()
    images = _data(a)[0]
    vae = train_vae(images, a.vae_steps, a.seed, position=1)
    vae.save_pretrained(out / "vae_tmp")
    vae_ready.set()
    t1 = time.time()
    vae = refine_decoder(vae, images, a.decoder_steps, a.seed, position=1)  # the saved copy is A's, untouched
    vae.save_pretrained(out / "vae_refined")
    times.put({"vae_s": t1 - t0, "decoder_s": time.time() - t1})


def _train_all(out: Path, a) -> dict:
    import multiprocessing as mp
    import shutil

    total = max(1, torch.get_num_threads())
    share_b = max(1, total // 2)
    share_a = max(1, total - share_b)
    ctx = mp.get_context("spawn")
    vae_ready, times = ctx.Event(), ctx.Queue()
    b = ctx.Process(target=_vae_and_decoder, args=(out, a, share_b, vae_ready, times), name="vae+decoder", daemon=True)
    b.start()

    def b_failed() -> SystemExit:
        return SystemExit(f"training stopped: the VAE/decoder process exited with code {b.exitcode}")

    log = {}
    try:
        torch.set_num_threads(share_a)
        t0 = time.time()
        data = _data(a)
        _clip_part(out, a, data)
        log["clip_s"] = time.time() - t0  # includes making the data
        while not vae_ready.wait(2):
            if not b.is_alive():
                raise b_failed()

        def widen(step: int) -> None:
            if step == WIDEN_AT_UNET_STEP:  # B's work is done by now (or nearly): wait, then take its threads
                b.join()
                if b.exitcode != 0:
                    raise b_failed()
                torch.set_num_threads(total)

        t1 = time.time()
        unet, text_encoder = _unet_part(out, a, data, out / "vae_tmp", widen)
        log["unet_s"] = time.time() - t1
        log.update(times.get())  # before join: a process with queued data does not exit until it is read
        b.join()
        if b.exitcode != 0:
            raise b_failed()
        _save_pipeline(out, out / "vae_refined", unet, text_encoder, data[3])
    finally:
        if b.is_alive():
            b.terminate()
    for tmp in ("vae_tmp", "vae_refined"):
        shutil.rmtree(out / tmp, ignore_errors=True)
    return log


def _train_one(out: Path, a) -> dict:
    """One part on every thread, reusing the other parts from ``out``."""
    from diffusers import StableDiffusionPipeline

    t0 = time.time()
    data = _data(a)
    if a.only == "clip":
        _clip_part(out, a, data)
        return {"clip_s": time.time() - t0}
    if a.only == "vae":  # the encoder changes the latents: the UNet and decoder must be retrained after it
        vae = train_vae(data[0], a.vae_steps, a.seed)
        vae.save_pretrained(out / "vae_tmp")
        return {"vae_s": time.time() - t0}
    if a.only == "unet":
        vae_dir = out / "vae_tmp" if (out / "vae_tmp").exists() else out / "sd" / "vae"
        unet, text_encoder = _unet_part(out, a, data, vae_dir)
        _save_pipeline(out, vae_dir, unet, text_encoder, data[3])
        return {"unet_s": time.time() - t0}
    pipe = StableDiffusionPipeline.from_pretrained(out / "sd")
    pipe.vae = refine_decoder(pipe.vae, data[0], a.decoder_steps, a.seed)
    pipe.save_pretrained(out / "sd")
    return {"decoder_s": time.time() - t0}


def main(argv=None) -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--out", required=True)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--images", type=int, default=20000)
    p.add_argument("--clip-steps", type=int, default=1200)
    p.add_argument("--vae-steps", type=int, default=1000)
    p.add_argument("--unet-steps", type=int, default=4000)
    p.add_argument("--decoder-steps", type=int, default=3000)
    p.add_argument("--only", choices=["clip", "vae", "unet", "decoder"],
                   help="train one part on all threads, reusing the others from --out")
    a = p.parse_args(argv)
    out = Path(a.out)
    out.mkdir(parents=True, exist_ok=True)
    t0 = time.time()
    log = _train_all(out, a) if a.only is None else _train_one(out, a)
    log["total_s"] = time.time() - t0
    log.update(vars(a))
    (out / "train_log.json").write_text(json.dumps(log, indent=2))
    print(json.dumps(log))


if __name__ == "__main__":
    main()
