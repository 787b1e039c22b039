"""ComfyUI's CLIP object seen as stylegrad's text towers, and a prompt's tuning handed back to it as weight patches.

ComfyUI's text layers add their residuals in place, so autograd cannot run through them. The tuning runs on
stylegrad's own tower (transformers' ``CLIPTextModel`` built on the meta device and given ComfyUI's tensors by
reference, nothing copied until Adam's first step), exactly as ``AestheticEncoder`` runs it; the tuned tensors'
differences then go to ``clip.clone().add_patches`` and ComfyUI encodes the prompt itself, so its prompt weighting,
long prompts and embeddings keep working. Key names (``clip_l.transformer.text_model.*``), the tokenizer's output
(``{"l": [[(token, weight), ...], ...]}``, tokens that are tensors for embeddings) and the model options
(``layer``, ``layer_idx``, ``special_tokens``) are ComfyUI's (``comfy/sd1_clip.py``, ``comfy/clip_model.py``).
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn.functional as F
from transformers import CLIPTextConfig, CLIPTextModel

from stylegrad.aesthetic.deltas import weight_deltas
from stylegrad.aesthetic.options import StyleOptions
from stylegrad.aesthetic.sdxl import TOWERS
from stylegrad.aesthetic.targets import blend, style_target
from stylegrad.aesthetic.tower import SD1, ClipParts, TextTower, clip_parts
from stylegrad.aesthetic.tuning import first_eos, personalize
from stylegrad.aesthetic.vectors import slerp
from stylegrad.errors import StylegradError
from stylegrad.files.styles import Style


@dataclass
class ComfyTower:
    """One of the CLIP's text towers (``l``, ``g``, ``h``) as stylegrad tunes it."""

    name: str
    prefix: str  # of its keys in ComfyUI's CLIP state dict: 'clip_l.transformer.text_model.'
    tower: TextTower
    width: int  # of its hidden states in the conditioning
    clip_skip: int | None  # ComfyUI's layer choice in stylegrad's terms (matters for the regularizer only)


def tower_names(model) -> list[str]:
    """The text towers of ComfyUI's ``cond_stage_model``, in the order its conditioning concatenates them."""
    names = [n for n in ("l", "g", "h") if hasattr(model, "clip_" + n)]
    if not names:
        raise StylegradError("this CLIP has no CLIP text tower stylegrad can tune (SD1.x, SD2.x and SDXL have)")
    return names


def _identity(weight: torch.Tensor) -> bool:
    return weight.shape[0] == weight.shape[1] and bool(torch.equal(weight.float().cpu(), torch.eye(weight.shape[0])))


def _hf_encoder(text_model, device: torch.device) -> CLIPTextModel:
    """transformers' CLIPTextModel holding ComfyUI's tensors (moved to ``device`` only if they are elsewhere)."""
    layers = text_model.encoder.layers
    token = text_model.embeddings.token_embedding.weight
    act = layers[0].mlp.activation
    config = CLIPTextConfig(
        vocab_size=token.shape[0], hidden_size=token.shape[1], intermediate_size=layers[0].mlp.fc1.weight.shape[0],
        num_hidden_layers=len(layers), num_attention_heads=layers[0].self_attn.heads,
        max_position_embeddings=text_model.embeddings.position_embedding.weight.shape[0],
        hidden_act="gelu" if act is F.gelu else "quick_gelu", layer_norm_eps=layers[0].layer_norm1.eps,
    )
    with torch.device("meta"):
        encoder = CLIPTextModel(config).requires_grad_(False)  # kept by assign: ComfyUI's may be inference tensors
    state = {k: v.detach().to(device) for k, v in text_model.state_dict().items()}
    encoder.load_state_dict(state, strict=True, assign=True)
    encoder.embeddings.position_ids = torch.arange(config.max_position_embeddings, device=device)[None]
    return encoder.eval()


