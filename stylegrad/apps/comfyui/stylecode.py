"""A ComfyUI MODEL that carries a stylecode: its ``diffusion_model`` replaced, on a clone only, by a module that runs
the same UNet with Stylecodes' control stream beside it (stylegrad's ``StylecodeUNet``).

ComfyUI's UNet has the original layout (``input_blocks``, ``middle_block``, ``output_blocks``); the control stream
interleaves with the diffusers layout's up sub-blocks. So the module reads the UNet's tensors as they are at each
call (LoRA patches included), renames them with diffusers' own converter into a meta-built ``UNet2DConditionModel``
(by reference, no copy) and runs that. SD1.x only, as Stylecodes is; ComfyUI's ControlNet and attention patches are
not applied inside this model."""

from __future__ import annotations

import torch

from stylegrad.errors import StylegradError
from stylegrad.stylecodes.model import float32_autoencoder, load_stylecodes
from stylegrad.stylecodes.unet import StylecodeUNet

PREFIX = "model.diffusion_model."


def diffusers_view(diffusion_model, config: dict):
    """ComfyUI's (original-layout) UNet as a diffusers ``UNet2DConditionModel`` holding the same tensors."""
    from diffusers import UNet2DConditionModel
    from diffusers.loaders.single_file_utils import convert_ldm_unet_checkpoint

    state = {PREFIX + k: v for k, v in diffusion_model.state_dict().items()}
    try:
        state = convert_ldm_unet_checkpoint(state, config)
        with torch.device("meta"):
            unet = UNet2DConditionModel.from_config(config)
        unet.load_state_dict(state, strict=True, assign=True)
    except (KeyError, RuntimeError, ValueError) as e:
        raise StylegradError(f"Stylecodes needs an SD1.x model; this one does not fit its UNet ({str(e)[:120]})") from None
    return unet.eval()


class StylecodeDiffusionModel(torch.nn.Module):
    """Called by ComfyUI as its ``diffusion_model`` (``forward(x, timesteps, context, ...)``)."""

    def __init__(self, original, checkpoint: str | None, latent: torch.Tensor, strength: float, config: dict):
        super().__init__()
        self.original = original
        self.checkpoint, self.latent, self.strength, self.config = checkpoint, latent, float(strength), config
        self._signature = None
        self._styled = None
        self._control = None
        self._decoder: tuple = ()  # the code's float32 autoencoder, in a tuple: outside the module tree, never cast

    def _unet(self) -> StylecodeUNet:
        tensors = list(self.original.state_dict().values())
        signature = tuple((t.data_ptr(), t.device, t.dtype) for t in tensors)
        if signature != self._signature:  # first call, or ComfyUI moved or patched the weights
            view = diffusers_view(self.original, self.config)
            if self._control is None:
                self._control = load_stylecodes(self.checkpoint, view)
                self._decoder = (float32_autoencoder(self._control.sref_autoencoder, separate=True),)
            # the control stream follows the UNet at each call (StylecodeUNet); the code is decoded in float32
            self._styled = StylecodeUNet(view, self._control, self.latent, self.strength,
                                         autoencoder=self._decoder[0])
            self._signature = signature
        return self._styled

    def forward(self, x, timesteps=None, context=None, y=None, control=None, transformer_options=None, **kwargs):
        unet = self._unet()
        dtype = unet.dtype
        out = unet(x.to(dtype), timesteps, context.to(dtype), return_dict=False)[0]
        return out.to(x.dtype)


def patched_model(model, checkpoint: str | None, latent: torch.Tensor, strength: float, config: dict):
    """A clone of ComfyUI's MODEL whose ``diffusion_model`` runs with the code; ``model`` itself is untouched."""
    styled = model.clone()
    original = model.get_model_object("diffusion_model")
    styled.add_object_patch("diffusion_model", StylecodeDiffusionModel(original, checkpoint, latent, strength, config))
    return styled
