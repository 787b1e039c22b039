"""From (prompt, style) to ``prompt_embeds``: the one seam with diffusers. Works with any pipeline that takes
``prompt_embeds`` / ``negative_prompt_embeds``; the pipeline's own text encoder is read, never changed."""

from __future__ import annotations

from collections import OrderedDict
from contextlib import nullcontext

import torch
from torch.func import functional_call

from stylegrad.aesthetic.options import StyleOptions
from stylegrad.aesthetic.targets import blend, style_target
from stylegrad.aesthetic.tower import TextTower, conditioning_layer, meta_skeleton, tower_for
from stylegrad.aesthetic.tuning import TOKEN, first_eos, personalize
from stylegrad.errors import StylegradError
from stylegrad.files.styles import Style
from stylegrad.notes import note
from stylegrad.prompts.chunks import Chunks, Vocabulary, apply_weights, gather_rows
from stylegrad.prompts.syntax import extract_tags


def tokenize(tokenizer, texts: list[str], device: torch.device) -> torch.Tensor:
    """As diffusers does: pad to the tokenizer's max length (77), truncate longer prompts (with a note). (B, S)"""
    ids = tokenizer(
        texts, padding="max_length", max_length=tokenizer.model_max_length, truncation=True, return_tensors="pt"
    ).input_ids
    for text in texts:
        if len(tokenizer(text).input_ids) > tokenizer.model_max_length:
            note(f"prompt longer than {tokenizer.model_max_length} tokens was truncated: {text[:60]!r}...")
    return ids.to(device)


