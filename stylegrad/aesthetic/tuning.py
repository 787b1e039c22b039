"""Aesthetic gradients (Gallego 2022, arXiv 2209.12330, Sec. 3): tune the CLIP text encoder for one prompt.

The reference loop deep-copies the whole CLIP model and runs Adam over every text-transformer parameter on the
full 77-token prompt. This function computes the same optimisation with less work, using two exact facts:
- CLIP's text attention is causal, so the state at the first EOS (all the loss looks at) depends only on the
  tokens up to it: the loss runs on those E tokens, not 77.
- Token-table rows the prompt does not use get a zero gradient, and Adam moves a parameter with an all-zero
  gradient history by exactly zero: tuning only the U rows the prompt uses is the same optimisation as tuning
  the 49,408-row table. The same holds for position rows after the EOS, which are tuned but never move.
Without the regulariser (which reads every token's hidden state) the loop runs on ``EosForward``, which computes
only the EOS state and takes the large weights' Adam steps itself, from their gradients' factors
(eos_forward.py says why).
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass

import torch

from stylegrad.aesthetic.eos_forward import EosForward, full_pass, is_matrix
from stylegrad.aesthetic.tower import TextTower

TOKEN = "embeddings.token_embedding.weight"


@dataclass
class Personalized:
    hidden: torch.Tensor  # (1, S, H) float32: what the UNet gets from the tuned encoder
    similarities: list[float]  # cos(text embedding, target) before each step, then after the last
    steps_taken: int


def first_eos(ids: torch.Tensor, eos_token_id: int) -> int:
    hits = (ids == eos_token_id).nonzero()
    if hits.numel() == 0:
        raise ValueError("the tokenised prompt has no end-of-text token")
    return int(hits[0])


def adam_kwargs(device: torch.device) -> dict:
    """The fused kernel where torch has one for the device (CPU and CUDA): one pass over memory per step."""
    return {"fused": True} if device.type in ("cpu", "cuda") else {"foreach": True}


def personalize(
    tower: TextTower,
    input_ids: torch.Tensor,
    target: torch.Tensor,
    *,
    steps: int,
    lr: float,
    betas: tuple[float, float] = (0.9, 0.999),
    eps: float = 1e-8,
    regularization: float = 0.0,
    target_similarity: float | None = None,
    clip_skip: int | None = None,
    callback: Callable[[int, float], None] | None = None,
) -> Personalized:
    """Adam on the text transformer (embeddings, layers, final norm; not the projection) to maximise
    cos(proj(h_EOS), target), then the tuned encoder's hidden states for the full prompt."""
    ids = input_ids.reshape(-1)  # (S,), padded to the tokenizer's max length
    eos = first_eos(ids, tower.eos_token_id)
    rows, local = torch.unique(ids, return_inverse=True)  # (U,) table rows the prompt uses; (S,) ids into them
    params = {name: t[rows] if name == TOKEN else t for name, t in tower.base.items()}
    # float32 copies to tune; EosForward copies the large matrices itself (eos_forward.AdamMatrix)
    lazy = regularization == 0
    params = {name: t if lazy and is_matrix(name) else t.to(torch.float32, copy=True) for name, t in params.items()}
    target = target.to(device=ids.device, dtype=torch.float32).reshape(1, -1)  # (1, P), unit norm
    short = local[: eos + 1]  # (E,): the EOS state sees only these tokens
    opt = dict(lr=lr, betas=betas, eps=eps, **adam_kwargs(ids.device))
    matrices = None  # EosForward's large weights, whose last Adam step may wait for the full pass
    if regularization > 0:
        objective, optimizer = _regularized_objective(tower, params, short, target, regularization, clip_skip, opt)
    else:
        objective, optimizer, matrices = _eos_objective(tower, params, short, target, opt)

    similarities: list[float] = []
    taken = 0
    sim = loss = None
    for step in range(steps):
        sim, loss = objective()
        similarities.append(float(sim.detach()))
        if callback is not None:
            callback(step, similarities[-1])
        if target_similarity is not None and similarities[-1] >= target_similarity:
            break
        optimizer.zero_grad(set_to_none=True)
        loss.backward()  # on the EOS path the large weights take their Adam step in here
        optimizer.step()
        taken += 1
    del objective, optimizer, sim, loss  # the last graph and the small parameters' moments

    with torch.no_grad():  # the full prompt on the tuned weights
        text, hidden = full_pass(tower, params, local, tower.cond_layer(clip_skip), matrices)  # (S, H) each
        final = torch.cosine_similarity(text[eos:eos + 1].to(tower.projection.dtype) @ tower.projection.T, target)
    similarities.append(float(final))
    return Personalized(hidden[None], similarities, taken)


def _eos_objective(tower, params, short, target, opt):
    """The paper's loss on ``EosForward``: Adam on the large weights inside backward (or at their next forward
    product), on the rest after it."""
    forward = EosForward(tower, params, opt)
    small = forward.small_parameters()
    for t in small:
        t.requires_grad_(True)

    def objective():
        text = forward(short).to(tower.projection.dtype) @ tower.projection.T  # (1, P)
        sim = torch.cosine_similarity(text, target, dim=-1)  # (1,)
        return sim, -sim.mean()

    return objective, torch.optim.Adam(small, **opt), forward.matrices


def _regularized_objective(tower, params, short, target, regularization, clip_skip, opt):
    """On the transformers module: the penalty needs every token's conditioning state, every step."""
    ids, eos = short[None], torch.tensor([short.shape[0] - 1], device=short.device)
    hidden = tower.needs_hidden(clip_skip)
    for t in params.values():
        t.requires_grad_(True)
    with torch.no_grad():
        h0 = tower.condition(params, tower.run(params, ids, hidden), clip_skip)  # (1, E, H)

    def objective():
        out = tower.run(params, ids, hidden)
        sim = torch.cosine_similarity(tower.text_embed(out, eos), target, dim=-1)  # (1,)
        return sim, -sim.mean() + regularization * (tower.condition(params, out, clip_skip) - h0).pow(2).mean()

    return objective, torch.optim.Adam(list(params.values()), **opt)
