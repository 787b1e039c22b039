"""Aesthetic gradients (Gallego 2022, arXiv 2209.12330, Sec. 3): tune the CLIP text encoder for one prompt.

The method is ``method.tune_text_encoder`` (read it first): a float32 copy of the text encoder, Adam over its
text transformer on the full 77-token prompt. ``personalize`` is the engine: the same optimization, to the
contract of docs/exactness.md, with less work, using two exact facts:
- CLIP's text attention is causal, so the state at the first EOS (all the loss looks at) depends only on the
  tokens up to it: the loss runs on those E tokens, not 77.
- Token-table rows the prompt does not use get a zero gradient, and Adam moves a parameter with an all-zero
  gradient history by exactly zero: tuning only the U rows the prompt uses is the same optimization as tuning
  the 49,408-row table. The same holds for position rows after the EOS, which are tuned but never move.
Without the regularizer (which reads every token's hidden state) the loop runs on ``TunedWeights.eos_state``,
which computes only the EOS state and takes the large weights' Adam steps itself, from their gradients' factors
(eos_forward.py says why). How it runs (memory mode, kernels, memory reuse) is one ``EngineSettings``.
"""

from __future__ import annotations

import gc
from collections.abc import Callable
from dataclasses import dataclass, replace
from functools import partial

import torch

from stylegrad.aesthetic.adam import AdamSettings
from stylegrad.aesthetic.engine import EngineSettings, resolve
from stylegrad.aesthetic.eos_forward import TunedWeights, is_matrix
from stylegrad.aesthetic.memory import fall_back, free_bytes, out_of_memory, rebuilt_bytes
from stylegrad.aesthetic.method import goal
from stylegrad.aesthetic.tower import TextTower
from stylegrad.errors import StylegradError
from stylegrad.prompts.chunks import gather_rows

TOKEN = "embeddings.token_embedding.weight"


@dataclass
class Personalized:
    hidden: torch.Tensor  # (C, S, H) float32: what the UNet gets from the tuned encoder, per chunk
    similarities: list[float]  # cos(text embedding, target) before each step, then after the last
    text_embedding: torch.Tensor | None = None  # (1, P): the tuned CLIP text embedding (SDXL's pooled embeds)
    weights: dict[str, torch.Tensor] | None = None  # with keep_weights: the tuned tensors (token table: ``rows``)
    rows: torch.Tensor | None = None  # (U,) the token-table rows ``weights``' token table holds, in order
    steps: int = 0  # the Adam steps taken (fewer than asked where a goal stopped the prompt)


def first_eos(ids: torch.Tensor, eos_token_id: int) -> int:
    hits = (ids == eos_token_id).nonzero()
    if hits.numel() == 0:
        raise ValueError("the tokenized prompt has no end-of-text token")
    return int(hits[0])


