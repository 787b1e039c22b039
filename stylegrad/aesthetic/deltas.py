"""One prompt's tuning as weight differences, for hosts that patch their own text model (ComfyUI's patches) instead
of taking ``prompt_embeds``: original + difference is the tuned tensor, to float32 rounding.

The differences are float32 whatever the text model's dtype: a layer-norm weight near 1 moves by about lr x steps
(1e-3 at the defaults), under half of bf16's spacing there (2^-7), so a difference rounded to the model's dtype, or
added to a weight stored in it, is mostly lost. Where the sum is rounded is the host's choice (apps/comfyui/clip.py)."""

from __future__ import annotations

import torch

from stylegrad.aesthetic.tuning import TOKEN, Personalized


@torch.no_grad()
def weight_deltas(base: dict[str, torch.Tensor], result: Personalized) -> dict[str, torch.Tensor]:
    """name -> tuned minus original, full-shape, float32 on the original's device, for every tensor the tuning moved.
    ``base``: the tensors the tuning started from; ``result``: ``personalize(..., keep_weights=True)``'s. The token
    table's difference is zero outside the rows the prompt used; textual-inversion rows (past the table) have no
    place in it and are left out. The tuned tensors are released one by one as their differences are made."""
    if result.weights is None:
        raise ValueError("personalize(..., keep_weights=True) keeps the tuned tensors; this result has none")
    tuned, out = result.weights, {}
    result.weights = None
    for name in list(tuned):
        t, original = tuned.pop(name).detach(), base[name]
        if name == TOKEN:
            inside = result.rows < original.shape[0]
            rows = result.rows[inside]
            diff = torch.zeros(original.shape, dtype=torch.float32, device=original.device)
            diff[rows] = t[inside].float() - original[rows].float()
        elif t is original or t.data_ptr() == original.data_ptr():
            continue  # a large weight that never took a step is still the original
        else:
            diff = t.float() - original.float()
        del t
        if bool(diff.any()):
            out[name] = diff
    return out
