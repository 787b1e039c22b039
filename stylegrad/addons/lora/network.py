"""LoRA files bound to a pipeline's modules. The user's modules are never written: during a generation each
patched module's output gets its change added by a forward hook (low-rank adapters run as two small products;
the others form their dW once, for that generation), and the hooks are gone afterwards. Text-encoder changes can
also be had as merged tensors (``text_params``) for code that runs the encoder's weights itself, such as tuning.
``merge_into`` writes the changes into modules, for baking into a checkpoint that stylegrad made itself."""

from __future__ import annotations

import json
from contextlib import contextmanager
from dataclasses import dataclass

import torch
import torch.nn.functional as F

from stylegrad.addons.lora.adapters import Adapter, LoRA, make_adapter
from stylegrad.addons.lora.formats import LoraFile, read_lora
from stylegrad.addons.lora.names import LORA_DIFFUSION_TARGETS, injection_order, lookup
from stylegrad.errors import StylegradError
from stylegrad.notes import note

COMPONENTS = {"unet": "unet", "te": "text_encoder", "te2": "text_encoder_2"}


@dataclass
class Patch:
    lora: str  # the file's name
    component: str
    path: str  # module path in the component
    module: torch.nn.Module
    adapter: Adapter
    multiplier: float

    def side(self, x: torch.Tensor, cache: dict) -> torch.Tensor:
        """This patch's share of the module's output for input ``x``, computed where ``x`` is and in its dtype (the
        module's place at the moment it runs, offloading included). ``cache`` keeps, per place, what is made once
        for every step: dW formed in float32 and cast, the scaled bias."""
        a, m = self.adapter, self.module
        conv = isinstance(m, torch.nn.Conv2d)
        if isinstance(a, LoRA) and a.low_rank:
            out = a.side(m, x) * self.multiplier
        else:
            key = (id(self), "delta", x.device, x.dtype)
            if key not in cache:
                cache[key] = a.full_delta(m.weight, self.multiplier, device=x.device).to(x.dtype)
            d = cache[key]
            out = F.conv2d(x, d, None, m.stride, m.padding, m.dilation, m.groups) if conv else F.linear(x, d)
        if a.bias is not None:
            key = (id(self), "bias", x.device, x.dtype)
            if key not in cache:
                b = a.bias_on(x.device, torch.float32) * self.multiplier
                cache[key] = (b.reshape(1, -1, 1, 1) if conv else b).to(x.dtype)
            out = out + cache[key]
        return out


def _bind_file(lora: LoraFile, components: dict[str, torch.nn.Module], te: float, unet: float) -> list[Patch]:
    patches, missing, unknown = [], [], []
    tables: dict[str, dict[str, str]] = {}
    orders: dict[str, list[str]] = {}
    for (component, name), tensors in lora.groups.items():
        model = components.get(component)
        if model is None:
            missing.append(f"{component}:{name}")
            continue
        if name.startswith("#"):
            if component not in orders:
                classes = lora.metadata.get("unet" if component == "unet" else "text_encoder")
                orders[component] = injection_order(model, json.loads(classes) if classes
                                                    else LORA_DIFFUSION_TARGETS[component])
            index = int(name[1:])
            path = orders[component][index] if index < len(orders[component]) else None
        else:
            if component not in tables:
                tables[component] = lookup(component, model)
            path = tables[component].get(name)
        if path is None:
            unknown.append(f"{component}:{name}")
            continue
        tensors = dict(tensors)
        alpha = tensors.pop("alpha", None)
        alpha = float(alpha) if alpha is not None else None
        if (component, name) in lora.rank_scale and alpha is None:
            alpha = lora.rank_scale[(component, name)] * tensors["down"].shape[0]
        try:
            adapter = make_adapter(tensors, alpha)
            module = model.get_submodule(path)
            adapter.check(module.weight.shape)
        except StylegradError as e:
            raise StylegradError(f"LoRA {lora.name}: {component} module {path}: {e} (a LoRA for another model "
                                 "family?)") from e
        patches.append(Patch(lora.name, component, path, module, adapter, te if component != "unet" else unet))
    failed = unknown + missing
    if failed and not patches:
        raise StylegradError(f"LoRA {lora.name} ({lora.format}) matches no module of this model: first keys that "
                             f"failed: {', '.join(failed[:4])} (a LoRA for another model family?)")
    if failed:
        what = "modules this model lacks" if missing and not unknown else "keys that match no module"
        note(f"LoRA {lora.name}: {len(failed)} of {len(lora.groups)} {what}, not applied: {', '.join(failed[:4])}")
    if lora.unread:
        note(f"LoRA {lora.name}: {len(lora.unread)} keys not read: {', '.join(lora.unread[:4])}")
    return patches


