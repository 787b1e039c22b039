"""What a request adds to the pipeline besides a style: its LoRAs (``--lora`` and the prompt's tags), its
textual-inversion words (``--embedding`` files and the embeddings folders) and its hypernetworks (``--hypernetwork``
and ``<hypernet:...>`` tags), resolved once per request and recorded in the PNG (``Lora hashes``, ``TI hashes``,
``Hypernet hashes``)."""

from __future__ import annotations

from dataclasses import dataclass, field, replace
from pathlib import Path

import torch

from stylegrad.addons.embeddings import (
    NEGATIVE_TWIN,
    EmbeddingLibrary,
    load_embedding,
    missing_twins,
    parse_embedding_arg,
    twin_file,
)
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
    hypernetworks: object = None  # a HypernetworkStack for the UNet, or None
    hypernet_hashes: dict[str, str] = field(default_factory=dict)
    ip: object = None  # the request's IP-Adapter (addons/ipadapter/run.py: an IPAdapterCall), or None

    def infotext_fields(self, used: list[str]) -> dict:
        ti = {n: self.ti_hashes[n] for n in used if self.ti_hashes.get(n)}
        return {"Lora hashes": ", ".join(f"{n}: {h}" for n, h in self.lora_hashes.items()) or None,
                "TI hashes": ", ".join(f"{n}: {h}" for n, h in ti.items()) or None,
                "Hypernet hashes": ", ".join(f"{n}: {h}" for n, h in self.hypernet_hashes.items()) or None,
                **(self.ip.fields if self.ip is not None else {})}


class Addons:
    """The LoRA and embedding folders of one ``Generator``, and the LoRA networks bound to its pipeline."""

    def __init__(self, pipe, embeddings_dirs: list[str] | None = None, loras_dirs: list[str] | None = None,
                 hypernetworks_dirs: list[str] | None = None):
        from stylegrad.addons.hypernetworks.library import HypernetworkLibrary

        self.pipe = pipe
        self.hypernet_library = HypernetworkLibrary(hypernetworks_dirs)
        self._hypernet_files: dict[tuple[str, str], object] = {}
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
                twin = self._twin(path, e.name)  # DreamArtist's NAME-neg beside NAME's file
                if twin is not None and twin.for_width(width, part) is not None:
                    words.setdefault(twin.name, twin.for_width(width, part))
                    ti_hashes.setdefault(twin.name, twin.short_hash)
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
        stack, hypernet_hashes = self.hypernetworks_for(request)
        return RequestAddons(network, embeddings, hashes, ti_hashes, hypernetworks=stack, hypernet_hashes=hypernet_hashes)

    def _twin(self, path: str, name: str):
        """The embedding ``NAME-neg`` beside an ``--embedding`` file, loaded once; None without one."""
        twin = twin_file(path)
        if twin is None:
            return None
        key = f"{twin}:{name}{NEGATIVE_TWIN}"
        if key not in self._files:
            self._files[key] = load_embedding(twin, name + NEGATIVE_TWIN)
        return self._files[key]

    def paired(self, request):
        """``request`` with DreamArtist's pairs completed (training/dreamartist.py): for each embedding NAME the
        prompt writes whose ``NAME-neg`` is at hand (in the embeddings folders, or beside an ``--embedding`` file)
        and absent from the negative prompt, ``NAME-neg`` is added to the negative prompt, with a note. The request
        carries it from there on, so the PNG's negative prompt records it and ``--from`` makes the same image."""
        names, beside = set(self.library.names()), set()
        for arg in request.embeddings:
            path, token = parse_embedding_arg(arg)
            name = token or Path(path).stem
            names.add(name)
            if twin_file(path) is not None:
                beside.add(name + NEGATIVE_TWIN)
        names |= beside
        twins = [t for t in missing_twins(request.prompt, request.negative, names)
                 if t in beside or self.library.get(t) is not None]
        if not twins:
            return request
        self._note_once(f"{', '.join(twins)} added to the negative prompt: DreamArtist's negative embedding of "
                        f"{', '.join(t[:-len(NEGATIVE_TWIN)] for t in twins)} (write it there yourself to place it)")
        written = [request.negative] if request.negative.strip() else []
        return replace(request, negative=", ".join(written + twins))

    def hypernetwork_specs(self, request) -> list[tuple[str, float]]:
        """(file, multiplier) for ``request.hypernetworks`` then the prompt's tags, in the order they chain; a tag
        naming no file is noted."""
        from stylegrad.prompts.syntax import hypernet_tags

        specs = self.hypernet_library.specs(request.hypernetworks)
        for tag in hypernet_tags(request.prompt):
            path = self.hypernet_library.find(tag.name)
            if path is None:
                self._note_once(f"hypernetwork '{tag.name}' of the prompt's {tag.text()} is not in the hypernetwork "
                                f"folders ({', '.join(map(str, self.hypernet_library.folders)) or 'none set'}); "
                                "generating without it")
                continue
            specs.append((str(path), tag.multiplier))
        if hypernet_tags(request.negative):
            self._note_once("hypernetwork tags in the negative prompt are removed and not applied (as in A1111)")
        return specs

    def hypernetworks_for(self, request):
        """(the request's hypernetworks bound to the UNet, or None; name -> A1111's short hash)."""
        from stylegrad.addons.hypernetworks.formats import read_hypernetwork
        from stylegrad.addons.hypernetworks.library import hypernetwork_hash
        from stylegrad.addons.hypernetworks.network import Applied, HypernetworkStack

        specs = self.hypernetwork_specs(request)
        if not specs:
            return None, {}
        applied, hashes = [], {}
        for path, mult in specs:
            key = (path, request.hypernetwork_reading)
            if key not in self._hypernet_files:
                if len(self._hypernet_files) >= 8:
                    self._hypernet_files.pop(next(iter(self._hypernet_files)))
                self._hypernet_files[key] = read_hypernetwork(path, request.hypernetwork_reading)
            file = self._hypernet_files[key]
            applied.append(Applied(file, mult))
            hashes[file.name] = hypernetwork_hash(path)
        stack = HypernetworkStack(self.pipe.unet, applied)
        return (stack if stack else None), hashes
