"""Checkpoint merging with A1111's Checkpoint Merger semantics, streamed one tensor at a time.

- weighted sum: ``A·(1−M) + B·M``; add difference: ``A + (B − C)·M``; none: A alone (convert, prune, bake a VAE).
- Only keys with 'model' in their name that B also has are merged (A1111's rule), the rest of A is copied;
  ``position_ids`` and other integer tensors are always A's. The result has A's keys, in A's dtypes (``fp16``:
  half). Add difference with a key C lacks adds nothing, as in A1111.
- An inpainting (9-channel) or instruct-pix2pix (8-channel) A with a normal B blends the first 4 input channels
  of the UNet's first convolution and keeps A's extra channels; a normal A with such a B is refused.
- The arithmetic is done in float32 and rounded once to the output dtype.

Memory: inputs are read a tensor at a time at their offsets and the output header is known before any data, so
the peak is a few copies of the largest tensor, whatever the files' sizes. The inputs' sha256 (for A1111's
``sd_merge_models`` metadata) is computed in a thread while the merge runs, and the header rewritten in place.
"""

from __future__ import annotations

import hashlib
import json
import math
import os
import re
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import torch

from stylegrad.checkpoints.blocks import block_of, parse_block_weights
from stylegrad.checkpoints.families import SUPPORTED, VAE, CheckpointKind, classify, strip_wrapper
from stylegrad.checkpoints.tensors import SafetensorsWriter, TensorFile
from stylegrad.errors import RequestError, StylegradError
from stylegrad.families import Family

METHODS = {"weighted-sum": "Weighted sum", "add-difference": "Add difference", "none": "No interpolation"}
FIRST_CONV = "model.diffusion_model.input_blocks.0.0.weight"


def legacy_hash(path: str | os.PathLike) -> str:
    """A1111's old 8-digit model hash: sha256 of 64 KiB at offset 1 MiB."""
    with open(path, "rb") as f:
        f.seek(0x100000)
        return hashlib.sha256(f.read(0x10000)).hexdigest()[:8]


class _Input:
    def __init__(self, path: str | os.PathLike, role: str):
        self.path = Path(path).expanduser()
        if not self.path.is_file():
            raise StylegradError(f"model {role} not found: {self.path}")
        self.role = role
        self.tf = TensorFile(self.path)
        self.prefix = strip_wrapper(self.tf.keys())
        self.keys = [k[len(self.prefix):] for k in self.tf.keys() if k.startswith(self.prefix)]
        self.shapes = {k: self.tf.shape(self.prefix + k) for k in self.keys}
        self.kind: CheckpointKind = classify(self.shapes)
        if self.kind.family is None:
            from stylegrad.checkpoints.loading import not_a_model

            self.tf.close()
            raise StylegradError(f"model {role}: " + not_a_model(self.path, self.kind))

    def __contains__(self, key: str) -> bool:
        return key in self.shapes

    def dtype(self, key: str) -> torch.dtype:
        return self.tf.dtype(self.prefix + key)

    def get(self, key: str) -> torch.Tensor:
        return self.tf.get(self.prefix + key)


def _label(family: str | None) -> str:
    return Family(family).label if family in set(Family) else str(family)


def _merged(key: str, method: str) -> bool:
    return method != "none" and "model" in key and not key.endswith("position_ids")


def _vae_tensors(path: Path) -> tuple[TensorFile, dict[str, str]]:
    """The VAE file and {output key: its key} for baking."""
    tf = TensorFile(path)
    names = {}
    for k in tf.keys():
        bare = k.removeprefix("state_dict.").removeprefix(VAE)
        if bare.startswith(("loss.", "model_ema.")) or not tf.dtype(k).is_floating_point:
            continue
        names[VAE + bare] = k
    if not any(k.startswith(VAE + "decoder.") for k in names):
        tf.close()
        raise StylegradError(f"{path} is not a VAE in the original layout (no decoder.* weights)")
    if any(".up_blocks." in k for k in names):
        tf.close()
        raise RequestError("bake_vae", f"{path} is a VAE in diffusers' layout; {{field}} takes the original layout "
                           "(the .safetensors/.pt files A1111 keeps in models/VAE)")
    return tf, names