def _clip_skip(module, clip_layer: int | None, sdxl: bool) -> int | None:
    """ComfyUI's conditioning layer (``CLIPSetLastLayer``, or the model's default) as stylegrad's ``clip_skip``."""
    layer, index = module.options_default[:2]
    if clip_layer is not None:
        layer, index = ("last", None) if abs(clip_layer) > module.num_layers else ("hidden", clip_layer)
    if layer == "last" or index is None:
        return None
    skip = -index - (2 if sdxl else 1)
    return skip if skip > 0 else None


def comfy_towers(clip, clip_model=None, device: torch.device | None = None) -> dict[str, ComfyTower]:
    """stylegrad's towers over a ComfyUI CLIP's tensors. CLIP-L's projection: the checkpoint's when it has a real
    one; ComfyUI keeps an identity there when the file has none (SD1.x checkpoints), and then ``clip_model``'s
    (default openai's ViT-L/14, as stylegrad uses for SD1.x)."""
    model = clip.cond_stage_model
    names = tower_names(model)
    sdxl = "g" in names
    out = {}
    for name in names:
        module = getattr(model, "clip_" + name)
        transformer = module.transformer
        dev = device or getattr(clip.patcher, "load_device", None) or transformer.text_projection.weight.device
        encoder = _hf_encoder(transformer.text_model, torch.device(dev))
        projection = transformer.text_projection.weight.detach()
        cfg = encoder.config
        source = clip_model if name == "l" else None  # the style space of CLIP-L can be another CLIP's
        if source is None and _identity(projection):
            if name != "l":
                raise StylegradError(f"this CLIP's tower '{name}' has no text projection to define its style space")
            source = SD1.clip_model
        if source is not None:
            parts = clip_parts(source, cfg.num_hidden_layers, encoder.device)
            if parts.hidden_size != cfg.hidden_size:
                raise StylegradError(f"the CLIP model's text tower is {parts.hidden_size} wide, this CLIP's tower "
                                     f"'{name}' is {cfg.hidden_size}")
            parts.layers = {}
        else:  # a normal tensor: ComfyUI makes its weights inside inference mode, and autograd saves this one
            parts = ClipParts(projection.to(encoder.device).clone(), {}, cfg.num_hidden_layers, cfg.hidden_size)
        tower = TextTower(encoder, parts, int(module.special_tokens["end"]), sdxl=sdxl)
        out[name] = ComfyTower(name, f"clip_{name}.transformer.text_model.", tower, cfg.hidden_size,
                               _clip_skip(module, getattr(clip, "layer_idx", None), sdxl))
    return out


def token_ids(chunks: list, vocab: int, width: int) -> tuple[torch.Tensor, torch.Tensor | None]:
    """ComfyUI's tokens of one tower (chunks of (token, weight[, word id]); a token is an id, or one vector of an
    embedding) as ids (C, S) and the embedding vectors numbered past the table, as stylegrad's prompts have them."""
    rows, extra = [], []
    for chunk in chunks:
        row = []
        for item in chunk:
            token = item[0]
            if isinstance(token, int):
                row.append(token)
                continue
            if token.shape[-1] != width:
                raise StylegradError(f"an embedding in the prompt is {token.shape[-1]} wide; this text tower is "
                                     f"{width}")
            row.append(vocab + len(extra))
            extra.append(token.reshape(-1).float())
        rows.append(row)
    return torch.tensor(rows), (torch.stack(extra) if extra else None)


def towers_to_tune(towers: dict[str, ComfyTower], style: Style, options: StyleOptions) -> list[str]:
    """SDXL: the option's towers among those the style has a part for; SD1.x/SD2.x: their one tower."""
    if not options.active:
        return []
    if "g" not in towers:
        name = next(iter(towers))
        style.check_width(towers[name].tower.width)
        return [name]
    wanted = [t for t in TOWERS[options.towers] if style.part("clip_" + t) is not None]
    for t in wanted:
        style.check_part("clip_" + t, towers[t].tower.width)
    return wanted


