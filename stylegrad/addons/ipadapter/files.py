"""An IP-Adapter file read as data: ``.safetensors``, or a ``.bin``/``.pt`` pickle through stylegrad's
``weights_only`` loader (files/pickles.py); the tensors stay on the CPU in the file's dtype until ``apply`` moves
them where the UNet is. A file that is something else, or a FaceID adapter, is one line."""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

import torch

from stylegrad.addons.ipadapter.shapes import AdapterShape, adapter_shape
from stylegrad.errors import StylegradError
from stylegrad.files.hashes import sha256_file


@dataclass
class AdapterFile:
    path: Path
    shape: AdapterShape
    image_proj: dict[str, torch.Tensor]  # as the file names them, without 'image_proj.'
    ip_adapter: dict[str, torch.Tensor]  # '1.to_k_ip.weight', ... without 'ip_adapter.'

    @property
    def name(self) -> str:
        return self.path.stem

    @property
    def short_hash(self) -> str:
        """A1111's short hash (the first 10 hex digits of the file's sha256), as its ControlNet units record."""
        return sha256_file(self.path)[:10]

    def state_dict(self) -> dict[str, dict[str, torch.Tensor]]:
        """The two-part dict diffusers' ``load_ip_adapter`` takes."""
        return {"image_proj": dict(self.image_proj), "ip_adapter": dict(self.ip_adapter)}


def read_adapter(path: str | Path) -> AdapterFile:
    """The adapter in ``path``; anything else is a StylegradError saying what the file is."""
    from stylegrad.files.recognize import open_file

    p = Path(path).expanduser()
    info, content, _ = open_file(p)
    if info.kind != "ip-adapter":
        raise StylegradError(f"{p.name} is not an IP-Adapter file: it is {info.detail}")
    shape = adapter_shape(content.shapes, p.name)  # a FaceID or unknown projection: its one line
    tensors = {k: content.read(k) for k in content.shapes}
    proj = {k[len("image_proj."):]: v for k, v in tensors.items() if k.startswith("image_proj.")}
    layers = {k[len("ip_adapter."):]: v for k, v in tensors.items() if k.startswith("ip_adapter.")}
    return AdapterFile(p, shape, proj, layers)
