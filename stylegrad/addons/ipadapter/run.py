"""What a request's IP-Adapter fields ask of one pipeline, put together for the Runner: the adapter file (read
once, kept), its image encoder (found once, loaded only when a picture is not cached), the pictures' embeddings
(or a style's vector), the per-layer scales, what the PNG records, and the pipeline-call arguments."""

from __future__ import annotations

from collections import OrderedDict
from contextlib import AbstractContextManager
from dataclasses import dataclass, field

import torch

from stylegrad.addons.ipadapter.apply import Built, build, check_fits, installed
from stylegrad.addons.ipadapter.blocks import chosen_blocks, describe, scale_config
from stylegrad.addons.ipadapter.embeds import PictureEmbedder, encoder_identity
from stylegrad.addons.ipadapter.encoder import find_encoder, load_encoder
from stylegrad.addons.ipadapter.files import AdapterFile, read_adapter
from stylegrad.addons.ipadapter.library import AdapterLibrary
from stylegrad.addons.ipadapter.styleside import style_embeds
from stylegrad.devices import execution_device
from stylegrad.errors import StylegradError
from stylegrad.files.hashes import sha256_file
from stylegrad.notes import note


@dataclass
class IPAdapterCall:
    """One request's adapter, ready: ``applied(unet)`` around the denoising, ``pipeline_kwargs`` into the call."""

    adapter: AdapterFile
    embeds: torch.Tensor  # (1, D) or (1, T, W): the pictures' mean (or the style's vector)
    negative: torch.Tensor  # zeros (base) or the all-zero picture's states (plus, full)
    scales: float | dict  # diffusers' set_ip_adapter_scale value
    fields: dict = field(default_factory=dict)  # the PNG's IP-Adapter fields
    built: Built | None = None  # its modules for the UNet, kept by IPAdapters between requests

    def applied(self, unet) -> AbstractContextManager:
        return installed(unet, self.adapter, self.scales, self.built)

    def pipeline_kwargs(self, unet, guidance: bool) -> dict:
        """``ip_adapter_image_embeds`` as diffusers' ``prepare_ip_adapter_image_embeds`` takes it: one entry for
        the one adapter, (negative, positive) stacked when the call runs classifier-free guidance."""
        w = next(unet.parameters())
        pos = self.embeds[None].to(w.device, w.dtype)  # (1, 1, D) or (1, 1, T, W): one picture slot
        if not guidance:
            return {"ip_adapter_image_embeds": [pos]}
        return {"ip_adapter_image_embeds": [torch.cat([self.negative[None].to(w.device, w.dtype), pos])]}


def _short(path: str) -> str:
    return sha256_file(path)[:10]


class IPAdapters:
    """One pipeline's adapters and encoders, kept between requests (two adapter files, one embedder per encoder,
    device and dtype)."""

    def __init__(self, folders: list[str] | None = None):
        self._folders = folders
        self._library: AdapterLibrary | None = None
        self._files: OrderedDict[str, AdapterFile] = OrderedDict()
        self._embedders: dict[tuple, PictureEmbedder] = {}
        self._built: OrderedDict[tuple, Built] = OrderedDict()  # (adapter file, UNet) -> its modules
        self._noted: set[str] = set()

    @property
    def library(self) -> AdapterLibrary:
        if self._library is None:
            self._library = AdapterLibrary(self._folders)
        return self._library

    def adapter(self, name: str) -> AdapterFile:
        path = str(self.library.resolve(name))
        if path not in self._files:
            if len(self._files) >= 2:
                self._files.popitem(last=False)
            self._files[path] = read_adapter(path)
        self._files.move_to_end(path)
        return self._files[path]

    def embedder(self, adapter: AdapterFile, given: str | None, unet) -> PictureEmbedder:
        folders = self.library.clip_vision_folders(adapter.path)
        where = find_encoder(adapter.shape, given, folders)
        device = execution_device(unet)
        dtype = next(unet.parameters()).dtype
        key = (where, str(device), dtype)
        if key not in self._embedders:
            identity = where if where.startswith("hub:") else encoder_identity(where)
            self._embedders[key] = PictureEmbedder(identity, lambda: load_encoder(where, folders, device, dtype), dtype)
        return self._embedders[key]

    def for_request(self, request, unet, family: str, style=None) -> IPAdapterCall | None:
        """The request's adapter on this UNet (None without ``ip_adapter``); every refusal is one line."""
        if request.ip_adapter is None:
            return None
        adapter = self.adapter(request.ip_adapter)
        check_fits(unet, adapter)
        fields = {"IP-Adapter": adapter.name, "IP-Adapter hash": adapter.short_hash,
                  "IP-Adapter file": request.ip_adapter, "IP-Adapter scale": request.ip_scale}
        if request.ip_images:
            embedder = self.embedder(adapter, request.ip_image_encoder, unet)
            embeds, negative = embedder.embeds(list(request.ip_images), adapter.shape.hidden_states)
            fields.update({"IP-Adapter images": "|".join(request.ip_images),
                           "IP-Adapter image hashes": " ".join(_short(p) for p in request.ip_images),
                           "IP-Adapter encoder": request.ip_image_encoder})
        elif style is not None:
            embeds, unit = style_embeds(style, adapter.shape)
            negative = torch.zeros_like(embeds)
            if unit:
                self._note_once(f"style '{style.name}' is unit length: IP-Adapter reads raw CLIP image embeddings, "
                                "so it acts with another strength than the pictures would (a style made with "
                                "--mean raw is their exact average)")
            fields["IP-Adapter source"] = "style"
        else:
            raise StylegradError("IP-Adapter needs reference pictures (--ip-image) or a style to act as them")
        blocks = chosen_blocks(family, request.ip_style, request.ip_blocks)
        lpb = unet.config.layers_per_block
        if blocks is not None and isinstance(lpb, (list, tuple)):
            raise StylegradError("InstantStyle blocks need a UNet with one layers_per_block for every block")
        transformers = {"down": lpb, "up": lpb + 1} if blocks is not None else {}
        scales = scale_config(blocks, request.ip_scale, transformers)
        if blocks is not None:
            fields.update({"IP-Adapter style": "True" if request.ip_style else None,
                           "IP-Adapter blocks": request.ip_blocks, "IP-Adapter layers": describe(blocks)})
        return IPAdapterCall(adapter, embeds, negative, scales, fields, self.built(unet, adapter))

    def built(self, unet, adapter: AdapterFile) -> Built:
        """The adapter's modules for ``unet``, made once (the last two kept)."""
        key = (str(adapter.path), id(unet))
        if key not in self._built:
            if len(self._built) >= 2:
                self._built.popitem(last=False)
            self._built[key] = build(unet, adapter)
        self._built.move_to_end(key)
        return self._built[key]

    def _note_once(self, message: str) -> None:
        if message not in self._noted:
            self._noted.add(message)
            note(message)


def resolve_name(name: str, folders: list[str] | None = None) -> str:
    """``--ip-adapter``'s FILE_OR_NAME as a file path (the CLI resolves names in ``--ip-adapters`` folders)."""
    return str(AdapterLibrary(folders).resolve(name))


