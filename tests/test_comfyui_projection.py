"""Aesthetic CLIP Text Encode from ComfyUI's own CLIP with nothing filled in. ComfyUI leaves CLIP-L's text projection
uninitialised (the stand-in's zeros, or NaN), so the style space must come from openai's projection read alone:
models/clip_vision, the Hugging Face cache, or a file named in the node; a NaN or zero projection is an error."""

import json
import shutil

import pytest
import test_comfyui
import torch
from comfy_standin import run_node, sd1_clip, sdxl_clip
from test_comfyui import PROMPT, _encode_node

from stylegrad import AestheticEncoder, StyleOptions
from stylegrad.errors import StylegradError

REPO = "openai/clip-vit-large-patch14"
comfy, sd1 = test_comfyui.comfy, test_comfyui.sd1  # the fixtures: ComfyUI's folders and the pack, a tiny SD1


def _reference(pipe, clip_dir, style, **options):
    enc = AestheticEncoder(pipe.text_encoder, pipe.tokenizer, clip_model=str(clip_dir))
    return enc.encode(PROMPT, style, StyleOptions(steps=3, lr=1e-2, **options))[0]


def _hub_cache(root, clip_dir, monkeypatch):
    """A Hugging Face cache holding the tiny CLIP as openai's ViT-L/14 (config and safetensors), read offline."""
    import huggingface_hub.constants as constants

    sha = "0" * 40
    repo = root / ("models--" + REPO.replace("/", "--"))
    (repo / "refs").mkdir(parents=True)
    (repo / "refs" / "main").write_text(sha)
    snapshot = repo / "snapshots" / sha
    snapshot.mkdir(parents=True)
    if clip_dir is not None:
        for name in ("config.json", "model.safetensors"):
            shutil.copy(clip_dir / name, snapshot / name)
    monkeypatch.setattr(constants, "HF_HUB_CACHE", str(root))
    monkeypatch.setattr(constants, "HF_HUB_OFFLINE", True)


@pytest.mark.parametrize("fill", [0.0, float("nan")], ids=["zeros", "nan"])
def test_nothing_filled_in_reads_clip_vision(comfy, sd1, tmp_path, monkeypatch, fill):
    """An openai CLIP file in models/clip_vision is found; ComfyUI's uninitialised matrix is never used."""
    fp, nodes = comfy
    pipe, clip_dir, style = sd1
    _hub_cache(tmp_path / "hub", None, monkeypatch)  # an empty cache: the folder must be the source
    folder = tmp_path / "ComfyUI" / "models" / "clip_vision"
    folder.mkdir(parents=True)
    shutil.copy(clip_dir / "model.safetensors", folder / "clip-vit-large-patch14.safetensors")
    clip = sd1_clip(pipe.text_encoder, pipe.tokenizer, fill=fill)
    cond, _ = _encode_node(nodes, clip, style)
    assert torch.isfinite(cond[0][0]).all()
    torch.testing.assert_close(cond[0][0], _reference(pipe, clip_dir, style), atol=2e-5, rtol=1e-4)


def test_nothing_filled_in_reads_the_hugging_face_cache(comfy, sd1, tmp_path, monkeypatch):
    _, nodes = comfy
    pipe, clip_dir, style = sd1
    _hub_cache(tmp_path / "hub", clip_dir, monkeypatch)
    cond, _ = _encode_node(nodes, sd1_clip(pipe.text_encoder, pipe.tokenizer), style, weight=0.6)
    torch.testing.assert_close(cond[0][0], _reference(pipe, clip_dir, style, weight=0.6), atol=2e-5, rtol=1e-4)


