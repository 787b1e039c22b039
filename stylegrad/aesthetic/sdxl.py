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
from torch.func import functional_call

from stylegrad.aesthetic.options import StyleOptions
from stylegrad.aesthetic.targets import blend, style_target
from stylegrad.aesthetic.tower import SD1, TextTower, meta_skeleton, text_parameters, tower_for
from stylegrad.aesthetic.tuning import TOKEN, personalize
from stylegrad.aesthetic.vectors import slerp
from stylegrad.errors import StylegradError
from stylegrad.files.styles import Style
from stylegrad.notes import note
from stylegrad.prompts.chunks import Chunks, Vocabulary, apply_weights, gather_rows
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
        self._skeletons: dict = {}
        self.last_similarities: dict[str, list[list[float]]] = {}
        self.last_embeddings: list[str] = []

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

    def encode(self, prompt: str, style: Style | None, options: StyleOptions | None = None,
               negative_prompt: str | None = None, clip_skip: int | None = None, callback=None, *,
               loras=None, embeddings: dict[str, dict[str, torch.Tensor]] | None = None,
               weighting: bool = True) -> SDXLEmbeddings:
        """SDXL's four conditioning tensors for one prompt, personalized towards ``style``; an empty negative
        prompt gives zeros (diffusers' ``force_zeros_for_empty_prompt``). Prompts are read as A1111 reads them
        (``weighting``: emphasis, BREAK, 75-token chunks; each tower's states weighted on their own; the pooled
        embedding from the first chunk); ``<lora:...>`` tags are removed. ``loras``: a ``LoraNetwork`` whose
        text-encoder changes apply (tuning starts from the merged tensors). ``embeddings``: ``{'l': {word: (N, 768)},
        'g': {word: (N, 1280)}}``, SDXL textual inversions' two parts."""
        options = options or StyleOptions()
        prompt, negative = extract_tags(prompt)[0], extract_tags(negative_prompt or "")[0]
        towers = self.towers_for(style, options)
        embeddings = {t: dict((embeddings or {}).get(t) or {}) for t in ("l", "g")}
        addons = tuple((t, n, v.data_ptr(), tuple(v.shape)) for t in ("l", "g") for n, v in sorted(embeddings[t].items()))
        key = (prompt, negative, style.digest if style is not None and towers else None,
               options.key() if towers else None, clip_skip, loras.key() if loras else (), addons, weighting)
        if key not in self._cache:
            value = self._encode(prompt, negative, style, options, towers, clip_skip, callback, loras, embeddings,
                                 weighting)
            if self.cache_size > 0:
                self._cache[key] = value
                while len(self._cache) > self.cache_size:
                    self._cache.popitem(last=False)
            else:
                self._cache.clear()
                self._cache[key] = value
        self._cache.move_to_end(key)
        pe, ne, pp, np_, self.last_embeddings = self._cache[key]
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

    def _encode(self, prompt, negative, style, options, towers, clip_skip, callback, loras, embeddings, weighting):
        self.last_similarities = {}
        zero_negative = not negative and getattr(self.pipe.config, "force_zeros_for_empty_prompt", True)
        out, used = [], []
        for i, (text, tune) in enumerate(((prompt, True), (negative, options.personalize_negative))):
            if i == 1 and zero_negative:
                out.append(None)
                continue
            hidden, pooled = [], None
            for which in ("l", "g"):
                chunks = Vocabulary(self._parts(which)[1], embeddings[which]).chunks(text, weighting)
                used += [e for e in chunks.embeddings if e not in used]
                h, p = self._one(which, chunks, style, options, towers if tune else (), clip_skip, callback, loras)
                hidden.append(apply_weights(h, chunks.weights).reshape(1, -1, h.shape[-1]))
                pooled = p if which == "g" else pooled
            if hidden[0].shape != hidden[1].shape[:-1] + hidden[0].shape[-1:]:
                raise StylegradError("SDXL's two tokenizers cut this prompt into different chunks")
            out.append((torch.cat(hidden, dim=-1), pooled))
        pe, pp = out[0]
        if out[1] is None:
            ne, np_ = torch.zeros_like(pe), torch.zeros_like(pp)
        else:
            ne, np_ = out[1]
        width = max(pe.shape[1], ne.shape[1])
        pe = self._pad(pe, width, clip_skip, loras)
        ne = torch.zeros_like(pe) if zero_negative else self._pad(ne, width, clip_skip, loras)
        return pe, ne, pp, np_, used

    def _pad(self, z: torch.Tensor, width: int, clip_skip, loras) -> torch.Tensor:
        """The shorter of prompt and negative: the empty prompt's chunk repeated (A1111's padding)."""
        if z.shape[1] == width:
            return z
        empty = torch.cat([self._states(w, Vocabulary(self._parts(w)[1]).chunks(""), clip_skip, loras)[0][0]
                           for w in ("l", "g")], dim=-1).to(z.dtype)  # (77, 2048)
        return torch.cat([z, empty.repeat((width - z.shape[1]) // empty.shape[0], 1)[None]], dim=1)

    @torch.no_grad()
    def _states(self, which: str, chunks: Chunks, clip_skip, loras) -> tuple[torch.Tensor, torch.Tensor | None]:
        """(the unweighted states the UNet reads, (C, 77, H); pooled (1, P) of the first chunk, bigG only) by the
        tower's own weights, LoRAs beside them; with embedding rows through a skeleton of it."""
        encoder, _ = self._parts(which)
        component = "te" if which == "l" else "te2"
        ids = chunks.ids.to(self.device)
        k = -(clip_skip + 2) if clip_skip is not None else -2
        if chunks.extra is None:
            with loras.applied((component,)) if loras else nullcontext():
                out = encoder(ids, output_hidden_states=True)
            return out.hidden_states[k], (out[0][:1] if which == "g" else None)
        rows, local = torch.unique(ids, return_inverse=True)
        base = text_parameters(encoder)
        params = {**base, TOKEN: gather_rows(base[TOKEN], chunks.extra, rows)}
        skeleton = self._skeleton(which)
        with loras.applied((component,), {component: skeleton}) if loras else nullcontext():
            out = functional_call(skeleton, params, (local,), {"output_hidden_states": True})
        pooled = None
        if which == "g":
            eos = int((ids[0] == self.tower_eos(which)).nonzero()[0])
            pooled = out.last_hidden_state[:1, eos] @ encoder.text_projection.weight.T
        return out.hidden_states[k], pooled

    def tower_eos(self, which: str) -> int:
        return self._parts(which)[1].eos_token_id

    def _skeleton(self, which: str):
        if which not in self._skeletons:
            self._skeletons[which] = meta_skeleton(self._parts(which)[0])
        return self._skeletons[which]

    def _one(self, which, chunks, style, options, towers, clip_skip, callback, loras):
        """(hidden (C, 77, H), pooled (1, P) or None) of one tower, tuned if it is among ``towers``."""
        if which not in towers:
            return self._states(which, chunks, clip_skip, loras)
        tower = self.tower(which)
        text_target = None
        if options.text:
            text_target = self._text_embedding(which, options.text)
        direction = style.part("clip_" + which)
        target = style_target(direction.to(self.device), text_target, options.text_angle, options.text_negative)
        base = None
        component = "te" if which == "l" else "te2"
        if loras:
            merged = {k.removeprefix("text_model."): v for k, v in loras.text_params(component).items()}
            base = {**tower.base, **merged} if merged else None
        result = personalize(tower, chunks.ids.to(self.device), target, steps=options.steps,
                             adam=options.adam(self.device), regularization=options.regularization,
                             target_similarity=options.target_similarity, clip_skip=clip_skip, callback=callback,
                             extra_rows=chunks.extra, base=base)
        self.last_similarities.setdefault(which, []).append(result.similarities)
        hidden, pooled = result.hidden.to(tower.dtype), (result.text_embedding if which == "g" else None)
        if options.weight != 1.0:  # the untuned states only now: at weight 1 they would cost a whole 77-token pass
            plain = self._states(which, chunks, clip_skip, loras)
            hidden = blend(plain[0].float(), hidden.float(), options.weight, options.slerp).to(tower.dtype)
            if pooled is not None:
                p0 = plain[1].float()
                pooled = slerp(p0, pooled.float(), options.weight, dim=-1) if options.slerp else \
                    (1 - options.weight) * p0 + options.weight * pooled.float()
        return hidden, pooled

    @torch.no_grad()
    def _text_embedding(self, which: str, text: str) -> torch.Tensor:
        tower = self.tower(which)
        ids = self._ids(which, text)
        out = tower.run(tower.base, ids)
        eos = int((ids[0] == tower.eos_token_id).nonzero()[0])
        return tower.text_embed(out, torch.tensor([eos], device=ids.device))[0].float()
