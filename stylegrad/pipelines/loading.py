"""Loading a diffusers pipeline from what the user names, and the samplers by our short names and A1111's."""

from __future__ import annotations

from pathlib import Path

import torch

from stylegrad.devices import resolve_device, resolve_dtype
from stylegrad.errors import RequestError, StylegradError
from stylegrad.files.hub import from_pretrained

DEFAULT_MODEL = "stable-diffusion-v1-5/stable-diffusion-v1-5"

KARRAS = {"use_karras_sigmas": True}
SDE = {"algorithm_type": "sde-dpmsolver++"}
# short name -> (diffusers scheduler class, A1111's name, config changes): A1111's samplers that diffusers has
SAMPLERS = {
    "ddim": ("DDIMScheduler", "DDIM", {}),
    "pndm": ("PNDMScheduler", "PLMS", {"skip_prk_steps": True}),  # LDM's PLMS: no Runge-Kutta warm-up steps
    "euler": ("EulerDiscreteScheduler", "Euler", {}),
    "euler_a": ("EulerAncestralDiscreteScheduler", "Euler a", {}),
    "euler_karras": ("EulerDiscreteScheduler", "Euler Karras", KARRAS),
    "dpmpp_2m": ("DPMSolverMultistepScheduler", "DPM++ 2M", {}),
    "dpmpp_2m_karras": ("DPMSolverMultistepScheduler", "DPM++ 2M Karras", KARRAS),
    "dpmpp_2m_sde": ("DPMSolverMultistepScheduler", "DPM++ 2M SDE", SDE),
    "dpmpp_2m_sde_karras": ("DPMSolverMultistepScheduler", "DPM++ 2M SDE Karras", {**SDE, **KARRAS}),
    "dpm2": ("KDPM2DiscreteScheduler", "DPM2", {}),
    "dpm2_karras": ("KDPM2DiscreteScheduler", "DPM2 Karras", KARRAS),
    "dpm2_a": ("KDPM2AncestralDiscreteScheduler", "DPM2 a", {}),
    "dpm2_a_karras": ("KDPM2AncestralDiscreteScheduler", "DPM2 a Karras", KARRAS),
    "unipc": ("UniPCMultistepScheduler", "UniPC", {}),
    "lms": ("LMSDiscreteScheduler", "LMS", {}),
    "lms_karras": ("LMSDiscreteScheduler", "LMS Karras", KARRAS),
    "heun": ("HeunDiscreteScheduler", "Heun", {}),
    "lcm": ("LCMScheduler", "LCM", {}),
}
# A1111 1.9+ writes 'Sampler: DPM++ 2M, Schedule type: Karras'; these schedule types map to a config change
SCHEDULES = {"automatic": {}, "uniform": {}, "karras": KARRAS, "exponential": {"use_exponential_sigmas": True}}


def sampler_id(name: str) -> str:
    """Our short name for a sampler given by short name or A1111's name (any case)."""
    wanted = name.strip().lower()
    for short, (_, a1111, _) in SAMPLERS.items():
        if wanted in (short, a1111.lower()):
            return short
    choices = ", ".join(f"{s} ({a})" for s, (_, a, _) in SAMPLERS.items())
    raise StylegradError(f"unknown sampler '{name}' (choose from {choices})")


def a1111_sampler(name: str, schedule: str | None = None) -> str | None:
    """Our short name for what an A1111 PNG names ('DPM++ 2M Karras', or 'DPM++ 2M' with schedule type
    'Karras'); None where diffusers has no equivalent."""
    full = f"{name} {schedule}" if schedule and schedule.lower() == "karras" and "karras" not in name.lower() else name
    try:
        return sampler_id(full)
    except StylegradError:
        return None


def a1111_sampler_name(scheduler) -> str:
    """A1111's name for a scheduler (with its Karras or SDE variant), as its PNGs write it."""
    name, config = type(scheduler).__name__, scheduler.config
    best = None
    for cls, a1111, changes in SAMPLERS.values():
        if cls == name and all(config.get(k) == v for k, v in changes.items()):
            if best is None or len(changes) > len(best[1]):
                best = (a1111, changes)
    return best[0] if best else name