class LoraNetwork:
    """LoRA files with their multipliers, bound to one pipeline (or to the named components)."""

    def __init__(self, components: dict[str, torch.nn.Module], loras: list[tuple[LoraFile, float, float]]):
        """``loras``: (file, text-encoder multiplier, UNet multiplier)."""
        self.components = {k: v for k, v in components.items() if v is not None}
        self.loras = loras
        self.patches = [p for lora, te, unet in loras for p in _bind_file(lora, self.components, te, unet)]

    @classmethod
    def for_pipeline(cls, pipe, loras: list[tuple[str | LoraFile, float, float]]) -> LoraNetwork:
        components = {c: getattr(pipe, attr, None) for c, attr in COMPONENTS.items()}
        return cls(components, [(f if isinstance(f, LoraFile) else read_lora(f), te, unet) for f, te, unet in loras])

    def __bool__(self) -> bool:
        return bool(self.patches)

    def of(self, component: str) -> list[Patch]:
        return [p for p in self.patches if p.component == component and p.multiplier != 0]

    @contextmanager
    def applied(self, components: tuple[str, ...] = ("unet", "te", "te2"),
                targets: dict[str, torch.nn.Module] | None = None):
        """Within the block the named components compute as if the LoRAs were merged; nothing of theirs is written.
        ``targets``: another module tree to hook for a component (a parameter-free skeleton of it that is run with
        ``functional_call``), at the same paths."""
        by_module: dict[int, tuple[torch.nn.Module, list[Patch]]] = {}
        for p in self.patches:
            if p.component in components and p.multiplier != 0:
                module = targets[p.component].get_submodule(p.path) if targets and p.component in targets \
                    else p.module
                by_module.setdefault(id(module), (module, []))[1].append(p)
        cache: dict = {}
        handles = []

        def hook_for(patches):
            def hook(module, args, output):
                x = args[0]
                for p in patches:
                    output = output + p.side(x, cache)
                return output
            return hook

        try:
            for module, patches in by_module.values():
                handles.append(module.register_forward_hook(hook_for(patches)))
            yield self
        finally:
            for h in handles:
                h.remove()
            cache.clear()
            for _, patches in by_module.values():
                for p in patches:
                    p.adapter.forget()

    def text_params(self, component: str = "te") -> dict[str, torch.Tensor]:
        """Merged tensors of the text-encoder weights the LoRAs change: parameter name -> W + dW, new float32
        tensors on W's device (tuning runs in float32; the encoder's own are untouched). Empty where no LoRA changes
        this encoder."""
        merged: dict[str, torch.Tensor] = {}
        for p in self.of(component):
            w = p.module.weight.detach()
            key = p.path + ".weight"
            base = merged.get(key, w.float())
            merged[key] = base + p.adapter.full_delta(w, p.multiplier)
            if p.adapter.bias is not None and p.module.bias is not None:
                bkey = p.path + ".bias"
                b = p.module.bias.detach()
                merged[bkey] = merged.get(bkey, b.float()) + p.adapter.bias_on(b.device, torch.float32) * p.multiplier
        return merged

    def key(self) -> tuple:
        """What these LoRAs change, for caches keyed on it."""
        return tuple((lora.path, te, unet) for lora, te, unet in self.loras)

    @torch.no_grad()
    def merge_into(self) -> None:
        """Add every change to its module's weights, in place: for a model stylegrad loaded itself (baking)."""
        for p in self.patches:
            w = p.module.weight
            w.copy_((w.float() + p.adapter.full_delta(w, p.multiplier)).to(w.dtype))
            if p.adapter.bias is not None and p.module.bias is not None:
                b = p.module.bias
                b.copy_((b.float() + p.adapter.bias_on(b.device, torch.float32) * p.multiplier).to(b.dtype))
