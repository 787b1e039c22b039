"""Hypernetworks applied beside a UNet's weights, as A1111 applies them: in every attention layer (self- and
cross-attention) whose context width (the input width of ``to_k``/``to_v``) has a module, ``to_k`` reads
``c + hk(c)·m`` and ``to_v`` ``c + hv(c)·m`` instead of the context ``c``; with several hypernetworks the keys'
input goes through each one's keys module in turn (and the values' likewise). Done by forward pre-hooks for the
length of a block: the user's modules are never written. The file's tensors (CPU) are copied to the device and
dtype of the context when a layer first runs in the block, kept for the block and dropped with the hooks."""

from __future__ import annotations

from contextlib import contextmanager
from dataclasses import dataclass

import torch
from torch.func import functional_call

from stylegrad.addons.hypernetworks.formats import HypernetworkFile
from stylegrad.errors import StylegradError
from stylegrad.notes import note


@dataclass(frozen=True)
class Applied:
    """One hypernetwork at its multiplier."""

    file: HypernetworkFile
    multiplier: float


def attention_layers(unet: torch.nn.Module) -> list[tuple[str, torch.nn.Module]]:
    """(path, module) of every attention layer with separate ``to_k``/``to_v`` projections (diffusers'
    ``Attention``: attn1 and attn2 of each transformer block)."""
    found = []
    for path, m in unet.named_modules():
        k, v = getattr(m, "to_k", None), getattr(m, "to_v", None)
        if isinstance(k, torch.nn.Linear) and isinstance(v, torch.nn.Linear):
            found.append((path, m))
    return found


class Moved:
    """A module's tensors where and as the context is, made once per (device, dtype) while a block lasts."""

    def __init__(self):
        self.cache: dict = {}

    def params(self, module: torch.nn.Module, x: torch.Tensor) -> dict[str, torch.Tensor]:
        key = (id(module), x.device, x.dtype)
        if key not in self.cache:
            self.cache[key] = {n: t.to(device=x.device, dtype=x.dtype if t.is_floating_point() else t.dtype)
                               for n, t in module.state_dict(keep_vars=True).items()}
        return self.cache[key]


def residual(module: torch.nn.Module, x: torch.Tensor, multiplier: float, moved: Moved | None = None) -> torch.Tensor:
    """A1111's ``HypernetworkModule.forward``: ``x + mlp(x)·multiplier`` (dropout off)."""
    params = moved.params(module, x) if moved is not None else None
    out = functional_call(module, params, (x,)) if params is not None else module(x)
    return x + out * multiplier


class HypernetworkStack:
    """Hypernetworks with their multipliers, in the order A1111 chains them, bound to one UNet."""

    def __init__(self, unet: torch.nn.Module, nets: list[Applied]):
        self.unet, self.nets = unet, [n for n in nets if n.multiplier != 0]
        self.layers = attention_layers(unet)
        if any(getattr(m, "fused_projections", False) for _, m in self.layers):
            raise StylegradError("hypernetworks need the attention's own to_k and to_v (this UNet's projections "
                                 "are fused: unfuse_qkv_projections())")
        widths = {m.to_k.in_features for _, m in self.layers}
        for n in nets:
            if not widths & set(n.file.widths):
                raise StylegradError(f"hypernetwork {n.file.name} has modules for context widths "
                                     f"{', '.join(map(str, n.file.widths))}; this model's attention layers read "
                                     f"{', '.join(map(str, sorted(widths)))} (a hypernetwork for another model?)")

    def __bool__(self) -> bool:
        return bool(self.nets)

    def key(self) -> tuple:
        return tuple((str(n.file.path), n.multiplier) for n in self.nets)

    def chain(self, width: int, which: int) -> list[tuple[torch.nn.Module, float]]:
        """The modules the context of ``width`` goes through for keys (0) or values (1), in order."""
        return [(n.file.modules[width][which], n.multiplier) for n in self.nets if width in n.file.modules]

    @contextmanager
    def applied(self):
        """Within the block the UNet's attention layers read the hypernetworks' contexts; nothing of the UNet is
        written, and no hook is left after it."""
        moved = Moved()
        handles = []

        def hook_for(chain):
            def hook(module, args, kwargs):
                x = args[0]
                for m, mult in chain:
                    x = residual(m, x, mult, moved)
                return (x, *args[1:]), kwargs
            return hook

        try:
            for _, layer in self.layers:
                width = layer.to_k.in_features
                for which, proj in enumerate((layer.to_k, layer.to_v)):
                    chain = self.chain(width, which)
                    if chain:
                        handles.append(proj.register_forward_pre_hook(hook_for(chain), with_kwargs=True))
            if self.nets and not handles:
                note("hypernetworks: no attention layer of this UNet has a matching context width")
            yield self
        finally:
            for h in handles:
                h.remove()
            moved.cache.clear()
