"""The CLIP text tower that aesthetic gradients tune, built around a pipeline's own text encoder.

The loss needs CLIP's text embedding (projection of the final-layer state at the first EOS); the UNet needs the
hidden states the pipeline would compute. A ``TextTower`` joins the two without copying or touching the
pipeline's modules: it is a parameter-free skeleton (built on the ``meta`` device) that is always run with
``torch.func.functional_call`` on a dict of tensors, either the originals (by reference) or tuned copies.

Families are picked like peft's dispatchers: the first adapter that matches wins, no match lists what is supported.
- SD1.x: the pipeline's 12-layer CLIP ViT-L/14 text encoder is the whole tower (so fine-tuned checkpoints work);
  only the projection comes from ``openai/clip-vit-large-patch14``, read as that one tensor from its safetensors
  file (``clip_parts``), not by building the 1.7 GB model.
- SD2.x: diffusers' encoder has 23 layers (the penultimate-layer trick). The tower is those 23 layers plus the
  24th layer and the projection of the full OpenCLIP ViT-H/14 text tower; the UNet still gets layer 23.
"""

from __future__ import annotations

import json
import os
from dataclasses import dataclass
from pathlib import Path

import torch
from torch.func import functional_call
from transformers import CLIPTextConfig, CLIPTextModel

from stylegrad.devices import execution_device, offload_hook, onload
from stylegrad.errors import StylegradError
from stylegrad.families import Family

TOKEN = "embeddings.token_embedding.weight"


def detect_family(encoder: CLIPTextModel) -> Family:
    """The family of a pipeline's one text encoder (SD1.x or SD2.x), from its width."""
    width = encoder.config.hidden_size
    family = Family.of_text_width(width)
    if family not in (Family.SD1, Family.SD2):
        supported = ", ".join(f"{f} (width {f.text_widths[0]})" for f in (Family.SD1, Family.SD2))
        raise StylegradError(f"unsupported text encoder of width {width}; supported: {supported}")
    return family


@dataclass
class ClipParts:
    """What the tower needs from the family's CLIP beyond the pipeline's encoder: its text projection and the text
    layers past the pipeline's (SD2.x's 24th), with the text tower's shape."""

    projection: torch.Tensor  # (P, H)
    layers: dict[str, torch.Tensor]  # 'encoder.layers.N.*' for N >= the pipeline's layer count
    num_layers: int
    hidden_size: int


def conditioning_layer(num_layers: int, clip_skip: int | None) -> int:
    """How many of the encoder's ``num_layers`` layers the UNet's conditioning goes through (then the final norm):
    diffusers' ``hidden_states[-(clip_skip + 1)]``."""
    k = num_layers - (clip_skip or 0)
    if clip_skip is not None and clip_skip < 0 or not 0 < k <= num_layers:
        raise StylegradError(f"clip_skip={clip_skip} is out of range for a {num_layers}-layer text encoder")
    return k


