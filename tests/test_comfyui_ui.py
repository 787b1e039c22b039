"""The nodes as ComfyUI users expect them: ``towers`` only where it applies, Style from Images saving with nothing
wired to it (an output node, which ComfyUI's executor runs on its own), errors naming the node's inputs."""

from pathlib import Path

import pytest
import test_comfyui
import torch
from comfy_standin import run_node, run_prompt, sd1_clip
from test_comfyui import PROMPT
from test_comfyui_projection import _hub_cache

from stylegrad.errors import StylegradError

comfy, sd1 = test_comfyui.comfy, test_comfyui.sd1  # the fixtures: ComfyUI's folders and the pack, a tiny SD1


def test_towers_is_optional_and_sd1_needs_none(comfy, sd1):
    _, nodes = comfy
    pipe, clip_dir, style = sd1
    spec = nodes.AestheticCLIPTextEncode.INPUT_TYPES()
    assert "towers" not in spec["required"] and spec["optional"]["towers"][1]["default"] == "both"
    clip = sd1_clip(pipe.text_encoder, pipe.tokenizer)
    cond, _ = run_node(nodes.AestheticCLIPTextEncode, clip=clip, text=PROMPT, style=style, steps=2, lr=1e-2,
                       weight=1.0, clip_model=str(clip_dir))
    assert torch.isfinite(cond[0][0]).all()


def test_style_from_images_saves_with_nothing_wired(comfy, sd1):
    fp, nodes = comfy
    _, clip_dir, _ = sd1
    images = torch.rand(2, 32, 32, 3, generator=torch.Generator().manual_seed(0))
    prompt = {"1": (nodes.StyleFromImages, dict(images=images, family="sd1", name="alone", save=True,
                                                clip_model=str(clip_dir)))}
    ran = run_prompt(prompt)
    assert "1" in ran and (Path(fp.models_dir) / "styles" / "alone.safetensors").is_file()


def test_a_missing_model_names_the_node_input(comfy, sd1, tmp_path, monkeypatch, tiny_checkpoint_configs):
    from ckpt_layout import _config
    from diffusers import UNet2DConditionModel
    from tiny import tiny_stylecodes

    from stylegrad.stylecodes.model import save_stylecodes

    fp, nodes = comfy
    _hub_cache(tmp_path / "hub", None, monkeypatch)  # nothing cached, offline
    images = torch.rand(1, 32, 32, 3)
    with pytest.raises(StylegradError) as e:
        run_node(nodes.StyleFromImages, images=images, family="sd1", name="x", save=False,
                 clip_model=str(tmp_path / "no-clip"))
    assert "'clip_model' input" in str(e.value) and "--" not in str(e.value)
    with pytest.raises(StylegradError) as e:
        run_node(nodes.Stylecode, model=None, code="", strength=1.0)
    message = str(e.value)
    assert "'checkpoint' input" in message and "models/stylecodes" in message
    assert "--" not in message and "stylecodes_model" not in message
    unet = UNet2DConditionModel.from_config(_config("sd1")["unet"])
    save_stylecodes(tiny_stylecodes(unet), Path(fp.models_dir) / "stylecodes" / "tiny.safetensors")
    with pytest.raises(StylegradError) as e:
        run_node(nodes.Stylecode, model=None, code="", strength=1.0, image=images, checkpoint="tiny.safetensors",
                 siglip=str(tmp_path / "no-siglip"))
    assert "'siglip' input" in str(e.value) and "--" not in str(e.value)