def merge_checkpoints(a: str | os.PathLike, b: str | os.PathLike | None = None, c: str | os.PathLike | None = None,
                      out: str | os.PathLike = "merged.safetensors", method: str = "weighted-sum", alpha: float = 0.3,
                      block_weights: str | None = None, fp16: bool = False, bake_vae: str | os.PathLike | None = None,
                      discard: str | None = None, progress: bool = True,
                      loras: list[tuple[str, float, float]] | None = None) -> Path:
    """Merge checkpoints into ``out`` (a .safetensors file in the original layout, or a diffusers folder when
    ``out`` has no suffix). ``block_weights``: a preset name or one weight per UNet block (see ``blocks.py``).
    ``loras``: (file, text-encoder multiplier, UNet multiplier) baked into the result."""
    given, out, discard_rx = _check_arguments(method, (a, b, c), out, discard)
    if Path(given[0]).expanduser().is_dir():
        return _bake_folder(Path(given[0]).expanduser(), len(given), out, fp16, loras,
                            dict(block_weights=block_weights, bake_vae=bake_vae, discard=discard))
    inputs = [_Input(p, role) for p, role in zip(given, "ABC")]
    vae = None
    try:
        family = _check_families(inputs)
        if block_weights and method == "none":
            raise StylegradError("block weights need a merge method (weighted-sum or add-difference)")
        base, blocks = parse_block_weights(block_weights, family, alpha) if block_weights else (alpha, None)
        A, B, C = (inputs + [None, None])[:3]
        keys = [k for k in A.keys if not (discard_rx and discard_rx.search(k))]
        kinds = _check_shapes(A, B, C, keys, method)
        vae_names = {}
        if bake_vae:
            vae, vae_names = _vae_tensors(Path(bake_vae).expanduser())
            for k, vk in vae_names.items():
                if k in kinds and tuple(vae.shape(vk)) != A.shapes[k]:
                    raise StylegradError(f"the VAE's {k[len(VAE):]} has shape {tuple(vae.shape(vk))}, the model's "
                                         f"{A.shapes[k]}: it is not a VAE for {Family(family).label}")
        baker = _baker(family, loras, A, keys)
        recipe = _recipe(inputs, method, alpha, fp16, out, bake_vae, discard)
        if loras:
            recipe["loras"] = [f"{Path(f).name}:{te}:{unet}" for f, te, unet in loras]
        if blocks:
            recipe["block_weights"] = {"BASE": base, **blocks}

        def weight(k: str) -> float:
            return blocks.get(block_of(k, family), base) if blocks else alpha

        def dtype(k: str) -> torch.dtype:
            return torch.float16 if fp16 and A.dtype(k).is_floating_point else A.dtype(k)

        target = out if out.suffix else out.with_name(f".{out.name}.merging.safetensors")
        _write(target, inputs, keys, kinds, method, weight, dtype, recipe, vae, vae_names, progress, baker)
    finally:
        for i in inputs:
            i.tf.close()
        if vae is not None:
            vae.close()
    return out if out.suffix else _to_diffusers(target, out, fp16)


