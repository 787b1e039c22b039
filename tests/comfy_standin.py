"""Stand-ins for the parts of ComfyUI (v0.3.x) the stylegrad nodes touch, written from ComfyUI's source facts:

- ``folder_paths``: ``models_dir``, ``folder_names_and_paths`` {name: ([folders], {suffixes})} (``clip_vision``
  among ComfyUI's own), ``get_filename_list``, ``get_full_path``, ``get_full_path_or_raise``, ``get_folder_paths``
  (folder_paths.py);
- the CLIP text model (comfy/clip_model.py): ``clip_X.transformer.text_model.{embeddings,encoder.layers.N,
  final_layer_norm}`` and ``clip_X.transformer.text_projection``, a comfy.ops Linear never initialised (so where the
  file has none, CLIP-L of SD1.x and SDXL, it holds whatever memory held: ``UNINITIALISED``), residuals added
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
  returning [[cond, {"pooled_output": pooled}]] after ``load_model`` (its patcher loaded, and left loaded);
- ``ModelPatcher`` (comfy/model_patcher.py): patches are (strength_patch, value, strength_model, offset, function);
  ``patch_weight_to_device`` copies the weight to float32, ``comfy.lora.calculate_weight`` adds strength * diff (a
  (diff,) value, cast to float32) and ``comfy.float.stochastic_rounding`` casts the sum back to the weight's dtype
  (a plain ``.to`` for fp32/fp16/bf16); loading a clone (model_management.py ``load_models_gpu``) detaches the
  previously loaded clone WITHOUT unpatching its weights, and the new clone, when the model holds other patches
  (``current_weight_patches_uuid``), restores the originals from the backup all clones share, then patches its own
  (Parameters replaced; ``partially_load``, ``unpatch_model``, ``load``); the last clone's patches stay on the shared
  module after the run; LoRA keys are matched against the modules as named at load time (object patches applied,
  ``_load_list``), unknown ones skipped; ``add_weight_wrapper(key, fn)`` (since Feb 2025) adds ``fn`` to the
  module's ``weight_function``/``bias_function`` while loaded, with no rounding to the stored dtype; object patches
  replace attributes of the model at load (``patch_model``), the originals restored when another clone loads;
  ``get_model_object`` sees them; ``memory_required`` and ``model_dtype`` read the shared model as it is;
- ``BaseModel`` (comfy/model_base.py): ``get_dtype`` = ``diffusion_model.dtype``, read by ``_apply_model`` (input
  and context cast to it, the diffusion model called with ComfyUI's keywords, ``.float()`` on its output) and by
  ``memory_required``; ComfyUI's SD1 ``UNetModel`` (original-layout names, a ``dtype`` attribute);
- the executor (execution.py) runs output nodes (``OUTPUT_NODE``) and what they need, nothing else (``run_prompt``);
- nodes run inside ``torch.inference_mode()`` (execution.py), and models are created there too.

Checked against Comfy-Org/ComfyUI at commit a125cd84b054 (2025-10-12): comfy/model_patcher.py
(``patch_weight_to_device``, ``add_weight_wrapper``, ``load``, ``clone`` sharing ``backup``, ``partially_load``,
``unpatch_model``, ``detach``, ``_load_list``), comfy/model_management.py (``load_models_gpu``), comfy/lora.py
(``calculate_weight``, "diff"), comfy/float.py (``stochastic_rounding``), comfy/ops.py (``cast_bias_weight``,
``manual_cast``, ``Embedding``), comfy/clip_model.py (``CLIPTextModel.text_projection``) and comfy/sd1_clip.py
(float32 activations), comfy/supported_models.py (SD15/SDXL: no CLIP-L projection kept), comfy/sd.py
(``CLIP.load_model``), comfy/model_base.py (``get_dtype``, ``_apply_model``, ``memory_required``). The CLIP-L
projection, history and Stylecode facts were also run in that real ComfyUI (CPU, a real-size random SD1.5 file,
graphs queued through ``POST /prompt``): see docs/comfyui.md.
"""

from __future__ import annotations

import os
import re
import sys
import types
import uuid
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
        "clip_vision": ([os.path.join(fp.models_dir, "clip_vision")], fp.supported_pt_extensions),
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


UNINITIALISED = 0.0  # what ComfyUI's never-initialised projection held in the run (zeros); NaN in some tests


class TextModel(nn.Module):
    def __init__(self, cfg, fill=UNINITIALISED):
        super().__init__()
        self.num_layers = cfg["num_hidden_layers"]
        self.text_model = TextModel_(cfg)
        width = cfg["hidden_size"]  # real CLIPs' projections are square (bigG: 1280); the tiny bigG's is not
        # comfy/clip_model.py CLIPTextModel: operations.Linear from comfy.ops, whose reset_parameters does nothing, so
        # a tower whose file has no projection (CLIP-L of SD1.x and SDXL) keeps uninitialised memory there
        self.text_projection = CastLinear(width, cfg.get("projection_dim", width), bias=False)
        self.text_projection.weight.fill_(fill)


