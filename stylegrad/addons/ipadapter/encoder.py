"""The CLIP vision encoder an IP-Adapter reads, found where users keep it, and diffusers' preprocessing.

Looked for in order: ``ip_image_encoder`` (a diffusers/transformers folder, or one ``.safetensors`` of a
``CLIPVisionModelWithProjection`` as ComfyUI's ``models/clip_vision`` holds them); an ``image_encoder`` or
``clip_vision`` folder beside the adapter (h94's layout, ComfyUI's), the candidate whose widths fit the adapter
chosen by its shapes; then the hub (h94/IP-Adapter's ``models/image_encoder``: OpenCLIP ViT-H/14, or
``sdxl_models/image_encoder``: ViT-bigG/14). Offline, a missing encoder is one line naming every place looked.
Pictures are prepared as diffusers' ``load_ip_adapter`` prepares them: ``CLIPImageProcessor`` at the encoder's
image size (shortest side resized bicubic, centre crop, CLIP's mean and std)."""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path

import torch

from stylegrad.addons.ipadapter.shapes import ENCODER_NAMES, AdapterShape
from stylegrad.errors import StylegradError
from stylegrad.files.safetensors_header import read_header

HUB_REPO = "h94/IP-Adapter"
HUB_FOLDERS = {"vit-h": "models/image_encoder", "bigG": "sdxl_models/image_encoder"}
# heads of the published towers (not in a bare weights file): ViT-H/14 and bigG/14 and ViT-L/14 have 16, B 12
_HEADS = {1280: 16, 1664: 16, 1024: 16, 768: 12}
_ACT = {1280: "gelu", 1664: "gelu"}  # OpenCLIP's towers; OpenAI's CLIP uses quick_gelu


@dataclass(frozen=True)
class Widths:
    """What a candidate encoder gives: pooled ``image_embeds`` (projection_dim) and hidden states' width."""

    pooled: int
    hidden: int

    def fits(self, shape: AdapterShape) -> bool:
        return (self.hidden if shape.hidden_states else self.pooled) == shape.image_width


def _widths(path: Path) -> Widths | None:
    """A candidate's widths, read without loading it (a folder's config.json, a file's header); None: not one."""
    try:
        if path.is_dir():
            cfg = json.loads((path / "config.json").read_text(encoding="utf-8"))
            vision = cfg.get("vision_config", cfg)
            return Widths(cfg.get("projection_dim", vision.get("projection_dim")), vision["hidden_size"])
        if path.suffix.lower() == ".safetensors":
            shapes = read_header(path).shapes
            proj = shapes.get("visual_projection.weight")
            patch = shapes.get("vision_model.embeddings.patch_embedding.weight")
            return Widths(proj[0], patch[0]) if proj and patch else None
    except (OSError, ValueError, KeyError, TypeError):
        return None
    return None


def find_encoder(shape: AdapterShape, given: str | None, folders: list[Path]) -> str:
    """The encoder's folder, file or hub id (``hub:REPO:SUBFOLDER``) for an adapter of ``shape``."""
    need = ENCODER_NAMES.get(shape.encoder or "", f"{shape.image_width}-wide")
    if given:
        p = Path(given).expanduser()
        if p.is_dir() and not (p / "config.json").is_file():
            folders = [p]  # a clip_vision folder of several encoders: the one that fits, as below
        elif p.exists():
            w = _widths(p)
            if w is not None and not w.fits(shape):
                raise StylegradError(f"image encoder {p.name} gives {w.hidden if shape.hidden_states else w.pooled}-"
                                     f"wide features, the adapter reads {shape.image_width} ({need})")
            return str(p)
        else:
            return given  # a hub id: loaded (or refused offline) by the loader
    looked = []
    for folder in folders:
        looked.append(str(folder))
        if not folder.is_dir():
            continue
        candidates = [folder] + sorted(folder.iterdir())
        for c in candidates:
            w = _widths(c)
            if w is not None and w.fits(shape):
                return str(c)
    if shape.encoder in HUB_FOLDERS and not given:
        return f"hub:{HUB_REPO}:{HUB_FOLDERS[shape.encoder]}"
    raise StylegradError(f"no image encoder for this IP-Adapter ({need}) in {', '.join(looked) or 'no folder'}, "
                         "and none published for it: give --ip-image-encoder")


