"""Stand-ins for the parts of ComfyUI (v0.3.x) the stylegrad nodes touch, written from ComfyUI's source facts:

- ``folder_paths``: ``models_dir``, ``folder_names_and_paths`` {name: ([folders], {suffixes})}, ``get_filename_list``,
  ``get_full_path``, ``get_full_path_or_raise``, ``get_folder_paths`` (folder_paths.py);
- the CLIP text model (comfy/clip_model.py): ``clip_X.transformer.text_model.{embeddings,encoder.layers.N,
  final_layer_norm}`` and ``clip_X.transformer.text_projection`` (identity where the file has none), residuals added
  IN PLACE (so autograd through it fails), the embeddings adding every position row, pooled = the state at the
  largest token id (the EOS); it runs in float32 whatever its weights' dtype (``dtype=torch.float32`` in
  sd1_clip.py's forward), each weight cast to the input's dtype when used (comfy/ops.py ``manual_cast``,
  ``cast_bias_weight``), then its ``weight_function``s applied; the token table keeps a half dtype through its
  functions and its rows are cast to float32 after the lookup (ops ``Embedding``); the position table is cast
  directly (``comfy.ops.cast_to``), with no functions;
- ``SDClipModel`` (comfy/sd1_clip.py): ``layer`` 'last'/'hidden', ``layer_idx``, ``layer_norm_hidden_state``,
  ``special_tokens``, ``options_default``, ``set_clip_options``/``reset_clip_options``, embedding vectors in the
  token lists, ``encode_token_weights`` weighting each token as (z - z_empty) * w + z_empty;
- SDXL (comfy/sdxl_clip.py): clip_l hidden -2 without the final norm, clip_g the same with pad 0 and a real
  projection, conditioning cat([l, g]) and bigG's pooled output;
- ``CLIP`` (comfy/sd.py): ``tokenize``, ``clone`` (shares the model, copies the patcher), ``add_patches`` (keys
  not in the model's state dict are skipped; returns the keys taken), ``clip_layer``, ``encode_from_tokens_scheduled``
  returning [[cond, {"pooled_output": pooled}]];
- ``ModelPatcher`` (comfy/model_patcher.py): patches are (strength_patch, value, strength_model, offset, function);
  ``patch_weight_to_device`` copies the weight to float32, ``comfy.lora.calculate_weight`` adds strength * diff (a
  (diff,) value, cast to float32) and ``comfy.float.stochastic_rounding`` casts the sum back to the weight's dtype
  (a plain ``.to`` for fp32/fp16/bf16); weights are patched into the shared model while it runs (Parameters
  replaced, backups restored after); ``add_weight_wrapper(key, fn)`` (since Feb 2025) adds ``fn`` to the module's
  ``weight_function``/``bias_function`` while it runs, with no rounding to the stored dtype; object patches replace
  attributes of the model while it runs; ``get_model_object`` sees them;
- nodes run inside ``torch.inference_mode()`` (execution.py), and models are created there too.

Checked against Comfy-Org/ComfyUI at commit a125cd84b054 (2025-10-12): comfy/model_patcher.py
(``patch_weight_to_device``, ``add_weight_wrapper``, ``load``), comfy/lora.py (``calculate_weight``, "diff"),
comfy/float.py (``stochastic_rounding``), comfy/ops.py (``cast_bias_weight``, ``manual_cast``, ``Embedding``),
comfy/clip_model.py and comfy/sd1_clip.py (float32 activations).
"""

from __future__ import annotations

import os
import re
import sys
import types
from contextlib import contextmanager

import torch
import torch.nn.functional as F
from torch import nn

# -- folder_paths ------------------------------------------------------------------------------------------------------


