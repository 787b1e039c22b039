"""Reading and writing A1111's hypernetwork files. The file is a torch pickle of a dict: integer keys are context
widths (320, 640, 768, 1024, 1280, ...), each a pair of module state dicts (keys, values) with ``linear.{i}.weight``
/ ``.bias``; string keys are the settings (``layout.HypernetSettings``) plus ``name``, ``step``, ``sd_checkpoint``
and ``sd_checkpoint_name``. NovelAI's original files have ``linear1``/``linear2`` and no settings: A1111 reads them
as ``[1, 2, 1]`` without activation. Read as data (``weights_only``); an optimizer sidecar ``NAME.pt.optim`` is
training state and not read here."""

from __future__ import annotations

import math
from dataclasses import dataclass, fields
from pathlib import Path

from stylegrad.addons.hypernetworks.layout import HypernetSettings, build
from stylegrad.errors import StylegradError

NOVELAI = {"linear1.weight": "linear.0.weight", "linear1.bias": "linear.0.bias",
           "linear2.weight": "linear.1.weight", "linear2.bias": "linear.1.bias"}  # A1111's renaming of old files
PREFIX = "linear."  # A1111's HypernetworkModule keeps its layers as the Sequential ``linear``
READINGS = ("a1111", "comfyui")  # what a file that does not state activate_output means: A1111 True, ComfyUI False


@dataclass
class HypernetworkFile:
    path: Path
    name: str  # the file's stem: what tags and the folder call it (the file's own 'name' is in settings)
    settings: HypernetSettings
    modules: dict  # width -> (keys module, values module): nn.Sequential, CPU, the file's values, eval mode
    states: dict  # width -> (keys state dict, values state dict): the file's tensors as read
    novelai: bool = False

    @property
    def widths(self) -> list[int]:
        return sorted(self.modules)

    def describe(self) -> str:
        s = self.settings
        origin = "NovelAI original, read as " if self.novelai else ""
        text = f"{origin}{s.describe()}; context widths {', '.join(map(str, self.widths))}"
        if s.step:
            text += f"; step {s.step}"
        if s.sd_checkpoint_name or s.sd_checkpoint:
            text += f"; trained on {s.sd_checkpoint_name or '?'}" + (f" [{s.sd_checkpoint}]" if s.sd_checkpoint else "")
        return text


def _setting(raw: dict, key: str, kinds, default):
    value = raw.get(key, default)
    if value is None or isinstance(value, kinds):
        return value
    raise StylegradError(f"setting {key!r} has the wrong type ({type(value).__name__})")


def _numbers(value, key: str) -> tuple[float, ...] | None:
    if value is None:
        return None
    if not isinstance(value, (list, tuple)) or not all(isinstance(v, (int, float)) and not isinstance(v, bool)
                                                        and math.isfinite(v) for v in value):
        raise StylegradError(f"setting {key!r} must be a list of numbers, got {str(value)[:60]}")
    return tuple(float(v) for v in value)


def parse_settings(raw: dict, reading: str = "a1111") -> HypernetSettings:
    """The settings of a file's dict as A1111 reads them (``reading='comfyui'``: a missing activate_output is
    False, as ComfyUI reads it)."""
    if reading not in READINGS:
        raise StylegradError(f"reading must be one of {', '.join(READINGS)}, got {reading!r}")
    known = {f.name for f in fields(HypernetSettings)} - {"extra"}
    dropouts = _numbers(raw.get("dropout_structure"), "dropout_structure")
    use_dropout = bool(_setting(raw, "use_dropout", bool, False))
    if dropouts is not None and any(dropouts):
        use_dropout = True  # A1111: a dropout structure with a probability means dropout is used
    step = _setting(raw, "step", int, 0)
    return HypernetSettings(
        layer_structure=_numbers(raw.get("layer_structure"), "layer_structure") or (1.0, 2.0, 1.0),
        activation_func=_setting(raw, "activation_func", str, None),
        is_layer_norm=bool(_setting(raw, "is_layer_norm", bool, False)),
        weight_initialization=_setting(raw, "weight_initialization", str, "Normal") or "Normal",
        use_dropout=use_dropout, dropout_structure=dropouts or (),
        last_layer_dropout=bool(_setting(raw, "last_layer_dropout", bool, False)),
        activate_output=bool(_setting(raw, "activate_output", bool, reading == "a1111")),
        name=_setting(raw, "name", str, None), step=step or 0,
        sd_checkpoint=_setting(raw, "sd_checkpoint", str, None),
        sd_checkpoint_name=_setting(raw, "sd_checkpoint_name", str, None),
        optional_info=_setting(raw, "optional_info", str, None),
        extra={k: v for k, v in raw.items() if isinstance(k, str) and k not in known})


def _state(value, width: int, which: str) -> tuple[dict, bool]:
    import torch

    if not isinstance(value, dict) or not all(isinstance(k, str) and isinstance(t, torch.Tensor)
                                              for k, t in value.items()):
        raise StylegradError(f"width {width}: the {which} module is not a dict of tensors")
    old = any(k in NOVELAI for k in value)
    state = {NOVELAI.get(k, k): t for k, t in value.items()}
    wrong = [k for k in state if not k.startswith(PREFIX)]
    if wrong:
        raise StylegradError(f"width {width}: the {which} module has a key {wrong[0]!r} (A1111's are linear.N.*)")
    return state, old


