"""ComfyUI's CLIP object seen as stylegrad's text towers, and a prompt's tuning handed back to it as weight patches.

ComfyUI's text layers add their residuals in place, so autograd cannot run through them. The tuning runs on
stylegrad's own towers (``PromptTower``: transformers' ``CLIPTextModel`` built on the meta device and given ComfyUI's
tensors by reference, nothing copied until Adam's first step), through the one ``AestheticEncoder`` (``towers_for``
picks the towers, ``tune`` runs the method) as every other front door, in float32 on ComfyUI's text-encoder
device whatever the CLIP's dtype; the tuned tensors' float32 differences then go to a clone of the CLIP
(``apply_patches``: ``add_patches``, or weight wrappers that keep a half-precision CLIP's sums in float32) and
ComfyUI encodes the prompt itself, so its prompt weighting, long prompts and embeddings keep working. Key names
(``clip_l.transformer.text_model.*``), the tokenizer's output (``{"l": [[(token, weight), ...], ...]}``, tokens that
are tensors for embeddings) and the model options (``layer``, ``layer_idx``, ``special_tokens``) are ComfyUI's
(``comfy/sd1_clip.py``, ``comfy/clip_model.py``). The tensors are read after the CLIP's own patcher is loaded
(``load_patcher``: ComfyUI's shared module holds whichever clone loaded last), and the style space is never
ComfyUI's uninitialised CLIP-L projection (``projection.py``).
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn.functional as F
from transformers import CLIPTextConfig, CLIPTextModel

from stylegrad.aesthetic.deltas import weight_deltas
from stylegrad.aesthetic.encoder import AestheticEncoder
from stylegrad.aesthetic.options import StyleOptions
from stylegrad.aesthetic.targets import blend
from stylegrad.aesthetic.tower import ClipParts, TextTower
from stylegrad.aesthetic.towers import PromptTower
from stylegrad.aesthetic.tuning import TOKEN
from stylegrad.aesthetic.vectors import slerp
from stylegrad.apps.comfyui.projection import check_projection, clip_l_projection
from stylegrad.errors import StylegradError
from stylegrad.files.styles import Style
from stylegrad.prompts.chunks import Chunks


@dataclass
class ComfyTower:
    """One of the CLIP's text towers (``l``, ``g``, ``h``) as stylegrad tunes it."""

    name: str
    prefix: str  # of its keys in ComfyUI's CLIP state dict: 'clip_l.transformer.text_model.'
    tower: PromptTower  # stylegrad's view of it (no tokenizer: ComfyUI tokenizes)
    width: int  # of its hidden states in the conditioning
    clip_skip: int | None  # ComfyUI's layer choice in stylegrad's terms (matters for the regularizer only)


def tower_names(model) -> list[str]:
    """The text towers of ComfyUI's ``cond_stage_model``, in the order its conditioning concatenates them."""
    names = [n for n in ("l", "g", "h") if hasattr(model, "clip_" + n)]
    if not names:
        raise StylegradError("this CLIP has no CLIP text tower stylegrad can tune (SD1.x, SD2.x and SDXL have)")
    return names


def load_patcher(clip) -> None:
    """Make the shared text model hold what ``clip`` means, as ComfyUI's own encode does first (sd.py
    ``CLIP.encode_from_tokens`` -> ``load_model``). ComfyUI keeps one module for every clone of a CLIP and leaves the
    last-loaded clone's patches (another styled prompt, a LoRA'd clone) applied to it (model_management.py
    ``load_models_gpu`` detaches the previous clone without unpatching its weights); loading this clone's patcher
    puts back the original weights from the shared backup and applies this clone's patches (model_patcher.py
    ``partially_load``), so its tensors are the connected CLIP's whatever ran before."""
    load = getattr(clip, "load_model", None)
    if load is not None:
        load()
        return
    from comfy import model_management  # a CLIP without load_model: its patcher loaded as load_model does

    model_management.load_models_gpu([clip.patcher])


