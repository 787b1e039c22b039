"""The CLIP text tower that aesthetic gradients tune, built around a pipeline's own text encoder.

The loss needs CLIP's text embedding (projection of the final-layer state at the first EOS); the UNet needs the
hidden states the pipeline would compute. A ``TextTower`` joins the two without copying or touching the
pipeline's modules: it is a parameter-free skeleton (built on the ``meta`` device) that is always run with
``torch.func.functional_call`` on a dict of tensors, either the originals (by reference) or tuned copies.

Families are picked like peft's dispatchers: the first adapter that matches wins, no match lists what is supported.
- SD1.x: the pipeline's 12-layer CLIP ViT-L/14 text encoder is the whole tower (so fine-tuned checkpoints work);
  only the projection comes from ``openai/clip-vit-large-patch14``.
- SD2.x: diffusers' encoder has 23 layers (the penultimate-layer trick). The tower is those 23 layers plus the
  24th layer and the projection of the full OpenCLIP ViT-H/14 text tower; the UNet still gets layer 23.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass

import torch
from torch.func import functional_call
from transformers import CLIPTextConfig, CLIPTextModel, CLIPTextModelWithProjection

from stylegrad.errors import StylegradError


@dataclass(frozen=True)
class Family:
    name: str
    hidden_size: int
    layers: int  # layers of the pipeline's text encoder
    clip_model: str  # the CLIP whose text tower, projection and image tower define the style space


SD1 = Family("sd1", 768, 12, "openai/clip-vit-large-patch14")
SD2 = Family("sd2", 1024, 23, "laion/CLIP-ViT-H-14-laion2B-s32B-b79K")
FAMILIES = {f.name: f for f in (SD1, SD2)}


def _dispatch_sd1(encoder: CLIPTextModel) -> Family | None:
    return SD1 if encoder.config.hidden_size == SD1.hidden_size else None


def _dispatch_sd2(encoder: CLIPTextModel) -> Family | None:
    return SD2 if encoder.config.hidden_size == SD2.hidden_size else None


DISPATCHERS: list[Callable[[CLIPTextModel], Family | None]] = [_dispatch_sd1, _dispatch_sd2]


def detect_family(encoder: CLIPTextModel) -> Family:
    """The model family of a pipeline's text encoder (SD1.x or SD2.x)."""
    for dispatch in DISPATCHERS:
        family = dispatch(encoder)
        if family is not None:
            return family
    supported = ", ".join(f"{f.name} (width {f.hidden_size})" for f in FAMILIES.values())
    raise StylegradError(
        f"unsupported text encoder of width {encoder.config.hidden_size}; supported: {supported}"
    )


