"""The Stylecodes networks (Rowles 2024), laid out so the published SD1.5 checkpoint loads key for key.

Three parts, named as in that checkpoint:
- ``sref_autoencoder``: SigLIP patch states -> a 20-d latent (the code) -> a feature map at the UNet's mid-block size;
- ``control_model``: a second UNet's mid and up blocks that carry that map alongside the base UNet's decoder;
- ``middle_block_out`` and ``control_model.up_zero_convs_out``: per-pixel "collab" linears that mix the two
  streams after the mid block and after every up sub-block.

How the streams run together lives in :mod:`stylegrad.stylecode_unet`; this module only builds and loads.
"""

from __future__ import annotations

import copy
import math
import os
from pathlib import Path

import torch
from torch import nn

from stylegrad.errors import StylegradError, first_line
from stylegrad.stylecodes.codec import DIM

PUBLISHED_REPO = "CiaraRowles/stylecodes"
PUBLISHED_FILE = "stylecodes_sd15_v1.bin"
SIGLIP = "google/siglip-base-patch16-224"


class SinusoidalPositions(nn.Module):
    """The fixed sine/cosine table (a persistent buffer in the checkpoint, so it is kept as one)."""

    def __init__(self, width: int, max_len: int = 5000):
        super().__init__()
        pos = torch.arange(max_len, dtype=torch.float32)[:, None]
        freq = torch.exp(torch.arange(0, width, 2, dtype=torch.float32) * (-math.log(10000.0) / width))
        pe = torch.zeros(max_len, width)
        pe[:, 0::2] = torch.sin(pos * freq)
        pe[:, 1::2] = torch.cos(pos * freq)
        self.register_buffer("pe", pe[None])

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return x + self.pe[:, : x.shape[1]]


class StyleAutoencoder(nn.Module):
    """Encoder: a learned query cross-attends to the image tokens three times -> LayerNorm'd 20-d latent.
    Decoder: one learned token per output pixel attends to the latent -> the control stream's starting map."""

    def __init__(self, input_dim: int = 768, output_dim: int = 1280, width: int = 512, heads: int = 4,
                 encoder_layers: int = 3, decoder_layers: int = 2, feedforward: int = 2048, max_len: int = 5000,
                 dropout: float = 0.1):
        super().__init__()
        self.output_dim = output_dim
        self.latent_init = nn.Parameter(torch.randn(1, width))
        self.tgt_init = nn.Parameter(torch.randn(1, width))
        self.pos_encoder = SinusoidalPositions(width, max_len)
        self.input_proj = nn.Linear(input_dim, width)
        self.attention_layers = nn.ModuleList(
            nn.MultiheadAttention(width, heads, batch_first=True) for _ in range(encoder_layers))
        self.latent_proj = nn.Linear(width, DIM)
        self.latent_norm = nn.LayerNorm(DIM)
        self.latent_to_d_model = nn.Linear(DIM, width)
        layer = nn.TransformerDecoderLayer(width, heads, feedforward, dropout=dropout, batch_first=True)
        self.transformer_decoder = nn.TransformerDecoder(layer, decoder_layers)
        self.output_proj = nn.Linear(width, output_dim)

    def encode(self, tokens: torch.Tensor) -> torch.Tensor:
        """(B, N, input_dim) image tokens -> (B, 20) latent, unquantized."""
        src = self.pos_encoder(self.input_proj(tokens))
        q = self.latent_init.expand(tokens.shape[0], -1)[:, None]
        for attn in self.attention_layers:  # no residual, as trained
            q, _ = attn(q, src, src, need_weights=False)
        return self.latent_norm(self.latent_proj(q[:, 0]))

    def decode(self, latent: torch.Tensor, height: int, width: int) -> torch.Tensor:
        """(B, 20) latent -> (B, output_dim, height, width)."""
        memory = self.latent_to_d_model(latent)[:, None]
        tgt = self.pos_encoder(self.tgt_init.expand(latent.shape[0], height * width, -1))
        out = self.output_proj(self.transformer_decoder(tgt, memory))
        return out.view(latent.shape[0], height, width, self.output_dim).permute(0, 3, 1, 2)

    @classmethod
    def geometry_of(cls, state: dict[str, torch.Tensor], prefix: str = "sref_autoencoder.") -> dict:
        """Constructor arguments read off a state dict's shapes (heads are not in any shape: 4, as published)."""
        def count(part: str) -> int:
            idx = {k[len(prefix + part):].split(".")[0] for k in state if k.startswith(prefix + part)}
            return len(idx)

        try:
            return dict(input_dim=state[prefix + "input_proj.weight"].shape[1],
                        output_dim=state[prefix + "output_proj.weight"].shape[0],
                        width=state[prefix + "latent_init"].shape[1],
                        encoder_layers=count("attention_layers."), decoder_layers=count("transformer_decoder.layers."),
                        feedforward=state[prefix + "transformer_decoder.layers.0.linear1.weight"].shape[0],
                        max_len=state[prefix + "pos_encoder.pe"].shape[1])
        except KeyError as e:
            raise StylegradError(f"not a Stylecodes checkpoint: no {e.args[0]!r}") from None


