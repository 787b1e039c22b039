"""Textual-inversion embeddings as users have them, read as data (never unpickled beyond tensors).

Formats (recognised by ``files/recognize.py``): A1111 ``.pt``/``.bin`` (``string_to_param``, also a pickled
``ParameterDict`` or an MPS-saved tensor), kohya ``emb_params``, diffusers' one ``{'<token>': (D,) or (N, D)}``
key, SDXL ``clip_l`` + ``clip_g``. The trigger word is the file stem, A1111's rule (``FILE:TOKEN`` overrides).
``EmbeddingLibrary`` scans a folder like A1111's ``embeddings/``: a stem written in a prompt activates its file.
"""

from __future__ import annotations

import os
import re
from dataclasses import dataclass
from pathlib import Path

import torch

from stylegrad.errors import StylegradError
from stylegrad.files.hashes import sha256_file
from stylegrad.files.recognize import open_file

EXTENSIONS = (".pt", ".bin", ".safetensors")
ENV = "STYLEGRAD_EMBEDDINGS_DIR"


@dataclass
class Embedding:
    """One trigger word and its vectors: ``parts['']`` (N, D) for SD1.x/SD2.x files, ``clip_l``/``clip_g`` for
    SDXL ones."""

    name: str
    parts: dict[str, torch.Tensor]
    path: str | None = None

    @property
    def vectors(self) -> int:
        return next(iter(self.parts.values())).shape[0]

    def for_width(self, width: int, part: str = "") -> torch.Tensor | None:
        v = self.parts.get(part)
        return v if v is not None and v.shape[-1] == width else None

    @property
    def short_hash(self) -> str:
        """A1111's ``TI hashes`` value: the first 12 hex digits of the file's sha256."""
        return sha256_file(self.path)[:12] if self.path else ""

    def describe(self) -> str:
        widths = "/".join(f"{k or 'width'} {v.shape[-1]}" for k, v in self.parts.items())
        return f"{self.name} ({self.vectors} vector(s), {widths})"


def _as_matrix(t: torch.Tensor) -> torch.Tensor:
    """(N, D) rows on the CPU in float32, whatever device and dtype saved them: they follow the text encoder's
    device and dtype only where they are gathered into its token table (``prompts.chunks.gather_rows``)."""
    return t.detach().to(device="cpu", dtype=torch.float32).reshape(-1, t.shape[-1])


def load_embedding(path: str | os.PathLike, name: str | None = None) -> Embedding:
    """A textual-inversion file; ``name`` is its trigger word (default: the file stem)."""
    info, content, _ = open_file(path)
    if info.kind != "textual-inversion":
        raise StylegradError(f"{path} is not a textual-inversion embedding: it is {info.detail}")
    if info.format == "sdxl":
        parts = {"clip_l": _as_matrix(content.read("clip_l")), "clip_g": _as_matrix(content.read("clip_g"))}
    else:
        key = {"kohya": "emb_params"}.get(info.format) or next(
            k for k in content.shapes if info.format != "a1111" or k.startswith("string_to_param."))
        parts = {"": _as_matrix(content.read(key))}
    if any(not torch.isfinite(v).all() for v in parts.values()):
        raise StylegradError(f"{path} holds NaN or infinite values")
    return Embedding(name or Path(path).stem, parts, str(path))


# DreamArtist's pairs (training/dreamartist.py): NAME.pt for the prompt and NAME-neg.pt for the negative prompt
NEGATIVE_TWIN = "-neg"


def twin_file(path: str | os.PathLike) -> Path | None:
    """The negative twin beside an embedding file (``NAME-neg`` with any embedding extension), or None."""
    path = Path(path)
    for ext in dict.fromkeys((path.suffix.lower(), *EXTENSIONS)):
        twin = path.with_name(path.stem + NEGATIVE_TWIN + ext)
        if ext in EXTENSIONS and twin.is_file():
            return twin
    return None


