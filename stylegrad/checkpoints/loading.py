"""A diffusers pipeline from one ``.safetensors`` / ``.ckpt`` file, with no network: the component configs ship in
``configs/`` (as A1111 ships ``v1-inference.yaml``), the tokenizer comes from ``tokenizers.py``.

UNet and VAE keys are renamed by diffusers' own converters; the text encoders (the HF layout of CLIP ViT-L and the
OpenCLIP layout of ViT-H / bigG) here. Every component is built on the meta device and filled with the file's
tensors, strictly: a missing or unexpected weight is an error naming the file, never a silently random layer.
"""

from __future__ import annotations

import copy
import json
import os
from pathlib import Path

import torch

from stylegrad.checkpoints.families import SUPPORTED, UNET, VAE, VAE_SUFFIXES, CheckpointKind, classify, strip_wrapper
from stylegrad.checkpoints.tensors import TensorFile
from stylegrad.checkpoints.tokenizers import clip_tokenizer
from stylegrad.devices import default_dtype, resolve_device
from stylegrad.errors import RequestError, StylegradError

CONFIGS = Path(__file__).parent / "configs"


def family_config(family: str, prediction: str = "epsilon") -> dict:
    """The components' configs for a family. ``STYLEGRAD_CHECKPOINT_CONFIGS`` names a folder whose ``FAMILY.json``
    replaces the shipped one (a custom architecture, or the tiny models of the tests)."""
    folder = Path(os.environ.get("STYLEGRAD_CHECKPOINT_CONFIGS") or CONFIGS)
    path = folder / f"{family}.json"
    if not path.is_file():
        path = CONFIGS / f"{family}.json"
    config = json.loads(path.read_text(encoding="utf-8"))
    config["_folder"] = str(path.parent)
    if prediction == "v_prediction":
        for part, changes in config.pop("v_prediction", {}).items():
            config[part] = {**config[part], **changes}
        config["scheduler"]["prediction_type"] = "v_prediction"
    config.pop("v_prediction", None)
    return config


def open_checkpoint(path: str | os.PathLike) -> tuple[TensorFile, str, CheckpointKind]:
    """(the file's tensors, the wrapper prefix of old .ckpt files, what it is)."""
    tf = TensorFile(path)
    prefix = strip_wrapper(tf.keys())
    shapes = {k[len(prefix):]: s for k, s in tf.shapes.items() if k.startswith(prefix)}
    return tf, prefix, classify(shapes)


def _read(tf: TensorFile, keys, dtype: torch.dtype, strip: str = "", add: str = "") -> dict[str, torch.Tensor]:
    out = {}
    for k in keys:
        t = tf.get(k)
        out[add + k[len(strip):]] = t.to(dtype) if t.is_floating_point() else t
    return out


def _fill(model: torch.nn.Module, state: dict[str, torch.Tensor], what: str, path: Path) -> torch.nn.Module:
    """Load ``state`` into a meta-device model, requiring every weight; rebuild CLIP's position_ids buffer."""
    own = model.state_dict()
    missing = [k for k in own if k not in state and not k.endswith("position_ids")]
    unexpected = [k for k in state if k not in own]
    if missing or unexpected:
        detail = f"missing {missing[:3]}" if missing else f"unexpected {unexpected[:3]}"
        raise StylegradError(f"{path.name}: its {what} weights do not fit the {what} config ({detail})")
    wrong = [k for k, v in state.items() if tuple(v.shape) != tuple(own[k].shape)]
    if wrong:
        k = wrong[0]
        raise StylegradError(f"{path.name}: {what} weight {k} has shape {tuple(state[k].shape)}, the config "
                             f"expects {tuple(own[k].shape)}")
    model.load_state_dict(state, strict=False, assign=True)
    for name, buf in list(model.named_buffers()):
        if buf.is_meta:
            if not name.endswith("position_ids"):
                raise StylegradError(f"{path.name}: the {what} buffer {name} is not in the file")
            owner = model.get_submodule(name.rsplit(".", 1)[0])
            owner.register_buffer("position_ids", torch.arange(buf.shape[-1]).expand((1, -1)), persistent=False)
    return model.eval()


# -- text encoders --------------------------------------------------------------------------------------------------

