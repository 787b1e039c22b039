"""The node classes ComfyUI lists under "stylegrad". Thin: each reads its inputs, calls stylegrad, and returns
ComfyUI's types; the maths are the library's (``clip.py``, ``stylecode.py``, ``stylegrad.aesthetic``)."""

from __future__ import annotations

import hashlib
import os
from pathlib import Path

import torch
from PIL import Image

from stylegrad.aesthetic.options import StyleOptions
from stylegrad.apps.comfyui.clip import apply_patches, blend_conditioning, encode, tower_names, tuned_patches
from stylegrad.errors import StylegradError
from stylegrad.files.styles import Style, load_style, save_style

CATEGORY = "stylegrad"
STYLE_SUFFIXES = {".pt", ".safetensors", ".bin"}
_ENCODERS: dict[str, tuple] = {}  # one CLIP image encoder kept between runs (loading it is the slow part)


def _folder_paths():
    import folder_paths  # ComfyUI's

    return folder_paths


def register_folders() -> None:
    """``styles`` (models/styles and models/aesthetic_embeddings) and ``stylecodes`` model folders, unless the
    user's extra_model_paths.yaml already named them."""
    fp = _folder_paths()
    folders = {"styles": (["styles", "aesthetic_embeddings"], STYLE_SUFFIXES),
               "stylecodes": (["stylecodes"], {".safetensors", ".bin"})}
    for name, (subdirs, suffixes) in folders.items():
        paths = [os.path.join(fp.models_dir, d) for d in subdirs]
        if name in fp.folder_names_and_paths:
            known, exts = fp.folder_names_and_paths[name]
            fp.folder_names_and_paths[name] = (known + [p for p in paths if p not in known], set(exts) | suffixes)
        else:
            fp.folder_names_and_paths[name] = (paths, set(suffixes))


def _progress(total: int):
    """ComfyUI's progress bar on the node, where there is one."""
    try:
        from comfy.utils import ProgressBar
    except ImportError:
        return None
    bar = ProgressBar(total)
    return lambda step, similarity: bar.update(1)


def _from_input(load, node_input: str):
    """``load()``; a model it cannot get is reported in the node's terms (the input to change), not the CLI's."""
    try:
        return load()
    except StylegradError as e:
        head, _, remedy = str(e).partition(": ")  # the library's remedy names CLI flags and arguments: dropped
        reason = head if any(w in remedy for w in ("download", "pass ", "give ")) else str(e)
        raise StylegradError(f"{reason}: give a local folder or file in the node's '{node_input}' input, or let "
                             "ComfyUI's Python download it once while online") from None


def _pictures(images: torch.Tensor) -> list[Image.Image]:
    """ComfyUI's IMAGE (B, H, W, C) floats in [0, 1] as the 8-bit pictures they were read from."""
    pixels = (images.detach().float().clamp(0, 1) * 255).round().to(torch.uint8).cpu().numpy()
    return [Image.fromarray(p[..., :3]) for p in pixels]


class LoadStyle:
    """A style file from ComfyUI's ``styles`` folder: A1111 aesthetic embeddings (``.pt``), stylegrad's
    ``.safetensors``, SDXL two-part styles."""

    DESCRIPTION = "Loads an aesthetic-gradients style (A1111 .pt or stylegrad .safetensors) from models/styles."
    CATEGORY = CATEGORY
    RETURN_TYPES = ("STYLE",)
    RETURN_NAMES = ("style",)
    OUTPUT_TOOLTIPS = ("The style: a mean CLIP image embedding (SDXL styles carry a ViT-L and a bigG part).",)
    FUNCTION = "load"

    @classmethod
    def INPUT_TYPES(cls):
        return {"required": {"style_name": (_folder_paths().get_filename_list("styles"), {
            "tooltip": "A file in models/styles or models/aesthetic_embeddings (add folders in extra_model_paths.yaml "
                       "under 'styles')."})}}

    def load(self, style_name: str):
        return (load_style(_folder_paths().get_full_path_or_raise("styles", style_name)),)

    @classmethod
    def IS_CHANGED(cls, style_name: str):
        """The file's digest: the same file is not read again, an edited one is."""
        path = _folder_paths().get_full_path("styles", style_name)
        return hashlib.sha256(Path(path).read_bytes()).hexdigest() if path else ""