class TextTower:
    """A CLIP text transformer (embeddings, layers, final layer norm) plus a frozen projection.

    ``base`` maps parameter names to the original tensors (references into the pipeline's encoder, plus any
    extra layers); ``cond_layers`` is how many of the layers belong to the pipeline's encoder.
    """

    def __init__(self, encoder: CLIPTextModel, clip: ClipParts, eos_token_id: int, sdxl: bool = False):
        """``sdxl``: the UNet reads the penultimate layer's states without the final layer norm (SDXL's
        ``hidden_states[-2]``, both towers), not the last layer's normed ones."""
        cfg_enc = encoder.config
        if clip.hidden_size != cfg_enc.hidden_size or clip.num_layers < cfg_enc.num_hidden_layers:
            raise StylegradError(
                f"the CLIP text model (width {clip.hidden_size}, {clip.num_layers} layers) does not "
                f"extend the pipeline's text encoder (width {cfg_enc.hidden_size}, {cfg_enc.num_hidden_layers} "
                "layers); pass the CLIP model of this pipeline's family"
            )
        self.cond_layers = cfg_enc.num_hidden_layers
        self.eos_token_id = eos_token_id
        self.sdxl = sdxl
        weights = text_parameters(encoder)
        table = weights[TOKEN]
        # the layers past the pipeline's (SD2's 24th), kept where the encoder's weights wait, in their dtype
        self._beyond = {name: t.detach().to(device=table.device, dtype=table.dtype) for name, t in clip.layers.items()
                        if (i := _layer_index(name)) is not None and i >= self.cond_layers}
        # (P, H), float32 whatever the encoder's dtype: tuning runs in float32, and SDXL's pooled embedding comes
        # from it (a bf16 projection moved the pooled delta by 1.2%)
        self.projection = clip.projection.detach().to(torch.float32)
        self.base: dict[str, torch.Tensor] = {}
        self._seen: tuple | None = None
        self.follow(encoder)

        self.skeleton = meta_skeleton(encoder, clip.num_layers)
        self.total_layers = clip.num_layers
        self.layer_norm_eps = cfg_enc.layer_norm_eps

    def follow(self, encoder) -> None:
        """Read ``encoder``'s tensors (by reference) where it computes, unless they are the ones read last time: after
        ``pipe.to()`` moved or cast it (the module's tensors are then new ones), tuning must start from what the
        pipeline runs, on its device and in its dtype. Under model CPU offload the encoder's weights wait on the
        CPU and it runs on its hook's execution device: the tower puts it there through that hook, as a forward of
        it would, and reads it there until ``release``. The layers the encoder lacks (SD2's 24th) follow the same
        device and dtype; the projection stays float32."""
        weights = {k: v.detach() for k, v in readable_parameters(encoder).items()}
        device = execution_device(encoder)
        seen = (device, tuple((k, v.data_ptr(), v.device, v.dtype) for k, v in weights.items()))
        if self.base and seen == self._seen:
            return
        table = weights[TOKEN]
        self.base = {**{k: v.to(device) for k, v in weights.items()},
                     **{k: t.to(device=device, dtype=table.dtype) for k, t in self._beyond.items()}}
        self.device, self.dtype, self._seen = device, table.dtype, seen
        self.projection = self.projection.to(device)

    def release(self) -> None:
        """Drop the tensors read (the next use reads the encoder again). Under model CPU offload the encoder goes back
        to the CPU when the next model runs, and what the tower holds would otherwise keep its copy on the card."""
        self.base, self._seen = {}, None

    @property
    def width(self) -> int:
        """Width of CLIP's joint embedding space: the width a style must have."""
        return self.projection.shape[0]

    def run(self, params: dict[str, torch.Tensor], ids: torch.Tensor, hidden: bool = False):
        """Forward the skeleton with ``params``; ``ids`` index ``params['embeddings.token_embedding.weight']``."""
        return run_skeleton(self.skeleton, params, ids, hidden)

    def text_embed(self, out, eos: torch.Tensor) -> torch.Tensor:
        """CLIP text embedding: projection of the final state at the first EOS (as CLIP's ``encode_text``)."""
        pooled = out.last_hidden_state[torch.arange(eos.shape[0], device=eos.device), eos]  # (B, H)
        return pooled.to(self.projection.dtype) @ self.projection.T  # (B, P)

    def condition(self, params: dict[str, torch.Tensor], out, clip_skip: int | None) -> torch.Tensor:
        """The hidden states the pipeline feeds the UNet: final layer norm of layer ``cond_layers - clip_skip``
        (SDXL: layer ``cond_layers - 1 - clip_skip`` as it is)."""
        k = self.cond_layer(clip_skip)
        if self.sdxl:
            return out.hidden_states[k]
        if k == self.total_layers:
            return out.last_hidden_state  # exactly what the encoder returns
        h = out.hidden_states[k]  # (B, S, H); hidden_states[0] is the embedding output
        w, b = params["final_layer_norm.weight"], params["final_layer_norm.bias"]
        return torch.nn.functional.layer_norm(h, h.shape[-1:], w, b, self.layer_norm_eps)

    def cond_layer(self, clip_skip: int | None) -> int:
        """How many layers the UNet's conditioning goes through (then the final layer norm, except on SDXL)."""
        if self.sdxl:  # diffusers' hidden_states[-(clip_skip + 2)]; 0 is the embeddings' output
            k = self.cond_layers - 1 - (clip_skip or 0)
            if not 0 <= k < self.cond_layers:
                raise StylegradError(f"clip_skip={clip_skip} is out of range for a {self.cond_layers}-layer text "
                                     "encoder")
            return k
        return conditioning_layer(self.cond_layers, clip_skip)

    def needs_hidden(self, clip_skip: int | None) -> bool:
        return self.sdxl or self.cond_layer(clip_skip) != self.total_layers