def install_folder_paths(base: str) -> types.ModuleType:
    fp = types.ModuleType("folder_paths")
    fp.supported_pt_extensions = {".ckpt", ".pt", ".bin", ".pth", ".safetensors", ".pkl", ".sft"}
    fp.models_dir = os.path.join(base, "models")
    fp.folder_names_and_paths = {
        "checkpoints": ([os.path.join(fp.models_dir, "checkpoints")], fp.supported_pt_extensions),
        "embeddings": ([os.path.join(fp.models_dir, "embeddings")], fp.supported_pt_extensions),
    }

    def get_folder_paths(name):
        return fp.folder_names_and_paths[name][0][:]

    def get_filename_list(name):
        folders, exts = fp.folder_names_and_paths[name]
        out = set()
        for folder in folders:
            for root, _, files in os.walk(folder):
                for f in files:
                    if os.path.splitext(f)[1].lower() in exts or not exts:
                        out.add(os.path.relpath(os.path.join(root, f), folder))
        return sorted(out)

    def get_full_path(name, filename):
        if name not in fp.folder_names_and_paths:
            return None
        filename = os.path.relpath(os.path.join("/", filename), "/")
        for folder in fp.folder_names_and_paths[name][0]:
            path = os.path.join(folder, filename)
            if os.path.isfile(path):
                return path
        return None

    def get_full_path_or_raise(name, filename):
        path = get_full_path(name, filename)
        if path is None:
            raise FileNotFoundError(f"Model in folder '{name}' with filename '{filename}' not found.")
        return path

    fp.get_folder_paths, fp.get_filename_list = get_folder_paths, get_filename_list
    fp.get_full_path, fp.get_full_path_or_raise = get_full_path, get_full_path_or_raise
    sys.modules["folder_paths"] = fp
    return fp


# -- the CLIP text model -----------------------------------------------------------------------------------------------

ACTIVATIONS = {"quick_gelu": lambda a: a * torch.sigmoid(1.702 * a), "gelu": F.gelu}


def _cast(module, dtype, device):
    """comfy/ops.py cast_bias_weight: the weight (and bias) cast to the compute dtype, then its functions applied."""
    weight = module.weight.to(device=device, dtype=dtype)
    for f in module.weight_function:
        weight = f(weight)
    bias = getattr(module, "bias", None)
    if bias is not None:
        bias = bias.to(device=device, dtype=dtype)
        for f in module.bias_function:
            bias = f(bias)
    return weight, bias


class CastLinear(nn.Linear):
    weight_function, bias_function = [], []

    def forward(self, x):
        return F.linear(x, *_cast(self, x.dtype, x.device))


class CastLayerNorm(nn.LayerNorm):
    weight_function, bias_function = [], []

    def forward(self, x):
        return F.layer_norm(x, self.normalized_shape, *_cast(self, x.dtype, x.device), self.eps)


class CastEmbedding(nn.Embedding):
    weight_function, bias_function = [], []

    def forward(self, ids, out_dtype=None):
        keep = self.weight.dtype in (torch.float16, torch.bfloat16)  # a half table is looked up in its own dtype
        weight, _ = _cast(self, self.weight.dtype if keep else (out_dtype or self.weight.dtype), ids.device)
        return F.embedding(ids, weight).to(out_dtype or weight.dtype)


class Attention(nn.Module):
    def __init__(self, width, heads):
        super().__init__()
        self.heads = heads
        self.q_proj, self.k_proj, self.v_proj, self.out_proj = (CastLinear(width, width) for _ in range(4))

    def forward(self, x, mask):
        b, s, w = x.shape
        q, k, v = (p(x).view(b, s, self.heads, -1).transpose(1, 2) for p in (self.q_proj, self.k_proj, self.v_proj))
        o = F.scaled_dot_product_attention(q, k, v, attn_mask=mask)
        return self.out_proj(o.transpose(1, 2).reshape(b, s, w))


class MLP(nn.Module):
    def __init__(self, width, inner, act):
        super().__init__()
        self.fc1, self.fc2, self.activation = CastLinear(width, inner), CastLinear(inner, width), ACTIVATIONS[act]

    def forward(self, x):
        return self.fc2(self.activation(self.fc1(x)))


class Layer(nn.Module):
    def __init__(self, width, heads, inner, act):
        super().__init__()
        self.layer_norm1, self.self_attn = CastLayerNorm(width), Attention(width, heads)
        self.layer_norm2, self.mlp = CastLayerNorm(width), MLP(width, inner, act)

    def forward(self, x, mask):
        x += self.self_attn(self.layer_norm1(x), mask)  # in place, as ComfyUI's CLIPLayer
        x += self.mlp(self.layer_norm2(x))
        return x