class StyleFromImages:
    """A style from a batch of pictures: the mean of their CLIP image embeddings, as ``stylegrad embed`` makes it."""

    DESCRIPTION = "Makes an aesthetic-gradients style from a batch of images (their mean CLIP image embedding)."
    CATEGORY = CATEGORY
    RETURN_TYPES = ("STYLE",)
    RETURN_NAMES = ("style",)
    OUTPUT_TOOLTIPS = ("The images' style.",)
    FUNCTION = "embed"
    OUTPUT_NODE = True  # ComfyUI runs it even with its output unwired, so "save" needs no other node

    @classmethod
    def INPUT_TYPES(cls):
        return {
            "required": {
                "images": ("IMAGE", {"tooltip": "The pictures whose look the style captures (5-50 work well)."}),
                "family": (["sd1", "sdxl"], {"tooltip": "sd1: CLIP ViT-L/14 (SD1.x and SDXL's first tower); sdxl: "
                                             "also OpenCLIP bigG for SDXL's second tower (a large download)."}),
                "name": ("STRING", {"default": "style", "tooltip": "The style's name."}),
                "save": ("BOOLEAN", {"default": False, "tooltip": "Also save it into the first styles folder as "
                                     "NAME.safetensors (never over an existing file)."}),
            },
            "optional": {
                "clip_model": ("STRING", {"default": "", "tooltip": "CLIP image model (hub id or folder) instead "
                                          "of openai/clip-vit-large-patch14."}),
                "clip_model_g": ("STRING", {"default": "", "tooltip": "sdxl: bigG image model instead of "
                                            "laion/CLIP-ViT-bigG-14-laion2B-39B-b160k."}),
            },
        }

    def embed(self, images, family: str, name: str, save: bool, clip_model: str = "", clip_model_g: str = ""):
        from stylegrad.aesthetic.embedding import BIGG, embed_pictures, load_image_encoder
        from stylegrad.families import Family

        pictures = _pictures(images)

        def mean(model: str, node_input: str) -> Style:
            if model not in _ENCODERS:
                _ENCODERS.clear()
                _ENCODERS[model] = _from_input(lambda: load_image_encoder(model), node_input)
            return embed_pictures(pictures, model, encoder=_ENCODERS[model], name=name or "style")

        with torch.inference_mode(False):
            style = mean(clip_model or Family.SD1.clip_model, "clip_model")
            if family == "sdxl":
                g = mean(clip_model_g or BIGG, "clip_model_g")
                style = Style(style.vector, {**style.metadata, "encoder_g": g.metadata["encoder"], "family": "sdxl"},
                              style.name, g.vector)
        if save:
            folder = Path(_folder_paths().get_folder_paths("styles")[0])
            folder.mkdir(parents=True, exist_ok=True)
            target, n = folder / f"{name or 'style'}.safetensors", 1
            while target.exists():
                n += 1
                target = folder / f"{name or 'style'}-{n}.safetensors"
            save_style(style, target)
        return (style,)


