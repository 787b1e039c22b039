"""ComfyUI with a half-precision CLIP (its default on CUDA is fp16): the tuning runs in float32 whatever the CLIP's
dtype, and its differences reach the conditioning in float32 instead of being rounded to the CLIP's dtype.

The reference is the same CLIP (the same rounded weights) held in float32, where ComfyUI's patches are exact."""

import sys

import pytest
import torch
from comfy_standin import _cast, encode, install_folder_paths, run_node, sd1_clip

from stylegrad import Style, StyleOptions

PROMPT = "a red house by the sea"
# The conditioning's distance to the float32 reference (tiny CLIP, 10 steps at lr 1e-4, the defaults; the style moves
# it by about 2). The one rounding left is the position table's: ComfyUI reads it with a plain cast, which takes no
# weight wrapper, so its sum is stored in the CLIP's dtype; measured 3.9e-3 (bf16) and 6.5e-4 (fp16). Rounding every
# difference to the CLIP's dtype, as before, gave 1.6e-2 and 4.5e-3.
TOLERANCE = {torch.bfloat16: 6e-3, torch.float16: 1e-3}


@pytest.fixture(scope="module")
def sd1(tmp_path_factory):
    from diffusers import StableDiffusionPipeline
    from tiny import save_world

    clip_dir, sd_dir = save_world(tmp_path_factory.mktemp("world"))
    pipe = StableDiffusionPipeline.from_pretrained(sd_dir, safety_checker=None, requires_safety_checker=False)
    style = Style(torch.randn(24, generator=torch.Generator().manual_seed(1)), name="mine")
    return pipe, str(clip_dir), style


@pytest.fixture()
def nodes(tmp_path, monkeypatch):
    monkeypatch.setitem(sys.modules, "folder_paths", install_folder_paths(str(tmp_path / "ComfyUI")))
    from stylegrad.apps.comfyui import nodes

    return nodes


def _clips(pipe, dtype):
    """(the CLIP in ``dtype``, the same rounded weights held in float32)."""
    half = sd1_clip(pipe.text_encoder, pipe.tokenizer, dtype=dtype)
    reference = sd1_clip(pipe.text_encoder, pipe.tokenizer, dtype=dtype)
    with torch.inference_mode():
        reference.cond_stage_model.to(torch.float32)
    return half, reference


def _used(clip, keys: list[str]) -> dict[str, torch.Tensor]:
    """The tensors as the CLIP's modules use them while ComfyUI runs it (patches, then its cast and wrappers)."""
    out = {}
    with clip.patcher.patched():
        for key in keys:
            module, name = key.rsplit(".", 1)
            weight, bias = _cast(clip.cond_stage_model.get_submodule(module), torch.float32, torch.device("cpu"))
            out[key] = weight if name == "weight" else bias
    return out


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16], ids=["bf16", "fp16"])
def test_a_half_clip_keeps_the_tunings_differences(nodes, sd1, dtype):
    pipe, clip_dir, style = sd1
    half, reference = _clips(pipe, dtype)
    before = {k: v.clone() for k, v in half.cond_stage_model.state_dict().items()}
    args = dict(text=PROMPT, style=style, steps=10, lr=1e-4, weight=1.0, towers="both", clip_model=clip_dir)
    cond, styled = run_node(nodes.AestheticCLIPTextEncode, clip=half, **args)
    cond_ref, styled_ref = run_node(nodes.AestheticCLIPTextEncode, clip=reference, **args)
    norms = [k for k in before if "layer_norm" in k]
    used = [_used(clip, norms) for clip in (styled_ref, reference, styled, half)]
    moved = survived = 0
    for key in norms:
        wanted, got = used[0][key] - used[1][key], used[2][key] - used[3][key]
        moved += int((wanted != 0).sum())
        survived += int(((got != 0) & (wanted != 0)).sum())
    assert moved > 0 and survived == moved, f"{survived}/{moved} layer-norm differences survive in {dtype}"
    plain = encode(reference, PROMPT)[0][0]
    assert (cond_ref[0][0] - plain).abs().max() > 100 * TOLERANCE[dtype]  # the style moved it far more
    assert (cond[0][0] - cond_ref[0][0]).abs().max() < TOLERANCE[dtype]
    # the user's CLIP: the same tensors, no patches or wrappers left
    after = half.cond_stage_model.state_dict()
    assert all(torch.equal(before[k], after[k]) for k in before)
    assert half.patcher.patches == {} and half.patcher.weight_wrapper_patches == {}


def test_the_tuning_runs_in_float32_whatever_the_clips_dtype(sd1):
    """The differences handed to ComfyUI are float32 and the same, bit for bit, as those of the float32 CLIP."""
    from stylegrad.apps.comfyui.clip import tuned_patches

    pipe, clip_dir, style = sd1
    half, reference = _clips(pipe, torch.bfloat16)
    options = StyleOptions(steps=4, lr=1e-3)
    patches, sims, _ = tuned_patches(half, PROMPT, style, options, clip_dir)
    wanted, wanted_sims, _ = tuned_patches(reference, PROMPT, style, options, clip_dir)
    assert sims == wanted_sims and patches.keys() == wanted.keys()
    for key, (diff,) in patches.items():
        assert diff.dtype == torch.float32 and torch.equal(diff, wanted[key][0]), key


def test_a_host_without_weight_wrappers_gets_float32_patches(nodes, sd1, monkeypatch):
    """ComfyUI before Feb 2025 has no ``add_weight_wrapper``: every difference goes through ``add_patches``,
    in float32 (ComfyUI then rounds the sum to the stored dtype itself)."""
    import comfy_standin

    pipe, clip_dir, style = sd1
    monkeypatch.delattr(comfy_standin.ModelPatcher, "add_weight_wrapper")
    half, _ = _clips(pipe, torch.bfloat16)
    cond, styled = run_node(nodes.AestheticCLIPTextEncode, clip=half, text=PROMPT, style=style, steps=3, lr=1e-2,
                            weight=1.0, towers="both", clip_model=clip_dir)
    assert styled.patcher.weight_wrapper_patches == {} and styled.patcher.patches
    assert all(p[1][0].dtype == torch.float32 for patches in styled.patcher.patches.values() for p in patches)
    assert (cond[0][0] - encode(half, PROMPT)[0][0]).abs().max() > 1e-2
