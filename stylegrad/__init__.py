"""stylegrad: custom Stable Diffusion styles from a handful of images, without retraining.

Public API::

    style = embed_images(["my_pictures/"], clip_model="openai/clip-vit-large-patch14")   # images -> Style
    save_style(style, "mine.safetensors");  style = load_style("watercolor.pt")
    enc = AestheticEncoder.from_pipeline(pipe)                                          # any diffusers pipeline
    prompt_embeds, negative_prompt_embeds = enc.encode("a harbour at night", style, StyleOptions(steps=10))
    image = pipe(prompt_embeds=prompt_embeds, negative_prompt_embeds=negative_prompt_embeds).images[0]
    aesthetic_score(load_predictor("laion-l14"), image_embeds); clip_score(...); style_similarity(...)
    sc = Stylecodes.load(pipe.unet); code = sc.code_for(image); styled = sc.pipeline(pipe, code)  # stylecodes
"""

__version__ = "0.1.0"

from stylegrad.aesthetic.encoder import AestheticEncoder  # noqa: E402
from stylegrad.errors import StylegradError  # noqa: E402
from stylegrad.aesthetic.embedding import embed_images, find_images  # noqa: E402
from stylegrad.evaluation.metrics import ClipEmbedder, aesthetic_score, clip_score, style_similarity  # noqa: E402
from stylegrad.aesthetic.options import StyleOptions  # noqa: E402
from stylegrad.evaluation.predictors import AestheticPredictor, load_predictor  # noqa: E402
from stylegrad.aesthetic.tuning import personalize  # noqa: E402
from stylegrad.files.styles import Style, inspect_file, load_style, mix_styles, save_style  # noqa: E402
from stylegrad.stylecodes.facade import Stylecodes  # noqa: E402
from stylegrad.aesthetic.tower import TextTower, detect_family  # noqa: E402

__all__ = [
    "AestheticEncoder",
    "AestheticPredictor",
    "ClipEmbedder",
    "aesthetic_score",
    "clip_score",
    "load_predictor",
    "style_similarity",
    "Style",
    "StyleOptions",
    "Stylecodes",
    "StylegradError",
    "TextTower",
    "detect_family",
    "embed_images",
    "find_images",
    "inspect_file",
    "load_style",
    "mix_styles",
    "personalize",
    "save_style",
]