class Encoder(nn.Module):
    def __init__(self, n, width, heads, inner, act):
        super().__init__()
        self.layers = nn.ModuleList(Layer(width, heads, inner, act) for _ in range(n))

    def forward(self, x, mask, intermediate_output=None):
        if intermediate_output is not None and intermediate_output < 0:
            intermediate_output = len(self.layers) + intermediate_output
        intermediate = None
        for i, layer in enumerate(self.layers):
            x = layer(x, mask)
            if i == intermediate_output:
                intermediate = x.clone()
        return x, intermediate


class Embeddings(nn.Module):
    def __init__(self, vocab, width, positions):
        super().__init__()
        self.token_embedding = CastEmbedding(vocab, width)
        self.position_embedding = CastEmbedding(positions, width)

    def forward(self, tokens, extra=None):
        """float32 states; ids past the table read ``extra`` (embedding vectors, float32 as sd1_clip.py has them)."""
        vocab = self.token_embedding.weight.shape[0]
        x = self.token_embedding(tokens.clamp(max=vocab - 1), out_dtype=torch.float32)
        if extra is not None:
            past = tokens >= vocab
            x = torch.where(past[..., None], extra[(tokens - vocab).clamp(min=0)], x)
        return x + self.position_embedding.weight.to(torch.float32)  # comfy.ops.cast_to: no weight functions


class TextModel_(nn.Module):
    def __init__(self, cfg):
        super().__init__()
        w = cfg["hidden_size"]
        self.embeddings = Embeddings(cfg["vocab_size"], w, cfg["max_position_embeddings"])
        self.encoder = Encoder(cfg["num_hidden_layers"], w, cfg["num_attention_heads"], cfg["intermediate_size"],
                               cfg["hidden_act"])
        self.final_layer_norm = CastLayerNorm(w)

    def forward(self, tokens, eos_at, extra=None, intermediate_output=None, final_layer_norm_intermediate=True):
        x = self.embeddings(tokens, extra)
        mask = torch.empty(x.shape[1], x.shape[1], dtype=x.dtype).fill_(float("-inf")).triu_(1)
        x, i = self.encoder(x, mask, intermediate_output)
        x = self.final_layer_norm(x)
        if i is not None and final_layer_norm_intermediate:
            i = self.final_layer_norm(i)
        return x, i, x[torch.arange(x.shape[0]), eos_at]


class TextModel(nn.Module):
    def __init__(self, cfg):
        super().__init__()
        self.num_layers = cfg["num_hidden_layers"]
        self.text_model = TextModel_(cfg)
        width = cfg["hidden_size"]  # real CLIPs' projections are square (bigG: 1280); the tiny bigG's is not
        self.text_projection = CastLinear(width, cfg.get("projection_dim", width), bias=False)
        self.text_projection.weight.copy_(torch.eye(cfg.get("projection_dim", width), width))


