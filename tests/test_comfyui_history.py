"""The same inputs give the same conditioning whatever ran before. ComfyUI keeps one text module for every clone of a
CLIP and leaves the last-loaded clone's patches applied to it (the stand-in's ``ModelPatcher.load``, as
model_management.load_models_gpu and ModelPatcher.partially_load do): the node must tune from what the connected CLIP
means, its own patches (a LoRA) included, not from whatever the shared module holds."""

import test_comfyui
import torch
from comfy_standin import encode, sd1_clip
from test_comfyui import PROMPT, _encode_node

from stylegrad import AestheticEncoder, Style, StyleOptions

comfy, sd1 = test_comfyui.comfy, test_comfyui.sd1  # the fixtures: ComfyUI's folders and the pack, a tiny SD1
KEY = "encoder.layers.0.mlp.fc1.weight"


def test_style_a_then_b_then_a_is_bit_identical(comfy, sd1):
    _, nodes = comfy
    pipe, clip_dir, a = sd1
    b = Style(torch.randn(24, generator=torch.Generator().manual_seed(2)), name="other")
    clip = sd1_clip(pipe.text_encoder, pipe.tokenizer)
    plain = encode(clip, PROMPT)[0][0]
    first, _ = _encode_node(nodes, clip, a, clip_model=str(clip_dir))
    other, styled_b = _encode_node(nodes, clip, b, clip_model=str(clip_dir))
    encode(styled_b, "another prompt")  # B's styled CLIP used downstream: its patches stay on the shared module
    again, _ = _encode_node(nodes, clip, a, clip_model=str(clip_dir))
    assert torch.equal(first[0][0], again[0][0]) and not torch.equal(first[0][0], other[0][0])
    assert torch.equal(encode(clip, PROMPT)[0][0], plain)  # the user's CLIP means what it meant


def test_a_lorad_clip_gives_the_same_result_in_any_order(comfy, sd1):
    """The LoRA is always part of what is tuned, whichever clone ComfyUI loaded last; the result is stylegrad's on
    the text encoder with the LoRA merged."""
    _, nodes = comfy
    pipe, clip_dir, style = sd1
    clip = sd1_clip(pipe.text_encoder, pipe.tokenizer)
    weight = pipe.text_encoder.get_parameter(KEY)
    delta = 0.05 * torch.randn(weight.shape, generator=torch.Generator().manual_seed(3))
    lora = clip.clone()
    assert lora.add_patches({"clip_l.transformer.text_model." + KEY: (delta,)}) == ["clip_l.transformer.text_model." + KEY]
    results = []
    for before in (lora, clip, None):
        if before is not None:
            encode(before, "what ran before")
        else:
            _encode_node(nodes, clip, style, clip_model=str(clip_dir))  # a styled CLIP loaded last
        results.append(_encode_node(nodes, lora, style, clip_model=str(clip_dir))[0][0][0])
    assert all(torch.equal(results[0], r) for r in results[1:])
    merged = AestheticEncoder(pipe.text_encoder, pipe.tokenizer, clip_model=str(clip_dir))
    with torch.no_grad():
        weight.add_(delta)
    try:
        want, _ = merged.encode(PROMPT, style, StyleOptions(steps=3, lr=1e-2))
    finally:
        with torch.no_grad():
            weight.sub_(delta)
    torch.testing.assert_close(results[0], want, atol=2e-5, rtol=1e-4)
    unlorad, _ = _encode_node(nodes, clip, style, clip_model=str(clip_dir))
    assert (unlorad[0][0] - results[0]).abs().max() > 1e-3  # the LoRA acts