class TextTower:
    """A CLIP text transformer (embeddings, layers, final layer norm) plus a frozen projection.

    ``base`` maps parameter names to the original tensors (references into the pipeline's encoder, plus any
    extra layers); ``cond_layers`` is how many of the layers belong to the pipeline's encoder.
    """

    def __init__(self, encoder: CLIPTextModel, clip: CLIPTextModelWithProjection, eos_token_id: int):
        cfg_enc, cfg_clip = encoder.config, clip.config
        if cfg_clip.hidden_size != cfg_enc.hidden_size or cfg_clip.num_hidden_layers < cfg_enc.num_hidden_layers:
            raise StylegradError(
                f"the CLIP text model (width {cfg_clip.hidden_size}, {cfg_clip.num_hidden_layers} layers) does not "
                f"extend the pipeline's text encoder (width {cfg_enc.hidden_size}, {cfg_enc.num_hidden_layers} "
                "layers); pass the CLIP model of this pipeline's family"
            )
        self.cond_layers = cfg_enc.num_hidden_layers
        self.eos_token_id = eos_token_id
        self.device = encoder.device
        self.projection = clip.text_projection.weight.detach().to(self.device)  # (P, H)

        base = dict(encoder.named_parameters())
        for name, tensor in clip.text_model.named_parameters():
            layer = _layer_index(name)
            if layer is not None and layer >= self.cond_layers:  # layers beyond the pipeline's
                base[name] = tensor.detach().to(device=self.device, dtype=encoder.dtype)
        self.base: dict[str, torch.Tensor] = {k: v.detach() for k, v in base.items()}

        config = CLIPTextConfig.from_dict(cfg_enc.to_dict())
        config.num_hidden_layers = cfg_clip.num_hidden_layers
        with torch.device("meta"):
            skeleton = CLIPTextModel._from_config(config, attn_implementation=cfg_enc._attn_implementation)
        skeleton.embeddings.position_ids = encoder.embeddings.position_ids.detach().clone()
        self.skeleton = skeleton.eval()
        self.total_layers = config.num_hidden_layers
        self.layer_norm_eps = config.layer_norm_eps

    @property
    def width(self) -> int:
        """Width of CLIP's joint embedding space: the width a style must have."""
        return self.projection.shape[0]

    @property
    def dtype(self) -> torch.dtype:
        return self.base["embeddings.token_embedding.weight"].dtype

    def run(self, params: dict[str, torch.Tensor], ids: torch.Tensor, hidden: bool = False):
        """Forward the skeleton with ``params``; ``ids`` index ``params['embeddings.token_embedding.weight']``."""
        return functional_call(self.skeleton, params, (ids,), {"output_hidden_states": hidden})

    def text_embed(self, out, eos: torch.Tensor) -> torch.Tensor:
        """CLIP text embedding: projection of the final state at the first EOS (as CLIP's ``encode_text``)."""
        pooled = out.last_hidden_state[torch.arange(eos.shape[0], device=eos.device), eos]  # (B, H)
        return pooled.to(self.projection.dtype) @ self.projection.T  # (B, P)

    def condition(self, params: dict[str, torch.Tensor], out, clip_skip: int | None) -> torch.Tensor:
        """The hidden states the pipeline feeds the UNet: final layer norm of layer ``cond_layers - clip_skip``."""
        k = self.cond_layer(clip_skip)
        if k == self.total_layers:
            return out.last_hidden_state  # exactly what the encoder returns
        h = out.hidden_states[k]  # (B, S, H); hidden_states[0] is the embedding output
        w, b = params["final_layer_norm.weight"], params["final_layer_norm.bias"]
        return torch.nn.functional.layer_norm(h, h.shape[-1:], w, b, self.layer_norm_eps)

    def cond_layer(self, clip_skip: int | None) -> int:
        """How many layers the UNet's conditioning goes through (then the final layer norm)."""
        k = self.cond_layers - (clip_skip or 0)
        if not 0 < k <= self.total_layers:
            raise StylegradError(f"clip_skip={clip_skip} is out of range for a {self.cond_layers}-layer encoder")
        return k

    def needs_hidden(self, clip_skip: int | None) -> bool:
        return self.cond_layer(clip_skip) != self.total_layers


def _layer_index(name: str) -> int | None:
    parts = name.split(".")
    if len(parts) > 2 and parts[0] == "encoder" and parts[1] == "layers":
        return int(parts[2])
    return None


def load_clip_text(clip_model: str, device: torch.device | str = "cpu") -> CLIPTextModelWithProjection:
    """The CLIP text tower with its projection, from a hub id or a local folder (offline-friendly errors)."""
    from stylegrad.files.hub import from_pretrained

    return from_pretrained(CLIPTextModelWithProjection, clip_model, what="CLIP model").to(device).eval()


def tower_for(encoder: CLIPTextModel, tokenizer, clip_model: str | CLIPTextModelWithProjection | None = None) -> TextTower:
    """Build the tower for a pipeline's text encoder; ``clip_model`` defaults to the family's CLIP."""
    if clip_model is None or isinstance(clip_model, str):
        clip_model = load_clip_text(clip_model or detect_family(encoder).clip_model, encoder.device)
    return TextTower(encoder, clip_model, tokenizer.eos_token_id)
