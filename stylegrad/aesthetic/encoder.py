"""From (prompt, style) to what a diffusers pipeline takes: the one seam with diffusers, for every family.

One encoder holds a pipeline's text towers (aesthetic/towers.py): SD1.x/SD2.x's one, SDXL's two. For each prompt it
reads A1111's prompt syntax per tower, tunes the towers the style asks for (``tune``: the one entry point to the
method, which ComfyUI's pack calls too), weights and concatenates the towers' states, and caches the result per
(prompt, negative, style, options, clip skip, embeddings, LoRAs, weighting). The pipeline's own text encoders are
read, never changed; with no style the tensors are exactly ``encode_prompt``'s.
"""

from __future__ import annotations

from collections import OrderedDict
from dataclasses import dataclass, fields

import torch

from stylegrad.aesthetic.options import StyleOptions
from stylegrad.aesthetic.targets import blend, style_target
from stylegrad.aesthetic.tower import TextTower
from stylegrad.aesthetic.towers import TOWERS, PromptTower, pipeline_towers, tokenize, zero_negative
from stylegrad.aesthetic.tuning import Personalized, personalize
from stylegrad.aesthetic.vectors import slerp
from stylegrad.errors import StylegradError
from stylegrad.files.styles import Style
from stylegrad.notes import note
from stylegrad.prompts.chunks import Chunks, apply_weights
from stylegrad.prompts.syntax import extract_tags

__all__ = ["AestheticEncoder", "EncodedPrompt", "tokenize"]


@dataclass
class EncodedPrompt:
    """What ``AestheticEncoder.encode`` gives, for any family: ``pipe(**e.pipeline_kwargs(), ...)``. The pooled
    embeddings are SDXL's (None for SD1.x/SD2.x). It unpacks as ``pe, ne = e`` (and ``e[0]``, ``e[1]``), as the
    tuple the SD1.x encoder used to return."""

    prompt_embeds: torch.Tensor  # (B, 77 x chunks, H); SDXL: H = 768 + 1280
    negative_prompt_embeds: torch.Tensor
    pooled_prompt_embeds: torch.Tensor | None = None  # (B, 1280)
    negative_pooled_prompt_embeds: torch.Tensor | None = None

    def pipeline_kwargs(self) -> dict[str, torch.Tensor]:
        """The keyword arguments a diffusers pipeline call takes: the tensors that are set."""
        return {f.name: getattr(self, f.name) for f in fields(self) if getattr(self, f.name) is not None}

    kwargs = pipeline_kwargs  # the name SDXLEmbeddings had

    def __iter__(self):
        return iter((self.prompt_embeds, self.negative_prompt_embeds))

    def __getitem__(self, i: int) -> torch.Tensor:
        return (self.prompt_embeds, self.negative_prompt_embeds)[i]

    def __len__(self) -> int:
        return 2


