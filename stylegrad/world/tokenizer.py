"""A character-level CLIP tokenizer (CLIP's byte-level BPE with almost no merges): small, offline, and the real
``CLIPTokenizer`` class, so every code path that takes a tokenizer works unchanged."""

from __future__ import annotations

from transformers import CLIPTokenizer


def _bytes_to_unicode() -> list[str]:
    """The printable stand-ins CLIP's byte-level BPE uses for the 256 byte values."""
    keep = set(range(ord("!"), ord("~") + 1)) | set(range(ord("¡"), ord("¬") + 1)) | set(range(ord("®"), ord("ÿ") + 1))
    chars, n = [], 0
    for b in range(256):
        if b in keep:
            chars.append(chr(b))
        else:
            chars.append(chr(256 + n))
            n += 1
    return chars


def char_tokenizer(max_length: int = 77) -> CLIPTokenizer:
    """One token per character (plus 'th', 'the', 're', 'red'); <|endoftext|> is the largest id, as in CLIP."""
    chars = _bytes_to_unicode()
    merges = [("t", "h"), ("th", "e</w>"), ("r", "e"), ("re", "d</w>")]
    tokens = chars + [c + "</w>" for c in chars] + ["th", "the</w>", "re", "red</w>"]
    tokens += ["<|startoftext|>", "<|endoftext|>"]
    tok = CLIPTokenizer(vocab={t: i for i, t in enumerate(tokens)}, merges=merges)
    tok.model_max_length = max_length
    return tok