def from_payload(payload, path: str | Path, reading: str = "a1111") -> HypernetworkFile:
    """A loaded file's dict -> its modules (each checked against the layout its settings imply)."""
    import torch

    path = Path(path)
    if not isinstance(payload, dict):
        raise StylegradError(f"hypernetwork {path.name}: not a hypernetwork file (a {type(payload).__name__})")
    widths = {k: v for k, v in payload.items() if isinstance(k, int) and not isinstance(k, bool)}
    if not widths:
        raise StylegradError(f"hypernetwork {path.name}: no context width keys (320, 640, 768, 1024, 1280)")
    try:
        settings = parse_settings({k: v for k, v in payload.items() if isinstance(k, str)}, reading)
    except StylegradError as e:
        raise StylegradError(f"hypernetwork {path.name}: {e}") from None
    modules, states, novelai = {}, {}, False
    for width, pair in widths.items():
        if width < 1 or not isinstance(pair, (list, tuple)) or len(pair) != 2:
            raise StylegradError(f"hypernetwork {path.name}: width {width} is not a pair of modules (keys, values)")
        made, read = [], []
        for which, value in zip(("keys", "values"), pair):
            try:
                state, old = _state(value, width, which)
            except StylegradError as e:
                raise StylegradError(f"hypernetwork {path.name}: {e}") from None
            novelai |= old
            module = build(settings, width)
            try:
                module.load_state_dict({k.removeprefix(PREFIX): t for k, t in state.items()}, strict=True,
                                       assign=True)
            except RuntimeError as e:
                raise StylegradError(f"hypernetwork {path.name}: width {width}, {which} module: its tensors do not "
                                     f"fit its settings ({settings.describe()}): "
                                     f"{str(e).splitlines()[-1].strip()[:160]}") from None
            with torch.no_grad():
                for t in module.state_dict().values():
                    if t.is_floating_point() and not torch.isfinite(t).all():
                        raise StylegradError(f"hypernetwork {path.name}: width {width} holds inf or NaN values")
            made.append(module)
            read.append(state)
        modules[width], states[width] = tuple(made), tuple(read)
    return HypernetworkFile(path, path.stem, settings, modules, states, novelai)


def read_hypernetwork(path: str | Path, reading: str = "a1111") -> HypernetworkFile:
    """An A1111 (or NovelAI) hypernetwork file, read as data. ``reading``: 'a1111' (a file that does not state
    activate_output has it on, as A1111 reads it) or 'comfyui' (off, as ComfyUI reads it)."""
    from stylegrad.files.pickles import NotATorchFile, UnsafePickle, load_pickle

    path = Path(path)
    if not path.is_file():
        raise StylegradError(f"hypernetwork not found: {path}")
    try:
        payload = load_pickle(path)
    except UnsafePickle as e:
        raise StylegradError(f"hypernetwork {path.name}: the pickle asks for {e}, which stylegrad does not load") \
            from None
    except NotATorchFile as e:
        raise StylegradError(f"hypernetwork {path.name}: not a torch file ({e})") from None
    return from_payload(payload, path, reading)


def hypernetwork_payload(states: dict, settings: HypernetSettings) -> dict:
    """What A1111's ``Hypernetwork.save`` writes: the width pairs, then the settings (plain tensors, numbers,
    strings, lists and None, so ``weights_only`` reads it)."""
    out: dict = {}
    for width, (k, v) in states.items():
        out[int(width)] = tuple({n: t.detach().float().cpu().contiguous() for n, t in m.items()} for m in (k, v))
    s = settings
    out.update({"step": s.step, "name": s.name, "layer_structure": list(s.layer_structure),
                "activation_func": s.activation_func, "is_layer_norm": s.is_layer_norm,
                "weight_initialization": s.weight_initialization, "sd_checkpoint": s.sd_checkpoint,
                "sd_checkpoint_name": s.sd_checkpoint_name, "activate_output": s.activate_output,
                "use_dropout": s.use_dropout, "dropout_structure": list(s.dropouts),
                "last_layer_dropout": s.dropouts[-2] != 0 if len(s.dropouts) > 1 else s.last_layer_dropout,
                "optional_info": s.optional_info})
    return out


def write_hypernetwork(path: str | Path, states: dict, settings: HypernetSettings,
                       optimizer_state: dict | None = None, optimizer_name: str = "AdamW") -> list[Path]:
    """``path`` in A1111's format, and with ``optimizer_state`` the ``PATH.optim`` sidecar A1111 writes beside it
    (optimizer name, the file's short hash, the state) so that A1111 resumes training from it."""
    import torch

    from stylegrad.files.atomic import atomic_path
    from stylegrad.files.hashes import short_hash

    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    with atomic_path(path) as tmp:
        torch.save(hypernetwork_payload(states, settings), tmp)
    written = [path]
    if optimizer_state is not None:
        optim = path.with_name(path.name + ".optim")
        with atomic_path(optim) as tmp:
            torch.save({"optimizer_name": optimizer_name, "hash": short_hash(path),
                        "optimizer_state_dict": optimizer_state}, tmp)
        written.append(optim)
    return written
