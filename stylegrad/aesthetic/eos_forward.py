"""The CLIP text transformer as plain functions, computing only what the aesthetic loss reads: the final state at
the first EOS, for the E tokens up to it, with each large weight's Adam step taken outside torch.optim.

Why not the transformers module: 99.8% of the tuned bytes are the 72 large matrices (q, k, v, out, fc1, fc2 of
each layer). Each is an ``AdamMatrix``: its backward hands the gradient's two small factors (grad_out, x) to its
own Adam, so no 340 MB of gradients per step (SD1) is ever kept. With the compiled kernels (products.py) the step
waits for the matrix's next forward product and runs fused with it, one pass over the weight and its moments;
without them it runs at once, from a reused buffer, on torch's fused Adam. The last layer, where only the EOS
row reaches the loss, runs q, out, fc1 and fc2 on that one row. Each large weight is copied at its first step,
not before the loop, and the full 77-token pass after tuning runs on the same products (``TunedWeights.finish``),
taking the last pending steps. The numbers are those of method.tune_text_encoder, the plain loop, within the
float-rounding tier of docs/exactness.md: Adam still sees every weight's full gradient before it moves."""

from __future__ import annotations

import torch
import torch.nn.functional as F
from transformers.activations import ACT2FN

from stylegrad.aesthetic.adam import AdamSettings, adam_step
from stylegrad.aesthetic.engine import EngineSettings, resolve
from stylegrad.aesthetic.memory import TILE, choose_moments
from stylegrad.aesthetic.pages import advise_huge
from stylegrad.aesthetic.products import (
    can_fuse_adam,
    empty_huge,
    empty_moments,
    fused_adam_linear,
    input_grad,
    linear,
    moment_dtypes,
)
from stylegrad.aesthetic.tower import TextTower
from stylegrad.aesthetic.workspace import WORKSPACE, HugeBlock, block_bytes

MATRICES = ("self_attn.q_proj", "self_attn.k_proj", "self_attn.v_proj", "self_attn.out_proj", "mlp.fc1", "mlp.fc2")