def derived_pipeline(pipe, **components):
    """A new pipeline object sharing ``pipe``'s components and settings (``components`` replace some), as
    ``from_pipe`` would give without casting anything: what a call writes on it (guidance scale, timesteps,
    progress-bar settings) stays on it, and under model CPU offload the components keep the user's hooks. Its
    progress-bar settings are a copy of ``pipe``'s, not the same dict."""
    import copy

    ours = copy.copy(pipe)
    if components:
        ours.register_modules(**components)  # sets the attribute and the copy's own config entry
    if isinstance(getattr(pipe, "_progress_bar_config", None), dict):
        ours._progress_bar_config = dict(pipe._progress_bar_config)
    if getattr(pipe, "_all_hooks", None):  # model CPU offload: after a call diffusers would hook the shared
        ours._all_hooks = []  # components anew for this object; run.py puts them back on the CPU itself instead
    return ours


def with_sampler(pipe, sampler: str | None):
    """``pipe`` itself for the model's own sampler, else a pipeline sharing its components with that scheduler
    (``derived_pipeline``: the user's pipeline keeps its own scheduler and settings)."""
    if sampler is None:
        return pipe
    import diffusers

    short = sampler_id(sampler)
    cls_name, _, changes = SAMPLERS[short]
    cls = getattr(diffusers, cls_name)
    defaults = {k: False if isinstance(v, bool) else None for _, _, c in SAMPLERS.values() for k, v in c.items()}
    config = {**pipe.scheduler.config, **{k: v for k, v in defaults.items() if k in pipe.scheduler.config}}
    config.pop("algorithm_type", None)
    if isinstance(pipe.scheduler, cls) and all(pipe.scheduler.config.get(k) == v for k, v in changes.items()) \
            and a1111_sampler_name(pipe.scheduler) == SAMPLERS[short][1]:
        return pipe
    try:
        scheduler = cls.from_config({**config, **changes})
    except ImportError as e:  # LMS needs scipy, which diffusers does not require
        missing = "scipy" if "scipy" in str(e) else "a package diffusers asks for"
        raise StylegradError(f"sampler {short} needs {missing} (pip install {missing.split()[0]})") from e
    return derived_pipeline(pipe, scheduler=scheduler)


PIPELINES = ("StableDiffusionPipeline", "StableDiffusionXLPipeline")


def _dtype_keyword() -> str:
    """``dtype`` where this diffusers reads it; older ones (the package allows >= 0.30) read only ``torch_dtype``
    and would load a hub model in float32: twice the memory on a GPU, silently."""
    try:
        from diffusers.utils.deprecation_utils import _resolve_dtype  # noqa: F401 (present where dtype= is read)
    except ImportError:
        return "torch_dtype"
    return "dtype"


def load_pipeline(model: str = DEFAULT_MODEL, device: str | torch.device | None = None, vae: str | None = None,
                  models_dir: str | None = None, dtype: str | torch.dtype | None = None):
    """An SD1.x/SD2.x/SDXL text-to-image pipeline from what users have: a hub id, a diffusers folder, a single
    ``.safetensors``/``.ckpt`` checkpoint, or a checkpoint's name in the models folder. ``device`` and ``dtype``
    follow stylegrad.devices' policy (auto: CUDA, MPS, CPU; fp16 on CUDA and MPS, fp32 on the CPU), checked before
    anything loads. ``vae``: a VAE file for a single-file checkpoint."""
    import diffusers

    from stylegrad.checkpoints.library import resolve_model
    from stylegrad.checkpoints.loading import load_checkpoint

    device = resolve_device(device)
    dtype = resolve_dtype(dtype, device)
    model = resolve_model(model, models_dir)
    path = Path(model).expanduser()
    if path.is_file():
        return load_checkpoint(path, device, vae=vae, dtype=dtype)
    if vae:
        raise RequestError("vae", "{field} applies to single-file checkpoints; a diffusers model has its own vae/ folder")
    pipe = from_pretrained(diffusers.DiffusionPipeline, model, what="model", **{_dtype_keyword(): dtype})
    if type(pipe).__name__ not in PIPELINES:
        raise StylegradError(f"{model} is a {type(pipe).__name__}; stylegrad generates with Stable Diffusion 1.x, "
                             "2.x and SDXL text-to-image models")
    return pipe.to(device, dtype)  # also where this diffusers version ignored torch_dtype