class SDClipModel(nn.Module):
    def __init__(self, cfg, layer="last", layer_idx=None, special_tokens=None, layer_norm_hidden_state=True):
        super().__init__()
        self.transformer = TextModel(cfg)
        self.num_layers = self.transformer.num_layers
        self.special_tokens = special_tokens or {"start": 49406, "end": 49407, "pad": 49407}
        self.layer, self.layer_idx = layer, layer_idx
        self.logit_scale = nn.Parameter(torch.tensor(4.6055))
        self.layer_norm_hidden_state = layer_norm_hidden_state
        self.options_default = (self.layer, self.layer_idx, True)

    def set_clip_options(self, options):
        idx = options.get("layer", self.layer_idx)
        if idx is None or abs(idx) > self.num_layers:
            self.layer = "last"
        else:
            self.layer, self.layer_idx = "hidden", idx

    def reset_clip_options(self):
        self.layer, self.layer_idx = self.options_default[:2]

    def forward(self, tokens):
        vocab = self.transformer.text_model.embeddings.token_embedding.weight.shape[0]
        extra, ids, eos_at = [], [], []
        for row in tokens:
            out = []
            for t in row:
                if isinstance(t, int):
                    out.append(t)
                else:
                    out.append(vocab + len(extra))
                    extra.append(t.to(torch.float32))
            ids.append(out)
            eos_at.append(out.index(self.special_tokens["end"]))
        x, i, pooled = self.transformer.text_model(
            torch.tensor(ids), torch.tensor(eos_at), torch.stack(extra) if extra else None,
            intermediate_output=self.layer_idx if self.layer == "hidden" else None,
            final_layer_norm_intermediate=self.layer_norm_hidden_state)
        z = x if self.layer == "last" else i
        return z.float(), self.transformer.text_projection(pooled).float()

    def encode_token_weights(self, pairs):
        to_encode = [[t for t, *_ in chunk] for chunk in pairs]
        weighted = any(w != 1.0 for chunk in pairs for _, w, *_ in chunk)
        if weighted:
            s = self.special_tokens
            to_encode.append([s["start"], s["end"]] + [s["pad"]] * (len(to_encode[0]) - 2))
        out, pooled = self(to_encode)
        chunks = []
        for k, chunk in enumerate(pairs):
            z = out[k:k + 1].clone()
            if weighted:
                for j, (_, w, *_) in enumerate(chunk):
                    if w != 1.0:
                        z[0, j] = (z[0, j] - out[-1, j]) * w + out[-1, j]
            chunks.append(z)
        return torch.cat(chunks, dim=-2), pooled[0:1]


class SD1Model(nn.Module):
    def __init__(self, cfg):
        super().__init__()
        self.clip_l = SDClipModel(cfg)

    def set_clip_options(self, options):
        self.clip_l.set_clip_options(options)

    def reset_clip_options(self):
        self.clip_l.reset_clip_options()

    def encode_token_weights(self, tokens):
        return self.clip_l.encode_token_weights(tokens["l"])


class SDXLModel(nn.Module):
    def __init__(self, cfg_l, cfg_g):
        super().__init__()
        self.clip_l = SDClipModel(cfg_l, "hidden", -2, layer_norm_hidden_state=False)
        self.clip_g = SDClipModel(cfg_g, "hidden", -2, {"start": 49406, "end": 49407, "pad": 0},
                                  layer_norm_hidden_state=False)

    def set_clip_options(self, options):
        self.clip_l.set_clip_options(options)
        self.clip_g.set_clip_options(options)

    def reset_clip_options(self):
        self.clip_l.reset_clip_options()
        self.clip_g.reset_clip_options()

    def encode_token_weights(self, tokens):
        g, pooled = self.clip_g.encode_token_weights(tokens["g"])
        lo, _ = self.clip_l.encode_token_weights(tokens["l"])
        cut = min(lo.shape[1], g.shape[1])
        return torch.cat([lo[:, :cut], g[:, :cut]], dim=-1), pooled


# -- tokenizer ---------------------------------------------------------------------------------------------------------


class Tokenizer:
    """Per tower: start + 75 tokens + end, padded to 77 (pad = end for CLIP-L, 0 for bigG); '(words:1.2)' weights;
    'embedding:NAME' reads a vector file from ``embeddings`` (one token per vector)."""

    def __init__(self, hf, towers=("l",), embeddings=None, pad_g: int = 0):
        self.hf, self.towers, self.embeddings, self.pad_g = hf, towers, embeddings or {}, pad_g
        for t in towers:
            setattr(self, "clip_" + t, types.SimpleNamespace(end_token=hf.eos_token_id, start_token=hf.bos_token_id))

    def _pieces(self, text):
        out, at = [], 0
        for m in re.finditer(r"\(([^():]+):([0-9.]+)\)", text):
            out.append((text[at:m.start()], 1.0))
            out.append((m.group(1), float(m.group(2))))
            at = m.end()
        out.append((text[at:], 1.0))
        return [(t, w) for t, w in out if t.strip()]

    def tokenize_with_weights(self, text, return_word_ids=False):
        tokens = []
        for piece, w in self._pieces(text):
            for word in re.split(r"(embedding:\S+)", piece):
                if word.startswith("embedding:"):
                    vectors = self.embeddings[word.removeprefix("embedding:")]
                    tokens += [(v, w) for v in vectors]
                elif word.strip():
                    tokens += [(t, w) for t in self.hf(word.strip(), add_special_tokens=False).input_ids]
        out = {}
        for t in self.towers:
            pad = self.hf.eos_token_id if t == "l" else self.pad_g
            chunks = [tokens[i:i + 75] for i in range(0, max(len(tokens), 1), 75)]
            out[t] = [[(self.hf.bos_token_id, 1.0)] + c + [(self.hf.eos_token_id, 1.0)] +
                      [(pad, 1.0)] * (75 - len(c)) for c in chunks]
        return out