class SDClipModel(nn.Module):
    def __init__(self, cfg, layer="last", layer_idx=None, special_tokens=None, layer_norm_hidden_state=True,
                 fill=UNINITIALISED):
        super().__init__()
        self.transformer = TextModel(cfg, fill)
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
    def __init__(self, cfg, fill=UNINITIALISED):
        super().__init__()
        self.clip_l = SDClipModel(cfg, fill=fill)

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
    """comfy/model_patcher.py's, reduced to CPU loading. Clones share the model, the weight ``backup`` and the
    object-patch backup; ``patches_uuid`` changes with the patches. ``load`` is ``model_management.load_models_gpu
    ([patcher])``: the previous clone is detached without unpatching its weights, and a clone whose patches differ
    from those the shared model holds (``current_weight_patches_uuid``) first puts the backed-up originals back,
    then patches its own in (``partially_load`` -> ``unpatch_model`` -> ``load``). Nothing is unpatched after a
    run: the shared module keeps the last-loaded clone's patches, as ComfyUI's does between nodes."""

    def __init__(self, model):
        self.model, self.patches, self.object_patches, self.weight_wrapper_patches = model, {}, {}, {}
        self.backup, self.object_patches_backup, self.patches_uuid = {}, {}, uuid.uuid4()
        if not hasattr(model, "current_weight_patches_uuid"):
            model.current_weight_patches_uuid = None

    def clone(self):
        n = ModelPatcher.__new__(ModelPatcher)
        n.model, n.patches_uuid = self.model, self.patches_uuid
        n.patches = {k: list(v) for k, v in self.patches.items()}
        n.object_patches = dict(self.object_patches)
        n.weight_wrapper_patches = dict(self.weight_wrapper_patches)
        n.backup, n.object_patches_backup = self.backup, self.object_patches_backup  # shared, as ComfyUI's
        return n

    def add_weight_wrapper(self, name, function):
        self.weight_wrapper_patches[name] = self.weight_wrapper_patches.get(name, []) + [function]
        self.patches_uuid = uuid.uuid4()

    def add_patches(self, patches, strength_patch=1.0, strength_model=1.0):
        keys = set(self.model.state_dict())
        taken = []
        for k, v in patches.items():
            if k in keys:
                self.patches.setdefault(k, []).append((strength_patch, v, strength_model, None, None))
                taken.append(k)
        self.patches_uuid = uuid.uuid4()
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

    def _patch_weight(self, key, state):
        """patch_weight_to_device: the original backed up once (shared), the sum in float32, rounded to its dtype."""
        if key not in self.backup:
            self.backup[key] = self.model.get_parameter(key)
        weight = state[key].to(torch.float32, copy=True)
        for strength, value, strength_model, _, _ in self.patches[key]:
            if strength_model != 1.0:
                weight *= strength_model
            weight += strength * value[0].to(torch.float32)
        _set(self.model, key, nn.Parameter(weight.to(state[key].dtype), requires_grad=False))

    def unpatch_model(self, unpatch_weights=True):
        if unpatch_weights:
            for key, weight in self.backup.items():
                _set(self.model, key, weight)
            self.backup.clear()
            modules = self.model.modules() if isinstance(self.model, nn.Module) else []
            for m in modules:  # wipe_lowvram_weight: the layers' functions dropped
                if "weight_function" in vars(m):
                    del m.weight_function, m.bias_function
            self.model.current_weight_patches_uuid = None
        for k, v in self.object_patches_backup.items():
            _set(self.model, k, v)
        self.object_patches_backup.clear()

    def load(self):
        current = self.model.current_weight_patches_uuid
        self.unpatch_model(unpatch_weights=current is not None and current != self.patches_uuid)
        for k, v in self.object_patches.items():  # patch_model: object patches, their originals kept
            old = _set(self.model, k, v)
            self.object_patches_backup.setdefault(k, old)
        if self.model.current_weight_patches_uuid == self.patches_uuid:
            return self.model
        state = self.model.state_dict() if self.patches else {}
        names = {n for n, _ in self.model.named_parameters()} if isinstance(self.model, nn.Module) else set()
        for key in self.patches:  # _load_list: the weights of the modules as named now (object patches applied)
            if key in names:
                self._patch_weight(key, state)
        for key, functions in self.weight_wrapper_patches.items():  # load(): m.weight_function.extend(...)
            module, name = key.rsplit(".", 1)
            sub = self.model.get_submodule(module)
            sub.weight_function, sub.bias_function = list(sub.weight_function), list(sub.bias_function)
            getattr(sub, name + "_function").extend(functions)
        self.model.current_weight_patches_uuid = self.patches_uuid
        return self.model

    def model_dtype(self):
        return self.model.get_dtype()

    def memory_required(self, input_shape):
        """Asked by the sampler before it loads the model (comfy/sampler_helpers.py ``prepare_sampling``): the
        shared model is read as the last-loaded clone left it."""
        return self.model.memory_required(input_shape)

    @contextmanager
    def patched(self):
        """The model as this patcher loads it, unloaded (originals back) afterwards: a sampler's run in tests."""
        try:
            yield self.load()
        finally:
            self.unpatch_model()