def effective_weights(module: torch.nn.Module) -> dict[str, torch.Tensor]:
    """``module``'s tensors as its layers use them: each weight (and bias) through the functions ComfyUI hangs on
    the layer while its patcher is loaded (``weight_function``/``bias_function``: weight wrappers, and LoRA
    patches in low-VRAM mode, comfy/model_patcher.py ``LowVramPatch``), applied in float32 as comfy/ops.py
    ``cast_bias_weight`` applies them, then held in the stored dtype; the others by reference, detached."""
    state = {k: v.detach() for k, v in module.state_dict().items()}
    for name, sub in module.named_modules():
        for attr in ("weight", "bias"):
            functions = getattr(sub, attr + "_function", None)
            key = f"{name}.{attr}" if name else attr
            if functions and key in state:
                weight = state[key].to(torch.float32)
                for f in functions:
                    weight = f(weight)
                state[key] = weight.to(state[key].dtype)
    return state


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
    state = {k: v.to(device) for k, v in effective_weights(text_model).items()}
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
    """stylegrad's towers over a ComfyUI CLIP's tensors, as the CLIP's patcher has them loaded (``load_patcher``
    first). The style space: CLIP-L's projection read alone (ComfyUI holds none, ``clip_l_projection``), the
    checkpoint's for bigG and ViT-H (checked: never an uninitialised matrix)."""
    model = clip.cond_stage_model
    names = tower_names(model)
    sdxl = "g" in names
    out = {}
    for name in names:
        module = getattr(model, "clip_" + name)
        transformer = module.transformer
        dev = device or getattr(clip.patcher, "load_device", None) or transformer.text_projection.weight.device
        encoder = _hf_encoder(transformer.text_model, torch.device(dev))
        cfg = encoder.config
        if name == "l":
            parts, _ = clip_l_projection(clip_model, cfg.hidden_size, cfg.num_hidden_layers, encoder.device)
        else:  # a normal float32 tensor: ComfyUI makes its weights inside inference mode; autograd saves this one
            projection = effective_weights(transformer)["text_projection.weight"]
            check_projection(projection, f"this CLIP's tower '{name}' (clip_{name}.transformer.text_projection)")
            parts = ClipParts(projection.to(encoder.device, torch.float32).clone(), {}, cfg.num_hidden_layers,
                              cfg.hidden_size)
        text_tower = TextTower(encoder, parts, int(module.special_tokens["end"]), sdxl=sdxl)
        tower = PromptTower(name, encoder, None, sdxl=sdxl, pooled=name == "g", component="te2" if name == "g"
                            else "te", text_tower=text_tower)
        out[name] = ComfyTower(name, f"clip_{name}.transformer.text_model.", tower, cfg.hidden_size,
                               _clip_skip(module, getattr(clip, "layer_idx", None), sdxl))
    return out


def comfy_encoder(towers: dict[str, ComfyTower]) -> AestheticEncoder:
    """stylegrad's one encoder over ComfyUI's towers: tuning goes through ``AestheticEncoder.tune``, as every
    other front door's does (nothing cached: ComfyUI caches node outputs itself)."""
    return AestheticEncoder(towers=[tw.tower for tw in towers.values()], cache_size=0)


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


def comfy_chunks(chunks: list, tower: ComfyTower) -> Chunks:
    """ComfyUI's tokens of one tower as stylegrad's ``Chunks`` (weights are ComfyUI's to apply: all 1 here)."""
    vocab, width = tower.tower.text_tower.base[TOKEN].shape
    ids, extra = token_ids(chunks, vocab, width)
    return Chunks(ids, torch.ones(ids.shape), vocab, extra)