_OPEN_CLIP_LAYER = {"ln_1": "layer_norm1", "ln_2": "layer_norm2", "attn.out_proj": "self_attn.out_proj",
                    "mlp.c_fc": "mlp.fc1", "mlp.c_proj": "mlp.fc2"}


def _open_clip_to_hf(state: dict[str, torch.Tensor], layers: int, projection: bool) -> dict[str, torch.Tensor]:
    """OpenCLIP's text tower (``transformer.resblocks.N`` with fused q/k/v) in transformers' CLIP names."""
    out = {}
    for key, t in state.items():
        if key == "token_embedding.weight":
            out["embeddings.token_embedding.weight"] = t
        elif key == "positional_embedding":
            out["embeddings.position_embedding.weight"] = t
        elif key.startswith("ln_final."):
            out["final_layer_norm." + key.split(".", 1)[1]] = t
        elif key == "text_projection":
            if projection:
                out["text_projection.weight"] = t.T.contiguous()
        elif key.startswith("transformer.resblocks."):
            n, rest = key[len("transformer.resblocks."):].split(".", 1)
            if int(n) >= layers:  # SD2 uses the penultimate layer: its last block is in the file but not the model
                continue
            base = f"encoder.layers.{n}."
            if rest.startswith("attn.in_proj_"):
                kind = rest.rsplit("_", 1)[1]  # weight | bias
                for name, part in zip(("q", "k", "v"), t.chunk(3, dim=0)):
                    out[f"{base}self_attn.{name}_proj.{kind}"] = part.contiguous()
            else:
                module, param = rest.rsplit(".", 1)
                if module not in _OPEN_CLIP_LAYER:
                    raise KeyError(key)
                out[f"{base}{_OPEN_CLIP_LAYER[module]}.{param}"] = t
        # logit_scale and attn_mask belong to OpenCLIP's training, not the text encoder
    return out


def _text_encoder(tf: TensorFile, prefix: str, cfg: dict, dtype: torch.dtype, path: Path):
    import transformers

    cfg = dict(cfg)
    cls = getattr(transformers, cfg.pop("class"))
    key_prefix = prefix + cfg.pop("prefix")
    layout = cfg.pop("layout")
    config = transformers.CLIPTextConfig(**cfg)
    with torch.device("meta"):
        model = cls(config)
    keys = [k for k in tf.keys() if k.startswith(key_prefix)]
    state = _read(tf, keys, dtype, strip=key_prefix)
    wrapped = hasattr(model, "text_model")  # CLIPTextModelWithProjection keeps 'text_model.'; CLIPTextModel not
    if layout == "open_clip":
        try:
            state = _open_clip_to_hf(state, config.num_hidden_layers, hasattr(model, "text_projection"))
        except KeyError as e:
            raise StylegradError(f"{path.name}: unexpected text-encoder weight {e.args[0]}") from e
        if wrapped:
            state = {(k if k.startswith("text_projection") else "text_model." + k): v for k, v in state.items()}
    else:
        state = {k: v for k, v in state.items() if not k.endswith("position_ids")}
        if not wrapped:
            state = {k.removeprefix("text_model."): v for k, v in state.items()}
        layers = config.num_hidden_layers
        state = {k: v for k, v in state.items() if not (".layers." in k and int(k.split(".layers.")[1].split(".")[0])
                                                      >= layers)}
    return _fill(model, state, "text encoder", path)


# -- UNet, VAE, scheduler ---------------------------------------------------------------------------------------------


def _unet(tf: TensorFile, prefix: str, cfg: dict, dtype: torch.dtype, path: Path):
    from diffusers import UNet2DConditionModel
    from diffusers.loaders.single_file_utils import convert_ldm_unet_checkpoint

    keys = [k for k in tf.keys() if k.startswith(prefix + UNET)]
    state = _read(tf, keys, dtype, strip=prefix)
    state = convert_ldm_unet_checkpoint(state, cfg)
    with torch.device("meta"):
        model = UNet2DConditionModel.from_config(cfg)
    return _fill(model, state, "UNet", path)