def _collab(channels: int) -> nn.Linear:
    """Linear(2C, 2C) over [control, base] channels, identity weight: at start the base passes through (the bias
    is left at PyTorch's default, as in the published training code)."""
    layer = nn.Linear(2 * channels, 2 * channels)
    with torch.no_grad():
        layer.weight.copy_(torch.eye(2 * channels))
    return layer


def control_unet_config(base_config) -> dict:
    """The control UNet's constructor arguments, derived from the base UNet's config as the published model was
    (same blocks and widths, 8 heads, linear attention projections)."""
    keep = ("sample_size", "down_block_types", "up_block_types", "block_out_channels", "norm_num_groups",
            "cross_attention_dim", "transformer_layers_per_block", "upcast_attention", "layers_per_block")
    cfg = {k: base_config[k] for k in keep if k in base_config}
    cfg.update(attention_head_dim=8, use_linear_projection=True, in_channels=base_config["in_channels"],
               out_channels=base_config["out_channels"])
    return cfg


def up_subblock_channels(base_unet) -> list[int]:
    """Output channels of every up-block resnet of the base UNet, in order: one collab layer each."""
    return [r.out_channels for block in base_unet.up_blocks for r in block.resnets]


class StylecodesModel(nn.Module):
    """The published module tree: ``control_model`` (mid + up blocks, ``up_zero_convs_out``),
    ``middle_block_out`` and ``sref_autoencoder``."""

    def __init__(self, base_unet, autoencoder: dict | None = None):
        super().__init__()
        from diffusers import UNet2DConditionModel

        control = UNet2DConditionModel(**control_unet_config(base_unet.config))
        for name in ("down_blocks", "conv_in", "conv_out", "conv_norm_out", "time_embedding"):
            delattr(control, name)
        mid = base_unet.config.block_out_channels[-1]
        control.up_zero_convs_out = nn.ModuleList(_collab(c) for c in up_subblock_channels(base_unet))
        self.control_model = control
        self.middle_block_out = _collab(mid)
        geometry = dict(output_dim=mid)
        geometry.update(autoencoder or {})
        self.sref_autoencoder = StyleAutoencoder(**geometry)


def check_state(model: nn.Module, state: dict[str, torch.Tensor], source: str) -> None:
    """Strict: every key the model has, nothing else, every shape equal; one clear error listing what is wrong."""
    own = model.state_dict()
    missing = sorted(set(own) - set(state))
    extra = sorted(set(state) - set(own))
    shapes = sorted(f"{k} {tuple(state[k].shape)} (expected {tuple(own[k].shape)})"
                    for k in set(own) & set(state) if tuple(own[k].shape) != tuple(state[k].shape))
    problems = []
    for label, items in (("missing", missing), ("unexpected", extra), ("wrong shape", shapes)):
        if items:
            more = f" and {len(items) - 3} more" if len(items) > 3 else ""
            problems.append(f"{len(items)} {label}: {', '.join(items[:3])}{more}")
    if problems:
        raise StylegradError(f"{source} does not match the Stylecodes model: " + "; ".join(problems))


def read_checkpoint(path: str | os.PathLike, dtype: torch.dtype | None = None,
                    only: str = "", float32: str | None = None) -> dict[str, torch.Tensor]:
    """The control weights of a Stylecodes checkpoint: a ``.bin``/``.pt`` holding a ``controlnet`` dict, or a
    ``.safetensors`` whose ``controlnet.`` keys are taken (prefix stripped) and ``image_proj.``/``ip_adapter.``
    keys ignored, as the published loader does. Never unpickles code. Tensors are read (and cast to ``dtype``)
    one at a time, so a 1.3 GB fp16 file costs little more than its fp32 result; ``only`` keeps one prefix;
    keys under the prefix ``float32`` are read in float32 whatever ``dtype`` (the code's autoencoder: a code must
    not depend on the precision the UNet runs in)."""
    path = Path(path)
    if not path.is_file():
        raise StylegradError(f"no Stylecodes checkpoint at {path}")

    def cast(key: str, t: torch.Tensor) -> torch.Tensor:
        if float32 is not None and key.startswith(float32):
            return t.to(torch.float32)
        return t.to(dtype) if dtype is not None else t
    if path.suffix == ".safetensors":
        from safetensors import SafetensorError, safe_open

        try:
            with safe_open(str(path), framework="pt", device="cpu") as f:
                state = {k[len("controlnet."):]: cast(k[len("controlnet."):], f.get_tensor(k)) for k in f.keys()
                         if k.startswith("controlnet." + only)}
        except (SafetensorError, OSError) as e:
            raise StylegradError(f"{path.name} is not a readable safetensors file ({e})") from None
        if not state:
            raise StylegradError(f"{path.name} has no 'controlnet.' keys: not a Stylecodes checkpoint")
        return state
    try:
        try:  # memory-mapped when the file allows it: tensors are paged in as they are cast
            obj = torch.load(path, map_location="cpu", weights_only=True, mmap=True)
        except RuntimeError:
            obj = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as e:  # noqa: BLE001 - any unpickling failure is a bad file to the user
        raise StylegradError(f"{path.name} is not a plain tensor checkpoint ({first_line(e, 120)})") from None
    if not isinstance(obj, dict) or not isinstance(obj.get("controlnet"), dict):
        raise StylegradError(f"{path.name} has no 'controlnet' dict: not a Stylecodes checkpoint")
    raw = obj["controlnet"]
    return {k: cast(k, raw.pop(k)) for k in list(raw) if k.startswith(only)}