def tuned_patches(clip, text: str, style: Style, options: StyleOptions, clip_model=None,
                  callback=None) -> tuple[dict[str, tuple[torch.Tensor]], dict[str, list[float]], list[str]]:
    """(ComfyUI patches ``{key: (difference,)}`` of the prompt's tuning, the cosine to the style per step for each
    tuned tower, the towers tuned). The towers are ``AestheticEncoder``'s choice (SD1.x/SD2.x: the one; SDXL:
    ``options.towers`` among the style's parts) and each is tuned by ``AestheticEncoder.tune``. Runs with autograd
    on whatever mode the caller is in (ComfyUI's inference mode is lifted here), and keeps nothing once it returns."""
    if style is None or not options.active:  # nothing to tune: no CLIP projection is read (as for plain prompts)
        return {}, {}, []
    load_patcher(clip)  # in ComfyUI's mode, as its encode loads it
    with torch.inference_mode(False), torch.enable_grad():
        towers = comfy_towers(clip, clip_model)
        encoder = comfy_encoder(towers)
        tune = list(encoder.towers_for(style, options))
        tokens = clip.tokenize(text)
        target_tokens = clip.tokenize(options.text) if options.text else None
        patches, similarities = {}, {}
        for name in tune:
            tw = towers[name]
            target_text = comfy_chunks(target_tokens[name][:1], tw) if target_tokens is not None else None
            # the first chunk is tuned, as stylegrad does
            result = encoder.tune(name, comfy_chunks(tokens[name][:1], tw), style, options, tw.clip_skip, callback,
                                  target_text=target_text, keep_weights=True)
            similarities[name] = result.similarities
            for key, diff in weight_deltas(tw.tower.text_tower.base, result).items():
                patches[tw.prefix + key] = (diff,)
            del result
        return patches, similarities, tune


class AddDifference:
    """A ComfyUI weight wrapper (``ModelPatcher.add_weight_wrapper``): the weight as ComfyUI's cast ops hand it at
    run time (comfy/ops.py ``cast_bias_weight``: float32 in a CLIP, which runs in float32) plus the tuned difference,
    added in float32, as ComfyUI's own trainer adds its differences (``BiasDiff``, comfy_extras/nodes_train.py).
    The token table is handed in its stored dtype when half and its rows cast to float32 after the lookup, so its
    sum is returned in float32. ``move_to`` is what ComfyUI calls to move weight functions with the model."""

    def __init__(self, diff: torch.Tensor, float32: bool = False):
        self.diff, self.float32 = diff, float32

    def __call__(self, weight: torch.Tensor) -> torch.Tensor:
        out = weight.to(torch.float32) + self.diff.to(weight.device)
        return out if self.float32 else out.to(weight.dtype)

    def move_to(self, device=None) -> int:
        self.diff = self.diff.to(device)
        return self.diff.nelement() * self.diff.element_size()


def apply_patches(clip, patches: dict[str, tuple[torch.Tensor]]) -> list[str]:
    """Give ``clip`` (a clone) the tuning's float32 differences; returns the keys taken. ComfyUI's ``add_patches``
    adds a difference in float32 and rounds the sum to the weight's stored dtype when it loads the model
    (model_patcher.py ``patch_weight_to_device``): exact for a float32 CLIP, but in bf16 a layer-norm weight's
    difference is mostly lost. Where the host has weight wrappers (ComfyUI since Feb 2025) a half-precision CLIP
    takes them instead: applied at run time to the float32 weight, never rounded. The position table is read
    without ComfyUI's cast ops (so without wrappers) and always goes as a patch."""
    patcher = clip.patcher
    stored = {k: v.dtype for k, v in clip.cond_stage_model.state_dict().items()}
    wrap = hasattr(patcher, "add_weight_wrapper")
    as_patches, taken = {}, []
    for key, (diff,) in patches.items():
        if wrap and key in stored and stored[key] != torch.float32 and not key.endswith("position_embedding.weight"):
            patcher.add_weight_wrapper(key, AddDifference(diff, float32=key.endswith(TOKEN)))
            taken.append(key)
        else:
            as_patches[key] = (diff,)
    return taken + list(clip.add_patches(as_patches, 1.0) if as_patches else [])


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
