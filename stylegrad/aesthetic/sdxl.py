"""Aesthetic gradients on SDXL: its two text towers personalized towards their own style vectors.

SDXL's UNet reads ``hidden_states[-2]`` (no final layer norm) of CLIP ViT-L/14's text tower (768) and of
OpenCLIP ViT-bigG/14's (1280), concatenated to (77, 2048), plus bigG's pooled text embedding (its projection of the
final-normed EOS state). Each tower is tuned with the paper's loss towards its own part of the style: CLIP-L's
text embedding (openai's projection, as for SD1.x) to the style's CLIP-L image mean, bigG's (its own projection)
to the bigG image mean. The pooled embedding is bigG's text embedding after tuning, what the pipeline would compute
from the tuned tower. Nothing of the pipeline is written; with no style (or 0 steps) the four tensors are exactly
``StableDiffusionXLPipeline.encode_prompt``'s.
"""

from __future__ import annotations

from collections import OrderedDict
from contextlib import nullcontext
from dataclasses import dataclass

import torch

from stylegrad.aesthetic.options import StyleOptions
from stylegrad.aesthetic.targets import blend, style_target
from stylegrad.aesthetic.tower import SD1, TextTower, tower_for
from stylegrad.aesthetic.tuning import personalize
from stylegrad.aesthetic.vectors import slerp
from stylegrad.errors import StylegradError
from stylegrad.files.styles import Style
from stylegrad.notes import note
from stylegrad.prompts.syntax import extract_tags

TOWERS = {"l": ("l",), "g": ("g",), "both": ("l", "g")}


@dataclass
class SDXLEmbeddings:
    """The four tensors an SDXL pipeline takes; ``pipe(**e.kwargs(), ...)``."""

    prompt_embeds: torch.Tensor  # (B, 77, 2048)
    negative_prompt_embeds: torch.Tensor
    pooled_prompt_embeds: torch.Tensor  # (B, 1280)
    negative_pooled_prompt_embeds: torch.Tensor

    def kwargs(self) -> dict[str, torch.Tensor]:
        return dict(self.__dict__)