def _check_arguments(method: str, paths: tuple, out, discard: str | None) -> tuple[list, Path, re.Pattern | None]:
    """(the given models, the output path, the discard pattern): every mistake in the arguments, before any file
    is opened."""
    if method not in METHODS:
        raise StylegradError(f"unknown merge method '{method}' (choose from {', '.join(METHODS)})")
    need = {"weighted-sum": 2, "add-difference": 3, "none": 1}[method]
    given = [p for p in paths if p is not None]
    if len(given) != need:
        raise StylegradError(f"{method} takes {need} model{'s' if need > 1 else ''} (A{', B' if need > 1 else ''}"
                             f"{', C' if need > 2 else ''}), got {len(given)}")
    out = Path(out).expanduser()
    if out.suffix and out.suffix != ".safetensors":
        raise RequestError("out", f"{{field}} must end in .safetensors (or have no suffix, for a diffusers folder), "
                           f"got {out.name}")
    try:
        return given, out, re.compile(discard) if discard else None
    except re.error as e:
        raise RequestError("discard", f"{{field}} is not a valid regular expression: {e}") from e


def _recipe(inputs: list[_Input], method: str, alpha: float, fp16: bool, out: Path, bake_vae, discard) -> dict:
    """A1111's ``sd_merge_recipe``, with placeholder hashes of the final length (filled in once hashed)."""
    A = inputs[0]
    B = inputs[1] if len(inputs) > 1 else None
    blends = B is not None and B.kind.variant == "base"
    return {
        "type": "stylegrad", "primary_model_hash": "0" * 64,
        "secondary_model_hash": "0" * 64 if B else None, "tertiary_model_hash": "0" * 64 if len(inputs) > 2 else None,
        "interp_method": METHODS[method], "multiplier": alpha, "save_as_half": fp16,
        "custom_name": out.stem, "config_source": 0, "bake_in_vae": Path(bake_vae).name if bake_vae else "None",
        "discard_weights": discard or "", "is_inpainting": blends and A.kind.variant == "inpainting",
        "is_instruct_pix2pix": blends and A.kind.variant == "instruct-pix2pix",
    }


def _write(target: Path, inputs: list[_Input], keys: list[str], kinds: dict[str, str], method: str, weight, dtype,
           recipe: dict, vae: TensorFile | None, vae_names: dict[str, str], progress: bool, baker=None) -> None:
    """Stream the output, one key at a time, while a thread hashes the inputs for the metadata."""
    A = inputs[0]
    entries = [(k, dtype(k), A.shapes[k]) for k in keys]
    with ThreadPoolExecutor(max_workers=1) as pool:
        futures = [pool.submit(_sha256, i.path) for i in inputs]
        metadata = _metadata(recipe, inputs, [str(i) * 64 for i in range(len(inputs))])  # the final lengths
        with SafetensorsWriter(target, entries, metadata) as writer:
            bar = _bar(len(keys), progress)
            work = _Workspace(inputs, keys)
            for k in keys:
                if k in vae_names:
                    t = vae.get(vae_names[k]).to(dtype(k))
                elif kinds[k] == "copy":
                    t = work.read(A, k).to(dtype(k))
                else:
                    t = work.combine(k, method, weight(k), kinds[k], dtype(k))
                if baker is not None and k in baker[1]:
                    t = baker[0].apply(baker[1][k], t).to(dtype(k))
                writer.write(k, t)
                bar.update(1)
            bar.close()
            digests = [f.result() for f in futures]
            for name, digest in zip(("primary", "secondary", "tertiary"), digests):
                recipe[f"{name}_model_hash"] = digest
            writer.metadata = _metadata(recipe, inputs, digests)


def _baker(family: str, loras, A: _Input, keys: list[str]):
    """(the LoraBaker, checkpoint key -> its key) for ``loras``, or None; a LoRA key the checkpoint lacks is an
    error before any work."""
    if not loras:
        return None
    from stylegrad.checkpoints.bake import LoraBaker

    baker = LoraBaker(family, loras)
    ours = {ck: k for k, ck in baker.checkpoint_keys().items()}
    missing = [k for k in ours if k not in A or k not in keys]
    if missing:
        raise StylegradError(f"the LoRAs change weights model A does not have (or the discard pattern drops): "
                             f"{', '.join(missing[:3])}")
    return baker, ours


