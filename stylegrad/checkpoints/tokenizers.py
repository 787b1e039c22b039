"""CLIP's tokenizer for single-file checkpoints, found on this machine: a checkpoint holds the text encoder's weights
but not the vocabulary it was trained with.

SD1.x, SD2.x and SDXL all use OpenAI's byte-level BPE (49,408 tokens); they differ only in the padding token
(``<|endoftext|>`` for CLIP ViT-L, ``!`` for the OpenCLIP towers). The vocabulary is OpenAI's data, so stylegrad
does not carry a copy; it is taken from, in order:

1. ``STYLEGRAD_CLIP_TOKENIZER``: a folder with ``vocab.json`` and ``merges.txt``;
2. the Hugging Face cache, where A1111, Forge and diffusers put ``openai/clip-vit-large-patch14`` on first use;
3. ``bpe_simple_vocab_16e6.txt.gz``, the merges file that ships inside the ``open_clip_torch`` wheel
   (``pip install --no-deps open_clip_torch`` brings it without its dependencies; nothing of it is imported).

From the merges the vocabulary is rebuilt the way CLIP builds it: the 256 byte symbols, the same with the
end-of-word mark, one token per merge, then the two special tokens.
"""

from __future__ import annotations

import gzip
import importlib.util
import json
import os
from functools import cache
from pathlib import Path

from stylegrad.errors import StylegradError

BPE_FILE = "bpe_simple_vocab_16e6.txt.gz"
N_MERGES = 49152 - 256 - 2  # CLIP keeps the first 48,894 merges of the file
CACHED_REPOS = ("openai/clip-vit-large-patch14", "stable-diffusion-v1-5/stable-diffusion-v1-5",
                "runwayml/stable-diffusion-v1-5", "stabilityai/stable-diffusion-xl-base-1.0")


def _bytes_to_unicode() -> list[str]:
    keep = [*range(ord("!"), ord("~") + 1), *range(ord("¡"), ord("¬") + 1), *range(ord("®"), ord("ÿ") + 1)]
    chars, extra = {}, 0
    for b in range(256):
        if b in keep:
            chars[b] = chr(b)
        else:
            chars[b] = chr(256 + extra)
            extra += 1
    return [chars[b] for b in keep] + [chars[b] for b in range(256) if b not in keep]


def vocabulary_from_bpe(path: str | os.PathLike) -> tuple[dict[str, int], list[str]]:
    """(vocab, merges) from CLIP's gzipped merges file."""
    with gzip.open(path, "rt", encoding="utf-8") as f:
        lines = f.read().split("\n")[1:N_MERGES + 1]  # the first line is a version comment
    merges = [tuple(line.split()) for line in lines]
    if len(merges) != N_MERGES or any(len(m) != 2 for m in merges):
        raise StylegradError(f"{path} is not CLIP's BPE merges file")
    symbols = _bytes_to_unicode()
    tokens = symbols + [s + "</w>" for s in symbols] + ["".join(m) for m in merges]
    tokens += ["<|startoftext|>", "<|endoftext|>"]
    return {t: i for i, t in enumerate(tokens)}, [" ".join(m) for m in merges]


def _bpe_file() -> Path | None:
    spec = importlib.util.find_spec("open_clip")
    for folder in (spec.submodule_search_locations or []) if spec else []:
        if (Path(folder) / BPE_FILE).is_file():
            return Path(folder) / BPE_FILE
    return None


def _cache_dir() -> Path:
    root = os.environ.get("STYLEGRAD_CACHE") or os.path.join(os.environ.get("XDG_CACHE_HOME", "~/.cache"), "stylegrad")
    return Path(root).expanduser() / "clip-tokenizer"


def _from_folder(folder: Path):
    from transformers import CLIPTokenizer

    vocab = json.loads((folder / "vocab.json").read_text(encoding="utf-8"))
    lines = (folder / "merges.txt").read_text(encoding="utf-8").split("\n")
    merges = [tuple(line.split()) for line in lines if line and not line.startswith("#version")]
    tok = CLIPTokenizer(vocab=vocab, merges=merges)
    if len(tok) < 49408:
        raise StylegradError(f"the CLIP tokenizer files in {folder} are incomplete ({len(tok)} tokens)")
    return tok


def _from_hub_cache():
    from huggingface_hub import try_to_load_from_cache

    for repo in CACHED_REPOS:
        for sub in ("", "tokenizer/"):
            vocab = try_to_load_from_cache(repo, sub + "vocab.json")
            merges = try_to_load_from_cache(repo, sub + "merges.txt")
            if isinstance(vocab, str) and isinstance(merges, str) and Path(vocab).parent == Path(merges).parent:
                return _from_folder(Path(vocab).parent)
    return None


@cache
def _base_tokenizer():
    explicit = os.environ.get("STYLEGRAD_CLIP_TOKENIZER")
    if explicit:
        folder = Path(explicit).expanduser()
        if not (folder / "vocab.json").is_file() or not (folder / "merges.txt").is_file():
            raise StylegradError(f"STYLEGRAD_CLIP_TOKENIZER={explicit} has no vocab.json and merges.txt")
        return _from_folder(folder)
    cached = _cache_dir()
    if (cached / "vocab.json").is_file() and (cached / "merges.txt").is_file():
        return _from_folder(cached)
    tok = _from_hub_cache()
    if tok is not None:
        return tok
    bpe = _bpe_file()
    if bpe is None:
        raise StylegradError(
            "a single-file checkpoint needs CLIP's tokenizer files and none are on this machine: "
            "`pip install --no-deps open_clip_torch` ships them (1.5 MB), or download openai/clip-vit-large-patch14 "
            "once, or set STYLEGRAD_CLIP_TOKENIZER to a folder with vocab.json and merges.txt")
    vocab, merges = vocabulary_from_bpe(bpe)
    try:
        cached.mkdir(parents=True, exist_ok=True)
        (cached / "vocab.json").write_text(json.dumps(vocab, ensure_ascii=False), encoding="utf-8")
        (cached / "merges.txt").write_text("#version: 0.2\n" + "\n".join(merges) + "\n", encoding="utf-8")
        return _from_folder(cached)
    except OSError:  # a read-only cache: build it in memory each time
        from transformers import CLIPTokenizer

        return CLIPTokenizer(vocab=vocab, merges=[tuple(m.split()) for m in merges])


def clip_tokenizer(pad_token: str = "<|endoftext|>", folder: str | os.PathLike | None = None):
    """CLIP's tokenizer with the family's padding token; ``folder``: a tokenizer saved with ``save_pretrained``."""
    from transformers import CLIPTokenizer

    tok = CLIPTokenizer.from_pretrained(str(folder)) if folder is not None else _base_tokenizer()
    if tok.pad_token != pad_token:
        import copy

        tok = copy.deepcopy(tok)
        tok.pad_token = pad_token
    tok.model_max_length = 77
    return tok