# -- ModelPatcher and CLIP ---------------------------------------------------------------------------------------------


def _set(root, key, value):
    *path, name = key.split(".")
    for p in path:
        root = getattr(root, p)
    old = getattr(root, name)
    setattr(root, name, value)
    return old


class ModelPatcher:
    def __init__(self, model):
        self.model, self.patches, self.object_patches, self.weight_wrapper_patches = model, {}, {}, {}

    def clone(self):
        n = ModelPatcher(self.model)
        n.patches = {k: list(v) for k, v in self.patches.items()}
        n.object_patches = dict(self.object_patches)
        n.weight_wrapper_patches = dict(self.weight_wrapper_patches)
        return n

    def add_weight_wrapper(self, name, function):
        self.weight_wrapper_patches[name] = self.weight_wrapper_patches.get(name, []) + [function]

    def add_patches(self, patches, strength_patch=1.0, strength_model=1.0):
        keys = set(self.model.state_dict())
        taken = []
        for k, v in patches.items():
            if k in keys:
                self.patches.setdefault(k, []).append((strength_patch, v, strength_model, None, None))
                taken.append(k)
        return taken

    def add_object_patch(self, name, obj):
        self.object_patches[name] = obj

    def get_model_object(self, name):
        if name in self.object_patches:
            return self.object_patches[name]
        obj = self.model
        for p in name.split("."):
            obj = getattr(obj, p)
        return obj

    @contextmanager
    def patched(self):
        state, backups = (self.model.state_dict() if self.patches else {}), {}
        for key, patches in self.patches.items():
            weight = state[key].to(torch.float32, copy=True)
            for strength, value, strength_model, _, _ in patches:
                if strength_model != 1.0:
                    weight *= strength_model
                weight += strength * value[0].to(torch.float32)
            backups[key] = _set(self.model, key, nn.Parameter(weight.to(state[key].dtype), requires_grad=False))
        for key, functions in self.weight_wrapper_patches.items():  # load(): m.weight_function.extend(...)
            module, name = key.rsplit(".", 1)
            backups[f"{module}.{name}_function"] = _set(self.model, f"{module}.{name}_function", list(functions))
        objects = {k: _set(self.model, k, v) for k, v in self.object_patches.items()}
        try:
            yield self.model
        finally:
            for k, v in {**backups, **objects}.items():
                _set(self.model, k, v)


class CLIP:
    def __init__(self, cond_stage_model, tokenizer):
        self.cond_stage_model, self.tokenizer = cond_stage_model, tokenizer
        self.patcher = ModelPatcher(cond_stage_model)
        self.patcher.load_device = torch.device("cpu")
        self.layer_idx = None

    def clone(self):
        n = CLIP.__new__(CLIP)
        n.patcher = self.patcher.clone()
        n.patcher.load_device = self.patcher.load_device
        n.cond_stage_model, n.tokenizer, n.layer_idx = self.cond_stage_model, self.tokenizer, self.layer_idx
        return n

    def add_patches(self, patches, strength_patch=1.0, strength_model=1.0):
        return self.patcher.add_patches(patches, strength_patch, strength_model)

    def clip_layer(self, layer_idx):
        self.layer_idx = layer_idx

    def tokenize(self, text, return_word_ids=False):
        return self.tokenizer.tokenize_with_weights(text, return_word_ids)

    def encode_from_tokens_scheduled(self, tokens):
        self.cond_stage_model.reset_clip_options()
        if self.layer_idx is not None:
            self.cond_stage_model.set_clip_options({"layer": self.layer_idx})
        with self.patcher.patched():
            cond, pooled = self.cond_stage_model.encode_token_weights(tokens)
        return [[cond, {"pooled_output": pooled}]]


