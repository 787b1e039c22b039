"""The text towers a pipeline conditions its UNet on, as the one ``AestheticEncoder`` reads them.

SD1.x and SD2.x have one tower; SDXL has two (CLIP ViT-L/14 and OpenCLIP ViT-bigG/14) whose states are
concatenated, and bigG also gives the pooled embedding. A ``PromptTower`` is one of them: its own text encoder and
tokenizer (only read), which of the pipeline's conditioning layers the UNet takes, and the ``TextTower`` that
tuning runs on, built on the first styled prompt (it reads the family's CLIP projection; plain prompts need none).
ComfyUI's CLIP gives the same towers (apps/comfyui/clip.py), built from its own tensors.
"""

from __future__ import annotations

from contextlib import nullcontext

import torch

from stylegrad.aesthetic.tower import (
    TextTower,
    conditioning_layer,
    meta_skeleton,
    readable_parameters,
    run_skeleton,
    tower_for,
)
from stylegrad.aesthetic.tuning import TOKEN, first_eos
from stylegrad.devices import execution_device, offload_hook
from stylegrad.errors import StylegradError
from stylegrad.families import Family
from stylegrad.notes import note
from stylegrad.prompts.chunks import Chunks, Vocabulary, gather_rows

TOWERS = {"l": ("l",), "g": ("g",), "both": ("l", "g")}  # StyleOptions.towers -> the SDXL towers it tunes


def tokenize(tokenizer, texts: list[str], device: torch.device) -> torch.Tensor:
    """As diffusers does: pad to the tokenizer's max length (77), truncate longer prompts (with a note). (B, S)"""
    ids = tokenizer(
        texts, padding="max_length", max_length=tokenizer.model_max_length, truncation=True, return_tensors="pt"
    ).input_ids
    for text in texts:
        if len(tokenizer(text).input_ids) > tokenizer.model_max_length:
            note(f"prompt longer than {tokenizer.model_max_length} tokens was truncated: {text[:60]!r}...")
    return ids.to(device)