def _sha256(path: Path) -> str:
    from stylegrad.files.hashes import sha256_file

    return sha256_file(path)


def _metadata(recipe: dict, inputs: list[_Input], digests: list[str]) -> dict[str, str]:
    models = {}
    for i, digest in zip(inputs, digests):
        models[digest] = {"name": i.path.name, "legacy_hash": legacy_hash(i.path),
                          "sd_merge_recipe": i.tf.metadata.get("sd_merge_recipe")}
        try:
            models.update(json.loads(i.tf.metadata.get("sd_merge_models", "{}")))
        except ValueError:
            pass
    return {"format": "pt", "sd_merge_recipe": json.dumps(recipe), "sd_merge_models": json.dumps(models)}


def _bar(total: int, enabled: bool):
    from tqdm.auto import tqdm

    return tqdm(total=total, desc="merging", unit="tensor", disable=not enabled)


def _check_families(inputs: list[_Input]) -> str:
    families = {i.kind.family for i in inputs}
    if len(families) > 1:
        what = ", ".join(f"{i.role} is {_label(i.kind.family)}" for i in inputs)
        raise StylegradError(f"cannot merge models of different families ({what})")
    family = families.pop()
    if family not in SUPPORTED:
        raise StylegradError(f"model A is {_label(family)}; stylegrad merges SD1.x, SD2.x and SDXL")
    return family


def _check_shapes(A: _Input, B: _Input | None, C: _Input | None, keys: list[str], method: str) -> dict[str, str]:
    """{key: 'copy' | 'full' | 'first4'}: how each output key is made; any mismatch fails here, before work."""
    kinds = {}
    for k in keys:
        if B is None or not _merged(k, method) or k not in B or not A.dtype(k).is_floating_point:
            kinds[k] = "copy"
            continue
        a, b = A.shapes[k], B.shapes[k]
        if C is not None and k in C and C.shapes[k] != b:
            raise StylegradError(f"models B and C differ at {k} ({b} vs {C.shapes[k]}); add difference needs B and C "
                                 "of one architecture")
        if a == b:
            kinds[k] = "full"
        elif k == FIRST_CONV and a[:1] + a[2:] == b[:1] + b[2:] and a[1] in (8, 9) and b[1] == 4:
            kinds[k] = "first4"
        elif k == FIRST_CONV and a[:1] + a[2:] == b[:1] + b[2:] and a[1] == 4 and b[1] in (8, 9):
            what = "an inpainting" if b[1] == 9 else "an instruct-pix2pix"
            raise StylegradError(f"when merging {what} model with a normal one, A must be the {what[3:]} model")
        else:
            raise StylegradError(f"models A and B differ at {k} ({a} vs {b}); they are not of one architecture")
    return kinds


class _Workspace:
    """Buffers sized for the largest tensor, reused for every key: a streamed merge then touches the same memory
    throughout instead of paging in (and zeroing) fresh allocations for each tensor."""

    def __init__(self, inputs: list[_Input], keys: list[str]):
        from stylegrad.checkpoints.tensors import nbytes

        self.inputs = inputs
        largest = max((nbytes(inputs[0].dtype(k), inputs[0].shapes[k]) for k in keys), default=0)
        numel = max((math.prod(i.shapes[k]) for i in inputs for k in keys if k in i), default=0)
        widest = max((nbytes(i.dtype(k), i.shapes[k]) for i in inputs for k in keys if k in i), default=largest)
        self.raw = {i.role: torch.empty(widest, dtype=torch.uint8) for i in inputs}
        self.f32 = [torch.empty(numel, dtype=torch.float32) for _ in range(2)]
        self.out = torch.empty(numel * 4, dtype=torch.uint8)

    def read(self, source: _Input, key: str) -> torch.Tensor:
        return source.tf.read_into(source.prefix + key, self.raw[source.role])

    def _f32(self, i: int, t: torch.Tensor) -> torch.Tensor:
        buf = self.f32[i][: t.numel()].view(t.shape)
        buf.copy_(t)
        return buf

    def combine(self, key: str, method: str, m: float, kind: str, dtype: torch.dtype) -> torch.Tensor:
        A, B = self.inputs[0], self.inputs[1]
        C = self.inputs[2] if len(self.inputs) > 2 else None
        a, b = self.read(A, key), self.read(B, key)
        c = self.read(C, key) if C is not None and key in C else None
        if kind == "first4" or not a.is_floating_point():
            return _combine(a, b, c, method, m, kind).to(dtype)
        fa, fb = self._f32(0, a), self._f32(1, b)
        if method == "weighted-sum":  # a·(1−m) + b·m, rounded as _combine rounds it
            fa.mul_(1 - m)
            fb.mul_(m)
        elif c is None:
            return fa.to(dtype)
        else:  # a + (b − c)·m
            fb.sub_(c)
            fb.mul_(m)
        fb.add_(fa)
        out = self.out[: fb.numel() * torch.empty((), dtype=dtype).element_size()].view(dtype).view(fb.shape)
        out.copy_(fb)
        return out