def _target(clip, tw: ComfyTower, style: Style, options: StyleOptions) -> torch.Tensor:
    part = style.part("clip_g") if tw.name == "g" else style.direction
    text = None
    if options.text:
        ids, extra = token_ids(clip.tokenize(options.text)[tw.name][:1], *tw.tower.base[
            "embeddings.token_embedding.weight"].shape)
        ids = ids.to(tw.tower.device)
        with torch.no_grad():
            from stylegrad.prompts.chunks import gather_rows

            rows, local = torch.unique(ids, return_inverse=True)
            params = {**tw.tower.base, "embeddings.token_embedding.weight": gather_rows(
                tw.tower.base["embeddings.token_embedding.weight"], extra, rows)}
            out = tw.tower.run(params, local)
            eos = torch.tensor([first_eos(ids[0], tw.tower.eos_token_id)], device=ids.device)
            text = tw.tower.text_embed(out, eos)[0].float()
    return style_target(part.to(tw.tower.device), text, options.text_angle, options.text_negative)


def tuned_patches(clip, text: str, style: Style, options: StyleOptions, clip_model=None,
                  callback=None) -> tuple[dict[str, tuple[torch.Tensor]], dict[str, list[float]], list[str]]:
    """(ComfyUI patches ``{key: (difference,)}`` of the prompt's tuning, the cosine to the style per step for each
    tuned tower, the towers tuned). Runs with autograd on whatever mode the caller is in (ComfyUI's inference
    mode is lifted here), and keeps nothing once it returns."""
    with torch.inference_mode(False), torch.enable_grad():
        towers = comfy_towers(clip, clip_model)
        tune = towers_to_tune(towers, style, options)
        tokens = clip.tokenize(text)
        patches, similarities = {}, {}
        for name in tune:
            tw = towers[name]
            # the first chunk is tuned, as stylegrad does
            ids, extra = token_ids(tokens[name][:1], *tw.tower.base["embeddings.token_embedding.weight"].shape)
            result = personalize(
                tw.tower, ids.to(tw.tower.device), _target(clip, tw, style, options), steps=options.steps,
                adam=options.adam(tw.tower.device), regularization=options.regularization,
                target_similarity=options.target_similarity, clip_skip=tw.clip_skip, extra_rows=extra,
                callback=callback, keep_weights=True)
            similarities[name] = result.similarities
            for key, diff in weight_deltas(tw.tower.base, result).items():
                patches[tw.prefix + key] = (diff,)
            del result
        return patches, similarities, tune


def encode(clip, text: str) -> list:
    """ComfyUI's own CONDITIONING for ``text`` (what CLIPTextEncode returns)."""
    return clip.encode_from_tokens_scheduled(clip.tokenize(text))


def blend_conditioning(plain: list, styled: list, widths: list[int], tuned: list[int], weight: float,
                       use_slerp: bool) -> list:
    """The tuned and untuned conditioning blended as stylegrad blends them: per tower (``widths`` of the
    concatenated towers; ``tuned``: the indices of those that were tuned), and the pooled output if its
    tower (SDXL's last) was tuned."""
    out = []
    for (c0, d0), (c1, d1) in zip(plain, styled):
        parts, at = [], 0
        for i, w in enumerate(widths):
            a, b = c0[..., at:at + w], c1[..., at:at + w]
            parts.append(blend(a.float(), b.float(), weight, use_slerp).to(b.dtype) if i in tuned else b)
            at += w
        extra = dict(d1)
        p0, p1 = d0.get("pooled_output"), d1.get("pooled_output")
        if p0 is not None and p1 is not None and len(widths) - 1 in tuned and len(widths) > 1:
            extra["pooled_output"] = (slerp(p0.float(), p1.float(), weight, dim=-1) if use_slerp else
                                      (1 - weight) * p0.float() + weight * p1.float()).to(p1.dtype)
        out.append([torch.cat(parts, dim=-1), extra])
    return out