class AdamMatrix:
    """One large weight with its own Adam moments. ``update`` takes one Adam step from the gradient's factors
    (grad W = grad_out^T x); ``forward`` computes x W^T + b on the weight as its steps have left it.

    ``params[name]`` is the original weight, never written. A float32 original is read in place until the
    first step, which writes a copy and records it in ``params``: a prompt whose tuning stops before a step
    copies nothing. Other dtypes are copied to float32 at once (the products run in float32). It is no autograd
    leaf, so no .grad is ever allocated for it.

    Where the compiled kernels run (products.py), a step is not taken in the backward pass but kept as its two
    small factors and taken by the next ``forward``, fused with that product: each weight then crosses memory
    once per step for its gradient, Adam and the next forward product together, instead of three times, and its
    full gradient is never stored. Elsewhere the step is taken at once, on torch's fused Adam. The numbers are
    Adam's either way.

    With ``rebuilt`` the moments are not stored: every step's factors are kept (a few hundred
    floats a row) and each step forms every gradient so far again, running Adam's recursions in order. The
    weight's copy is then its whole state (4 bytes a weight, where kept moments take 10 or 12 in all), for about t
    times the gradient arithmetic at step t; on the compiled kernels the numbers are bit for bit those of kept
    moments (on AVX-512 both carry the moments rounded to 24 bits, _fewrows.c says why).

    Off the CPU (torch's path) a step runs a tile of rows at a time (``memory.TILE`` values), so the scratch is
    three tiles shared by every weight, not three tensors of each shape; and the rebuilt moments' history is kept
    in host memory and moved to the device for each step: it grows with the steps and the prompt's tokens (bigG,
    77 tokens: 0.2 GB a step), and the device's memory is the scarce one. Moving it back takes about as long as the
    rebuilding arithmetic on a PCIe card: the price of the low-memory mode, paid only where it is chosen."""

    def __init__(self, params: dict, name: str, scratch: dict, adam: AdamSettings,
                 blocks: tuple[HugeBlock | None, HugeBlock | None] = (None, None), rebuilt: bool = False):
        """``blocks``: where the copy and the moments are carved from (``TunedWeights._lease_blocks``); None, tensors
        of their own. ``rebuilt``: the moments are rebuilt each step, not stored (memory.py chooses)."""
        self.params, self.name, self.blocks = params, name, blocks
        self.weight = params[name]  # (out, in)
        self.exp_avg = self.exp_avg_sq = None  # made with the copy, unless rebuilt
        self.rebuilt = rebuilt
        self.history: list[tuple[torch.Tensor, torch.Tensor]] = []  # rebuilt: every step's (grad_out, x)
        self.copied = False
        # where torch's Adam wants the step: on the weight's device for its fused kernel, else on the CPU (as
        # torch.optim keeps it: its other kernels read the number on the host)
        self.step = torch.zeros((), dtype=torch.float32, device=self.weight.device if adam.fused else "cpu")
        self.scratch, self.adam = scratch, adam
        self.pending = None  # (grad_out, x) of a step not yet taken
        if self.weight.dtype != torch.float32:
            self._take_copy()
        self.deferred = can_fuse_adam(self.weight)

    def _take_copy(self) -> None:
        shape, block = self.weight.shape, self.blocks[0]
        copy = (block.empty(shape, torch.float32) if block is not None else  # no float32 copy just for its shape
                advise_huge(torch.empty(shape, dtype=torch.float32, device=self.weight.device)))
        self.weight = self.params[self.name] = copy.copy_(self.weight)
        self.copied = True
        if not self.rebuilt:  # zeroed here, the moments are still in cache when Adam reads them
            m, v = self._new_moments()
            self.exp_avg, self.exp_avg_sq = m.zero_(), v.zero_()

    def _new_moments(self) -> tuple[torch.Tensor, torch.Tensor]:
        """Storage for the two moments: the kernels' layout where they take this weight, else float32."""
        if can_fuse_adam(self.weight):
            return empty_moments(self.weight, self.blocks[1])
        return empty_huge(self.weight, self.blocks[1]), empty_huge(self.weight, self.blocks[1])

    def _tile(self, role: str, rows: int) -> torch.Tensor:
        """A scratch tensor of ``rows`` of this weight's rows, for ``role``: one per role, shared by every weight (one
        steps at a time), grown to the largest tile asked."""
        numel = rows * self.weight.shape[1]
        buf = self.scratch.get(role)
        if buf is None or buf.numel() < numel:
            buf = self.scratch[role] = self.weight.new_empty(numel)
        return buf[:numel].view(rows, -1)

    def update(self, grad_out: torch.Tensor, x: torch.Tensor) -> None:
        """One Adam step with grad W = grad_out^T @ x (rows are tokens): now, or kept for the next ``forward``."""
        factors = (grad_out.to(torch.float32).contiguous(), x.to(torch.float32).contiguous())
        if self.rebuilt:
            self.history.append(factors if self.weight.device.type == "cpu" else tuple(map(_to_host, factors)))
        if self.deferred:
            self.pending = factors
        else:
            self._step(*factors)

    def _step(self, grad_out: torch.Tensor, x: torch.Tensor) -> None:
        """torch's path: the step a tile of rows at a time, the moments rebuilt tile by tile from the history's
        factors (moved to the weight's device once for the whole step) or read from the kept ones."""
        if not self.copied:
            self._take_copy()
        device, b1, b2 = self.weight.device, self.adam.beta1, self.adam.beta2
        earlier = [tuple(t.to(device, non_blocking=True) for t in f) for f in self.history[:-1]] if self.rebuilt else []
        out_features, in_features = self.weight.shape
        rows = max(1, min(out_features, TILE // in_features))
        for start in range(0, out_features, rows):
            tile = slice(start, min(start + rows, out_features))
            n = tile.stop - tile.start
            g = self._tile("grad", n)
            if self.rebuilt:  # the moments before this step, from the earlier steps' gradients
                m, v = self._tile("exp_avg", n).zero_(), self._tile("exp_avg_sq", n).zero_()
                for go, xp in earlier:
                    torch.mm(go[:, tile].T, xp, out=g)
                    m.mul_(b1).add_(g, alpha=1 - b1)
                    v.mul_(b2).addcmul_(g, g, value=1 - b2)
            else:
                m, v = self.exp_avg[tile], self.exp_avg_sq[tile]
            torch.mm(grad_out[:, tile].T, x, out=g)
            adam_step(self.weight[tile], g, m, v, self.step.clone(), self.adam)  # each tile at this step's number
        self.step += 1

    def forward(self, x: torch.Tensor, bias: torch.Tensor | None, last: bool = False) -> torch.Tensor:
        """x W^T (+ bias) after any pending step. ``last``: no step follows, so the moments are not kept."""
        if self.pending is None:
            y = linear(x, self.weight, bias)
        else:
            y = self._step_then_product(x, bias, last)
        if last:
            self.exp_avg = self.exp_avg_sq = None
            self.history = []
        return y

    def _step_then_product(self, x: torch.Tensor, bias: torch.Tensor | None, last: bool) -> torch.Tensor:
        (grad_out, x_prev), self.pending = self.pending, None
        if not can_fuse_adam(self.weight, x):  # more rows than the kernels take: the step, then the product
            self._kernel_step(grad_out, x_prev, None, None, last)
            return linear(x, self.weight, bias)
        return self._kernel_step(grad_out, x_prev, x, bias, last)

    def _kernel_step(self, grad_out: torch.Tensor, x_prev: torch.Tensor, x: torch.Tensor | None,
                     bias: torch.Tensor | None, last: bool) -> torch.Tensor | None:
        """The pending step on the compiled kernels, then x W^T (+ bias) unless x is None."""
        self.step += 1
        first = not self.copied
        source = self.weight
        if first:
            self.weight = self.params[self.name] = empty_huge(source, self.blocks[0])
            self.copied = True
        if self.rebuilt:
            return fused_adam_linear(source, self.weight, None, None, grad_out, x_prev, x, bias, first=True,
                                     keep=False, step=int(self.step), adam=self.adam, history=self.history)
        if first and not last:  # written before they are read
            self.exp_avg, self.exp_avg_sq = self._new_moments()
        return fused_adam_linear(source, self.weight, self.exp_avg, self.exp_avg_sq, grad_out, x_prev, x, bias,
                                 first=first, keep=not last, step=int(self.step), adam=self.adam)


_MATRIX_WEIGHTS = tuple(m + ".weight" for m in MATRICES)


def _to_host(t: torch.Tensor) -> torch.Tensor:
    """A host copy of a device tensor, for a history the device reads back later: in pinned memory on CUDA, so the
    copy does not wait and the way back is asynchronous too (both on the same stream, in order). A meta tensor
    (the accelerator's stand-in in tests and bench/tuning_memory.py) has no values to copy: an empty CPU tensor."""
    if t.is_meta:
        return torch.empty(t.shape, dtype=t.dtype)
    if t.is_cuda:
        return torch.empty(t.shape, dtype=t.dtype, pin_memory=True).copy_(t, non_blocking=True)
    return t.to("cpu")


def is_matrix(name: str) -> bool:
    """One of the large weights ``TunedWeights`` tunes as an ``AdamMatrix`` on the EOS path."""
    return name.startswith("encoder.layers.") and name.endswith(_MATRIX_WEIGHTS)


class _AdamLinear(torch.autograd.Function):
    """y = x W^T + b whose backward returns grad x and grad b, and hands grad W straight to the weight's Adam."""

    @staticmethod
    def forward(ctx, x: torch.Tensor, bias: torch.Tensor, matrix: AdamMatrix) -> torch.Tensor:
        ctx.save_for_backward(x)
        ctx.matrix = matrix
        return matrix.forward(x, bias)

    @staticmethod
    def backward(ctx, grad_out: torch.Tensor):
        (x,) = ctx.saved_tensors
        matrix = ctx.matrix
        grad_x = input_grad(grad_out, matrix.weight)  # with the weight as the forward pass saw it, before it moves
        matrix.update(grad_out, x)
        return grad_x, grad_out.sum(0), None


class _Layers:
    """The shape of a tower's transformer and its per-layer maths, on any dict of tensors and any product."""

    def __init__(self, tower: TextTower):
        cfg = tower.skeleton.config
        self.layers, self.heads, self.eps = cfg.num_hidden_layers, cfg.num_attention_heads, cfg.layer_norm_eps
        self.act = ACT2FN[cfg.hidden_act]  # the module's own activation, so the maths is the same

    def norm(self, p: dict, x: torch.Tensor, prefix: str) -> torch.Tensor:
        return F.layer_norm(x, x.shape[-1:], p[prefix + ".weight"], p[prefix + ".bias"], self.eps)

    def run(self, p: dict, ids: torch.Tensor, lin, eos_only: bool, keep: int | None = None):
        """(S,) local token ids -> (residual stream after the last layer, after ``keep`` layers). With
        ``eos_only`` the last layer computes only the last row (the EOS), the only one the loss reads."""
        n = ids.shape[0]
        h = p["embeddings.token_embedding.weight"][ids] + p["embeddings.position_embedding.weight"][:n]  # (S, H)
        width = h.shape[-1]
        head = width // self.heads
        kept = None
        for i in range(self.layers):
            if i == keep:
                kept = h
            pre = f"encoder.layers.{i}."
            last = eos_only and i == self.layers - 1
            a = self.norm(p, h, pre + "layer_norm1")
            q = lin(a[-1:] if last else a, pre + "self_attn.q_proj")
            k = lin(a, pre + "self_attn.k_proj")
            v = lin(a, pre + "self_attn.v_proj")
            # (1, heads, ., d): with a batch axis torch can pick its fused CPU attention kernel, forward and
            # backward; the 3-d form only reaches the unfused maths
            q, k, v = (t.view(1, t.shape[0], self.heads, head).transpose(1, 2) for t in (q, k, v))
            o = F.scaled_dot_product_attention(q, k, v, is_causal=not last)  # the EOS row sees every token
            o = lin(o[0].transpose(0, 1).reshape(-1, width), pre + "self_attn.out_proj")
            h = (h[-1:] if last else h) + o
            m = self.act(lin(self.norm(p, h, pre + "layer_norm2"), pre + "mlp.fc1"))
            h = h + lin(m, pre + "mlp.fc2")
        return h, (h if keep == self.layers else kept)


class TunedWeights:
    """The tensors one prompt's tuning moves, and the Adam state of its large weights: their one owner.

    ``params`` maps names to the tensors the tuned tower runs on (copies, never the pipeline's own). With
    ``matrices`` (the EOS path) each large weight is an ``AdamMatrix`` whose last step may still be pending;
    ``finish`` takes it, runs every token through the tuned tower, and closes the state, so no step can be dropped
    and none taken twice."""

    def __init__(self, tower: TextTower, params: dict[str, torch.Tensor], adam: AdamSettings | None = None,
                 keep_copies: bool = False, engine: EngineSettings | None = None):
        """``adam``: given, the large weights are tuned here (``AdamMatrix``); None, they are ordinary tensors that
        an optimizer outside moves. ``keep_copies``: the tuned copies outlive ``release`` (for the caller), so
        they are not carved from memory the next prompt reuses (workspace.py). ``engine``: memory mode and reuse
        (None: the environment's defaults); its ``kernels`` apply where the caller applies them
        (``EngineSettings.applied``, as ``personalize`` does)."""
        self.tower, self.params, self.shape = tower, params, _Layers(tower)
        self.engine = resolve(engine)
        scratch: dict = {}
        self.moments: dict[str, str] = {}  # with ``adam``: "kept" or "rebuilt" for each large weight
        if adam is not None:
            weights = {name: t for name, t in params.items() if is_matrix(name)}
            device = next(iter(weights.values())).device if weights else torch.device("cpu")
            self.moments = choose_moments(self.engine.memory, weights, device)
        self.keep_copies = keep_copies
        self.blocks = self._lease_blocks()
        self.matrices = {name: AdamMatrix(params, name, scratch, adam, self.blocks, rebuilt=mode == "rebuilt")
                         for name, mode in self.moments.items()}
        self.finished = False

    def _lease_blocks(self) -> tuple[HugeBlock | None, HugeBlock | None]:
        """One block for the large weights' float32 copies and one for their kept moments, on the CPU (see
        ``HugeBlock`` and workspace.py); none elsewhere."""
        weights = [self.params[name] for name in self.moments]
        if not weights or weights[0].device.type != "cpu":
            return None, None
        device, dtypes = weights[0].device, moment_dtypes(weights[0].device)
        copies = sum(block_bytes(w.numel(), torch.float32) for w in weights)
        kept = sum(block_bytes(self.params[n].numel(), d) for n, mode in self.moments.items() if mode == "kept"
                   for d in dtypes)
        reuse = self.engine.reuse_memory
        return (HugeBlock(copies, device) if self.keep_copies else WORKSPACE.lease("copies", copies, device, reuse),
                WORKSPACE.lease("moments", kept, device, reuse) if kept else None)

    def release(self) -> None:
        """Drop the large weights' tuned copies (unless ``keep_copies``) and moments, and hand their memory back
        for the next prompt. The tuned tensors are unusable after this."""
        for name, matrix in self.matrices.items():
            matrix.exp_avg = matrix.exp_avg_sq = matrix.pending = None
            matrix.history = []
            if not self.keep_copies:
                matrix.weight = None
                self.params.pop(name, None)
        copies, moments = self.blocks
        self.blocks = (None, None)
        if not self.keep_copies:
            WORKSPACE.give_back(copies, "copies")
        WORKSPACE.give_back(moments, "moments")

    def small_parameters(self) -> list[torch.Tensor]:
        """Everything an ordinary optimizer moves: embeddings, biases, layer norms (and the matrices without
        ``adam``)."""
        return [t for name, t in self.params.items() if name not in self.matrices]

    def _tuning_linear(self, x: torch.Tensor, prefix: str) -> torch.Tensor:
        return _AdamLinear.apply(x, self.params[prefix + ".bias"], self.matrices[prefix + ".weight"])

    def eos_state(self, ids: torch.Tensor) -> torch.Tensor:
        """(E,) local token ids ending at the first EOS -> (1, H) final-layer-normed state at that EOS, with the
        large weights' Adam steps taken in the backward pass (or at their next product)."""
        if self.finished:
            raise RuntimeError("this prompt's tuning is finished")
        h, _ = self.shape.run(self.params, ids, self._tuning_linear, eos_only=True)
        return self.shape.norm(self.params, h, "final_layer_norm")  # (1, H)

    @torch.no_grad()
    def finish(self, ids: torch.Tensor, keep: int, norm_kept: bool = True) -> tuple[torch.Tensor, torch.Tensor]:
        """Take the pending steps and run every token through every layer on the tuned tensors, with tuning's
        products (the transformers module's generic ones are slower on few rows): (final-normed last layer, state
        after ``keep`` layers, final-normed unless ``norm_kept`` is False), each (S, H). After this the state is
        closed."""
        if self.finished:
            raise RuntimeError("this prompt's tuning is already finished")
        self.finished = True

        def lin(x, prefix):
            name, bias = prefix + ".weight", self.params[prefix + ".bias"]
            if name in self.matrices:
                return self.matrices[name].forward(x, bias, last=True)  # the last pending step, then the product
            return linear(x, self.params[name], bias)

        h, kept = self.shape.run(self.params, ids, lin, eos_only=False, keep=keep)
        if any(m.pending is not None for m in self.matrices.values()):
            raise RuntimeError("an Adam step was left pending")  # every large weight is read by the full pass
        last = self.shape.norm(self.params, h, "final_layer_norm")
        if not norm_kept:
            return last, kept
        return last, (last if kept is h else self.shape.norm(self.params, kept, "final_layer_norm"))

    @torch.no_grad()
    def encode(self, ids: torch.Tensor, keep: int, norm_kept: bool = True) -> torch.Tensor:
        """After ``finish``: the state after ``keep`` layers (final-normed unless ``norm_kept`` is False) for more
        tokens (S,) (another chunk of a long prompt), on the tuned tensors as they were left. (S, H)"""
        if not self.finished:
            raise RuntimeError("finish the tuning first")
        h, kept = self.shape.run(self.params, ids, lambda x, prefix: linear(
            x, self.params[prefix + ".weight"], self.params[prefix + ".bias"]), eos_only=False, keep=keep)
        return self.shape.norm(self.params, kept, "final_layer_norm") if norm_kept else kept
