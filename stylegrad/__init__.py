"""stylegrad: custom Stable Diffusion styles from a handful of images, without retraining.

Public API::

    style = embed_images(["my_pictures/"])                        # images -> Style (CLIP ViT-L/14 for SD1.x)
    save_style(style, "mine.safetensors");  style = load_style("watercolor.pt");  inspect_file("any.file")
    enc = AestheticEncoder.from_pipeline(pipe)                    # any diffusers pipeline that takes prompt_embeds
    e = enc.encode("a harbour at night", style, StyleOptions(steps=10))   # EncodedPrompt (SDXL: pooled too)
    image = pipe(**e.pipeline_kwargs()).images[0]                 # or pe, ne = e for SD1.x/SD2.x
    gen = Generator.load("stable-diffusion-v1-5/stable-diffusion-v1-5")   # or Generator(pipe), or a .safetensors
    pipe = load_pipeline("models/dreamshaper_8.safetensors")      # single files (SD1/SD2/SDXL), offline
    merge_checkpoints("a.safetensors", "b.safetensors", out="mix.safetensors", alpha=0.4)  # A1111's merger
    gen.generate(GenerationRequest("a lighthouse", style="mine.safetensors"), "outputs")   # PNGs with metadata
    sc = Stylecodes.load(pipe.unet); code = sc.code_for(image); styled = sc.pipeline(pipe, code)
    read_generation_info("image.png")                             # A1111, ComfyUI, NovelAI, kohya, stylegrad
    loras = LoraNetwork.for_pipeline(pipe, [("ink.safetensors", 0.7, 0.7)])   # any LoRA/LyCORIS; runs beside
    with loras.applied(): ...                                     # the weights, never written
    enc.encode("a (cat:1.2) tok", style, embeddings={"tok": load_embedding("tok.pt").parts[""]}, loras=loras)
    gen.generate(GenerationRequest("a cat <lora:ink:0.7>", loras=("more.safetensors:0.5",)), "outputs")
    run_batch("jobs.jsonl", "out", WorkerSpec("sd15.safetensors"), ray=True)   # JSONL requests, local or on Ray
    train_textual_inversion(["pics/"], "tok.pt", "tok", model=m); train_lora(["pics/"], "ink.safetensors", model=m)
    train_dreamartist(["pics/"], "da.pt", model=m)      # da.pt + da-neg.pt; "da" in a prompt adds da-neg to the negative
    train_negative(["pics/"], "not-mine.pt", model=m); train_finetune(["pics/"], "models/mine", model=m)  # a folder
    train_hypernetwork(["pics/"], "ink.pt", model=m)   # A1111's file (+ ink.pt.optim); "<hypernet:ink:0.8>" in prompts
    # ComfyUI: stylegrad/apps/comfyui is a custom-node folder (docs/comfyui.md)
"""

__version__ = "0.1.0"

# Lazy (PEP 562): ``import stylegrad`` costs nothing until a name is used, so ``stylegrad --help`` and
# ``stylegrad info`` start without torch or diffusers; ``from stylegrad import X`` imports X's module then.

import importlib
from typing import TYPE_CHECKING

if TYPE_CHECKING:  # what type checkers and IDEs see; at run time __getattr__ imports each name when first used
    from stylegrad.addons.embeddings import load_embedding
    from stylegrad.addons.hypernetworks.formats import read_hypernetwork
    from stylegrad.addons.lora.network import LoraNetwork
    from stylegrad.aesthetic.embedding import embed_images
    from stylegrad.aesthetic.encoder import AestheticEncoder, EncodedPrompt
    from stylegrad.aesthetic.engine import EngineSettings
    from stylegrad.aesthetic.options import StyleOptions
    from stylegrad.checkpoints.merge import merge_checkpoints
    from stylegrad.errors import RequestError, StylegradError
    from stylegrad.evaluation.metrics import aesthetic_score, clip_score, style_similarity
    from stylegrad.evaluation.predictors import load_predictor
    from stylegrad.families import Family
    from stylegrad.files.pnginfo import read_generation_info
    from stylegrad.files.recognize import inspect_file
    from stylegrad.files.styles import Style, load_style, mix_styles, save_style
    from stylegrad.jobs.batch import run_batch
    from stylegrad.jobs.work import WorkerSpec
    from stylegrad.pipelines.generation import Generator
    from stylegrad.pipelines.loading import load_pipeline
    from stylegrad.pipelines.request import GenerationRequest
    from stylegrad.stylecodes.facade import Stylecodes
    from stylegrad.training.hypernetwork import train_hypernetwork
    from stylegrad.training.recipes import (
        train_dreamartist,
        train_finetune,
        train_lora,
        train_negative,
        train_textual_inversion,
    )

