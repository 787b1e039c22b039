"""How a generated picture scores: aesthetic score, CLIP score (prompt fidelity), style similarity. Batched.

The evaluation CLIP (``ClipEmbedder``) is separate from the pipeline's text encoder: scores must not be computed
with the encoder the style just tuned.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from PIL import Image

from stylegrad.devices import resolve_device, resolve_dtype
from stylegrad.errors import StylegradError
from stylegrad.evaluation.predictors import AestheticPredictor
from stylegrad.files.hub import from_pretrained


def aesthetic_score(predictor: AestheticPredictor, image_embeds: torch.Tensor) -> torch.Tensor:
    """(B, D) -> (B,) predicted aesthetic rating."""
    return predictor(image_embeds)


def clip_score(text_embeds: torch.Tensor, image_embeds: torch.Tensor) -> torch.Tensor:
    """(B, D), (B, D) -> (B,): 100 x cosine, floored at 0, as CLIP score is usually reported (Hessel et al. 2021
    use 2.5 x; torchmetrics and most papers use 100 x max(cos, 0))."""
    return 100.0 * F.cosine_similarity(text_embeds.float(), image_embeds.float(), dim=-1).clamp(min=0)


def style_similarity(image_embeds: torch.Tensor, style: torch.Tensor) -> torch.Tensor:
    """(B, D), (D,) -> (B,): cosine of each image embedding to the style direction, in float32 where the image
    embeddings are (the style, a CPU vector, follows them)."""
    embeds = image_embeds.float()
    return F.cosine_similarity(embeds, style.to(embeds).reshape(1, -1), dim=-1)


class ClipEmbedder:
    """A full CLIP model (text and image towers, with projections) for scoring, on ``device`` in ``dtype``
    (stylegrad.devices' policy: auto is fp16 on CUDA and MPS); embeddings come back as CPU float32."""

    def __init__(self, clip_model: str, device: torch.device | str = "cpu", batch_size: int = 16,
                 dtype: torch.dtype | str | None = None):
        from transformers import CLIPModel, CLIPTokenizer

        try:
            from transformers import CLIPImageProcessorPil as Processor
        except ImportError:  # pragma: no cover - older transformers
            from transformers import CLIPImageProcessor as Processor
        self.name = clip_model
        self.device = resolve_device(device)
        self.dtype = resolve_dtype(dtype, self.device)
        self.model = from_pretrained(CLIPModel, clip_model, what="CLIP model", dtype=self.dtype)
        self.model = self.model.to(self.device, self.dtype).eval()
        self.processor = from_pretrained(Processor, clip_model, what="CLIP image processor")
        self.tokenizer = from_pretrained(CLIPTokenizer, clip_model, what="CLIP tokenizer")
        self.batch_size = batch_size

    @property
    def width(self) -> int:
        return self.model.config.projection_dim

    @torch.no_grad()
    def images(self, images: list[Image.Image]) -> torch.Tensor:
        """(B, D) image embeddings, in batches."""
        if not images:
            raise StylegradError("no images to embed")
        out = []
        for i in range(0, len(images), self.batch_size):
            px = self.processor(images=[im.convert("RGB") for im in images[i : i + self.batch_size]],
                                return_tensors="pt")["pixel_values"].to(self.device, self.dtype)
            vision = self.model.vision_model(pixel_values=px)
            out.append(self.model.visual_projection(vision.pooler_output).float().cpu())
        return torch.cat(out)

    @torch.no_grad()
    def texts(self, texts: list[str]) -> torch.Tensor:
        """(B, D) text embeddings, in batches."""
        out = []
        for i in range(0, len(texts), self.batch_size):
            ids = self.tokenizer(texts[i : i + self.batch_size], padding="max_length", truncation=True,
                                 max_length=self.tokenizer.model_max_length, return_tensors="pt").input_ids
            text = self.model.text_model(input_ids=ids.to(self.device))
            out.append(self.model.text_projection(text.pooler_output).float().cpu())
        return torch.cat(out)