def personalize(
    tower: TextTower,
    input_ids: torch.Tensor,
    target: torch.Tensor,
    *,
    steps: int,
    adam: AdamSettings,
    regularization: float = 0.0,
    target_similarity: float | None = None,
    target_gain: float | None = None,
    clip_skip: int | None = None,
    callback: Callable[[int, float], None] | None = None,
    extra_rows: torch.Tensor | None = None,
    base: dict[str, torch.Tensor] | None = None,
    keep_weights: bool = False,
    engine: EngineSettings | None = None,
) -> Personalized:
    """Adam on the text transformer (embeddings, layers, final norm; not the projection) to maximize
    cos(proj(h_EOS), target), then the tuned encoder's hidden states for the full prompt.

    ``target_similarity`` (absolute) or ``target_gain`` (relative: the starting cosine plus this fraction of its
    distance to 1): the consistent mode, ``steps`` a cap; the prompt stops before the first step whose cosine is at
    or past the goal (``method.goal``), as the method does.

    ``regularization`` (lambda) adds lambda * mean((z - z0)^2) over the 77 x H conditioning states the UNet reads
    (z tuned, z0 original): every row the UNet sees is held, padding included, since it reads all of them; and as a
    mean over a fixed 77 rows, the same lambda means the same for a 3-word and a 60-word prompt.

    ``input_ids`` (C, S): a long prompt's chunks; the first is tuned (as the A1111 extension does), and every
    chunk is then encoded by the tuned encoder. Ids past the token table read ``extra_rows`` (textual-inversion
    vectors), tuned like any other row the prompt uses. ``base``: the tensors to start from (default the tower's;
    e.g. with a LoRA merged into some of them). ``keep_weights``: also return the tuned tensors, for hosts that
    apply weight differences themselves (ComfyUI's patches). ``engine``: how the engine runs (engine.py); None,
    the environment's defaults. Whatever it says, the result is ``method.tune_text_encoder``'s within the
    contract (docs/exactness.md).

    Running out of memory with Adam moments kept, the prompt is tuned again from the start rebuilding them (one
    note per device, memory.fall_back), so its result is a ``low`` run's; the callback hears each step once. Out
    of memory even so (or with regularization, which keeps them), a ``StylegradError`` says what it needed."""
    chunks = input_ids.reshape(-1, input_ids.shape[-1]).cpu()  # (C, S), each padded to the tokenizer's length
    eos = first_eos(chunks[0], tower.eos_token_id)  # found on the host: a few hundred ids, and no device sync later
    rows, local_all = torch.unique(chunks, return_inverse=True)  # (U,) table rows the prompt uses; ids into them
    base = base or tower.base
    device = base[TOKEN].device
    rows, local_all = rows.to(device), local_all.to(device)
    eos_path = regularization == 0
    attempt = partial(_attempt, tower, base, chunks, local_all, rows, eos, target, steps=steps, adam=adam,
                      regularization=regularization, target_similarity=target_similarity, target_gain=target_gain,
                      clip_skip=clip_skip, extra_rows=extra_rows, keep_weights=keep_weights)
    settings = resolve(engine)
    reported = _Reported(callback)
    try:
        return attempt(reported, settings)
    except Exception as e:  # only running out of memory is handled here; anything else goes on up
        if not out_of_memory(e):
            raise
        matrices = {name: t for name, t in base.items() if is_matrix(name)}
        if not eos_path or settings.memory == "low" or not matrices:
            raise _no_memory(base, matrices, device, eos_path) from e
    # the first try's tensors are unreachable once its exception is gone: collect them and hand their memory back
    fall_back(matrices, device)  # said once per device; later prompts rebuild at once
    _release_cached(device)
    try:
        return attempt(reported, replace(settings, memory="low"))
    except Exception as e:
        if out_of_memory(e):
            raise _no_memory(base, matrices, device, eos_path) from e
        raise


class _Reported:
    """The caller's callback, told each step once: a prompt taken again after running out of memory reports only
    the steps it had not reached."""

    def __init__(self, callback: Callable[[int, float], None] | None):
        self.callback, self.reached = callback, 0

    def __call__(self, step: int, similarity: float) -> None:
        if self.callback is not None and step >= self.reached:
            self.reached = step + 1
            self.callback(step, similarity)


def _release_cached(device: torch.device) -> None:
    """Collect the failed try's tensors and return the accelerator allocator's cached blocks, so the retry starts
    from the memory the device really has."""
    gc.collect()
    if device.type == "cuda":
        torch.cuda.empty_cache()
    elif device.type == "mps" and hasattr(torch, "mps") and hasattr(torch.mps, "empty_cache"):
        torch.mps.empty_cache()


def _no_memory(base: dict[str, torch.Tensor], matrices: dict[str, torch.Tensor], device: torch.device,
               eos_path: bool) -> StylegradError:
    """The one line when tuning cannot fit: what it needed on ``device`` at least, and what was free."""
    others = sum(t.numel() for name, t in base.items() if name not in matrices and name != TOKEN)
    if eos_path:
        need, how = rebuilt_bytes(matrices, device) + 12 * others, "even rebuilding Adam moments"
    else:  # the regularized loss runs the transformers module: every tensor keeps its copy and moments
        need, how = 12 * (others + sum(t.numel() for t in matrices.values())), "with regularization (kept moments)"
    free = free_bytes(device)
    there = "" if free is None else f", {free / 2**30:.1f} GB is free"
    return StylegradError(f"out of memory tuning the text encoder on {device} {how}: it needs about "
                          f"{need / 2**30:.1f} GB there{there}; free memory on the device or run on another one")


def _attempt(tower: TextTower, base: dict[str, torch.Tensor], chunks: torch.Tensor, local_all: torch.Tensor,
             rows: torch.Tensor, eos: int, target: torch.Tensor, callback: Callable[[int, float], None],
             engine: EngineSettings, *, steps: int, adam: AdamSettings, regularization: float,
             target_similarity: float | None, target_gain: float | None, clip_skip: int | None,
             extra_rows: torch.Tensor | None, keep_weights: bool) -> Personalized:
    """One try at the tuning, from the original tensors (never written) with ``engine``'s settings."""
    params = {name: gather_rows(t, extra_rows, rows) if name == TOKEN else t for name, t in base.items()}
    eos_path = regularization == 0
    # float32 copies to tune; on the EOS path each large matrix is copied at its first step (AdamMatrix)
    params = {name: t if eos_path and is_matrix(name) else t.to(torch.float32, copy=True) for name, t in params.items()}
    target = target.to(device=rows.device, dtype=torch.float32).reshape(1, -1)  # (1, P), unit norm
    with engine.applied() as engine:
        tuned = TunedWeights(tower, params, adam if eos_path else None, keep_copies=keep_weights, engine=engine)
        try:
            return _tune(tower, tuned, chunks, local_all, eos, target, steps=steps, adam=adam,
                         regularization=regularization, target_similarity=target_similarity, target_gain=target_gain,
                         clip_skip=clip_skip, callback=callback, rows=rows, keep_weights=keep_weights)
        finally:
            tuned.release()  # its memory goes to the next prompt (workspace.py)


