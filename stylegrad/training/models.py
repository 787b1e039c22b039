"""The model a method trains on, loaded for training (its own copy, in the run's precision: the weights a method
does not train stay in the model's dtype, what it trains is float32; the user's files are only read), and the one
text-conditioning function every method uses: SD1.x/SD2.x's final states, SDXL's two towers' penultimate states
with bigG's pooled embedding and the size conditioning."""

from __future__ import annotations

from dataclasses import dataclass

import torch
from torch.func import functional_call

from stylegrad.families import Family
from stylegrad.prompts.chunks import Vocabulary, gather_rows

TOKEN = "embeddings.token_embedding.weight"


@dataclass
class Models:
    unet: torch.nn.Module
    vae: torch.nn.Module
    scheduler: object
    text_encoders: list  # one (SD1.x/SD2.x) or two (SDXL)
    tokenizers: list
    pipe: object  # for samples
    family: Family

    @property
    def sdxl(self) -> bool:
        return self.family.is_sdxl

    @property
    def device(self) -> torch.device:
        return self.unet.device

    @property
    def dtype(self) -> torch.dtype:
        """The frozen weights' dtype (the VAE's: no method trains it)."""
        return next(self.vae.parameters()).dtype


def load_models(model: str, device=None, vae: str | None = None, models_dir: str | None = None,
                dtype: str | torch.dtype | None = None) -> Models:
    """The pipeline's parts in ``dtype`` (stylegrad.devices' policy: auto is fp16 on CUDA and MPS, fp32 on the CPU),
    every weight frozen: a method makes what it trains float32 (``train_float32``) and unfreezes it."""
    from diffusers import DDPMScheduler

    from stylegrad.pipelines.loading import load_pipeline

    pipe = load_pipeline(model, device, vae=vae, models_dir=models_dir, dtype=dtype)
    encoders = [e for e in (pipe.text_encoder, getattr(pipe, "text_encoder_2", None)) if e is not None]
    tokenizers = [t for t in (pipe.tokenizer, getattr(pipe, "tokenizer_2", None)) if t is not None]
    for m in (pipe.unet, pipe.vae, *encoders):
        m.requires_grad_(False).eval()
    family = Family.SDXL if len(encoders) == 2 else Family.of_text_width(encoders[0].config.hidden_size) or Family.SD1
    scheduler = DDPMScheduler.from_config(pipe.scheduler.config)  # the training noise schedule of the model
    return Models(pipe.unet, pipe.vae, scheduler, encoders, tokenizers, pipe, family)


@torch.no_grad()
def train_float32(params) -> None:
    """Make these parameters (of a model loaded for training) trainable, in float32 in place: the optimizer's
    steps and a gradient scaler need float32, while the rest of their module keeps its half precision and the
    forward mixes the two under autocast."""
    for p in params:
        if p.dtype != torch.float32:
            p.data = p.data.float()
        p.requires_grad_(True)


def _run(encoder, ids: torch.Tensor, extra: torch.Tensor | None, hidden: bool):
    """The encoder on ``ids`` (B, 77), ids past the table reading ``extra`` (trainable vectors)."""
    if extra is None:
        return encoder(ids, output_hidden_states=hidden)
    rows, local = torch.unique(ids, return_inverse=True)
    params = dict(encoder.named_parameters())
    prefix = "text_model." if "text_model." + TOKEN in params else ""
    params[prefix + TOKEN] = gather_rows(params[prefix + TOKEN], extra, rows)
    return functional_call(encoder, params, (local,), {"output_hidden_states": hidden})


def condition(models: Models, captions: list[str], words: list[dict[str, torch.Tensor]] | None = None,
              size: int | None = None) -> dict[str, torch.Tensor]:
    """The UNet's conditioning for ``captions``: ``encoder_hidden_states`` (B, 77, H), and for SDXL
    ``added_cond_kwargs``. ``words``: per text encoder, textual-inversion words -> their (n, H) vectors (trainable
    tensors keep their gradient). Captions are plain text (no emphasis), first 75 tokens."""
    states, pooled = [], None
    for i, (encoder, tokenizer) in enumerate(zip(models.text_encoders, models.tokenizers)):
        vocab = Vocabulary(tokenizer, (words or [{}] * 2)[i] if words else None)
        chunks = [vocab.chunks(c, weighting=False) for c in captions]
        ids = torch.cat([c.ids[:1] for c in chunks]).to(models.device)
        used = [c for c in chunks if c.extra is not None]
        if any(c.embeddings != used[0].embeddings for c in used):
            raise ValueError("every caption of a batch must use the same textual-inversion words, in one order")
        extra = used[0].extra if used else None  # the words' vectors, numbered alike in every caption
        out = _run(encoder, ids, extra, hidden=models.sdxl)
        if models.sdxl:
            states.append(out.hidden_states[-2])
            if i == 1:
                pooled = out[0]  # CLIPTextModelWithProjection: text_embeds
        else:
            states.append(out[0])
    cond = {"encoder_hidden_states": torch.cat(states, dim=-1)}
    if models.sdxl:
        side = size or models.unet.config.sample_size * 8
        time_ids = torch.tensor([[side, side, 0, 0, side, side]], dtype=pooled.dtype, device=pooled.device)
        cond["added_cond_kwargs"] = {"text_embeds": pooled, "time_ids": time_ids.expand(len(captions), -1)}
    return cond