class AestheticEncoder:
    """Prompt embeddings personalized towards a style, cached per (prompt, negative, style, options). The family's
    CLIP (its projection) is read on the first styled prompt, not before: plain prompts need none.

    >>> enc = AestheticEncoder.from_pipeline(pipe)
    >>> pe, ne = enc.encode("a lighthouse at dusk", load_style("watercolor.pt"))
    >>> image = pipe(prompt_embeds=pe, negative_prompt_embeds=ne).images[0]
    """

    def __init__(self, text_encoder, tokenizer, clip_model=None, cache_size: int = 64, tower: TextTower | None = None):
        """``clip_model``: hub id, folder or loaded CLIP text model whose projection defines the style space
        (default: the family's)."""
        self.text_encoder = text_encoder
        self.tokenizer = tokenizer
        self.clip_model = clip_model
        self._tower = tower
        self.cache_size = cache_size
        self._cache: OrderedDict[tuple, tuple[torch.Tensor, torch.Tensor, list[str]]] = OrderedDict()
        self._plain_skeleton = None
        self.last_similarities: list[list[float]] = []
        self.last_embeddings: list[str] = []  # the textual-inversion words the last prompts used

    @classmethod
    def from_pipeline(cls, pipe, clip_model=None, **kwargs) -> AestheticEncoder:
        if getattr(pipe, "text_encoder", None) is None or getattr(pipe, "tokenizer", None) is None:
            raise StylegradError("the pipeline has no CLIP text encoder and tokenizer to personalize")
        return cls(pipe.text_encoder, pipe.tokenizer, clip_model, **kwargs)

    @property
    def tower(self) -> TextTower:
        if self._tower is None:
            self._tower = tower_for(self.text_encoder, self.tokenizer, self.clip_model)
        return self._tower

    @property
    def device(self) -> torch.device:
        return self.text_encoder.device

    def text_embedding(self, text: str) -> torch.Tensor:
        """CLIP text embedding (P,) of ``text`` with the original weights."""
        ids = tokenize(self.tokenizer, [text], self.device)
        with torch.no_grad():
            out = self.tower.run(self.tower.base, ids)
            eos = torch.tensor([first_eos(ids[0], self.tower.eos_token_id)], device=self.device)
            return self.tower.text_embed(out, eos)[0].float()

    def plain(self, texts: list[str], clip_skip: int | None = None) -> torch.Tensor:
        """What the pipeline computes itself (diffusers' ``encode_prompt``), on its own encoder. (B, S, H)
        ``clip_skip`` applies to every text given, the negative prompt too, as in A1111 (diffusers skips it
        for the positive prompt only)."""
        return self.plain_ids(tokenize(self.tokenizer, texts, self.device), clip_skip)

    def plain_ids(self, ids: torch.Tensor, clip_skip: int | None = None) -> torch.Tensor:
        enc = self.text_encoder
        k = conditioning_layer(enc.config.num_hidden_layers, clip_skip)
        with torch.no_grad():
            if k == enc.config.num_hidden_layers:
                return enc(ids)[0]
            h = enc(ids, output_hidden_states=True).hidden_states[k]
            return getattr(enc, "text_model", enc).final_layer_norm(h)  # transformers 5 dropped .text_model

    def encode(
        self,
        prompt: str | list[str],
        style: Style | None,
        options: StyleOptions | None = None,
        negative_prompt: str | list[str] | None = None,
        clip_skip: int | None = None,
        callback=None,
        *,
        embeddings: dict[str, torch.Tensor] | None = None,
        loras=None,
        weighting: bool = True,
    ) -> tuple[torch.Tensor, torch.Tensor]:
        """(prompt_embeds, negative_prompt_embeds), each (B, 77 x chunks, H) in the encoder's dtype and device.

        Prompts are read as A1111 reads them (``weighting=False``: as plain text): emphasis ``(word:1.2)``,
        ``BREAK``, 75-token chunks, ``<lora:...>`` tags removed. ``embeddings``: textual-inversion words -> (N, H)
        vectors, active where the prompt writes them. ``loras``: a ``LoraNetwork`` whose text-encoder changes
        apply (the tuning starts from the LoRA-merged encoder)."""
        options = options or StyleOptions()
        prompts = [prompt] if isinstance(prompt, str) else list(prompt)
        negatives = negative_prompt if isinstance(negative_prompt, list) else [negative_prompt or ""] * len(prompts)
        if len(negatives) != len(prompts):
            raise StylegradError(f"{len(prompts)} prompts but {len(negatives)} negative prompts")
        if style is not None and options.active:
            style.check_width(self.tower.width)
        embeddings = dict(embeddings or {})
        addons = (tuple((n, v.data_ptr(), tuple(v.shape)) for n, v in sorted(embeddings.items())),
                  loras.key() if loras else (), weighting)
        self.last_similarities = []
        self.last_embeddings = []
        pos, neg = [], []
        for p, n in zip(prompts, negatives):
            key = (p, n, style.digest if style is not None else None, options.key(), clip_skip, addons)
            if key not in self._cache:
                self._store(key, self._encode_one(p, n, style, options, clip_skip, callback, embeddings, loras,
                                                  weighting))
            self._cache.move_to_end(key)
            pe, ne, used = self._cache[key]
            pos.append(pe)
            neg.append(ne)
            self.last_embeddings += [u for u in used if u not in self.last_embeddings]
        width = max(t.shape[1] for t in pos + neg)
        pos, neg = ([self._pad(t, width, clip_skip, loras) for t in ts] for ts in (pos, neg))
        dtype = self.text_encoder.dtype
        return torch.cat(pos).to(dtype), torch.cat(neg).to(dtype)

    def _pad(self, z: torch.Tensor, width: int, clip_skip, loras=None) -> torch.Tensor:
        """Longer prompts than this one: repeat the empty prompt's chunk until the lengths match (A1111's
        padding of the shorter of cond and uncond)."""
        if z.shape[1] == width:
            return z
        empty = self.states(Vocabulary(self.tokenizer).chunks(""), clip_skip, loras).to(z.dtype)
        return torch.cat([z, empty.repeat(1, (width - z.shape[1]) // empty.shape[1], 1)], dim=1)

    def _store(self, key, value):
        if self.cache_size > 0:
            self._cache[key] = value
            while len(self._cache) > self.cache_size:
                self._cache.popitem(last=False)
        else:  # no cache: keep only until returned
            self._cache.clear()
            self._cache[key] = value

    def clear_cache(self) -> None:
        self._cache.clear()

    def states(self, chunks: Chunks, clip_skip: int | None, loras=None):
        """The unweighted conditioning of each chunk (C, S, H) by the original weights, with the chunks'
        textual-inversion rows, and the text-encoder LoRAs of ``loras`` run beside the weights."""
        ids = chunks.ids.to(self.device)
        if chunks.extra is None:
            with loras.applied(("te",)) if loras else nullcontext():
                return self.plain_ids(ids, clip_skip)
        rows, local = torch.unique(ids, return_inverse=True)
        base = dict(self.text_encoder.named_parameters())
        merged = {**base, TOKEN: gather_rows(base[TOKEN], chunks.extra, rows)}
        skeleton = self._skeleton()
        k = conditioning_layer(skeleton.config.num_hidden_layers, clip_skip)
        with torch.no_grad(), loras.applied(("te",), {"te": skeleton}) if loras else nullcontext():
            out = functional_call(skeleton, merged, (local,), {"output_hidden_states": True})
            if k == skeleton.config.num_hidden_layers:
                return out.last_hidden_state
            w, b = merged["final_layer_norm.weight"], merged["final_layer_norm.bias"]
            h = out.hidden_states[k]
            return torch.nn.functional.layer_norm(h, h.shape[-1:], w, b, skeleton.config.layer_norm_eps)

    def _skeleton(self):
        if self._plain_skeleton is None:
            self._plain_skeleton = meta_skeleton(self.text_encoder)
        return self._plain_skeleton

    def _encode_one(self, prompt, negative, style, options, clip_skip, callback, embeddings, loras, weighting):
        """(prompt states, negative states, embeddings used), each (1, 77 x chunks, H)."""
        vocab = Vocabulary(self.tokenizer, embeddings)
        styled = style is not None and options.active
        te_params = loras.text_params("te") if loras and styled else {}  # tuning runs on the merged weights
        if styled:
            text = self.text_embedding(options.text) if options.text else None
            target = style_target(style.direction.to(self.device), text, options.text_angle, options.text_negative)
        out, used = [], []
        for text_, tune in ((prompt, True), (negative, options.personalize_negative)):
            chunks = vocab.chunks(extract_tags(text_)[0], weighting)
            used += [e for e in chunks.embeddings if e not in used]
            if not (styled and tune):
                z = self.states(chunks, clip_skip, loras)
            else:
                result = personalize(
                    self.tower, chunks.ids.to(self.device), target, steps=options.steps,
                    adam=options.adam(self.device), regularization=options.regularization,
                    target_similarity=options.target_similarity, clip_skip=clip_skip, callback=callback,
                    extra_rows=chunks.extra, base={**self.tower.base, **te_params} if te_params else None,
                )
                self.last_similarities.append(result.similarities)
                z = result.hidden
                if options.weight != 1.0:  # the original states are only needed to blend
                    z = blend(self.states(chunks, clip_skip, loras).float(), z, options.weight, options.slerp)
            z = apply_weights(z.to(self.tower.dtype if styled else z.dtype), chunks.weights)
            out.append(z.reshape(1, -1, z.shape[-1]))
        return out[0], out[1], used