def _vae_state(path: Path, dtype: torch.dtype) -> dict[str, torch.Tensor]:
    """A VAE from its own file: the original layout (with or without 'first_stage_model.') or diffusers'."""
    with TensorFile(path) as tf:
        prefix = "state_dict." if any(k.startswith("state_dict.") for k in tf.keys()) else ""
        keys = [k for k in tf.keys() if k.startswith(prefix) and not k[len(prefix):].startswith(("loss.", "model_ema."))]
        state = _read(tf, keys, dtype, strip=prefix)
    state = {k.removeprefix(VAE): v for k, v in state.items()}
    if not any(k.startswith(("encoder.", "decoder.")) for k in state):
        raise StylegradError(f"{path} is not a VAE (no encoder./decoder. weights)")
    return state


def _vae(state: dict[str, torch.Tensor], cfg: dict, path: Path):
    from diffusers import AutoencoderKL
    from diffusers.loaders.single_file_utils import convert_ldm_vae_checkpoint

    if not any(k.startswith("decoder.up_blocks.") for k in state):  # original layout
        state = convert_ldm_vae_checkpoint({VAE + k: v for k, v in state.items()}, cfg)
    with torch.device("meta"):
        model = AutoencoderKL.from_config(cfg)
    return _fill(model, state, "VAE", path)


def beside_vae(path: Path) -> Path | None:
    """A1111's convention: ``NAME.vae.safetensors`` (or .pt/.ckpt) beside ``NAME.safetensors`` is its VAE."""
    for suffix in VAE_SUFFIXES:
        candidate = path.with_name(path.stem + suffix)
        if candidate.is_file():
            return candidate
    return None


def _yaml_prediction(path: Path) -> str | None:
    """A1111's convention: ``NAME.yaml`` beside the checkpoint with ``parameterization: "v"``."""
    candidate = path.with_suffix(".yaml")
    if not candidate.is_file():
        return None
    import yaml

    try:
        doc = yaml.safe_load(candidate.read_text(encoding="utf-8")) or {}
        param = doc.get("model", {}).get("params", {}).get("parameterization")
    except (yaml.YAMLError, AttributeError, UnicodeDecodeError):
        return None
    return "v_prediction" if param == "v" else "epsilon" if param == "eps" else None


@torch.no_grad()
def predicts_v(unet) -> bool:
    """A1111's test for SD2 files that do not say: at t=999, on a flat latent and a flat context, an ε-model
    predicts noise around the input while a v-model's output sits well below it."""
    x = torch.full((1, unet.config.in_channels, 8, 8), 0.5, dtype=unet.dtype, device=unet.device)
    context = torch.full((1, 2, unet.config.cross_attention_dim), 0.5, dtype=unet.dtype, device=unet.device)
    out = unet(x, torch.tensor([999], device=unet.device), encoder_hidden_states=context).sample
    return float((out.float() - x.float()).mean()) < -1.0


def _as_configured(unet, cfg: dict) -> None:
    """Give a UNet built from the ε config the v config's default size and attention upcasting."""
    from diffusers.models.attention_processor import Attention

    unet.register_to_config(sample_size=cfg["sample_size"], upcast_attention=cfg.get("upcast_attention", False))
    for module in unet.modules():
        if isinstance(module, Attention):
            module.upcast_attention = cfg.get("upcast_attention", False)


def _scheduler(cfg: dict):
    import diffusers

    cfg = dict(cfg)
    return getattr(diffusers, cfg.pop("class")).from_config(cfg)


def _tokenizer(config: dict, part: str):
    spec = config.get(part, {})
    folder = spec.get("folder")
    return clip_tokenizer(spec.get("pad_token", "<|endoftext|>"),
                          Path(config["_folder"]) / folder if folder else None)


def _looks_like_tensors(path: Path) -> bool:
    with open(path, "rb") as f:
        head = f.read(9)
    return (len(head) == 9 and head[8:9] == b"{") or head[:2] == b"PK" or head[:1] == b"\x80"


_WHAT = {"lora": "a LoRA", "textual-inversion": "a textual-inversion embedding", "image": "an image",
         "style": "an aesthetic embedding (a style, not a model)"}