class SDXLAestheticEncoder:
    """``AestheticEncoder`` for SDXL pipelines: personalizes CLIP-L, bigG or both (``StyleOptions.towers``).

    >>> enc = SDXLAestheticEncoder.from_pipeline(pipe)
    >>> e = enc.encode("a lighthouse at dusk", load_style("mine-sdxl.safetensors"), StyleOptions(steps=10))
    >>> image = pipe(**e.kwargs()).images[0]
    """

    def __init__(self, pipe, clip_model=None, cache_size: int = 64):
        """``clip_model``: the CLIP whose projection defines CLIP-L's style space (default openai's ViT-L/14);
        bigG's projection is the pipeline's own ``text_encoder_2.text_projection``."""
        if getattr(pipe, "text_encoder_2", None) is None or getattr(pipe, "text_encoder", None) is None:
            raise StylegradError("an SDXL pipeline with both text encoders is needed")
        self.pipe = pipe
        self.clip_model = clip_model
        self.cache_size = cache_size
        self._towers: dict[str, TextTower] = {}
        self._cache: OrderedDict = OrderedDict()
        self._noted: set[str] = set()
        self.last_similarities: dict[str, list[list[float]]] = {}

    @classmethod
    def from_pipeline(cls, pipe, clip_model=None, **kwargs) -> SDXLAestheticEncoder:
        return cls(pipe, clip_model, **kwargs)

    def _parts(self, tower: str):
        p = self.pipe
        return (p.text_encoder, p.tokenizer) if tower == "l" else (p.text_encoder_2, p.tokenizer_2)

    def tower(self, which: str) -> TextTower:
        if which not in self._towers:
            encoder, tokenizer = self._parts(which)
            clip = (self.clip_model or SD1.clip_model) if which == "l" else None
            self._towers[which] = tower_for(encoder, tokenizer, clip, sdxl=True)
        return self._towers[which]

    @property
    def device(self) -> torch.device:
        return self.pipe.text_encoder_2.device

    def _ids(self, which: str, text: str) -> torch.Tensor:
        _, tok = self._parts(which)
        ids = tok([text], padding="max_length", max_length=tok.model_max_length, truncation=True,
                  return_tensors="pt").input_ids
        if len(tok(text).input_ids) > tok.model_max_length and "truncated" not in self._noted:
            self._noted.add("truncated")
            note(f"prompt longer than {tok.model_max_length} tokens was truncated (SDXL): {text[:60]!r}...")
        return ids.to(self.device)

    @torch.no_grad()
    def _plain(self, which: str, text: str, clip_skip: int | None) -> tuple[torch.Tensor, torch.Tensor | None]:
        """(hidden states the UNet reads, pooled embedding or None), as ``encode_prompt`` computes them."""
        encoder, _ = self._parts(which)
        out = encoder(self._ids(which, text), output_hidden_states=True)
        hidden = out.hidden_states[-(clip_skip + 2) if clip_skip is not None else -2]
        return hidden, (out[0] if which == "g" else None)

    def encode(self, prompt: str, style: Style | None, options: StyleOptions | None = None,
               negative_prompt: str | None = None, clip_skip: int | None = None, callback=None, *,
               loras=None) -> SDXLEmbeddings:
        """SDXL's four conditioning tensors for one prompt, personalized towards ``style``; an empty negative
        prompt gives zeros (diffusers' ``force_zeros_for_empty_prompt``). ``<lora:...>`` tags are removed;
        ``loras``: a ``LoraNetwork`` whose text-encoder changes apply (tuning starts from the merged tensors)."""
        options = options or StyleOptions()
        prompt, negative = extract_tags(prompt)[0], extract_tags(negative_prompt or "")[0]
        towers = self.towers_for(style, options)
        key = (prompt, negative, style.digest if style is not None and towers else None,
               options.key() if towers else None, clip_skip, loras.key() if loras else ())
        if key not in self._cache:
            value = self._encode(prompt, negative, style, options, towers, clip_skip, callback, loras)
            if self.cache_size > 0:
                self._cache[key] = value
                while len(self._cache) > self.cache_size:
                    self._cache.popitem(last=False)
            else:
                self._cache.clear()
                self._cache[key] = value
        self._cache.move_to_end(key)
        pe, ne, pp, np_ = self._cache[key]
        dtype = self.pipe.text_encoder_2.dtype
        return SDXLEmbeddings(pe.to(dtype), ne.to(dtype), pp.to(dtype), np_.to(dtype))

    def clear_cache(self) -> None:
        self._cache.clear()

    def towers_for(self, style: Style | None, options: StyleOptions) -> tuple[str, ...]:
        """The towers to tune: the option's, among those the style has a part for."""
        if style is None or not options.active:
            return ()
        wanted = TOWERS[options.towers]
        have = tuple(t for t in wanted if style.part("clip_" + t) is not None)
        if "g" in wanted and "g" not in have and "sd1-style" not in self._noted:
            self._noted.add("sd1-style")
            note(f"style '{style.name}' has no bigG part (an SD1.x style): only SDXL's CLIP-L text tower is tuned")
        for t in have:
            style.check_part("clip_" + t, self.tower(t).width)
        return have

    def _encode(self, prompt, negative, style, options, towers, clip_skip, callback, loras):
        self.last_similarities = {}
        zero_negative = not negative and getattr(self.pipe.config, "force_zeros_for_empty_prompt", True)
        out = []
        for i, (text, tune) in enumerate(((prompt, True), (negative, options.personalize_negative))):
            if i == 1 and zero_negative:
                out.append(None)
                continue
            hidden, pooled = [], None
            for which in ("l", "g"):
                h, p = self._one(which, text, style, options, towers if tune else (), clip_skip, callback, loras)
                hidden.append(h)
                pooled = p if which == "g" else pooled
            out.append((torch.cat(hidden, dim=-1), pooled))
        pe, pp = out[0]
        if out[1] is None:
            ne, np_ = torch.zeros_like(pe), torch.zeros_like(pp)
        else:
            ne, np_ = out[1]
        return pe, ne, pp, np_

    def _one(self, which, text, style, options, towers, clip_skip, callback, loras):
        """(hidden (1, 77, H), pooled (1, P) or None) of one tower, tuned if it is among ``towers``."""
        component = "te" if which == "l" else "te2"
        with loras.applied((component,)) if loras else nullcontext():
            plain = self._plain(which, text, clip_skip)
        if which not in towers:
            return plain
        tower = self.tower(which)
        text_target = None
        if options.text:
            text_target = self._text_embedding(which, options.text)
        direction = style.part("clip_" + which)
        target = style_target(direction.to(self.device), text_target, options.text_angle, options.text_negative)
        base = None
        if loras:
            merged = {k.removeprefix("text_model."): v for k, v in loras.text_params(component).items()}
            base = {**tower.base, **merged} if merged else None
        result = personalize(tower, self._ids(which, text), target, steps=options.steps,
                             adam=options.adam(self.device), regularization=options.regularization,
                             target_similarity=options.target_similarity, clip_skip=clip_skip, callback=callback,
                             base=base)
        self.last_similarities.setdefault(which, []).append(result.similarities)
        hidden, pooled = result.hidden.to(tower.dtype), (result.text_embedding if which == "g" else None)
        if options.weight != 1.0:
            hidden = blend(plain[0].float(), hidden.float(), options.weight, options.slerp).to(tower.dtype)
            if pooled is not None:
                p0 = plain[1].float()
                pooled = slerp(p0, pooled.float(), options.weight, dim=-1) if options.slerp else \
                    (1 - options.weight) * p0 + options.weight * pooled.float()
        return hidden, (pooled if which == "g" else None)

    @torch.no_grad()
    def _text_embedding(self, which: str, text: str) -> torch.Tensor:
        tower = self.tower(which)
        ids = self._ids(which, text)
        out = tower.run(tower.base, ids)
        eos = int((ids[0] == tower.eos_token_id).nonzero()[0])
        return tower.text_embed(out, torch.tensor([eos], device=ids.device))[0].float()