def _written(name: str, text: str) -> bool:
    """Whether ``name`` stands as a word in ``text`` (not part of a longer word such as ``name-neg``; any case,
    as CLIP's tokenizer reads it)."""
    return re.search(rf"(?<![\w-]){re.escape(name)}(?![\w-])", text, re.IGNORECASE) is not None


def missing_twins(prompt: str, negative: str, names: set[str]) -> list[str]:
    """The ``NAME-neg`` of every NAME among ``names`` the prompt writes, whose twin is among ``names`` and that the
    negative prompt lacks: what completes DreamArtist's pairs."""
    return [n + NEGATIVE_TWIN for n in sorted(names) if n + NEGATIVE_TWIN in names and _written(n, prompt)
            and not _written(n + NEGATIVE_TWIN, negative)]


def parse_embedding_arg(text: str) -> tuple[str, str | None]:
    """``FILE`` or ``FILE:TOKEN`` (a Windows drive letter is not a token)."""
    path, sep, token = text.rpartition(":")
    if sep and path and token and not (len(path) == 1 and path.isalpha()) and "/" not in token and "\\" not in token:
        return path, token
    return text, None


def _in_training_checkpoint(path: Path, folder: Path) -> bool:
    """A training run's checkpoint (``NAME-training/checkpoint-N/``, its optimizer state beside the tensors) is
    not an embedding: ``train ... --out embeddings/NAME.pt`` keeps its work folder beside the file it writes."""
    return any(_CHECKPOINT.fullmatch(part) for part in path.relative_to(folder).parts[:-1])


_CHECKPOINT = re.compile(r"\.?checkpoint-\d+(\.tmp)?")


class EmbeddingLibrary:
    """The embeddings a generation may use: files named one by one, and folders scanned by stem (subfolders
    too). Files of another width than the model's are listed in ``skipped``, not errors."""

    def __init__(self, folders: list[str] | None = None, files: list[str] | None = None):
        self.folders = [Path(f).expanduser() for f in (folders or [])]
        env = os.environ.get(ENV)
        if env and not folders:
            self.folders.append(Path(env).expanduser())
        self.explicit: dict[str, Embedding] = {}
        for arg in files or []:
            path, token = parse_embedding_arg(arg)
            e = load_embedding(path, token)
            self.explicit[e.name] = e
        self._found: dict[str, Path] | None = None
        self._loaded: dict[str, Embedding | None] = {}
        self.skipped: dict[str, str] = {}  # name -> why

    def _scan(self) -> dict[str, Path]:
        if self._found is None:
            self._found = {}
            for folder in self.folders:
                if not folder.is_dir():
                    raise StylegradError(f"embeddings folder not found: {folder}")
                for p in sorted(folder.rglob("*")):
                    if p.suffix.lower() in EXTENSIONS and p.is_file() and not _in_training_checkpoint(p, folder):
                        self._found.setdefault(p.stem, p)
        return self._found

    def names(self) -> list[str]:
        return sorted(set(self._scan()) | set(self.explicit))

    def get(self, name: str) -> Embedding | None:
        if name in self.explicit:
            return self.explicit[name]
        if name not in self._loaded:
            path = self._scan().get(name)
            try:
                self._loaded[name] = load_embedding(path, name) if path else None
            except StylegradError as e:
                self._loaded[name] = None
                self.skipped[name] = str(e)
        return self._loaded[name]

    def for_encoder(self, width: int, part: str = "") -> dict[str, torch.Tensor]:
        """Every usable trigger word -> its (N, width) vectors for one text encoder; the rest go to ``skipped``."""
        out = {}
        for name in self.names():
            e = self.get(name)
            if e is None:
                continue
            v = e.for_width(width, part)
            if v is None:
                what = f"{part} part of width {width}" if part else f"width {width}"
                self.skipped.setdefault(name, f"{e.describe()} does not fit this model's text encoder ({what})")
            else:
                out[name] = v
        return out