def not_a_model(path: Path, kind: CheckpointKind | None) -> str:
    """One line for a file that is not a model stylegrad can load, saying what it is."""
    from stylegrad.files.recognize import inspect_file

    if kind is not None and kind.refusal and not kind.refusal.startswith("not a Stable"):  # an architecture we name
        return f"{path.name} is {kind.refusal}"
    info = inspect_file(path)
    if info.kind in _WHAT:
        what = _WHAT[info.kind] + (f" ({info.format})" if info.kind == "lora" and info.format else "")
        return f"{path.name} is {what}, not a model: the model must be a Stable Diffusion checkpoint"
    return f"{path.name} is not a Stable Diffusion checkpoint: {info.detail}"


def assemble(family: str, parts: dict):
    """The family's diffusers pipeline from its components (SDXL's with ``text_encoder_2`` and ``tokenizer_2``), as
    A1111 runs it: no safety checker, no watermark, SDXL's empty negative prompt as zeros."""
    import diffusers

    if family == "sdxl":
        return diffusers.StableDiffusionXLPipeline(**parts, force_zeros_for_empty_prompt=True, add_watermarker=False)
    return diffusers.StableDiffusionPipeline(**parts, safety_checker=None, feature_extractor=None,
                                             requires_safety_checker=False)


def load_checkpoint(path: str | os.PathLike, device: str | torch.device | None = None, vae: str | None = None,
                    prediction: str | None = None, dtype: torch.dtype | None = None):
    """A StableDiffusionPipeline or StableDiffusionXLPipeline from a single-file checkpoint.

    ``vae``: a VAE file to use instead of the baked one (else ``NAME.vae.*`` beside it, else the baked one).
    ``prediction``: 'epsilon' or 'v_prediction' when the file's own hints (a ``v_pred`` key, ``NAME.yaml``, and
    for SD2 A1111's probe) should be overridden."""

    path = Path(path).expanduser()
    device = resolve_device(device)
    dtype = dtype or default_dtype(device)
    tf, prefix, kind = open_checkpoint(path) if _looks_like_tensors(path) else (None, "", None)
    if kind is None or (kind.refusal and kind.in_channels is None and kind.family is None):
        if tf is not None:
            tf.close()
        raise StylegradError(not_a_model(path, kind))
    with tf:
        if kind.refusal:
            raise StylegradError(f"{path.name} is {kind.refusal}")
        vae_file = Path(vae).expanduser() if vae else beside_vae(path)
        if vae_file is None and not kind.has_vae:
            raise RequestError("vae", f"{path.name} has no VAE baked in: give one as {{field}} (or put "
                               f"{path.stem}.vae.safetensors beside it)")
        hinted = prediction or kind.prediction or _yaml_prediction(path)
        config = family_config(kind.family, hinted or "epsilon")
        if prefix + "ztsnr" in tf:  # ComfyUI's mark of a zero-terminal-SNR model (with v_pred, e.g. NoobAI-XL v-pred)
            config["scheduler"]["rescale_betas_zero_snr"] = True
        unet = _unet(tf, prefix, config["unet"], dtype, path).to(device)  # probed where it will run, not on the CPU
        if hinted is None and kind.family == "sd2" and predicts_v(unet):
            config = family_config(kind.family, "v_prediction")
            _as_configured(unet, config["unet"])
        if vae_file is not None:
            vae_state = _vae_state(vae_file, dtype)
        else:
            keys = [k for k in tf.keys() if k.startswith(prefix + VAE)]
            vae_state = _read(tf, keys, dtype, strip=prefix + VAE)
        vae_model = _vae(vae_state, config["vae"], vae_file or path)
        del vae_state
        parts = dict(unet=unet, vae=vae_model, scheduler=_scheduler(config["scheduler"]),
                     text_encoder=_text_encoder(tf, prefix, config["text_encoder"], dtype, path),
                     tokenizer=_tokenizer(config, "tokenizer"))
        if kind.family == "sdxl":
            parts.update(text_encoder_2=_text_encoder(tf, prefix, config["text_encoder_2"], dtype, path),
                         tokenizer_2=_tokenizer(config, "tokenizer_2"))
        pipe = assemble(kind.family, parts)
    pipe.stylegrad_checkpoint = copy.copy(kind)
    return pipe.to(device)


__all__ = ["SUPPORTED", "assemble", "load_checkpoint", "open_checkpoint", "family_config", "beside_vae", "predicts_v"]
