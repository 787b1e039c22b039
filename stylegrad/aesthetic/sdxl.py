"""Aesthetic gradients on SDXL: its two text towers personalized towards their own style vectors.

SDXL's UNet reads ``hidden_states[-2]`` (no final layer norm) of CLIP ViT-L/14's text tower (768) and of
OpenCLIP ViT-bigG/14's (1280), concatenated to (77, 2048), plus bigG's pooled text embedding (its projection of the
final-normed EOS state). Each tower is tuned with the paper's loss towards its own part of the style: CLIP-L's
text embedding (openai's projection, as for SD1.x) to the style's CLIP-L image mean, bigG's (its own projection)
to the bigG image mean. The pooled embedding is bigG's text embedding after tuning, what the pipeline would compute
from the tuned tower. Nothing of the pipeline is written; with no style (or 0 steps) the four tensors are exactly
``StableDiffusionXLPipeline.encode_prompt``'s.

All of this is the one ``AestheticEncoder`` with SDXL's two towers (``AestheticEncoder.from_pipeline`` builds it for
an SDXL pipeline); ``SDXLAestheticEncoder`` is that encoder under the name and constructor it has always had.
"""

from __future__ import annotations

from stylegrad.aesthetic.encoder import AestheticEncoder, EncodedPrompt
from stylegrad.aesthetic.tower import TextTower
from stylegrad.aesthetic.towers import TOWERS, pipeline_towers, zero_negative
from stylegrad.errors import StylegradError

SDXLEmbeddings = EncodedPrompt  # the four tensors an SDXL pipeline takes; ``pipe(**e.pipeline_kwargs(), ...)``

__all__ = ["TOWERS", "SDXLAestheticEncoder", "SDXLEmbeddings"]


class SDXLAestheticEncoder(AestheticEncoder):
    """``AestheticEncoder`` of an SDXL pipeline: personalizes CLIP-L, bigG or both (``StyleOptions.towers``).

    >>> enc = SDXLAestheticEncoder(pipe)
    >>> e = enc.encode("a lighthouse at dusk", load_style("mine-sdxl.safetensors"), StyleOptions(steps=10))
    >>> image = pipe(**e.pipeline_kwargs()).images[0]
    """

    def __init__(self, pipe, clip_model=None, cache_size: int = 64, engine=None):
        """``clip_model``: the CLIP whose projection defines CLIP-L's style space (default openai's ViT-L/14);
        bigG's projection is the pipeline's own ``text_encoder_2.text_projection``. ``engine``: ``EngineSettings``
        for tuning (None: the environment's)."""
        if getattr(pipe, "text_encoder_2", None) is None or getattr(pipe, "text_encoder", None) is None:
            raise StylegradError("an SDXL pipeline with both text encoders is needed")
        super().__init__(clip_model=clip_model, cache_size=cache_size, engine=engine,
                         towers=pipeline_towers(pipe, clip_model), zero_negative=zero_negative(pipe))
        self.pipe = pipe

    @classmethod
    def from_pipeline(cls, pipe, clip_model=None, **kwargs) -> SDXLAestheticEncoder:
        return cls(pipe, clip_model, **kwargs)

    def tower(self, which: str) -> TextTower:  # type: ignore[override]  # SDXL's encoder always named its tower
        return self.text_tower(which)
