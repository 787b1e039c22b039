"""The maths of each adapter kind, as A1111 and LyCORIS document them, one small class each: tensors in, the
weight change ``delta`` out, and a side branch that adds the change to a module's output without touching it.

scale = alpha / rank where the file has an alpha (else 1), times the user's multiplier:
- LoRA / LoCon:  dW = up @ down; with ``lora_mid`` (Tucker), dW = mid x1 up x2 down
- DoRA (``dora_scale``): W' = m * (W + dW) / ||W + dW|| per input column; the change is W' - W (A1111's order:
  the multiplier scales the result)
- LoHa:  dW = (w1a @ w1b) * (w2a @ w2b)  (Hadamard product; with ``hada_t1/t2``, each factor is a Tucker product)
- LoKr:  dW = w1 kron w2, each side full or a product of two factors (``lokr_t2``: Tucker)
- full:  dW = diff (and a bias change diff_b)
- IA3:   dW = W * w, per output row (per input column with ``on_input``)
"""

from __future__ import annotations

import abc

import torch
import torch.nn.functional as F

from stylegrad.errors import StylegradError


def _tucker(t: torch.Tensor, wa: torch.Tensor, wb: torch.Tensor) -> torch.Tensor:
    """LyCORIS's Tucker form: core t (r, r', k, k), wa (r, out), wb (r', in) -> (out, in, k, k)."""
    return torch.einsum("i j k l, i p, j r -> p r k l", t, wa.flatten(1), wb.flatten(1))


def _cp(mid: torch.Tensor, up: torch.Tensor, down: torch.Tensor) -> torch.Tensor:
    """LoCon's ``lora_mid``: mid (r, r', k, k), up (out, r), down (r', in) -> (out, in, k, k)."""
    return torch.einsum("n m k l, i n, m j -> i j k l", mid, up.flatten(1), down.flatten(1))


def _flat2(t: torch.Tensor) -> torch.Tensor:
    return t.reshape(t.shape[0], -1)


class Adapter(abc.ABC):
    """One module's change. ``tensors`` keep the file's dtype and place (the CPU, as read); the maths run where
    the module they act on is, in float32 (or the input's dtype), on copies made by ``on``."""

    kind = "?"
    low_rank = False  # a side branch without forming dW

    def __init__(self, tensors: dict[str, torch.Tensor], alpha: float | None, rank: int | None = None):
        self.t = tensors
        self.scale = alpha / rank if alpha is not None and rank else 1.0
        if "scale" in tensors:
            self.scale = float(tensors["scale"])
        self.bias = tensors.get("diff_b")
        self._placed: dict[tuple[torch.device, torch.dtype], dict[str, torch.Tensor]] = {}

    def on(self, device: torch.device | str, dtype: torch.dtype, keep: bool = True) -> dict[str, torch.Tensor]:
        """The file's tensors on ``device``, floating ones in ``dtype`` (flags keep theirs). ``keep``: the copies
        are kept for the next call at the same place (a generation's every step), until ``forget``; a tensor
        already there in that dtype is the file's own, not a copy."""
        key = (torch.device(device), dtype)
        placed = self._placed.get(key)
        if placed is None:
            placed = {k: v.to(device=key[0], dtype=dtype if v.is_floating_point() else v.dtype)
                      for k, v in self.t.items()}
            if keep:
                self._placed[key] = placed
        return placed

    def forget(self) -> None:
        """Drop the copies ``on`` kept (when the hooks that used them are removed)."""
        self._placed.clear()

    def bias_on(self, device: torch.device | str, dtype: torch.dtype) -> torch.Tensor | None:
        """The bias change (``diff_b``) on ``device`` in ``dtype``, or None (a new tensor where it moves; its
        callers keep what they make of it)."""
        return None if self.bias is None else self.bias.to(device=device, dtype=dtype)

    @abc.abstractmethod
    def delta(self, t: dict[str, torch.Tensor], weight: torch.Tensor | None = None) -> torch.Tensor:
        """dW (before the scale and the user's multiplier), in the shape the file implies, from the tensors ``t``
        (``on``'s, in the dtype and on the device the maths run in) and, where needed, the module's ``weight``
        (already there)."""

    def check(self, shape: torch.Size) -> None:
        """Raise if the change cannot be read as a change of a weight of ``shape`` (worked out on meta tensors, so
        it needs no weights)."""
        t = {k: torch.empty(v.shape, dtype=v.dtype, device="meta") for k, v in self.t.items()}
        got = self.delta(t, torch.empty(shape, device="meta")).shape
        if got.numel() != shape.numel() or got[0] != shape[0]:
            raise StylegradError(f"a {self.kind} change of shape {tuple(got)} does not fit a weight of shape "
                                 f"{tuple(shape)}")

    needs_weight = False

    def full_delta(self, weight: torch.Tensor, multiplier: float, device: torch.device | str | None = None,
                   keep: bool = False) -> torch.Tensor:
        """The change to ``weight`` at this multiplier, in its shape and float32, on ``device`` (default the
        weight's: the module's). ``keep``: keep the float32 copies of the file's tensors there (see ``on``); the
        callers that form dW once for many uses keep dW instead."""
        device = weight.device if device is None else device
        t = self.on(device, torch.float32, keep)
        w = weight.detach().to(device=device, dtype=torch.float32) if self.needs_weight else None
        d = self.delta(t, w).reshape(weight.shape) * self.scale
        if "dora_scale" in t:
            d = _dora(d, w, t["dora_scale"])
        return d * multiplier