class AestheticEncoder:
    """Prompt embeddings personalized towards a style, cached per (prompt, negative, style, options). A tower's CLIP
    (its projection) is read on the first styled prompt, not before: plain prompts need none.

    >>> enc = AestheticEncoder.from_pipeline(pipe)                  # SD1.x, SD2.x or SDXL
    >>> e = enc.encode("a lighthouse at dusk", load_style("watercolor.pt"))
    >>> image = pipe(**e.pipeline_kwargs()).images[0]               # or: pe, ne = e (SD1.x/SD2.x)
    """

    def __init__(self, text_encoder=None, tokenizer=None, clip_model=None, cache_size: int = 64,
                 tower: TextTower | None = None, engine=None, *, towers: list[PromptTower] | None = None,
                 zero_negative: bool = False):
        """One tower (SD1.x/SD2.x): ``text_encoder`` and ``tokenizer``; ``clip_model``: hub id, folder or loaded
        CLIP text model whose projection defines the style space (default: the family's); ``tower``: its
        ``TextTower`` if already built. Or ``towers``, in the order the conditioning concatenates them.
        ``zero_negative``: an empty negative prompt is conditioned on zeros (SDXL). ``engine``: ``EngineSettings``
        for tuning (None: the environment's)."""
        if towers is None:
            if text_encoder is None or tokenizer is None:
                raise StylegradError("the encoder needs a text encoder and its tokenizer (or towers)")
            towers = [PromptTower("", text_encoder, tokenizer, clip_model, text_tower=tower)]
        self.towers: dict[str, PromptTower] = {t.name: t for t in towers}
        first = towers[0]
        self.text_encoder, self.tokenizer, self.clip_model = first.encoder, first.tokenizer, clip_model
        self.zero_negative = zero_negative
        self.engine = engine
        self.cache_size = cache_size
        self._cache: OrderedDict[tuple, tuple] = OrderedDict()
        self._noted: set[str] = set()
        self.similarities: dict[str, list[list[float]]] = {}  # tower -> cosines per step, of the last prompts tuned
        self.steps_taken: dict[str, list[int]] = {}  # tower -> Adam steps each of them took (a goal stops early)
        self.last_embeddings: list[str] = []  # the textual-inversion words the last prompts used

    @classmethod
    def from_pipeline(cls, pipe, clip_model=None, **kwargs) -> AestheticEncoder:
        """The encoder of any SD1.x, SD2.x or SDXL pipeline (SDXL: both towers; ``clip_model`` is CLIP-L's)."""
        return cls(towers=pipeline_towers(pipe, clip_model), zero_negative=zero_negative(pipe),
                   clip_model=clip_model, **kwargs)

    @property
    def tower(self) -> TextTower:
        """The ``TextTower`` of a one-tower encoder (SD1.x/SD2.x); ``text_tower(name)`` for any."""
        if len(self.towers) != 1:
            raise StylegradError(f"this encoder has the towers {', '.join(self.towers)}: use text_tower(name)")
        return next(iter(self.towers.values())).text_tower

    def text_tower(self, name: str) -> TextTower:
        return self.towers[name].text_tower

    @property
    def device(self) -> torch.device:
        return list(self.towers.values())[-1].device

    @property
    def last_similarities(self):
        """The cosine to the style before each step (then after the last) of each prompt tuned by the last
        ``encode``: a list for a one-tower encoder, else a dict by tower."""
        if len(self.towers) == 1:
            return self.similarities.get(next(iter(self.towers)), [])
        return self.similarities

    @property
    def last_steps(self):
        """The Adam steps each prompt tuned by the last ``encode`` took (fewer than asked where the consistent
        mode's goal stopped it): a list for a one-tower encoder, else a dict by tower."""
        if len(self.towers) == 1:
            return self.steps_taken.get(next(iter(self.towers)), [])
        return self.steps_taken

    def text_embedding(self, text: str) -> torch.Tensor:
        """CLIP text embedding (P,) of ``text`` with the original weights (the one tower's)."""
        return self._only().text_embedding(text)

    def plain(self, texts: list[str], clip_skip: int | None = None) -> torch.Tensor:
        """What the pipeline computes itself (diffusers' ``encode_prompt``), on its own encoder (one-tower
        encoders). (B, S, H) ``clip_skip`` applies to every text given, the negative prompt too, as in A1111
        (diffusers skips it for the positive prompt only)."""
        return self.plain_ids(tokenize(self.tokenizer, texts, self.device), clip_skip)

    def plain_ids(self, ids: torch.Tensor, clip_skip: int | None = None) -> torch.Tensor:
        return self._only().plain_ids(ids, clip_skip)

    def states(self, chunks: Chunks, clip_skip: int | None, loras=None) -> torch.Tensor:
        """The one tower's unweighted conditioning of each chunk (C, S, H) by the original weights."""
        return self._only().states(chunks, clip_skip, loras)[0]

    def _only(self) -> PromptTower:
        if len(self.towers) != 1:
            raise StylegradError(f"this encoder has the towers {', '.join(self.towers)}; name one")
        return next(iter(self.towers.values()))

    def towers_for(self, style: Style | None, options: StyleOptions) -> tuple[str, ...]:
        """The towers a styled prompt tunes: a one-tower encoder's own; SDXL's as ``options.towers`` asks, among
        those the style has a part for. Checks the style's widths (so the CLIP projections are read here)."""
        if style is None or not options.active:
            return ()
        if len(self.towers) == 1:
            only = next(iter(self.towers.values()))
            style.check_width(only.text_tower.width)
            return (only.name,)
        wanted = TOWERS[options.towers]
        have = tuple(t for t in wanted if t in self.towers and style.part(self.towers[t].part) is not None)
        if "g" in wanted and "g" not in have and "sd1-style" not in self._noted:
            self._noted.add("sd1-style")
            note(f"style '{style.name}' has no bigG part (an SD1.x style): only SDXL's CLIP-L text tower is tuned")
        for t in have:
            style.check_part(self.towers[t].part, self.towers[t].text_tower.width)
        return have

    def encode(
        self,
        prompt: str | list[str],
        style: Style | None,
        options: StyleOptions | None = None,
        negative_prompt: str | list[str] | None = None,
        clip_skip: int | None = None,
        callback=None,
        *,
        embeddings: dict | None = None,
        loras=None,
        weighting: bool = True,
    ) -> EncodedPrompt:
        """The pipeline's conditioning for ``prompt`` (one or a batch), personalized towards ``style``: each
        tensor (B, 77 x chunks, H) in the encoder's dtype and device; an empty negative prompt gives zeros where the
        pipeline does (SDXL's ``force_zeros_for_empty_prompt``).

        Prompts are read as A1111 reads them (``weighting=False``: as plain text): emphasis ``(word:1.2)``,
        ``BREAK``, 75-token chunks (each tower's states weighted on their own; the pooled embedding from the first
        chunk), ``<lora:...>`` tags removed. ``embeddings``: textual-inversion words -> (N, H) vectors for a
        one-tower encoder, or per tower (``{'l': {word: (N, 768)}, 'g': {word: (N, 1280)}}``), active where the
        prompt writes them. ``loras``: a ``LoraNetwork`` whose text-encoder changes apply (the tuning starts from
        the LoRA-merged encoder). ``callback(step, similarity)`` after each Adam step."""
        options = options or StyleOptions()
        prompts = [prompt] if isinstance(prompt, str) else list(prompt)
        negatives = negative_prompt if isinstance(negative_prompt, list) else [negative_prompt or ""] * len(prompts)
        if len(negatives) != len(prompts):
            raise StylegradError(f"{len(prompts)} prompts but {len(negatives)} negative prompts")
        tuned = self.towers_for(style, options)
        words = self._words(embeddings)
        addons = (tuple((t, n, v.data_ptr(), tuple(v.shape)) for t in sorted(words) for n, v in sorted(words[t].items())),
                  loras.key() if loras else (), weighting)
        # where and in what precision the towers run: a pipeline moved or cast since gives other results
        placement = tuple((str(t.device), str(t.dtype)) for t in self.towers.values())
        self.similarities, self.steps_taken = {}, {}
        self.last_embeddings = []
        entries = []
        try:
            for p, n in zip(prompts, negatives):
                key = (p, n, style.digest if tuned else None, options.key() if tuned else None, clip_skip, addons,
                       placement)
                if key not in self._cache:
                    self._store(key, self._encode_pair(p, n, style, options, tuned, clip_skip, callback, words, loras,
                                                       weighting))
                self._cache.move_to_end(key)
                entries.append(self._cache[key])
                self.last_embeddings += [u for u in entries[-1][4] if u not in self.last_embeddings]
            width = max(t.shape[1] for e in entries for t in e[:2] if t is not None)
            pe = torch.cat([self._pad(e[0], width, clip_skip, loras) for e in entries])
            ne = torch.cat([torch.zeros_like(pe[:1]) if e[1] is None else self._pad(e[1], width, clip_skip, loras)
                            for e in entries])
        finally:  # under model CPU offload nothing read from the encoders stays on the card
            for t in self.towers.values():
                t.release()
        dtype = list(self.towers.values())[-1].dtype
        pooled = negative_pooled = None
        if entries[0][2] is not None:
            pooled = torch.cat([e[2] for e in entries]).to(dtype)
            negative_pooled = torch.cat([torch.zeros_like(e[2]) if e[3] is None else e[3] for e in entries]).to(dtype)
        return EncodedPrompt(pe.to(dtype), ne.to(dtype), pooled, negative_pooled)

    def _words(self, embeddings: dict | None) -> dict[str, dict[str, torch.Tensor]]:
        """Embedding words per tower: ``{word: vectors}`` (one tower) or ``{tower: {word: vectors}}``."""
        embeddings = embeddings or {}
        if all(isinstance(v, torch.Tensor) for v in embeddings.values()):
            if embeddings and len(self.towers) != 1:
                raise StylegradError("this encoder has several text towers: give embeddings per tower "
                                     f"({', '.join(self.towers)})")
            return {name: dict(embeddings) for name in self.towers}
        return {name: dict(embeddings.get(name) or {}) for name in self.towers}

    def _pad(self, z: torch.Tensor, width: int, clip_skip, loras) -> torch.Tensor:
        """Longer prompts than this one: repeat the empty prompt's chunk until the lengths match (A1111's
        padding of the shorter of cond and uncond)."""
        if z.shape[1] == width:
            return z
        empty = torch.cat([t.states(t.vocabulary().chunks(""), clip_skip, loras)[0] for t in self.towers.values()],
                          dim=-1).to(z.dtype)  # (1, 77, H)
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

    def _encode_pair(self, prompt, negative, style, options, tuned, clip_skip, callback, words, loras, weighting):
        """(prompt states, negative states or None for zeros, pooled or None, negative pooled or None, embedding
        words used): states (1, 77 x chunks, H), pooled (1, P)."""
        out, used = [], []
        for text, tune in ((prompt, True), (negative, options.personalize_negative)):
            text = extract_tags(text)[0]
            if not text and self.zero_negative and len(out) == 1:
                out.append((None, None))
                continue
            hidden, pooled = [], None
            for tower in self.towers.values():
                chunks = tower.vocabulary(words[tower.name]).chunks(text, weighting)
                used += [e for e in chunks.embeddings if e not in used]
                h, p = self._tower_states(tower, chunks, style, options, tuned if tune else (), clip_skip, callback,
                                          loras)
                hidden.append(apply_weights(h, chunks.weights).reshape(1, -1, h.shape[-1]))
                pooled = p if p is not None else pooled
            if any(h.shape[1] != hidden[0].shape[1] for h in hidden):
                raise StylegradError("SDXL's two tokenizers cut this prompt into different chunks")
            out.append((torch.cat(hidden, dim=-1), pooled))
        (pe, pp), (ne, np_) = out
        return pe, ne, pp, np_, used

    def _tower_states(self, tower: PromptTower, chunks: Chunks, style, options, tuned, clip_skip, callback, loras):
        """(hidden (C, 77, H), pooled (1, P) or None) of one tower, tuned if it is among ``tuned``."""
        if tower.name not in tuned:
            return tower.states(chunks, clip_skip, loras)
        result = self.tune(tower.name, chunks, style, options, clip_skip, callback, loras=loras)
        hidden, pooled = result.hidden, (result.text_embedding if tower.pooled else None)
        if options.weight != 1.0:  # the original states only now: at weight 1 they would cost a whole 77-token pass
            plain, plain_pooled = tower.states(chunks, clip_skip, loras)
            hidden = blend(plain.float(), hidden.float(), options.weight, options.slerp)
            if pooled is not None:
                p0 = plain_pooled.float()
                pooled = slerp(p0, pooled.float(), options.weight, dim=-1) if options.slerp else \
                    (1 - options.weight) * p0 + options.weight * pooled.float()
        return hidden.to(tower.text_tower.dtype), pooled

    def tune(self, name: str, chunks: Chunks, style: Style, options: StyleOptions, clip_skip: int | None = None,
             callback=None, *, loras=None, target_text: Chunks | None = None,
             keep_weights: bool = False) -> Personalized:
        """The method on one tower: its text transformer tuned for the prompt's first chunk towards the style's part
        (rotated towards ``options.text``, or the host-tokenized ``target_text``), then every chunk encoded by it.
        ``loras``: tuning starts from the LoRA-merged tensors. ``keep_weights``: the tuned tensors are returned
        too (ComfyUI applies their differences itself)."""
        tower = self.towers[name]
        text = None
        if options.text:
            text = tower.text_embedding(target_text if target_text is not None else options.text)
        target = style_target(style.part(tower.part).to(tower.device), text, options.text_angle,
                              options.text_negative)
        base = None
        if loras:
            merged = {k.removeprefix("text_model."): v.to(tower.device)  # W's device: the CPU under offload
                      for k, v in loras.text_params(tower.component).items()}
            base = {**tower.text_tower.base, **merged} if merged else None
        result = personalize(tower.text_tower, chunks.ids.to(tower.device), target, steps=options.steps,
                             adam=options.adam(tower.device), regularization=options.regularization,
                             target_similarity=options.target_similarity, target_gain=options.target_gain,
                             clip_skip=clip_skip, callback=callback,
                             extra_rows=chunks.extra, base=base, keep_weights=keep_weights, engine=self.engine)
        self.similarities.setdefault(name, []).append(result.similarities)
        self.steps_taken.setdefault(name, []).append(result.steps)
        return result
