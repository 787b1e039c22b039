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

The consistent mode (stylegrad's answer to "inconsistent results": at a fixed T some prompts barely move, others lose
their content) stops each prompt where its cosine to the style reaches a goal, T becoming a cap: an absolute goal
``target_similarity``, or a relative one, ``target_gain`` g: the prompt's starting cosine s0 plus g of its distance to
1, s0 + g * (1 - s0). The check comes before each step, on the cosine that step's forward computes: the prompt stops
at the first state whose cosine is at or past the goal (0 steps if it starts there), as the engine does.
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
    steps: int = 0  # the Adam steps taken (fewer than T where a goal stopped the prompt)


def goal(start: float, target_similarity: float | None = None, target_gain: float | None = None) -> float | None:
    """The cosine at which a prompt that starts at ``start`` stops: absolute, relative (``start`` plus
    ``target_gain`` of the way to 1), or None (no goal: T steps)."""
    if target_gain is not None:
        return start + target_gain * (1.0 - start)
    return target_similarity


def tune_text_encoder(clip, input_ids: torch.Tensor, target: torch.Tensor, *, steps: int, lr: float,
                      betas: tuple[float, float] = (0.9, 0.999), eps: float = 1e-8, layer: int = -1,
                      final_norm: bool = True, regularization: float = 0.0, target_similarity: float | None = None,
                      target_gain: float | None = None) -> Tuned:
    """T Adam steps on a copy of ``clip`` (anything with ``text_model`` and ``text_projection``: a
    ``CLIPTextModelWithProjection``, or a whole ``CLIPModel`` as the paper copies it) towards ``target`` (P,), for
    the tokenized prompt ``input_ids`` (B, 77); ``clip`` itself is never written. ``regularization`` (lambda) adds
    lambda * mean((z - z0)^2) over the conditioning states (z tuned, z0 the original ones). ``target_similarity`` or
    ``target_gain``: stop before the first step whose cosine is at or past the goal (``goal``), T a cap."""
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
    stop, taken = None, 0
    for step in range(steps):
        out = text(input_ids=input_ids, output_hidden_states=True)
        embedding = model.text_projection(out.pooler_output)  # pooler_output: the final-normed EOS state
        similarity = (normalize(embedding) @ style.T).mean()  # the batch's mean cosine to the style
        reached = float(similarity.detach())
        if step == 0:
            stop = goal(reached, target_similarity, target_gain)
        if stop is not None and reached >= stop:
            break  # reached: this state is the prompt's
        loss = -similarity
        if regularization:
            loss = loss + regularization * (conditioning(out) - z0).pow(2).mean()
        optimizer.zero_grad()
        loss.backward()
        optimizer.step()
        taken += 1
    with torch.no_grad():
        out = text(input_ids=input_ids, output_hidden_states=True)
        return Tuned(conditioning(out), model.text_projection(out.pooler_output), taken)