def resolve_checkpoint(model_id_or_path: str | None) -> Path:
    """A local file, a local folder holding the published file name, or a hub repo id (file downloaded once)."""
    ref = model_id_or_path or PUBLISHED_REPO
    p = Path(ref).expanduser()
    if p.is_file():
        return p
    if p.is_dir():
        found = [p / PUBLISHED_FILE] if (p / PUBLISHED_FILE).is_file() else sorted(
            [*p.glob("*.safetensors"), *p.glob("*.bin")])
        if not found:
            raise StylegradError(f"no Stylecodes checkpoint (.bin or .safetensors) in {p}")
        return found[0]
    if ref.startswith((".", "/", "~")) or ref.count("/") != 1 or p.suffix in (".bin", ".safetensors", ".pt", ".ckpt"):
        raise StylegradError(f"no Stylecodes checkpoint at {ref}")
    from huggingface_hub import hf_hub_download

    try:
        return Path(hf_hub_download(ref, PUBLISHED_FILE))
    except Exception as e:  # noqa: BLE001
        raise StylegradError(
            f"cannot get {ref}/{PUBLISHED_FILE} ({type(e).__name__}); download it while online "
            f"(huggingface-cli download {ref} {PUBLISHED_FILE}) or give stylecodes_model as a path") from None


AUTOENCODER = "sref_autoencoder."


def load_stylecodes(model_id_or_path: str | None, base_unet) -> StylecodesModel:
    """Build the model for ``base_unet`` on the meta device and load the checkpoint into it strictly, so the
    weights are never held twice. The control stream comes in the UNet's dtype, the code's autoencoder (small) in
    float32, as the file has it. Returned in eval mode: the decoder's dropout is off and results are repeatable."""
    path = resolve_checkpoint(model_id_or_path)
    state = read_checkpoint(path, next(base_unet.parameters()).dtype, float32=AUTOENCODER)
    with torch.device("meta"):
        model = StylecodesModel(base_unet, StyleAutoencoder.geometry_of(state))
    check_state(model, state, path.name)
    model.load_state_dict(state, strict=True, assign=True)
    return model.to(base_unet.device).eval()


def load_autoencoder(model_id_or_path: str | None, device="cpu") -> StyleAutoencoder:
    """Only the code encoder/decoder of a checkpoint (strictly: every ``sref_autoencoder.`` key), in float32:
    enough to make codes from images, no base UNet needed."""
    path = resolve_checkpoint(model_id_or_path)
    prefix = AUTOENCODER
    state = {k[len(prefix):]: v for k, v in read_checkpoint(path, torch.float32, only=prefix).items()}
    with torch.device("meta"):
        model = StyleAutoencoder(**StyleAutoencoder.geometry_of(state, prefix=""))
    check_state(model, state, path.name)
    model.load_state_dict(state, strict=True, assign=True)
    return model.to(device).eval()


def float32_autoencoder(auto: StyleAutoencoder, separate: bool = False) -> StyleAutoencoder:
    """The code's autoencoder as codes are made and read: float32, in eval mode. ``auto`` itself when it is
    float32 and need not be ``separate``; otherwise a float32 copy (exact when ``auto`` was read in float32). A
    separate one stays float32 when a pipeline holding the control model is moved or cast."""
    if not separate and all(t.dtype == torch.float32 for t in auto.state_dict().values()):
        return auto.eval()
    return copy.deepcopy(auto).to(torch.float32).eval()


def save_stylecodes(model: StylecodesModel, path: str | os.PathLike) -> Path:
    """Write the published containers: ``.safetensors`` with the ``controlnet.`` prefix (our default) or a
    ``.bin`` holding ``{"controlnet": state_dict}``."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    state = {k: v.detach().contiguous().cpu() for k, v in model.state_dict().items()}
    tmp = path.with_name(path.name + ".tmp")
    if path.suffix == ".safetensors":
        from safetensors.torch import save_file

        save_file({f"controlnet.{k}": v for k, v in state.items()}, str(tmp), metadata={"format": "pt"})
    else:
        torch.save({"controlnet": state}, tmp)
    os.replace(tmp, path)
    return path
