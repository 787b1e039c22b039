"""A ComfyUI MODEL that carries a stylecode: its ``diffusion_model`` replaced, on a clone only, by a module that runs
the same UNet with Stylecodes' control stream beside it (stylegrad's ``StylecodeUNet``).

ComfyUI's UNet has the original layout (``input_blocks``, ``middle_block``, ``output_blocks``); the control stream
interleaves with the diffusers layout's up sub-blocks. So the module reads the UNet's tensors as they are at each
call (LoRA patches included), renames them with diffusers' own converter into a meta-built ``UNet2DConditionModel``
(by reference, no copy) and runs that. SD1.x only, as Stylecodes is; ComfyUI's ControlNet and attention patches are
not applied inside this model."""

from __future__ import annotations

from types import SimpleNamespace

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
    """Called by ComfyUI as its ``diffusion_model`` (``forward(x, timesteps, context, ...)``), and seen by ComfyUI as
    the UNet it wraps. ComfyUI reads its diffusion model while this object patch is applied, and even after a failed
    run, when a later graph (plain ones too) estimates memory before loading its own clone: comfy/model_base.py
    ``get_dtype`` (``diffusion_model.dtype``, in ``apply_model`` and ``memory_required``), ``state_dict`` and the
    model patcher's walk over ``named_modules`` to patch LoRA weights by name (``diffusion_model.input_blocks...``).
    So this module shares the UNet's parameter, buffer and child tables (the same names, the same tensors: ComfyUI's
    patches land in the UNet), answers any other attribute from the UNet, and keeps its own state (the control
    stream, the code's decoder) outside the module tree, where ComfyUI neither moves, casts nor patches it."""

    def __init__(self, original, checkpoint: str | None, latent: torch.Tensor, strength: float, config: dict):
        super().__init__()
        for table in ("_parameters", "_buffers", "_modules", "_non_persistent_buffers_set"):
            self.__dict__[table] = getattr(original, table)
        self.__dict__["_hold"] = SimpleNamespace(
            original=original, checkpoint=checkpoint, latent=latent, strength=float(strength), config=config,
            signature=None, styled=None, control=None, decoder=None)

    def __getattr__(self, name: str):
        try:
            return super().__getattr__(name)
        except AttributeError:
            hold = self.__dict__.get("_hold")
            if hold is None:
                raise
            return getattr(hold.original, name)

    @property
    def original(self):
        return self._hold.original

    @property
    def dtype(self) -> torch.dtype:
        """ComfyUI's UNet carries its weights' dtype as ``dtype``; the first weight's otherwise."""
        dtype = getattr(self._hold.original, "dtype", None)
        return dtype if isinstance(dtype, torch.dtype) else next(self._hold.original.parameters()).dtype

    def _unet(self) -> StylecodeUNet:
        hold = self._hold
        tensors = list(hold.original.state_dict().values())
        signature = tuple((t.data_ptr(), t.device, t.dtype) for t in tensors)
        if signature != hold.signature:  # first call, or ComfyUI moved or patched the weights
            view = diffusers_view(hold.original, hold.config)
            if hold.control is None:
                control = load_stylecodes(hold.checkpoint, view)
                hold.decoder = float32_autoencoder(control.sref_autoencoder, separate=True)
                hold.control = control
            # the control stream follows the UNet at each call (StylecodeUNet); the code is decoded in float32
            hold.styled = StylecodeUNet(view, hold.control, hold.latent, hold.strength, autoencoder=hold.decoder)
            hold.signature = signature
        return hold.styled

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
