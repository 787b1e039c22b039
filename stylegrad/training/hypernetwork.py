"""Hypernetworks as A1111 trains them: per context width, two small MLPs (keys, values) whose residual
``c + mlp(c)`` replaces the context ``to_k`` and ``to_v`` read in every attention layer of the UNet, everything
else frozen; written in A1111's file format (``NAME.pt``, which A1111, ComfyUI and stylegrad load) with the
optimizer's state beside it as A1111 writes it (``NAME.pt.optim``). Defaults are A1111's: layer structure
[1, 2, 1], 'linear' (no activation), no layer norm, no dropout, 'Normal' initialisation, learning rate 5e-6."""

from __future__ import annotations

from pathlib import Path

import torch
from torch import nn

from stylegrad.addons.hypernetworks.formats import write_hypernetwork
from stylegrad.addons.hypernetworks.layout import HypernetSettings, build
from stylegrad.addons.hypernetworks.network import attention_layers
from stylegrad.errors import StylegradError
from stylegrad.training.data import STYLE_TEMPLATES
from stylegrad.training.loop import Method, TrainSettings, train
from stylegrad.training.models import Models

DEFAULTS = {"steps": 1000, "lr": 5e-6, "batch_size": 1, "grad_accum": 1, "weight_decay": 1e-2}
INITS = ("Normal", "XavierUniform", "XavierNormal", "KaimingUniform", "KaimingNormal")


def initialise(module: nn.Sequential, how: str, activation: str) -> None:
    """A1111's initialisation: 'Normal' draws weights (LayerNorm's too) from N(0, 0.01) with zero biases; the
    Xavier and Kaiming ones draw the Linear weights so, LayerNorm's still from N(0, 0.01), biases zero."""
    nonlinearity = "leaky_relu" if activation == "leakyrelu" else "relu"
    with torch.no_grad():
        for layer in module:
            if not isinstance(layer, (nn.Linear, nn.LayerNorm)):
                if hasattr(layer, "reset_parameters"):  # an activation with a parameter (PReLU): torch's own start
                    layer.reset_parameters()
                continue
            w, b = layer.weight, layer.bias
            b.zero_()
            if how == "Normal" or isinstance(layer, nn.LayerNorm):
                nn.init.normal_(w, 0.0, 0.01)
            elif how == "XavierUniform":
                nn.init.xavier_uniform_(w)
            elif how == "XavierNormal":
                nn.init.xavier_normal_(w)
            elif how == "KaimingUniform":
                nn.init.kaiming_uniform_(w, nonlinearity=nonlinearity)
            else:
                nn.init.kaiming_normal_(w, nonlinearity=nonlinearity)


class SeededDropout(nn.Module):
    """Dropout drawing its masks from the method's generator (reset every step from the seed and the step), so a
    resumed run draws the masks the uninterrupted one drew."""

    def __init__(self, p: float, owner: Hypernetwork):
        super().__init__()
        self.p, self.owner = p, [owner]  # a list: not a submodule

    def forward(self, x):
        g = self.owner[0].dropout_generator
        keep = torch.rand(x.shape, generator=g).to(x.device) >= self.p
        return x * keep.to(x.dtype) / (1 - self.p)


