"""What a request adds to the pipeline besides a style: its LoRAs (``--lora`` and the prompt's tags) and its
textual-inversion words (``--embedding`` files and the embeddings folders), resolved once per request and recorded
in the PNG as A1111 records them (``Lora hashes``, ``TI hashes``)."""

from __future__ import annotations

from dataclasses import dataclass, field

import torch

from stylegrad.addons.embeddings import EmbeddingLibrary, load_embedding, parse_embedding_arg
from stylegrad.addons.lora.library import LoraLibrary, lora_hash
from stylegrad.addons.lora.network import LoraNetwork
from stylegrad.errors import StylegradError
from stylegrad.notes import note
from stylegrad.prompts.syntax import extract_tags


@dataclass
class RequestAddons:
    loras: LoraNetwork | None
    embeddings: dict[str, dict[str, torch.Tensor]]  # text encoder ('' for SD, 'l'/'g' for SDXL) -> word -> (N, H)
    lora_hashes: dict[str, str] = field(default_factory=dict)
    ti_hashes: dict[str, str] = field(default_factory=dict)  # every embedding that could apply, by name

    def infotext_fields(self, used: list[str]) -> dict:
        ti = {n: self.ti_hashes[n] for n in used if self.ti_hashes.get(n)}
        return {"Lora hashes": ", ".join(f"{n}: {h}" for n, h in self.lora_hashes.items()) or None,
                "TI hashes": ", ".join(f"{n}: {h}" for n, h in ti.items()) or None}


class Addons:
    """The LoRA and embedding folders of one ``Generator``, and the LoRA networks bound to its pipeline."""

    def __init__(self, pipe, embeddings_dirs: list[str] | None = None, loras_dirs: list[str] | None = None):
        self.pipe = pipe
        self.library = EmbeddingLibrary(embeddings_dirs)
        self.lora_library = LoraLibrary(loras_dirs)
        self._networks: dict[tuple, LoraNetwork] = {}
        self._files: dict[str, object] = {}
        self._noted: set[str] = set()

    def _note_once(self, message: str) -> None:
        if message not in self._noted:
            self._noted.add(message)
            note(message)

    def lora_specs(self, request) -> list[tuple[str, float, float]]:
        """(file, te, unet) for ``request.loras`` and the tags of its prompt; a tag naming no file is noted."""
        specs = self.lora_library.specs(request.loras)
        _, tags = extract_tags(request.prompt)
        for tag in tags:
            path = self.lora_library.find(tag.name)
            if path is None:
                self._note_once(f"LoRA '{tag.name}' of the prompt's {tag.text()} is not in the LoRA folders "
                                f"({', '.join(map(str, self.lora_library.folders)) or 'none set: loras_dirs'}); "
                                "generating without it")
                continue
            specs.append((str(path), tag.te, tag.unet))
        if extract_tags(request.negative)[1]:
            self._note_once("LoRA tags in the negative prompt are removed and not applied (as in A1111)")
        return specs

    def for_request(self, request, encoders: dict[str, tuple[int, str]]) -> RequestAddons:
        """``encoders``: each text encoder's key, width and the part of an embedding file it takes
        (``{'': (768, '')}`` for SD1.x, ``{'l': (768, 'clip_l'), 'g': (1280, 'clip_g')}`` for SDXL)."""
        specs = self.lora_specs(request)
        key = tuple(specs)
        if key and key not in self._networks:
            if len(self._networks) >= 4:
                self._networks.pop(next(iter(self._networks)))
            self._networks[key] = LoraNetwork.for_pipeline(self.pipe, specs)
        network = self._networks.get(key) if key else None
        embeddings: dict[str, dict[str, torch.Tensor]] = {}
        ti_hashes: dict[str, str] = {}
        for enc, (width, part) in encoders.items():
            words = embeddings[enc] = self.library.for_encoder(width, part)
            for name in words:
                ti_hashes[name] = self.library.get(name).short_hash
            for arg in request.embeddings:
                path, token = parse_embedding_arg(arg)
                if arg not in self._files:
                    self._files[arg] = load_embedding(path, token)
                e = self._files[arg]
                v = e.for_width(width, part)
                if v is None:
                    raise StylegradError(f"embedding {e.describe()} does not fit this model's text encoder "
                                         f"({part or 'width'} {width})")
                words[e.name], ti_hashes[e.name] = v, e.short_hash
            for lora, _, _ in network.loras if network else ():
                for token, v in lora.embeddings.items():  # lora_diffusion's bundled tokens
                    if v.shape[-1] == width and not part:
                        words.setdefault(token, v.reshape(-1, width))
        for name, why in self.library.skipped.items():
            if all(name not in words for words in embeddings.values()):
                self._note_once(f"embedding {name} skipped: {why}")
        hashes = {}
        for lora, _, _ in network.loras if network else ():
            hashes[lora.name] = lora_hash(lora.path)
        return RequestAddons(network, embeddings, hashes, ti_hashes)