def _dora(d: torch.Tensor, w: torch.Tensor, m: torch.Tensor) -> torch.Tensor:
    """W' - W with W' = m * (W + dW) / ||W + dW||: the norm per output row where ``m`` has one value per row
    (LyCORIS's ``wd_on_output``), else per input column (kohya's, A1111's)."""
    merged = w + d
    if m.shape[0] == merged.shape[0] and m.numel() == merged.shape[0]:
        norm = merged.reshape(merged.shape[0], -1).norm(dim=1).reshape(-1, *[1] * (merged.dim() - 1))
    else:
        norm = merged.transpose(0, 1).reshape(merged.shape[1], -1).norm(dim=1)
        norm = norm.reshape(merged.shape[1], *[1] * (merged.dim() - 1)).transpose(0, 1)
    return merged * (m.reshape(norm.shape) / norm) - w


class LoRA(Adapter):
    """kohya's ``lora_down``/``lora_up`` (+ ``lora_mid``), PEFT's ``lora_A``/``lora_B``: low rank."""

    kind = "LoRA"

    def __init__(self, tensors, alpha, rank=None):
        super().__init__(tensors, alpha, tensors["down"].shape[0])
        self.low_rank = "dora_scale" not in tensors

    def delta(self, t, weight=None):
        up, down = t["up"], t["down"]
        if "mid" in t:
            return _cp(t["mid"], up, down)
        d = _flat2(up) @ _flat2(down)  # (out, in * k * k)
        return d.reshape(up.shape[0], *down.shape[1:]) if down.dim() == 4 else d

    def side(self, module: torch.nn.Module, x: torch.Tensor) -> torch.Tensor:
        """up(mid(down(x))) * scale on ``module``'s input, without forming dW: the factors on ``x``'s device in its
        dtype (copied once per place, see ``on``)."""
        t = self.on(x.device, x.dtype)
        up, down = t["up"], t["down"]
        if isinstance(module, torch.nn.Conv2d):
            if "mid" in t:
                h = F.conv2d(x, down.reshape(*down.shape[:2], 1, 1) if down.dim() == 2 else down)
                h = F.conv2d(h, t["mid"], None, module.stride, module.padding, module.dilation)
            else:
                d4 = down if down.dim() == 4 else down.reshape(*down.shape, 1, 1)
                h = F.conv2d(x, d4, None, module.stride, module.padding, module.dilation, module.groups)
            return F.conv2d(h, up.reshape(up.shape[0], up.shape[1], 1, 1)) * self.scale
        return F.linear(F.linear(x, _flat2(down)), _flat2(up)) * self.scale


class LoHa(Adapter):
    kind = "LoHa"

    def __init__(self, tensors, alpha, rank=None):
        super().__init__(tensors, alpha, tensors["hada_w1_b"].shape[0])

    def delta(self, t, weight=None):
        if "hada_t1" in t:
            return _tucker(t["hada_t1"], t["hada_w1_a"], t["hada_w1_b"]) * _tucker(t["hada_t2"], t["hada_w2_a"],
                                                                                   t["hada_w2_b"])
        return (_flat2(t["hada_w1_a"]) @ _flat2(t["hada_w1_b"])) * (_flat2(t["hada_w2_a"]) @ _flat2(t["hada_w2_b"]))


class LoKr(Adapter):
    kind = "LoKr"

    def __init__(self, tensors, alpha, rank=None):
        dim = next((tensors[k].shape[0] for k in ("lokr_w1_b", "lokr_w2_b") if k in tensors), None)
        super().__init__(tensors, alpha, dim)
        if dim is None:  # both sides full: alpha does not apply
            self.scale = float(tensors["scale"]) if "scale" in tensors else 1.0

    @staticmethod
    def _side(t: dict[str, torch.Tensor], n: int) -> torch.Tensor:
        if f"lokr_w{n}" in t:
            return t[f"lokr_w{n}"]
        a, b = t[f"lokr_w{n}_a"], t[f"lokr_w{n}_b"]
        if f"lokr_t{n}" in t:
            return _tucker(t[f"lokr_t{n}"], a, b)
        return a @ _flat2(b)

    def delta(self, t, weight=None):
        w1, w2 = self._side(t, 1), self._side(t, 2)
        a, b = w1.shape
        c, d = w2.shape[:2]
        kron = torch.einsum("ab,cd...->acbd...", w1, w2)  # (a, c, b, d, k, k): torch.kron without its views
        return kron.reshape(a * c, b * d, *w2.shape[2:])


class Full(Adapter):
    kind = "full"

    def delta(self, t, weight=None):
        return t["diff"]


class IA3(Adapter):
    kind = "IA3"
    needs_weight = True

    def __init__(self, tensors, alpha, rank=None):
        super().__init__(tensors, alpha, rank)
        self.on_input = "on_input" in tensors and bool(tensors["on_input"].reshape(-1)[0])

    def delta(self, t, weight=None):
        w = t["weight"]
        on_input = self.on_input
        if weight is None:
            raise StylegradError("an IA3 change needs the weight it scales")
        shape = [1] * weight.dim()
        shape[1 if on_input else 0] = -1
        return weight.to(w.dtype) * w.reshape(shape)


# which tensors name which kind: the first whose marker key the module has
KINDS: list[tuple[str, type[Adapter]]] = [
    ("down", LoRA), ("hada_w1_a", LoHa), ("lokr_w1", LoKr), ("lokr_w1_a", LoKr), ("diff", Full), ("weight", IA3)]


def make_adapter(tensors: dict[str, torch.Tensor], alpha: float | None) -> Adapter:
    for marker, cls in KINDS:
        if marker in tensors:
            adapter = cls(tensors, alpha)
            if "dora_scale" in tensors:
                adapter.needs_weight = True
            return adapter
    raise StylegradError(f"unknown adapter tensors: {', '.join(sorted(tensors))}")