def _combine(a: torch.Tensor, b: torch.Tensor, c: torch.Tensor | None, method: str, m: float,
             kind: str) -> torch.Tensor:
    if kind == "first4":
        out = a.float().clone()
        out[:, :4] = _combine(a[:, :4], b, c, method, m, "full")
        return out
    if method == "weighted-sum":
        return a.float() * (1 - m) + b.float() * m
    if c is None:  # add difference, a key C lacks: B − C counts as zero
        return a.float()
    return a.float() + (b.float() - c.float()) * m


def _bake_folder(folder: Path, models: int, out: Path, fp16: bool, loras, unsupported: dict) -> Path:
    """LoRAs baked into a diffusers folder, written as a diffusers folder. The streamed merge reads the original
    layout (what A1111 and ComfyUI keep), so a folder can only be the one model of a bake: a weighted merge of
    folders, or a single-file output from one, would need diffusers' layout mapped back, which stylegrad leaves to
    the tools that own that conversion."""
    if models > 1:
        raise StylegradError(f"model A is a diffusers folder ({folder}): merging reads single-file checkpoints "
                             "(.safetensors or .ckpt); a folder can only have LoRAs baked into it")
    if not loras:
        raise StylegradError(f"model A is a diffusers folder ({folder}): give LoRAs to bake into it (a folder is "
                             "already what loading a single file gives)")
    if out.suffix:
        raise StylegradError(f"model A is a diffusers folder: the result is a diffusers folder too, so give an "
                             f"output name without suffix (got {out.name})")
    given = [name for name, value in unsupported.items() if value]
    if given:
        raise StylegradError(f"{', '.join(given)} apply to single-file checkpoints, not to the diffusers folder {folder}")
    from stylegrad.addons.lora.formats import read_lora
    from stylegrad.addons.lora.network import LoraNetwork
    from stylegrad.pipelines.loading import load_pipeline

    pipe = load_pipeline(str(folder), device="cpu")  # float32, stylegrad's own copy: baked in place
    LoraNetwork.for_pipeline(pipe, [(read_lora(f), te, unet) for f, te, unet in loras]).merge_into()
    if fp16:
        pipe.to(torch.float16)
    pipe.save_pretrained(out, safe_serialization=True)
    return out


def _to_diffusers(merged: Path, folder: Path, fp16: bool) -> Path:
    """The merged file as a diffusers folder (loaded with the family's configs, then saved)."""
    from stylegrad.checkpoints.loading import load_checkpoint

    try:
        pipe = load_checkpoint(merged, "cpu", dtype=torch.float16 if fp16 else torch.float32)
        pipe.save_pretrained(folder, safe_serialization=True)
    finally:
        merged.unlink(missing_ok=True)
    return folder