def test_a_file_named_in_the_node(comfy, sd1, tmp_path, monkeypatch):
    """A path to a safetensors file, or a file's name in models/clip_vision; OpenCLIP's transposed key too."""
    from safetensors.torch import load_file, save_file

    _, nodes = comfy
    pipe, clip_dir, style = sd1
    _hub_cache(tmp_path / "hub", None, monkeypatch)
    projection = load_file(clip_dir / "model.safetensors")["text_projection.weight"]
    save_file({"text_projection.weight": projection}, tmp_path / "proj.safetensors")
    folder = tmp_path / "ComfyUI" / "models" / "clip_vision"
    folder.mkdir(parents=True)
    save_file({"text_projection": projection.T.contiguous()}, folder / "openclip.safetensors")
    want = _reference(pipe, clip_dir, style)
    clip = sd1_clip(pipe.text_encoder, pipe.tokenizer)
    for named in (str(tmp_path / "proj.safetensors"), "openclip.safetensors"):
        cond, _ = _encode_node(nodes, clip, style, clip_model=named)
        torch.testing.assert_close(cond[0][0], want, atol=2e-5, rtol=1e-4)


def test_no_projection_anywhere_is_one_error_naming_where_it_looked(comfy, sd1, tmp_path, monkeypatch):
    _, nodes = comfy
    pipe, _, style = sd1
    _hub_cache(tmp_path / "hub", None, monkeypatch)
    clip = sd1_clip(pipe.text_encoder, pipe.tokenizer)
    with pytest.raises(StylegradError) as e:
        _encode_node(nodes, clip, style)
    message = str(e.value)
    assert "\n" not in message and "clip_vision" in message and REPO in message and "clip_model" in message


def test_a_zero_or_nan_projection_is_an_error_never_an_image(comfy, sd1, tmp_path, monkeypatch):
    from safetensors.torch import save_file

    _, nodes = comfy
    pipe, _, style = sd1
    _hub_cache(tmp_path / "hub", None, monkeypatch)
    clip = sd1_clip(pipe.text_encoder, pipe.tokenizer)
    width = pipe.text_encoder.config.hidden_size
    for bad in (torch.zeros(24, width), torch.full((24, width), float("nan"))):
        save_file({"text_projection.weight": bad}, tmp_path / "bad.safetensors")
        with pytest.raises(StylegradError, match="text projection"):
            _encode_node(nodes, clip, style, clip_model=str(tmp_path / "bad.safetensors"))


def test_sdxl_reads_bigg_from_the_checkpoint_and_refuses_an_empty_one(comfy, tmp_path, monkeypatch):
    """SDXL: CLIP-L's style space as SD1.x's (ComfyUI has none), bigG's the checkpoint's; a zero bigG is refused."""
    from ckpt_layout import family_pipeline
    from test_sdxl_tuning import xl_style
    from transformers import CLIPTextModelWithProjection

    from stylegrad.aesthetic.sdxl import SDXLAestheticEncoder

    _, nodes = comfy
    pipe = family_pipeline("sdxl", seed=3)
    clip_l = CLIPTextModelWithProjection(pipe.text_encoder.config).eval()
    clip_l.text_model.load_state_dict(pipe.text_encoder.state_dict())
    torch.manual_seed(4)
    torch.nn.init.normal_(clip_l.text_projection.weight, std=0.2)
    clip_l.save_pretrained(tmp_path / "clip_l")
    (tmp_path / "clip_l" / "config.json").write_text(json.dumps(clip_l.config.to_dict()))
    _hub_cache(tmp_path / "hub", tmp_path / "clip_l", monkeypatch)
    style = xl_style(pipe, clip_l)
    clip = sdxl_clip(pipe.text_encoder, pipe.text_encoder_2, pipe.tokenizer, pad_g=pipe.tokenizer_2.pad_token_id)
    cond, _ = _encode_node(nodes, clip, style, towers="both")
    e = SDXLAestheticEncoder(pipe, clip_model=str(tmp_path / "clip_l")).encode(
        PROMPT, style, StyleOptions(steps=3, lr=1e-2, towers="both"))
    torch.testing.assert_close(cond[0][0], e.prompt_embeds, atol=3e-5, rtol=1e-4)
    torch.testing.assert_close(cond[0][1]["pooled_output"], e.pooled_prompt_embeds, atol=3e-5, rtol=1e-4)
    with torch.inference_mode():
        clip.cond_stage_model.clip_g.transformer.text_projection.weight.zero_()
    with pytest.raises(StylegradError, match="tower 'g'.*all zeros"):
        run_node(nodes.AestheticCLIPTextEncode, clip=clip, text=PROMPT, style=style, steps=3, lr=1e-2, weight=1.0,
                 towers="g")
