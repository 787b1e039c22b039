"""A prompt as A1111 feeds CLIP: parsed pieces tokenized one by one, textual-inversion words found by their token
ids and given vectors of their own, then cut into chunks of 75 tokens, each wrapped as
``[BOS] tokens [EOS] [pad...]`` (77), with one emphasis weight per token.

A1111's chunk rules: a chunk that fills up moves the tokens after its last comma (within 20 tokens) to the next
chunk; an embedding that does not fit in what is left of a chunk starts the next one; ``BREAK`` starts the next
one. The layout inside a chunk is diffusers' (EOS right after the text, then the tokenizer's pad), so a plain prompt
of up to 75 tokens gives exactly ``encode_prompt``'s ids; for SD1.x it is A1111's too.
"""

from __future__ import annotations

from dataclasses import dataclass, field

import torch

from stylegrad.prompts.syntax import BREAK, parse_attention

CHUNK = 75  # tokens per chunk between BOS and EOS
COMMA_BACKTRACK = 20  # A1111's comma_padding_backtrack


@dataclass
class Chunks:
    """One prompt's token ids (C, 77) and weights (C, 77). Ids >= ``vocab_size`` index ``extra``, the vectors of
    the textual-inversion embeddings the prompt uses (rows of the token table the model does not have)."""

    ids: torch.Tensor
    weights: torch.Tensor
    vocab_size: int
    extra: torch.Tensor | None = None  # (N, H)
    embeddings: list[str] = field(default_factory=list)  # names used, in order of first use

    @property
    def weighted(self) -> bool:
        return bool((self.weights != 1).any())


class Vocabulary:
    """A tokenizer plus textual-inversion words (``name -> (n, H) vectors``), matched as A1111 does: by the token
    ids of the name, longest match first, wherever they occur in the prompt."""

    def __init__(self, tokenizer, embeddings: dict[str, torch.Tensor] | None = None):
        self.tokenizer = tokenizer
        self.vocab_size = len(tokenizer)
        self.embeddings = dict(embeddings or {})
        self._by_first: dict[int, list[tuple[tuple[int, ...], str]]] = {}
        for name in self.embeddings:
            ids = tuple(self._ids(name))
            if ids:
                self._by_first.setdefault(ids[0], []).append((ids, name))
        for options in self._by_first.values():
            options.sort(key=lambda o: -len(o[0]))
        vocab = tokenizer.get_vocab()
        self.comma = vocab.get(",</w>", vocab.get(","))
        self.pad = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else tokenizer.eos_token_id

    def _ids(self, text: str) -> list[int]:
        return self.tokenizer(text, add_special_tokens=False, truncation=False).input_ids

    def _match(self, tokens: list[int], at: int) -> tuple[str, int] | None:
        for ids, name in self._by_first.get(tokens[at], ()):
            if tuple(tokens[at:at + len(ids)]) == ids:
                return name, len(ids)
        return None

    def chunks(self, prompt: str, weighting: bool = True) -> Chunks:
        """``weighting=False`` reads the prompt as plain text (brackets are words, every weight 1)."""
        pieces = parse_attention(prompt) if weighting else [(prompt, 1.0)]
        done: list[tuple[list[int], list[float]]] = []
        tokens: list[int] = []
        weights: list[float] = []
        last_comma = -1
        extra: list[torch.Tensor] = []
        used: dict[str, int] = {}  # name -> its first id past the vocabulary

        def close() -> None:
            nonlocal tokens, weights, last_comma
            done.append((tokens, weights))
            tokens, weights, last_comma = [], [], -1

        for text, weight in pieces:
            if text == BREAK and weight < 0:
                close()
                continue
            ids = self._ids(text)
            at = 0
            while at < len(ids):
                token = ids[at]
                if token == self.comma:
                    last_comma = len(tokens)
                elif len(tokens) == CHUNK and last_comma != -1 and len(tokens) - last_comma <= COMMA_BACKTRACK:
                    moved_t, moved_w = tokens[last_comma + 1:], weights[last_comma + 1:]
                    tokens, weights = tokens[:last_comma + 1], weights[:last_comma + 1]
                    close()
                    tokens, weights = moved_t, moved_w
                if len(tokens) == CHUNK:
                    close()
                found = self._match(ids, at)
                if found is None:
                    tokens.append(token)
                    weights.append(weight)
                    at += 1
                    continue
                name, length = found
                vectors = self.embeddings[name]
                if name not in used:
                    used[name] = self.vocab_size + sum(len(v) for v in extra)
                    extra.append(vectors)
                n = vectors.shape[0]
                if len(tokens) + n > CHUNK:
                    close()
                tokens.extend(range(used[name], used[name] + n))
                weights.extend([weight] * n)
                at += length
        if tokens or not done:
            close()

        tok = self.tokenizer
        rows = [[tok.bos_token_id] + t + [tok.eos_token_id] + [self.pad] * (CHUNK - len(t)) for t, _ in done]
        mults = [[1.0] + w + [1.0] * (CHUNK + 1 - len(w)) for _, w in done]
        return Chunks(torch.tensor(rows), torch.tensor(mults), self.vocab_size,
                      torch.cat(extra) if extra else None, list(used))


def gather_rows(table: torch.Tensor, extra: torch.Tensor | None, rows: torch.Tensor) -> torch.Tensor:
    """The token-table rows ``rows`` (U,), reading ids past the table from ``extra``: the same rows as a table with
    the embeddings appended, without copying the table. (U, H) in the table's device and dtype: the embedding rows
    (kept on the CPU in float32 as read) follow the text encoder now, before ``rows`` (on its device) index them."""
    if extra is None:
        return table[rows]
    v = table.shape[0]
    inside = rows < v
    out = table.new_empty(rows.shape[0], table.shape[1])
    out[inside] = table[rows[inside]]
    out[~inside] = extra.to(table)[rows[~inside] - v]  # to the table's device and dtype
    return out


def apply_weights(z: torch.Tensor, weights: torch.Tensor) -> torch.Tensor:
    """A1111's emphasis on each chunk's states (C, 77, H): multiply each token's state by its weight, then rescale
    the chunk so its mean is what it was."""
    if not bool((weights != 1).any()):
        return z
    w = weights.to(device=z.device, dtype=z.dtype)
    out = []
    for chunk, cw in zip(z, w):
        mean = chunk.mean()
        chunk = chunk * cw[:, None]
        out.append(chunk * (mean / chunk.mean()))
    return torch.stack(out)