def _text_module(encoder):
    """The transformer of a ``CLIPTextModel`` (transformers 5: itself) or of a ``CLIPTextModelWithProjection``."""
    return encoder.text_model if hasattr(encoder, "text_projection") else encoder


def text_parameters(encoder) -> dict[str, torch.Tensor]:
    """The text transformer's tensors under ``CLIPTextModel``'s names (``embeddings.*``, ``encoder.layers.*``,
    ``final_layer_norm.*``), also for SDXL's ``CLIPTextModelWithProjection``; by reference."""
    if hasattr(encoder, "text_projection"):
        return {k.removeprefix("text_model."): v for k, v in encoder.named_parameters()
                if not k.startswith("text_projection.")}
    return dict(encoder.named_parameters())


def readable_parameters(encoder) -> dict[str, torch.Tensor]:
    """``text_parameters`` where the encoder computes: under model CPU offload it is put on its execution device
    first, through its own hook, as a forward of it would (the model before it in the chain goes back to the
    CPU). Sequential offload keeps the weights outside the module: refused in one line."""
    onload(encoder)
    params = text_parameters(encoder)
    if params[TOKEN].device.type == "meta" and offload_hook(encoder) is None and any(
            hasattr(m, "_hf_hook") for m in encoder.modules()):
        raise StylegradError("the text encoder's weights are kept outside it (sequential CPU offload): use "
                             "pipe.enable_model_cpu_offload() or no offload")
    return params


def meta_skeleton(encoder: CLIPTextModel, layers: int | None = None) -> CLIPTextModel:
    """A parameter-free copy of ``encoder``'s architecture (``layers`` deep), run with ``functional_call`` on a dict
    of tensors: the way to run the encoder on other weights without touching its own."""
    config = CLIPTextConfig.from_dict(encoder.config.to_dict())
    config.num_hidden_layers = layers or config.num_hidden_layers
    with torch.device("meta"):
        skeleton = CLIPTextModel._from_config(config, attn_implementation=encoder.config._attn_implementation)
    skeleton.embeddings.position_ids = _text_module(encoder).embeddings.position_ids.detach().clone()
    return skeleton.eval()


def run_skeleton(skeleton: CLIPTextModel, params: dict[str, torch.Tensor], ids: torch.Tensor, hidden: bool = False):
    """``skeleton`` (from ``meta_skeleton``) run on ``params``, its position ids (its one real buffer) moved to where
    ``ids`` are first: the encoder it was copied from may have moved since."""
    embeddings = skeleton.embeddings
    if embeddings.position_ids.device != ids.device:
        embeddings.position_ids = embeddings.position_ids.to(ids.device)
    return functional_call(skeleton, params, (ids,), {"output_hidden_states": hidden})


def _layer_index(name: str) -> int | None:
    parts = name.split(".")
    if len(parts) > 2 and parts[0] == "encoder" and parts[1] == "layers":
        return int(parts[2])
    return None


def _text_config(config: dict) -> dict:
    return config.get("text_config") or config  # a CLIPModel nests it; a CLIPTextModel(WithProjection) does not


def _safetensors_files(folder: Path) -> dict[str, Path] | None:
    """Tensor name -> file for a folder's (possibly sharded) model.safetensors, or None if it has none."""
    single = folder / "model.safetensors"
    if single.is_file():
        return {"": single}
    index = folder / "model.safetensors.index.json"
    if index.is_file():
        weight_map = json.loads(index.read_text(encoding="utf-8"))["weight_map"]
        return {k: folder / v for k, v in weight_map.items()}
    return None


def _hub_folder(repo: str) -> Path | None:
    """The folder in the local cache holding the hub repo's config and safetensors file(s), downloading them if
    allowed; None if the repo has no safetensors weights."""
    from huggingface_hub import hf_hub_download
    from huggingface_hub.errors import EntryNotFoundError, HfHubHTTPError, LocalEntryNotFoundError

    from stylegrad.files.hub import explain_unavailable

    try:
        config = Path(hf_hub_download(repo, "config.json"))
        try:
            hf_hub_download(repo, "model.safetensors")
        except LocalEntryNotFoundError:
            raise  # offline and not cached: said below
        except EntryNotFoundError:  # the repo has no such file
            try:
                index = Path(hf_hub_download(repo, "model.safetensors.index.json"))
            except LocalEntryNotFoundError:
                raise
            except EntryNotFoundError:
                return None
            for name in set(json.loads(index.read_text(encoding="utf-8"))["weight_map"].values()):
                hf_hub_download(repo, name)
    except (LocalEntryNotFoundError, EntryNotFoundError, HfHubHTTPError, OSError, ValueError) as e:
        raise StylegradError(explain_unavailable(repo, "CLIP model", e)) from e
    return config.parent