_EXPORTS = {  # public name -> the module that defines it
    "AestheticEncoder": "stylegrad.aesthetic.encoder",
    "EncodedPrompt": "stylegrad.aesthetic.encoder",
    "EngineSettings": "stylegrad.aesthetic.engine",
    "Family": "stylegrad.families",
    "GenerationRequest": "stylegrad.pipelines.request",
    "Generator": "stylegrad.pipelines.generation",
    "LoraNetwork": "stylegrad.addons.lora.network",
    "Style": "stylegrad.files.styles",
    "StyleOptions": "stylegrad.aesthetic.options",
    "Stylecodes": "stylegrad.stylecodes.facade",
    "RequestError": "stylegrad.errors",
    "StylegradError": "stylegrad.errors",
    "WorkerSpec": "stylegrad.jobs.work",
    "aesthetic_score": "stylegrad.evaluation.metrics",
    "clip_score": "stylegrad.evaluation.metrics",
    "embed_images": "stylegrad.aesthetic.embedding",
    "inspect_file": "stylegrad.files.recognize",
    "load_embedding": "stylegrad.addons.embeddings",
    "load_pipeline": "stylegrad.pipelines.loading",
    "load_predictor": "stylegrad.evaluation.predictors",
    "load_style": "stylegrad.files.styles",
    "merge_checkpoints": "stylegrad.checkpoints.merge",
    "mix_styles": "stylegrad.files.styles",
    "read_generation_info": "stylegrad.files.pnginfo",
    "read_hypernetwork": "stylegrad.addons.hypernetworks.formats",
    "run_batch": "stylegrad.jobs.batch",
    "save_style": "stylegrad.files.styles",
    "style_similarity": "stylegrad.evaluation.metrics",
    "train_dreamartist": "stylegrad.training.recipes",
    "train_finetune": "stylegrad.training.recipes",
    "train_hypernetwork": "stylegrad.training.hypernetwork",
    "train_lora": "stylegrad.training.recipes",
    "train_negative": "stylegrad.training.recipes",
    "train_textual_inversion": "stylegrad.training.recipes",
}

__all__ = [  # the keys of _EXPORTS, written out for linters
    "AestheticEncoder",
    "EncodedPrompt",
    "EngineSettings",
    "Family",
    "GenerationRequest",
    "Generator",
    "LoraNetwork",
    "RequestError",
    "Style",
    "StyleOptions",
    "Stylecodes",
    "StylegradError",
    "WorkerSpec",
    "aesthetic_score",
    "clip_score",
    "embed_images",
    "inspect_file",
    "load_embedding",
    "load_pipeline",
    "load_predictor",
    "load_style",
    "merge_checkpoints",
    "mix_styles",
    "read_generation_info",
    "read_hypernetwork",
    "run_batch",
    "save_style",
    "style_similarity",
    "train_dreamartist",
    "train_finetune",
    "train_hypernetwork",
    "train_lora",
    "train_negative",
    "train_textual_inversion",
]


def __getattr__(name: str):
    module = _EXPORTS.get(name)
    if module is None:
        raise AttributeError(f"module 'stylegrad' has no attribute {name!r}")
    value = getattr(importlib.import_module(module), name)
    globals()[name] = value  # later lookups are plain attribute reads
    return value


def __dir__() -> list[str]:
    return sorted(set(globals()) | set(__all__))