# -- the diffusion model -----------------------------------------------------------------------------------------------


class UNetModel(nn.Module):
    """ComfyUI's SD1.x UNet (comfy/ldm/modules/diffusionmodules/openaimodel.py): the original layout's module tree
    (``input_blocks.N...``: ``names`` maps diffusers' keys to it), a ``dtype`` attribute, ``forward(x, timesteps,
    context, control, transformer_options, **kwargs)``; computes as the diffusers UNet it was made from, with the
    tensors the tree holds now (so patched weights act)."""

    def __init__(self, unet, names: dict[str, str]):
        super().__init__()
        self.unet, self.names = (unet,), names  # the diffusers UNet outside the tree: a skeleton to compute with
        for key, value in unet.state_dict().items():
            *path, leaf = names[key].split(".")
            module = self
            for part in path:
                if part not in module._modules:
                    module.add_module(part, nn.Module())
                module = module._modules[part]
            module.register_parameter(leaf, nn.Parameter(value.detach().clone(), requires_grad=False))
        self.dtype = next(unet.parameters()).dtype

    def forward(self, x, timesteps=None, context=None, control=None, transformer_options=None, **kwargs):
        tensors = {key: self.get_parameter(name) for key, name in self.names.items()}
        return torch.func.functional_call(self.unet[0], tensors, (x, timesteps, context)).sample


class BaseModel(nn.Module):
    """comfy/model_base.py BaseModel, as a sampler reaches it: ``get_dtype`` reads ``diffusion_model.dtype``;
    ``apply_model`` casts the input and context to it and calls the diffusion model with ComfyUI's keywords, its
    output made float32 (EPS: the sigma scaling left out); ``memory_required`` reads the dtype too (as with
    xformers or flash attention, ComfyUI's usual case on a GPU)."""

    def __init__(self, diffusion_model):
        super().__init__()
        self.diffusion_model, self.manual_cast_dtype, self.memory_usage_factor = diffusion_model, None, 1.0

    def get_dtype(self):
        return self.diffusion_model.dtype

    def apply_model(self, x, t, c_crossattn=None, control=None, transformer_options=None):
        dtype = self.manual_cast_dtype or self.get_dtype()
        context = c_crossattn.to(dtype) if c_crossattn is not None else None
        return self.diffusion_model(x.to(dtype), t.float(), context=context, control=control,
                                    transformer_options=transformer_options or {}).float()

    def memory_required(self, input_shape):
        dtype = self.manual_cast_dtype or self.get_dtype()
        area = input_shape[0] * input_shape[2] * input_shape[3]
        return area * torch.finfo(dtype).bits // 8 * 0.01 * self.memory_usage_factor * 1024 * 1024


def sample_step(patcher, x, t, context):
    """One denoiser call of a ComfyUI sampler (KSampler and every sampler ComfyUI ships go through it): memory
    estimated on the shared model as it is, the clone loaded (``load_models_gpu``), ``apply_model`` on it."""
    patcher.memory_required(list(x.shape))
    model = patcher.load()
    return model.apply_model(x, t, c_crossattn=context)


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

    def load_model(self):
        self.patcher.load()
        return self.patcher

    def clip_layer(self, layer_idx):
        self.layer_idx = layer_idx

    def tokenize(self, text, return_word_ids=False):
        return self.tokenizer.tokenize_with_weights(text, return_word_ids)

    def encode_from_tokens_scheduled(self, tokens):
        self.cond_stage_model.reset_clip_options()
        if self.layer_idx is not None:
            self.cond_stage_model.set_clip_options({"layer": self.layer_idx})
        self.load_model()  # and left loaded: the next clone to load puts the originals back first
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


def sd1_clip(text_encoder, tokenizer, embeddings=None, dtype=None, fill=UNINITIALISED) -> CLIP:
    """ComfyUI's CLIP of an SD1.x checkpoint (no projection in the file: ``fill`` stands for the uninitialised
    memory left there), made inside inference mode; ``dtype``: its weights' (ComfyUI's default on CUDA is fp16;
    activations are float32 whatever it is)."""
    with torch.inference_mode():
        model = SD1Model(_cfg(text_encoder.config), fill).eval()
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


def run_prompt(prompt: dict):
    """ComfyUI's executor over a queued prompt (execution.py): only output nodes (``OUTPUT_NODE = True``) and what
    they need are run; ``prompt`` is {id: (class, inputs)}, an input ``("link", id, index)`` being another node's
    output. Returns {id: outputs} of the nodes run."""
    done = {}

    def run(node_id):
        if node_id not in done:
            cls, inputs = prompt[node_id]
            resolved = {k: run(v[1])[v[2]] if isinstance(v, tuple) and v[:1] == ("link",) else v
                        for k, v in inputs.items()}
            done[node_id] = run_node(cls, **resolved)
        return done[node_id]

    for node_id, (cls, _) in prompt.items():
        if getattr(cls, "OUTPUT_NODE", False):
            run(node_id)
    return done