def clip_parts(clip_model, cond_layers: int, device: torch.device | str = "cpu") -> ClipParts:
    """The projection (and layers from ``cond_layers`` on) of a CLIP model: a loaded CLIP text model, a local folder
    or a hub id. From a folder or the hub only those tensors are read from the safetensors file(s) (for SD1.x one
    768 x 768 matrix instead of the 1.7 GB model); a folder without safetensors is loaded whole."""
    if not isinstance(clip_model, (str, os.PathLike)):  # a CLIPTextModelWithProjection or CLIPModel in memory
        text = getattr(clip_model, "text_model", clip_model)
        layers = {n: t.detach() for n, t in text.named_parameters()
                  if (i := _layer_index(n)) is not None and i >= cond_layers}
        return ClipParts(clip_model.text_projection.weight.detach().to(device), layers,
                         text.config.num_hidden_layers, text.config.hidden_size)
    path = Path(clip_model).expanduser()
    if path.is_dir():
        folder = path
    elif str(clip_model).startswith((".", "/", "~")) or str(clip_model).count("/") > 1:
        raise StylegradError(f"CLIP model folder not found: {clip_model}")
    else:
        folder = _hub_folder(str(clip_model))
        if folder is None:  # weights in another format: build the model (weights_only loading in transformers)
            return clip_parts(load_clip_text(str(clip_model), device), cond_layers, device)
    files = _safetensors_files(folder)
    try:
        config = _text_config(json.loads((folder / "config.json").read_text(encoding="utf-8")))
    except (OSError, ValueError) as e:
        raise StylegradError(f"CLIP model at {folder} has no readable config.json") from e
    if files is None:  # e.g. only pytorch_model.bin: build the model (weights_only loading in transformers)
        return clip_parts(load_clip_text(str(folder), device), cond_layers, device)
    from safetensors import safe_open

    wanted = ["text_projection.weight"] + [
        n for n in _keys(files) if n.startswith("text_model.encoder.layers.")
        and int(n.split(".")[3]) >= cond_layers]
    tensors = {}
    for name in wanted:
        with safe_open(str(files.get(name, files.get(""))), framework="pt", device="cpu") as f:
            tensors[name] = f.get_tensor(name)
    layers = {n.removeprefix("text_model."): t for n, t in tensors.items() if n != "text_projection.weight"}
    return ClipParts(tensors["text_projection.weight"].float().to(device), layers, config["num_hidden_layers"],
                     config["hidden_size"])


def _keys(files: dict[str, Path]) -> list[str]:
    if "" not in files:
        return list(files)
    from safetensors import safe_open

    with safe_open(str(files[""]), framework="pt", device="cpu") as f:
        return list(f.keys())


def load_clip_text(clip_model: str, device: torch.device | str = "cpu"):
    """The whole CLIP text tower with its projection, from a hub id or a local folder (offline-friendly errors)."""
    from transformers import CLIPTextModelWithProjection

    from stylegrad.files.hub import from_pretrained

    return from_pretrained(CLIPTextModelWithProjection, clip_model, what="CLIP model").to(device).eval()


def tower_for(encoder: CLIPTextModel, tokenizer, clip_model=None, sdxl: bool = False) -> TextTower:
    """Build the tower for a pipeline's text encoder; ``clip_model`` (an id, a folder or a loaded CLIP text model)
    defaults to the family's CLIP. An encoder with its own projection (SDXL's second) is its own CLIP."""
    if hasattr(encoder, "text_projection") and clip_model is None:
        cfg = encoder.config
        parts = ClipParts(encoder.text_projection.weight.detach(), {}, cfg.num_hidden_layers, cfg.hidden_size)
        return TextTower(encoder, parts, tokenizer.eos_token_id, sdxl)
    if clip_model is None:
        clip_model = detect_family(encoder).clip_model
    parts = clip_parts(clip_model, encoder.config.num_hidden_layers, execution_device(encoder))
    return TextTower(encoder, parts, tokenizer.eos_token_id, sdxl)