def _cfg(hf_config) -> dict:
    return {k: getattr(hf_config, k) for k in ("vocab_size", "hidden_size", "intermediate_size", "num_hidden_layers",
                                               "num_attention_heads", "max_position_embeddings", "hidden_act")}


def _load(module: SDClipModel, hf_text, projection: torch.Tensor | None):
    """A transformers CLIP text model's weights under ComfyUI's names (its text_model.*, the projection if given)."""
    state = {"text_model." + k: v for k, v in hf_text.state_dict().items() if not k.endswith("position_ids")}
    if projection is not None:
        state["text_projection.weight"] = projection
    missing, unexpected = module.transformer.load_state_dict(state, strict=False)
    assert not unexpected and set(missing) <= {"text_projection.weight"}, (missing, unexpected)


def _special(tokenizer, pad: int) -> dict:
    """ComfyUI's constants are real CLIP's ids (49406, 49407); the tiny vocabulary has its own."""
    return {"start": tokenizer.bos_token_id, "end": tokenizer.eos_token_id, "pad": pad}


def sd1_clip(text_encoder, tokenizer, embeddings=None, dtype=None) -> CLIP:
    """ComfyUI's CLIP of an SD1.x checkpoint (no projection in the file), made inside inference mode; ``dtype``: its
    weights' (ComfyUI's default on CUDA is fp16; activations are float32 whatever it is)."""
    with torch.inference_mode():
        model = SD1Model(_cfg(text_encoder.config)).eval()
        _load(model.clip_l, text_encoder, None)
        model.to(dtype)
        model.clip_l.special_tokens = _special(tokenizer, tokenizer.eos_token_id)
        return CLIP(model, Tokenizer(tokenizer, ("l",), embeddings))


def sdxl_clip(text_encoder, text_encoder_2, tokenizer, pad_g: int = 0, dtype=None) -> CLIP:
    """``pad_g``: bigG's pad id, 0 in CLIP's vocabulary ('!'); the tiny tokenizer's own id for '!' in tests."""
    with torch.inference_mode():
        cfg_g = {**_cfg(text_encoder_2.config), "projection_dim": text_encoder_2.config.projection_dim}
        model = SDXLModel(_cfg(text_encoder.config), cfg_g).eval()
        _load(model.clip_l, text_encoder, None)
        _load(model.clip_g, getattr(text_encoder_2, "text_model", text_encoder_2),
              text_encoder_2.text_projection.weight)
        model.to(dtype)
        model.clip_l.special_tokens = _special(tokenizer, tokenizer.eos_token_id)
        model.clip_g.special_tokens = _special(tokenizer, pad_g)
        return CLIP(model, Tokenizer(tokenizer, ("l", "g"), pad_g=pad_g))


def run_node(cls, **inputs):
    """ComfyUI's executor: the node's FUNCTION called on a fresh instance inside inference mode."""
    with torch.inference_mode():
        return getattr(cls(), cls.FUNCTION)(**inputs)


class Executor:
    """ComfyUI's output cache, reduced: a node is run again only when its inputs or its IS_CHANGED value change."""

    def __init__(self):
        self.cache, self.runs = {}, 0

    def __call__(self, cls, **inputs):
        changed = cls.IS_CHANGED(**inputs) if hasattr(cls, "IS_CHANGED") else None
        key = (cls.__name__, tuple(sorted((k, id(v) if not isinstance(v, (str, int, float, bool)) else v)
                                          for k, v in inputs.items())), changed)
        if key not in self.cache:
            self.runs += 1
            self.cache[key] = run_node(cls, **inputs)
        return self.cache[key]


def encode(clip, text):
    """CLIPTextEncode's work, inside inference mode as every node runs."""
    with torch.inference_mode():
        return clip.encode_from_tokens_scheduled(clip.tokenize(text))
