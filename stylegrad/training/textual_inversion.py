"""Textual inversion (Gal et al. 2022, "An Image is Worth One Word"): new word vectors for a token, learned with
everything else frozen. The diffusers example trains the whole token table and restores every other row after
each step; here the new vectors are the only tensors the optimizer sees (read as table rows past the end, as
stylegrad reads any embedding), which is the same optimization. Defaults are the diffusers example's."""

from __future__ import annotations

from pathlib import Path

import torch
from safetensors.torch import save_file

from stylegrad.errors import StylegradError
from stylegrad.files.atomic import atomic_path
from stylegrad.training.data import OBJECT_TEMPLATES, STYLE_TEMPLATES
from stylegrad.training.loop import Method
from stylegrad.training.models import TOKEN, Models

DEFAULTS = {"steps": 3000, "lr": 5e-4, "batch_size": 1, "grad_accum": 4, "weight_decay": 1e-2}


def _table(encoder) -> torch.Tensor:
    params = dict(encoder.named_parameters())
    return params.get(TOKEN, params.get("text_model." + TOKEN))


class TextualInversion(Method):
    name = "textual-inversion"

    def __init__(self, models: Models, token: str, init: str | None = None, vectors: int = 1, kind: str = "style"):
        if vectors < 1:
            raise StylegradError(f"vectors must be >= 1, got {vectors}")
        if not token.strip() or any(c.isspace() for c in token):
            raise StylegradError(f"the token must be one word, got {token!r}")
        self.word, self.kind = token, kind
        self.templates = STYLE_TEMPLATES if kind == "style" else OBJECT_TEMPLATES
        self.vectors = []
        for encoder, tokenizer in zip(models.text_encoders, models.tokenizers):
            table = _table(encoder)
            ids = tokenizer(init or "*", add_special_tokens=False).input_ids if init else []
            if init and not ids:
                raise StylegradError(f"the init word {init!r} has no tokens")
            start = table[ids].float().mean(0) if ids else table.float().mean(0)
            self.vectors.append(torch.nn.Parameter(start.detach().clone().repeat(vectors, 1)))
        self.init = init

    def keys(self) -> list[str]:
        return ["clip_l", "clip_g"] if len(self.vectors) == 2 else ["emb_params"]

    def trained(self) -> dict[str, torch.Tensor]:
        return dict(zip(self.keys(), self.vectors))

    def words(self) -> list[dict[str, torch.Tensor]]:
        return [{self.word: v} for v in self.vectors]

    def describe(self) -> dict:
        return {"token": self.word, "init": self.init, "vectors": self.vectors[0].shape[0], "kind": self.kind}

    def export(self, out: str | Path, step: int = 0) -> list[Path]:
        """``out`` (.safetensors or .pt) and its twin: A1111's ``.pt`` ({string_to_param: {'*': vectors}, name,
        step}; for SDXL {clip_l, clip_g}) and ``.safetensors`` ({emb_params} or {clip_l, clip_g}), which A1111,
        diffusers' ``load_textual_inversion`` and stylegrad all read."""
        out = Path(out)
        tensors = {k: v.detach().float().cpu().contiguous() for k, v in self.trained().items()}
        st, pt = out.with_suffix(".safetensors"), out.with_suffix(".pt")
        st.parent.mkdir(parents=True, exist_ok=True)
        with atomic_path(st) as tmp:
            save_file(tensors, str(tmp), metadata={"name": self.word, "step": str(step), "trained_by": "stylegrad"})
        if "emb_params" in tensors:
            payload = {"string_to_token": {"*": 265}, "string_to_param": {"*": tensors["emb_params"]},
                       "name": self.word, "step": step, "sd_checkpoint": None, "sd_checkpoint_name": None}
        else:
            payload = dict(tensors)
        with atomic_path(pt) as tmp:
            torch.save(payload, tmp)
        return [pt, st]
