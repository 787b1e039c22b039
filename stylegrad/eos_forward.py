"""The CLIP text transformer as plain functions, computing only what the aesthetic loss reads: the final state at
the first EOS, for the E tokens up to it, with Adam folded into the backward pass of the large weights.

Why not the transformers module: 99.8% of the tuned bytes are the 72 large matrices (q, k, v, out, fc1, fc2 of
each layer). Folding Adam into each matrix's backward lets its gradient live in one reusable buffer instead of
340 MB of fresh gradients per step (SD1): measured, the same speed and 27% less peak memory (bench/personalize.py).
The last layer, where only the EOS row reaches the loss, runs q, out, fc1 and fc2 on that one row. The forward and
input-gradient products go through oneDNN where torch has it (``linear``): measured 30% faster per prompt than
torch's default sgemm on the test machine (bench/personalize.py, 2.7 s instead of 3.5-4.5 s). The numbers are
those of the plain loop (tested against a fresh-copy reference within 1e-5): Adam still sees every weight's full
gradient before it moves.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch.optim.adam import adam
from transformers.activations import ACT2FN

from .tower import TextTower

MATRICES = ("self_attn.q_proj", "self_attn.k_proj", "self_attn.v_proj", "self_attn.out_proj", "mlp.fc1", "mlp.fc2")


class AdamMatrix:
    """One large weight with its own Adam moments; ``update`` applies one Adam step from the gradient's factors."""

    def __init__(self, weight: torch.Tensor, scratch: dict, hyper: dict):
        self.weight = weight  # tuned in place; no autograd leaf, so no .grad is ever allocated for it
        self.exp_avg = torch.zeros_like(weight)
        self.exp_avg_sq = torch.zeros_like(weight)
        self.step = torch.zeros((), dtype=torch.float32, device=weight.device)  # where fused Adam wants it
        self.scratch, self.hyper = scratch, hyper

    def update(self, grad_out_t: torch.Tensor, x: torch.Tensor) -> None:
        """grad W = grad_out^T @ x (rows of x are tokens), into a buffer shared by all matrices of this shape."""
        buf = self.scratch.get(self.weight.shape)
        if buf is None:
            buf = self.scratch[self.weight.shape] = torch.empty_like(self.weight)
        torch.mm(grad_out_t, x, out=buf)
        adam([self.weight], [buf], [self.exp_avg], [self.exp_avg_sq], [], [self.step],
             amsgrad=False, maximize=False, weight_decay=0.0, **self.hyper)


def _onednn_linear():
    """oneDNN's fp32 linear (x W^T + b), where this torch build has it. Why: on these few-row products MKL's sgemm
    ran 20-35% slower on the test machine's AMD CPU, where MKL takes a generic code path and oneDNN's JIT kernels use
    AVX2 (microbenchmark on the SD1 weight shapes, 16 rows; the gradient-of-weight product stays on MKL, which is
    faster there because it writes into a reused buffer)."""
    try:
        if torch.backends.mkldnn.is_available():
            return torch.ops.mkldnn._linear_pointwise
    except (AttributeError, RuntimeError):
        pass
    return None


_ONEDNN = _onednn_linear()


def linear(x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None = None) -> torch.Tensor:
    """x @ weight.T (+ bias), on oneDNN for CPU tensors where available."""
    global _ONEDNN
    if _ONEDNN is not None and x.device.type == "cpu" and x.dtype == torch.float32:
        try:
            return _ONEDNN(x, weight, bias, "none", [], "")
        except (RuntimeError, TypeError):  # a private op: if this torch's differs, use the public path from now on
            _ONEDNN = None
    return F.linear(x, weight, bias)


class _AdamLinear(torch.autograd.Function):
    """y = x W^T + b whose backward returns grad x and grad b, and hands grad W straight to the weight's Adam."""

    @staticmethod
    def forward(ctx, x: torch.Tensor, bias: torch.Tensor, matrix: AdamMatrix) -> torch.Tensor:
        ctx.save_for_backward(x)
        ctx.matrix = matrix
        return linear(x, matrix.weight, bias)

    @staticmethod
    def backward(ctx, grad_out: torch.Tensor):
        (x,) = ctx.saved_tensors
        matrix = ctx.matrix
        grad_x = linear(grad_out, matrix.weight.T)  # with the weight as the forward pass saw it, before it moves
        matrix.update(grad_out.T, x)
        return grad_x, grad_out.sum(0), None


class EosForward:
    """The tower's transformer for one tokenised prompt cut at its first EOS, on ``params`` (a tuned copy)."""

    def __init__(self, tower: TextTower, params: dict[str, torch.Tensor], adam_options: dict):
        """``adam_options``: torch.optim.Adam's keywords (lr, betas, eps, fused or foreach)."""
        cfg = tower.skeleton.config
        self.layers, self.heads, self.eps = cfg.num_hidden_layers, cfg.num_attention_heads, cfg.layer_norm_eps
        self.act = ACT2FN[cfg.hidden_act]  # the module's own activation, so the maths is the same
        self.params = params
        hyper = {k: v for k, v in adam_options.items() if k != "betas"}
        hyper["beta1"], hyper["beta2"] = adam_options["betas"]
        scratch: dict = {}
        self.matrices = {
            f"encoder.layers.{i}.{m}.weight": AdamMatrix(params[f"encoder.layers.{i}.{m}.weight"], scratch, hyper)
            for i in range(self.layers) for m in MATRICES
        }

    def small_parameters(self) -> list[torch.Tensor]:
        """Everything Adam updates the usual way: embeddings, biases, layer norms."""
        return [t for name, t in self.params.items() if name not in self.matrices]

    def _linear(self, x: torch.Tensor, prefix: str) -> torch.Tensor:
        return _AdamLinear.apply(x, self.params[prefix + ".bias"], self.matrices[prefix + ".weight"])

    def _norm(self, x: torch.Tensor, prefix: str) -> torch.Tensor:
        return F.layer_norm(x, x.shape[-1:], self.params[prefix + ".weight"], self.params[prefix + ".bias"], self.eps)

    def __call__(self, ids: torch.Tensor) -> torch.Tensor:
        """(E,) local token ids ending at the first EOS -> (1, H) final-layer-normed state at that EOS."""
        p = self.params
        n = ids.shape[0]
        h = p["embeddings.token_embedding.weight"][ids] + p["embeddings.position_embedding.weight"][:n]  # (E, H)
        width = h.shape[-1]
        head = width // self.heads
        for i in range(self.layers):
            pre = f"encoder.layers.{i}."
            last = i == self.layers - 1  # only the EOS row of the last layer reaches the loss
            a = self._norm(h, pre + "layer_norm1")
            q = self._linear(a[-1:] if last else a, pre + "self_attn.q_proj")
            k = self._linear(a, pre + "self_attn.k_proj")
            v = self._linear(a, pre + "self_attn.v_proj")
            q, k, v = (t.view(t.shape[0], self.heads, head).transpose(0, 1) for t in (q, k, v))  # (heads, ., d)
            o = F.scaled_dot_product_attention(q, k, v, is_causal=not last)  # the EOS row sees every token
            o = self._linear(o.transpose(0, 1).reshape(-1, width), pre + "self_attn.out_proj")
            h = (h[-1:] if last else h) + o
            m = self.act(self._linear(self._norm(h, pre + "layer_norm2"), pre + "mlp.fc1"))
            h = h + self._linear(m, pre + "mlp.fc2")
        return self._norm(h, "final_layer_norm")  # (1, H)