class AestheticCLIPTextEncode:
    """CLIPTextEncode with the prompt personalized towards a style (aesthetic gradients, Gallego 2022)."""

    DESCRIPTION = ("Encodes a prompt with the CLIP tuned for a few Adam steps towards the style (aesthetic "
                   "gradients): the same conditioning as stylegrad's AestheticEncoder. The CLIP given is not changed.")
    CATEGORY = CATEGORY
    RETURN_TYPES = ("CONDITIONING", "CLIP")
    RETURN_NAMES = ("conditioning", "styled_clip")
    OUTPUT_TOOLTIPS = ("The prompt's conditioning, personalized.",
                       "A clone of the CLIP patched with this prompt's tuning (weight 1), for other encoders.")
    FUNCTION = "encode"

    @classmethod
    def INPUT_TYPES(cls):
        defaults = StyleOptions()
        return {
            "required": {
                "clip": ("CLIP", {"tooltip": "The CLIP from your checkpoint loader (SD1.x, SD2.x or SDXL)."}),
                "text": ("STRING", {"multiline": True, "dynamicPrompts": True, "tooltip": "The prompt."}),
                "style": ("STYLE", {"tooltip": "From Load Style or Style from Images."}),
                "steps": ("INT", {"default": defaults.steps, "min": 0, "max": 200, "tooltip":
                                  "Adam steps on the text encoder (the paper uses 5-20; 0 = no style)."}),
                "lr": ("FLOAT", {"default": defaults.lr, "min": 1e-7, "max": 1.0, "step": 1e-5, "round": False,
                                 "tooltip": "Adam learning rate; higher is stronger and less faithful."}),
                "weight": ("FLOAT", {"default": defaults.weight, "min": 0.0, "max": 1.0, "step": 0.01, "tooltip":
                                     "Blend of the original (0) and tuned (1) conditioning."}),
            },
            "optional": {
                "towers": (["both", "l", "g"], {"default": "both", "tooltip": "SDXL only: tune CLIP-L, bigG or "
                                                "both (SD1.x and SD2.x have one tower; ignored there)."}),
                "style_text": ("STRING", {"default": "", "tooltip": "Rotate the style target towards this text."}),
                "text_angle": ("FLOAT", {"default": defaults.text_angle, "min": 0.0, "max": 1.0, "step": 0.01,
                                         "tooltip": "How far towards the style text (slerp fraction)."}),
                "slerp": ("BOOLEAN", {"default": defaults.slerp, "tooltip": "Blend per token on the sphere."}),
                "regularization": ("FLOAT", {"default": defaults.regularization, "min": 0.0, "max": 100.0,
                                             "step": 0.01, "tooltip": "Hold the tuned states near the original."}),
                "target_similarity": ("FLOAT", {"default": 0.0, "min": 0.0, "max": 1.0, "step": 0.01, "tooltip":
                                                "Consistent strength: stop each prompt once its cosine to the style "
                                                "reaches this, steps becoming a cap (0: off)."}),
                "target_gain": ("FLOAT", {"default": 0.0, "min": 0.0, "max": 1.0, "step": 0.01, "tooltip":
                                          "Consistent strength: stop each prompt once its cosine to the style has "
                                          "closed this share of its distance to 1, steps becoming a cap (0: off)."}),
                "clip_model": ("STRING", {"default": "", "tooltip": "CLIP-L's style space: openai's ViT-L/14 text "
                                          "projection, which ComfyUI's CLIP lacks. Empty: the first .safetensors in "
                                          "models/clip_vision holding it, else openai/clip-vit-large-patch14 from the "
                                          "Hugging Face cache. Or a .safetensors file (path or clip_vision name), a "
                                          "folder or a hub id."}),
            },
        }

    def encode(self, clip, text: str, style: Style, steps: int, lr: float, weight: float, towers: str = "both",
               style_text: str = "", text_angle: float = 0.1, slerp: bool = False, regularization: float = 0.0,
               clip_model: str = "", target_similarity: float = 0.0, target_gain: float = 0.0):
        options = StyleOptions(steps=steps, lr=lr, weight=weight, towers=towers, text=style_text or None,
                               text_angle=text_angle, slerp=slerp, regularization=regularization,
                               target_similarity=target_similarity or None, target_gain=target_gain or None)
        patches, _, tuned = tuned_patches(clip, text, style, options, clip_model or None, _progress(steps))
        if not tuned:
            return (encode(clip, text), clip)
        styled = clip.clone()
        accepted = set(apply_patches(styled, patches))
        if accepted != set(patches):
            missing = sorted(set(patches) - accepted)
            raise StylegradError(f"ComfyUI's CLIP has no weight {missing[0]} ({len(missing)} missing)")
        del patches
        cond = encode(styled, text)
        if not all(bool(torch.isfinite(c).all()) for c, _ in cond):
            raise StylegradError("the styled conditioning is not finite (NaN or inf): lower lr or steps")
        if weight != 1.0:
            names = tower_names(clip.cond_stage_model)
            widths = [getattr(clip.cond_stage_model, "clip_" + n).transformer.text_model.embeddings
                      .token_embedding.weight.shape[1] for n in names]
            cond = blend_conditioning(encode(clip, text), cond, widths, [names.index(t) for t in tuned], weight,
                                      slerp)
        return (cond, styled)