def load_encoder(where: str, folders_looked: list[Path], device: torch.device, dtype: torch.dtype):
    """(CLIPVisionModelWithProjection on ``device`` in ``dtype``, eval; its image processor)."""
    from transformers import CLIPVisionConfig, CLIPVisionModelWithProjection

    from stylegrad.files.hub import from_pretrained

    if where.startswith("hub:"):
        _, repo, sub = where.split(":", 2)
        try:
            model = CLIPVisionModelWithProjection.from_pretrained(repo, subfolder=sub, dtype=dtype)
        except (OSError, ValueError) as e:
            import os

            from stylegrad.errors import first_line

            looked = ", ".join(map(str, folders_looked)) or "no local folder"
            offline = os.environ.get("HF_HUB_OFFLINE", "0") not in ("", "0", "false", "False")
            why = "is not downloaded (offline)" if offline else f"could not be had ({first_line(e, 120)})"
            raise StylegradError(f"the IP-Adapter's image encoder is in none of {looked}, and {repo}'s {sub} {why}: "
                                 f"`hf download {repo} --include '{sub}/*'` once, or give --ip-image-encoder") from e
    elif Path(where).is_file():
        from safetensors.torch import load_file

        if Path(where).suffix.lower() != ".safetensors":
            raise StylegradError(f"image encoder {Path(where).name}: give a .safetensors file or a folder")
        tensors = load_file(where)
        model = CLIPVisionModelWithProjection(_config_from(tensors, CLIPVisionConfig))
        missing, unexpected = model.load_state_dict(tensors, strict=False)
        if [k for k in missing if "position_ids" not in k]:
            raise StylegradError(f"image encoder {Path(where).name} is not a CLIPVisionModelWithProjection "
                                 f"(missing {missing[0]})")
    else:
        model = from_pretrained(CLIPVisionModelWithProjection, where, what="IP-Adapter image encoder", dtype=dtype)
    return model.to(device, dtype).eval(), image_processor(model.config.image_size)


def _config_from(tensors: dict[str, torch.Tensor], config_class):
    """A vision config from a bare weights file's shapes (ComfyUI's clip_vision files carry none)."""
    patch = tensors["vision_model.embeddings.patch_embedding.weight"]  # (H, 3, P, P)
    positions = tensors["vision_model.embeddings.position_embedding.weight"].shape[0]  # (S/P)^2 + 1
    hidden, size = patch.shape[0], patch.shape[-1]
    layers = 1 + max(int(k.split(".")[3]) for k in tensors if k.startswith("vision_model.encoder.layers."))
    side = round((positions - 1) ** 0.5) * size
    return config_class(hidden_size=hidden, intermediate_size=tensors[
        "vision_model.encoder.layers.0.mlp.fc1.weight"].shape[0], num_hidden_layers=layers,
        num_attention_heads=_HEADS.get(hidden, max(1, hidden // 64)), image_size=side, patch_size=size,
        projection_dim=tensors["visual_projection.weight"].shape[0], hidden_act=_ACT.get(hidden, "quick_gelu"),
        layer_norm_eps=1e-5)


def image_processor(size: int):
    """The processor diffusers' ``load_ip_adapter`` makes when the pipeline has none: ``CLIPImageProcessor`` at
    ``size`` (transformers' PIL backend where torchvision is absent, as transformers itself falls back)."""
    import importlib.util

    if importlib.util.find_spec("torchvision") is not None:
        from transformers import CLIPImageProcessor as Processor
    else:
        from transformers import CLIPImageProcessorPil as Processor
    return Processor(size=size, crop_size=size)