class Hypernetwork(Method):
    name = "hypernetwork"
    templates = STYLE_TEMPLATES

    def __init__(self, models: Models, layer_structure=(1, 2, 1), activation: str = "linear",
                 layer_norm: bool = False, dropout_structure=None, use_dropout: bool = False,
                 last_layer_dropout: bool = False, activate_output: bool = False, weight_init: str = "Normal",
                 widths: list[int] | None = None, word: str | None = None, seed: int = 0, name: str | None = None):
        if weight_init not in INITS:
            raise StylegradError(f"weight initialisation must be one of {', '.join(INITS)}, got {weight_init!r}")
        self.settings = HypernetSettings(
            layer_structure=tuple(float(x) for x in layer_structure), activation_func=activation,
            is_layer_norm=layer_norm, weight_initialization=weight_init, use_dropout=use_dropout or
            bool(dropout_structure and any(dropout_structure)),
            dropout_structure=tuple(float(x) for x in dropout_structure) if dropout_structure else (),
            last_layer_dropout=last_layer_dropout, activate_output=activate_output, name=name)
        self.models, self.word, self.seed, self.step = models, word, seed, 0
        self.dropout_generator = torch.Generator()
        layers = attention_layers(models.unet)
        own = sorted({m.to_k.in_features for _, m in layers})
        self.widths = list(widths or own)
        if not set(self.widths) & set(own):
            raise StylegradError(f"none of the widths {self.widths} is a context width of this UNet ({own})")
        torch.manual_seed(seed)  # the modules' start, as LoRA's
        self.modules: dict[int, tuple[nn.Sequential, nn.Sequential]] = {}
        for width in self.widths:
            pair = []
            for _ in range(2):
                m = build(self.settings, width).to_empty(device=models.device).float()
                for i, layer in enumerate(m):
                    if isinstance(layer, nn.Dropout):
                        m[i] = SeededDropout(layer.p, self)
                initialise(m, weight_init, self.settings.activation)
                m.train().requires_grad_(True)
                pair.append(m)
            self.modules[width] = tuple(pair)
        self._hook(layers)
        self.reset_dropout()

    def _hook(self, layers) -> None:
        """The model is the method's own copy: its to_k/to_v read the trained contexts for the run (multiplier 1,
        as A1111 trains)."""
        def hook_for(module):
            def hook(_, args):
                x = args[0]
                return (x + module(x.to(torch.float32)).to(x.dtype), *args[1:])
            return hook

        for _, layer in layers:
            width = layer.to_k.in_features
            if width in self.modules:
                layer.to_k.register_forward_pre_hook(hook_for(self.modules[width][0]))
                layer.to_v.register_forward_pre_hook(hook_for(self.modules[width][1]))

    def reset_dropout(self) -> None:
        self.dropout_generator.manual_seed(self.seed * 1_000_003 + self.step)

    def trained(self) -> dict[str, torch.Tensor]:
        """In A1111's optimizer order (``Hypernetwork.weights``): width by width, the keys module then the values
        module, each layer's weight then bias."""
        out = {}
        for width, pair in self.modules.items():
            for which, m in zip("kv", pair):
                for name, p in m.named_parameters():
                    out[f"{width}.{which}.linear.{name}"] = p
        return out

    def after_step(self) -> None:
        self.step += 1
        self.reset_dropout()

    def describe(self) -> dict:
        return {"layer_structure": list(self.settings.layer_structure), "activation": self.settings.activation,
                "widths": self.widths}

    def export(self, out: str | Path, step: int, optimizer_state: dict | None = None,
               checkpoint: tuple[str | None, str | None] = (None, None)) -> list[Path]:
        """``out`` (.pt) as A1111 writes it, and ``out.optim`` with ``optimizer_state`` (A1111's AdamW state dict).
        ``checkpoint``: (short hash, name) of the model it was trained on."""
        out = Path(out).with_suffix(".pt")
        states = {w: tuple({f"linear.{k}": v for k, v in m.state_dict().items()} for m in pair)
                  for w, pair in self.modules.items()}
        from dataclasses import replace

        s = replace(self.settings, name=self.settings.name or out.stem, step=step, sd_checkpoint=checkpoint[0],
                    sd_checkpoint_name=checkpoint[1])
        return write_hypernetwork(out, states, s, optimizer_state)


def _checkpoint_of(model: str) -> tuple[str | None, str | None]:
    """A1111's sd_checkpoint (the model file's short hash) and sd_checkpoint_name (its stem); a folder's name."""
    p = Path(model)
    if p.is_file():
        from stylegrad.files.hashes import short_hash

        return short_hash(p), p.stem
    return None, p.name or model


def train_hypernetwork(images: list[str], out: str | Path, *, model: str, layer_structure=(1, 2, 1),
                       activation: str = "linear", layer_norm: bool = False, dropout_structure=None,
                       use_dropout: bool = False, last_layer_dropout: bool = False, activate_output: bool = False,
                       weight_init: str = "Normal", widths: list[int] | None = None, word: str | None = None,
                       device=None, dtype=None, vae: str | None = None, models_dir: str | None = None,
                       resume: bool = True, progress: bool = True, stop_after: int | None = None,
                       **settings) -> list[Path]:
    """A hypernetwork from the pictures (captions from .txt files beside them, else style templates with
    ``word``): ``out`` as A1111's .pt and its .pt.optim. ``dtype`` and ``mixed_precision`` as for
    ``train_lora``; the hypernetwork trains in float32. Settings not given are A1111's defaults."""
    from stylegrad.training.checkpoint import checkpoints
    from stylegrad.training.recipes import _load, _settings

    out = Path(out).with_suffix(".pt")
    s: TrainSettings = _settings(DEFAULTS, out, settings)
    if s.gradient_checkpointing and (use_dropout or (dropout_structure and any(dropout_structure))):
        raise StylegradError("gradient checkpointing recomputes the forward, which would draw other dropout masks: "
                             "train with dropout or with gradient checkpointing, not both")
    data, models = _load(images, s, model, device, dtype, vae, models_dir)
    method = Hypernetwork(models, layer_structure, activation, layer_norm, dropout_structure, use_dropout,
                          last_layer_dropout, activate_output, weight_init, widths, word, s.seed, out.stem)
    found = checkpoints(Path(s.work)) if resume else []
    if found:
        method.step = found[-1][0]
        method.reset_dropout()
    result = train(method, models, data, s, resume, progress, stop_after)
    last = checkpoints(Path(s.work))[-1][1]
    optimizer_state = torch.load(last / "optimizer.pt", map_location="cpu", weights_only=True)["optimizer"]
    return method.export(out, result["step"], optimizer_state, _checkpoint_of(model))
