"""A hypernetwork's settings and the layers they imply. A1111 stores only the tensors of its ``nn.Sequential``
(``linear.{i}.weight/bias``), so the index ``i`` of each Linear depends on the settings: per step of
``layer_structure`` a Linear, then the activation (not after the last Linear unless ``activate_output``; none for
'linear' or no activation), then a LayerNorm (every step, the last included, with ``is_layer_norm``), then a Dropout
where ``dropout_structure`` has a probability. Dropout is off at inference; it is kept in the layout only because
it shifts the indices of the layers after it."""

from __future__ import annotations

import inspect
from dataclasses import dataclass, field

from stylegrad.errors import StylegradError

DROPOUT = 0.3  # A1111's probability where use_dropout is set without a dropout_structure


def activations() -> dict:
    """A1111's activation names: its own short list ('swish' is Hardswish), then every class of
    ``torch.nn.modules.activation`` by its lower-cased name."""
    import torch

    named = {"linear": torch.nn.Identity, "relu": torch.nn.ReLU, "leakyrelu": torch.nn.LeakyReLU,
             "elu": torch.nn.ELU, "swish": torch.nn.Hardswish, "tanh": torch.nn.Tanh, "sigmoid": torch.nn.Sigmoid}
    module = torch.nn.modules.activation
    for name, cls in inspect.getmembers(module, inspect.isclass):
        if cls.__module__ == module.__name__:
            named[name.lower()] = cls
    return named


def dropout_structure(layers: tuple[float, ...], use_dropout: bool, last_layer_dropout: bool) -> tuple[float, ...]:
    """A1111's dropout per layer boundary when a file has no ``dropout_structure``: 0.3 after every hidden layer but
    the last one (that one too with ``last_layer_dropout``), never after the output."""
    if not use_dropout:
        return (0.0,) * len(layers)
    return (0.0, *[DROPOUT] * (len(layers) - 3), DROPOUT if last_layer_dropout else 0.0, 0.0)


@dataclass(frozen=True)
class HypernetSettings:
    """What an A1111 hypernetwork file says about itself, with A1111's reading of what it leaves out."""

    layer_structure: tuple[float, ...] = (1.0, 2.0, 1.0)
    activation_func: str | None = None  # None and 'linear': no activation
    is_layer_norm: bool = False
    weight_initialization: str = "Normal"
    use_dropout: bool = False
    dropout_structure: tuple[float, ...] = ()  # empty: from use_dropout and last_layer_dropout
    last_layer_dropout: bool = False
    activate_output: bool = True  # A1111 reads True when the file does not say; ComfyUI False
    name: str | None = None
    step: int = 0
    sd_checkpoint: str | None = None
    sd_checkpoint_name: str | None = None
    optional_info: str | None = None
    extra: dict = field(default_factory=dict, compare=False)  # keys A1111 does not read

    def __post_init__(self):
        s = self.layer_structure
        if len(s) < 2 or s[0] != 1 or s[-1] != 1 or any(not x > 0 for x in s):
            raise StylegradError(f"layer_structure must start and end with 1 and be positive, got {list(s)}")
        if self.dropout_structure and len(self.dropout_structure) != len(s):
            raise StylegradError(f"dropout_structure {list(self.dropout_structure)} does not match layer_structure "
                                 f"{list(s)}")
        if any(not 0 <= p < 1 for p in self.dropouts):
            raise StylegradError(f"dropout probabilities must be in [0, 1), got {list(self.dropouts)}")
        if self.activation_func not in (None, "linear") and self.activation_func not in activations():
            raise StylegradError(f"activation_func {self.activation_func!r} is not one A1111 knows")

    @property
    def dropouts(self) -> tuple[float, ...]:
        return self.dropout_structure or dropout_structure(self.layer_structure, self.use_dropout,
                                                           self.last_layer_dropout)

    @property
    def activation(self) -> str:
        return self.activation_func or "linear"

    def describe(self) -> str:
        parts = [f"layers {_structure(self.layer_structure)}", f"activation {self.activation}"]
        if self.activation != "linear":
            parts.append(f"activate output {'yes' if self.activate_output else 'no'}")
        if self.is_layer_norm:
            parts.append("layer norm")
        if any(self.dropouts):
            parts.append(f"dropout {_structure(self.dropouts)} (off when generating)")
        return ", ".join(parts)


def _structure(values) -> str:
    return "[" + ", ".join(f"{v:g}" for v in values) + "]"


def layers(settings: HypernetSettings, width: int) -> list[tuple[str, object]]:
    """The module's ``nn.Sequential``, as (kind, argument) in index order: ('linear', (in, out)),
    ('activation', name), ('norm', width), ('dropout', p)."""
    s = settings.layer_structure
    out: list[tuple[str, object]] = []
    for i in range(len(s) - 1):
        n_in, n_out = int(width * s[i]), int(width * s[i + 1])
        out.append(("linear", (n_in, n_out)))
        last = i == len(s) - 2
        if settings.activation != "linear" and (not last or settings.activate_output):
            out.append(("activation", settings.activation))
        if settings.is_layer_norm:
            out.append(("norm", n_out))
        if settings.dropouts[i + 1] > 0:
            out.append(("dropout", settings.dropouts[i + 1]))
    return out


def build(settings: HypernetSettings, width: int):
    """The ``nn.Sequential`` A1111 builds for ``width`` (CPU, float32, uninitialised values; eval mode)."""
    import torch

    modules = []
    for kind, arg in layers(settings, width):
        if kind == "linear":
            modules.append(torch.nn.Linear(*arg, device="meta"))
        elif kind == "activation":
            try:
                modules.append(activations()[arg]())
            except TypeError as e:
                raise StylegradError(f"activation_func {arg!r} needs arguments A1111 does not give it") from e
        elif kind == "norm":
            modules.append(torch.nn.LayerNorm(arg, device="meta"))
        else:
            modules.append(torch.nn.Dropout(arg))
    return torch.nn.Sequential(*modules).eval()