class Stylecode:
    """A MODEL styled by a stylecode (Stylecodes, Rowles 2024): SD1.5, like Midjourney's --sref."""

    DESCRIPTION = ("Patches an SD1.5 MODEL with the Stylecodes control stream for a code (or the code of an image). "
                   "The MODEL given is not changed.")
    CATEGORY = CATEGORY
    RETURN_TYPES = ("MODEL", "STRING")
    RETURN_NAMES = ("model", "code")
    OUTPUT_TOOLTIPS = ("A clone of the model carrying the style.", "The code used (paste it into other workflows).")
    FUNCTION = "patch"

    @classmethod
    def INPUT_TYPES(cls):
        return {
            "required": {
                "model": ("MODEL", {"tooltip": "An SD1.5 model."}),
                "code": ("STRING", {"default": "", "tooltip": "A stylecode, or a blend 'CODE1::2 CODE2::1'. Ignored "
                                    "when an image is connected."}),
                "strength": ("FLOAT", {"default": 1.0, "min": 0.0, "max": 2.0, "step": 0.05,
                                       "tooltip": "How strongly the style steers the UNet (0 = off)."}),
            },
            "optional": {
                "image": ("IMAGE", {"tooltip": "Use this image's style (its code is returned)."}),
                "checkpoint": (["default"] + _folder_paths().get_filename_list("stylecodes"), {"default": "default",
                    "tooltip": "Stylecodes weights from models/stylecodes; default: the published model (HF cache)."}),
                "siglip": ("STRING", {"default": "", "tooltip": "SigLIP image model for image -> code (hub id or "
                                      "folder; default google/siglip-base-patch16-224)."}),
            },
        }

    def patch(self, model, code: str, strength: float, image=None, checkpoint: str = "default", siglip: str = ""):
        from stylegrad.checkpoints.loading import family_config
        from stylegrad.stylecodes.facade import Stylecodes, load_siglip
        from stylegrad.stylecodes.model import PUBLISHED_FILE, PUBLISHED_REPO, SIGLIP, resolve_checkpoint

        if checkpoint in ("", "default"):
            try:
                path = str(resolve_checkpoint(None))
            except StylegradError:
                raise StylegradError(
                    f"the published Stylecodes weights ({PUBLISHED_REPO}, {PUBLISHED_FILE}) are not in the Hugging "
                    "Face cache and cannot be downloaded now: put a Stylecodes file in models/stylecodes and pick it "
                    "in the node's 'checkpoint' input, or let ComfyUI's Python download it once while online") from None
        else:
            path = _folder_paths().get_full_path_or_raise("stylecodes", checkpoint)
        with torch.inference_mode(False):
            codes = Stylecodes.load(None, path, siglip=None)
            if image is not None:
                codes.siglip, codes.processor = _from_input(lambda: load_siglip(siglip or SIGLIP, dtype=torch.float32),
                                                            "siglip")
                code = codes.code_for(_pictures(image[:1])[0])
            if not code.strip():
                raise StylegradError("give a stylecode or connect an image")
            latent = codes.latent_of(code.strip())
        from stylegrad.apps.comfyui.stylecode import patched_model

        return (patched_model(model, path, latent, strength, family_config("sd1")["unet"]), code.strip())


NODE_CLASS_MAPPINGS = {
    "StylegradLoadStyle": LoadStyle,
    "StylegradStyleFromImages": StyleFromImages,
    "StylegradAestheticCLIPTextEncode": AestheticCLIPTextEncode,
    "StylegradStylecode": Stylecode,
}
NODE_DISPLAY_NAME_MAPPINGS = {
    "StylegradLoadStyle": "Load Style (stylegrad)",
    "StylegradStyleFromImages": "Style from Images (stylegrad)",
    "StylegradAestheticCLIPTextEncode": "Aesthetic CLIP Text Encode (stylegrad)",
    "StylegradStylecode": "Stylecode (stylegrad)",
}