def _tune(tower: TextTower, tuned: TunedWeights, chunks: torch.Tensor, local_all: torch.Tensor, eos: int,
          target: torch.Tensor, *, steps: int, adam: AdamSettings, regularization: float,
          target_similarity: float | None, target_gain: float | None, clip_skip: int | None,
          callback: Callable[[int, float], None] | None, rows: torch.Tensor, keep_weights: bool) -> Personalized:
    local, eos_path = local_all[0], regularization == 0
    if eos_path:
        objective = _eos_objective(tower, tuned, local[: eos + 1], target)  # the EOS state sees only these tokens
    else:
        objective = _regularized_objective(tower, tuned, local, eos, target, regularization, clip_skip)
    optimizer = adam.optimizer(tuned.small_parameters())

    similarities: list[float] = []
    sim = loss = stop = None
    taken = 0
    for step in range(steps):
        sim, loss = objective()
        similarities.append(_number(sim.detach()))
        if callback is not None:
            callback(step, similarities[-1])
        if step == 0:
            stop = goal(similarities[0], target_similarity, target_gain)  # the consistent mode's, or None
        if stop is not None and similarities[-1] >= stop:
            break
        optimizer.zero_grad(set_to_none=True)
        loss.backward()  # on the EOS path the large weights take their Adam step in here (or at their next product)
        optimizer.step()
        taken += 1
    del objective, optimizer, sim, loss  # the last graph and the small parameters' moments

    keep, norm = tower.cond_layer(clip_skip), not tower.sdxl
    text, hidden = tuned.finish(local, keep, norm)  # (S, H) each, every pending step taken
    with torch.no_grad():
        embedding = text[eos:eos + 1].to(tower.projection.dtype) @ tower.projection.T  # (1, P)
        final = torch.cosine_similarity(embedding, target)
    similarities.append(_number(final))
    more = [tuned.encode(c, keep, norm) for c in local_all[1:]]  # the other chunks, on the tuned tensors
    kept = (tuned.params, rows) if keep_weights else (None, None)
    return Personalized(torch.stack([hidden, *more]), similarities, embedding, *kept, steps=taken)


def _number(t: torch.Tensor) -> float:
    """A one-value tensor as a float; NaN on the ``meta`` device, where tuning runs without values (the accelerator's
    stand-in in tests and bench/tuning_memory.py)."""
    return float("nan") if t.is_meta else float(t)


def _eos_objective(tower: TextTower, tuned: TunedWeights, short: torch.Tensor, target: torch.Tensor):
    """The paper's loss on the EOS state alone: the large weights take their own Adam steps (``TunedWeights``)."""
    for t in tuned.small_parameters():
        t.requires_grad_(True)

    def objective():
        text = tuned.eos_state(short).to(tower.projection.dtype) @ tower.projection.T  # (1, P)
        sim = torch.cosine_similarity(text, target, dim=-1)  # (1,)
        return sim, -sim.mean()

    return objective


def _regularized_objective(tower: TextTower, tuned: TunedWeights, ids: torch.Tensor, eos: int,
                           target: torch.Tensor, regularization: float, clip_skip: int | None):
    """On the transformers module: the penalty needs every one of the S conditioning rows, every step."""
    ids, eos_index = ids[None], torch.tensor([eos], device=ids.device)  # (1, S)
    hidden = tower.needs_hidden(clip_skip)
    params = tuned.params
    for t in params.values():
        t.requires_grad_(True)
    with torch.no_grad():
        z0 = tower.condition(params, tower.run(params, ids, hidden), clip_skip)  # (1, S, H)

    def objective():
        out = tower.run(params, ids, hidden)
        sim = torch.cosine_similarity(tower.text_embed(out, eos_index), target, dim=-1)  # (1,)
        penalty = (tower.condition(params, out, clip_skip) - z0).pow(2).mean()  # over S x H: length-free
        return sim, -sim.mean() + regularization * penalty

    return objective
