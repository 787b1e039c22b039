"""The method, plainly: aesthetic gradients (Gallego 2022, arXiv 2209.12330, Sec. 3). Read this first.

``tune_text_encoder`` is the definition of what stylegrad computes for one prompt: copy the CLIP text encoder as
float32, take T steps of ``torch.optim.Adam`` over its text transformer with the loss
-cos(projection(final state at the first end-of-text token), style), and read the conditioning states the UNet
gets from the tuned copy. ``tuning.personalize`` (the engine: EOS-only forward, kernels, kept or rebuilt moments,
memory kept between prompts) must give the same numbers within the contract of docs/exactness.md, whose
tolerances live in contract.py; the tests hold it to this function, and bench/personalize.py times it as the
reference.

Which states the UNet reads, as ``layer`` (an index into ``hidden_states``: 0 is the embeddings' output) and
``final_norm``:
- SD1.x: the last layer, final-normed: ``layer=-1`` (the defaults); with clip skip c, ``layer=L - c``;
- SD2.x: the pipeline's encoder stops one layer short of the CLIP tower the loss needs: ``layer=L - 1 - c``;
- SDXL (each tower): the penultimate layer as it is, ``layer=-2 - c, final_norm=False``; bigG's ``text_embedding``
  is the pooled embedding.
"""

from __future__ import annotations

import copy
from dataclasses import dataclass

import torch

from stylegrad.aesthetic.vectors import normalize


@dataclass
class Tuned:
    hidden: torch.Tensor  # (B, 77, H): the conditioning states from the tuned copy
    text_embedding: torch.Tensor  # (B, P): projection of its final-normed EOS state (SDXL's pooled embedding)


def tune_text_encoder(clip, input_ids: torch.Tensor, target: torch.Tensor, *, steps: int, lr: float,
                      betas: tuple[float, float] = (0.9, 0.999), eps: float = 1e-8, layer: int = -1,
                      final_norm: bool = True, regularization: float = 0.0) -> Tuned:
    """T Adam steps on a copy of ``clip`` (anything with ``text_model`` and ``text_projection``: a
    ``CLIPTextModelWithProjection``, or a whole ``CLIPModel`` as the paper copies it) towards ``target`` (P,), for
    the tokenized prompt ``input_ids`` (B, 77); ``clip`` itself is never written. ``regularization`` (lambda) adds
    lambda * mean((z - z0)^2) over the conditioning states (z tuned, z0 the original ones)."""
    model = copy.deepcopy(clip).float()
    model.requires_grad_(True)
    text = model.text_model  # embeddings, layers, final norm: what is tuned (not the projection)
    optimizer = torch.optim.Adam(text.parameters(), lr=lr, betas=betas, eps=eps)
    style = normalize(target.float().reshape(1, -1))  # (1, P)

    def conditioning(out) -> torch.Tensor:
        states = out.hidden_states[layer]
        return text.final_layer_norm(states) if final_norm else states

    if regularization:
        with torch.no_grad():
            z0 = conditioning(text(input_ids=input_ids, output_hidden_states=True))
    for _ in range(steps):
        out = text(input_ids=input_ids, output_hidden_states=True)
        embedding = model.text_projection(out.pooler_output)  # pooler_output: the final-normed EOS state
        loss = -(normalize(embedding) @ style.T).mean()
        if regularization:
            loss = loss + regularization * (conditioning(out) - z0).pow(2).mean()
        optimizer.zero_grad()
        loss.backward()
        optimizer.step()
    with torch.no_grad():
        out = text(input_ids=input_ids, output_hidden_states=True)
        return Tuned(conditioning(out), model.text_projection(out.pooler_output))
