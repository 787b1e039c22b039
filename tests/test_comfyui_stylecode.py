"""Stylecode in ComfyUI's samplers: the wrapper is read as ComfyUI's model base reads its diffusion model
(``get_dtype`` in ``apply_model`` and ``memory_required``, LoRA weights patched by their names), samples as
``StylecodeUNet`` on the same weights, and a failure inside it leaves later graphs working."""

from pathlib import Path

import pytest
import test_comfyui
import torch
from comfy_standin import BaseModel, ModelPatcher, UNetModel, run_node, sample_step

comfy = test_comfyui.comfy  # the fixture: ComfyUI's folders and the pack


@pytest.fixture()
def world(comfy, tiny_checkpoint_configs):
    """A tiny SD1 UNet as ComfyUI holds it (original layout, in a model base), a Stylecodes file in
    models/stylecodes, and a clone of the MODEL carrying a LoRA-like patch on one weight."""
    from ckpt_layout import _config, unet_key
    from diffusers import UNet2DConditionModel
    from tiny import tiny_stylecodes

    from stylegrad.stylecodes.model import save_stylecodes

    fp, nodes = comfy
    torch.manual_seed(0)
    unet = UNet2DConditionModel.from_config(_config("sd1")["unet"]).eval().requires_grad_(False)
    control = tiny_stylecodes(unet)
    save_stylecodes(control, Path(fp.models_dir) / "stylecodes" / "tiny.safetensors")
    names = {k: unet_key(k, unet.config) for k in unet.state_dict()}
    with torch.inference_mode():
        base = BaseModel(UNetModel(unet, names))
    model = ModelPatcher(base)
    key = "conv_in.weight"
    delta = 0.1 * torch.randn(unet.get_parameter(key).shape, generator=torch.Generator().manual_seed(5))
    lora = model.clone()
    assert lora.add_patches({"diffusion_model." + names[key]: (delta,)})
    return nodes, unet, control, model, lora, key, delta


def _inputs(unet):
    g = torch.Generator().manual_seed(1)
    return (torch.randn(1, 4, 16, 16, generator=g), torch.tensor([500.0]),
            torch.randn(1, 77, unet.config.cross_attention_dim, generator=g))


def _want(unet, control, code, strength, x, t, ctx, key=None, delta=None):
    from stylegrad.stylecodes.facade import Stylecodes
    from stylegrad.stylecodes.unet import StylecodeUNet

    latent = Stylecodes(control.sref_autoencoder, control).latent_of(code)
    weight = unet.get_parameter(key) if key else None
    with torch.no_grad():
        if key:
            weight.add_(delta)
        try:
            return StylecodeUNet(unet, control, latent, strength)(x, t, ctx).sample
        finally:
            if key:
                weight.sub_(delta)


def test_a_stylecode_model_samples_with_its_loras(world):
    """KSampler's calls on the styled clone of a LoRA'd MODEL: ComfyUI's dtype reads work and the LoRA acts."""
    from stylegrad.stylecodes.codec import random_code

    nodes, unet, control, model, lora, key, delta = world
    code = random_code(3)
    styled, _ = run_node(nodes.Stylecode, model=lora, code=code, strength=0.8, checkpoint="tiny.safetensors")
    x, t, ctx = _inputs(unet)
    with torch.inference_mode():
        assert styled.model_dtype() == torch.float32  # before loading: the diffusion model is still ComfyUI's
        got = sample_step(styled, x, t, ctx)
        assert styled.model.diffusion_model.dtype == torch.float32 and styled.model.get_dtype() == torch.float32
        wrapper = styled.model.diffusion_model
        assert set(wrapper.state_dict()) == set(wrapper.original.state_dict())  # ComfyUI patches by these names
    torch.testing.assert_close(got, _want(unet, control, code, 0.8, x, t, ctx, key, delta), atol=1e-5, rtol=1e-4)
    plain = _want(unet, control, code, 0.8, x, t, ctx)
    assert (got - plain).abs().max() > 1e-4  # without the LoRA it would differ


def test_a_failure_inside_the_stylecode_model_leaves_later_graphs_working(world, monkeypatch):
    from stylegrad.apps.comfyui import stylecode
    from stylegrad.stylecodes.codec import random_code

    nodes, unet, control, model, _, _, _ = world
    x, t, ctx = _inputs(unet)
    styled, _ = run_node(nodes.Stylecode, model=model, code=random_code(2), strength=1.0,
                         checkpoint="tiny.safetensors")
    monkeypatch.setattr(stylecode, "load_stylecodes", lambda *a, **k: (_ for _ in ()).throw(RuntimeError("broken")))
    with torch.inference_mode(), pytest.raises(RuntimeError, match="broken"):
        sample_step(styled, x, t, ctx)
    with torch.inference_mode():  # a plain graph next, while the failed clone is still the one loaded
        got = sample_step(model, x, t, ctx)
    with torch.no_grad():
        torch.testing.assert_close(got, unet(x, t, ctx).sample, atol=1e-5, rtol=1e-4)