class PromptTower:
    """One text tower: what the pipeline computes with it (``states``), and what tuning needs (``text_tower``).

    ``name``: '' for SD1.x/SD2.x's only tower, 'l' / 'g' for SDXL's (ComfyUI's: 'l', 'g', 'h'). ``sdxl``: the UNet
    reads ``hidden_states[-2 - clip_skip]`` without the final norm (both SDXL towers), not the final-normed layer
    ``cond_layers - clip_skip``. ``pooled``: the tower also gives the pooled embedding (SDXL's bigG). ``component``:
    its name in a ``LoraNetwork`` ('te', 'te2'). ``clip_model``: whose projection defines its style space (default:
    the family's, or the encoder's own projection)."""

    def __init__(self, name: str, encoder, tokenizer, clip_model=None, *, sdxl: bool = False, pooled: bool = False,
                 component: str = "te", text_tower: TextTower | None = None):
        self.name = name
        self.encoder = encoder
        self.tokenizer = tokenizer
        self.clip_model = clip_model
        self.sdxl = sdxl
        self.pooled = pooled
        self.component = component
        self.part = "clip_g" if name == "g" else "clip_l"  # the style's vector this tower is tuned towards
        self._text_tower = text_tower
        self._follows_encoder = text_tower is None  # a tower built here re-reads the encoder when it changed
        self._skeleton = None

    @property
    def text_tower(self) -> TextTower:
        """The tower tuning runs on (reads the CLIP projection the first time; later, follows the encoder if the
        pipeline was moved or cast since)."""
        if self._text_tower is None:
            self._text_tower = tower_for(self.encoder, self.tokenizer, self.clip_model, sdxl=self.sdxl)
        elif self._follows_encoder:
            self._text_tower.follow(self.encoder)
        return self._text_tower

    def release(self) -> None:
        """After a prompt: under model CPU offload, drop what the tower read from the encoder on its execution device
        (the encoder goes back to the CPU when the next model runs; nothing may keep its copy there)."""
        if self._text_tower is not None and self._follows_encoder and offload_hook(self.encoder) is not None:
            self._text_tower.release()

    @property
    def device(self) -> torch.device:
        """Where the tower computes: the encoder's device, or under model CPU offload its execution device."""
        return execution_device(self.encoder)

    @property
    def dtype(self) -> torch.dtype:
        return self.encoder.dtype

    @property
    def width(self) -> int:
        """The width of its hidden states in the conditioning."""
        return self.encoder.config.hidden_size

    def vocabulary(self, embeddings: dict[str, torch.Tensor] | None = None) -> Vocabulary:
        if self.tokenizer is None:
            raise StylegradError(f"text tower '{self.name}' has no tokenizer: its host tokenizes prompts itself")
        return Vocabulary(self.tokenizer, embeddings)

    def plain_ids(self, ids: torch.Tensor, clip_skip: int | None = None) -> torch.Tensor:
        """SD1.x/SD2.x: what diffusers' ``encode_prompt`` computes for these ids on the tower's own encoder."""
        enc = self.encoder
        k = conditioning_layer(enc.config.num_hidden_layers, clip_skip)
        with torch.no_grad():
            if k == enc.config.num_hidden_layers:
                return enc(ids)[0]
            h = enc(ids, output_hidden_states=True).hidden_states[k]
            return getattr(enc, "text_model", enc).final_layer_norm(h)  # transformers 5 dropped .text_model

    @torch.no_grad()
    def states(self, chunks: Chunks, clip_skip: int | None, loras=None) -> tuple[torch.Tensor, torch.Tensor | None]:
        """(the unweighted conditioning of each chunk (C, S, H) by the original weights; the pooled embedding (1, P)
        of the first chunk, or None), with the chunks' textual-inversion rows (through a parameter-free skeleton of
        the encoder) and the LoRAs of ``loras`` run beside the weights."""
        ids = chunks.ids.to(self.device)
        hooks = (lambda targets=None: loras.applied((self.component,), targets)) if loras else \
            (lambda targets=None: nullcontext())
        if chunks.extra is None:
            with hooks():
                if not self.sdxl:
                    return self.plain_ids(ids, clip_skip), None
                out = self.encoder(ids, output_hidden_states=True)
            return out.hidden_states[self._sdxl_layer(clip_skip)], (out[0][:1] if self.pooled else None)
        rows, local = torch.unique(ids, return_inverse=True)
        base = readable_parameters(self.encoder)  # under model CPU offload: on its execution device
        params = {**base, TOKEN: gather_rows(base[TOKEN], chunks.extra, rows)}
        skeleton = self.skeleton()
        with hooks({self.component: skeleton}):
            out = run_skeleton(skeleton, params, local, hidden=True)
        if self.sdxl:
            pooled = None
            if self.pooled:
                eos = first_eos(ids[0], self.tokenizer.eos_token_id)
                pooled = out.last_hidden_state[:1, eos] @ self.encoder.text_projection.weight.T
            return out.hidden_states[self._sdxl_layer(clip_skip)], pooled
        k = conditioning_layer(skeleton.config.num_hidden_layers, clip_skip)
        if k == skeleton.config.num_hidden_layers:
            return out.last_hidden_state, None
        w, b = params["final_layer_norm.weight"], params["final_layer_norm.bias"]
        h = out.hidden_states[k]
        return torch.nn.functional.layer_norm(h, h.shape[-1:], w, b, skeleton.config.layer_norm_eps), None

    @staticmethod
    def _sdxl_layer(clip_skip: int | None) -> int:
        return -(clip_skip + 2) if clip_skip is not None else -2  # diffusers' SDXL encode_prompt

    def skeleton(self):
        if self._skeleton is None:
            self._skeleton = meta_skeleton(self.encoder)
        return self._skeleton

    @torch.no_grad()
    def text_embedding(self, text: str | Chunks) -> torch.Tensor:
        """CLIP's text embedding (P,) of ``text`` by the original weights: a string (this tower's tokenizer), or
        chunks a host tokenized (the first chunk; ids past the table read its ``extra`` rows)."""
        tower = self.text_tower
        if isinstance(text, str):
            ids = tokenize(self.tokenizer, [text], self.device)
            out = tower.run(tower.base, ids)
        else:
            ids = text.ids[:1].to(self.device)
            rows, local = torch.unique(ids, return_inverse=True)
            out = tower.run({**tower.base, TOKEN: gather_rows(tower.base[TOKEN], text.extra, rows)}, local)
        eos = torch.tensor([first_eos(ids[0], tower.eos_token_id)], device=ids.device)
        return tower.text_embed(out, eos)[0].float()


def pipeline_towers(pipe, clip_model=None) -> list[PromptTower]:
    """The towers of a diffusers pipeline, in the order its conditioning concatenates them: SDXL's CLIP-L and bigG
    (``clip_model``: CLIP-L's style space, default openai's ViT-L/14; bigG's is its own projection), or SD1.x/SD2.x's
    one (``clip_model``: default the family's)."""
    if getattr(pipe, "text_encoder", None) is None or getattr(pipe, "tokenizer", None) is None:
        raise StylegradError("the pipeline has no CLIP text encoder and tokenizer to personalize")
    if getattr(pipe, "text_encoder_2", None) is None:
        return [PromptTower("", pipe.text_encoder, pipe.tokenizer, clip_model)]
    return [PromptTower("l", pipe.text_encoder, pipe.tokenizer, clip_model or Family.SDXL.clip_models[0], sdxl=True),
            PromptTower("g", pipe.text_encoder_2, pipe.tokenizer_2, None, sdxl=True, pooled=True, component="te2")]


def zero_negative(pipe) -> bool:
    """Whether the pipeline conditions an empty negative prompt on zeros (SDXL's ``force_zeros_for_empty_prompt``)."""
    if getattr(pipe, "text_encoder_2", None) is None:
        return False
    return bool(getattr(pipe.config, "force_zeros_for_empty_prompt", True))
