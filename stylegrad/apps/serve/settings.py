"""What one ``stylegrad serve`` process allows: limits on every request (``Limits``, defaults ``limits.SERVER``),
the folders it reads, who may call it."""

from __future__ import annotations

import ipaddress
import os
from dataclasses import dataclass

from stylegrad.errors import StylegradError
from stylegrad.pipelines.limits import SERVER, Limits

MAX_PIXELS = 4096 * 4096  # an init image may be larger than the picture (it is resized), not without bound


@dataclass(frozen=True)
class ServeSettings:
    host: str = "127.0.0.1"
    port: int = 7860
    api_key: str | None = None  # required off loopback: clients send 'Authorization: Bearer KEY'
    styles_dirs: tuple[str, ...] = ()  # where request styles are looked up by name, and new styles are saved
    loras_dirs: tuple[str, ...] = ()
    embeddings_dirs: tuple[str, ...] = ()
    hypernetworks_dirs: tuple[str, ...] = ()  # A1111's models/hypernetworks: <hypernet:NAME:MULT> tags, the list
    models_dir: str | None = None  # checkpoints a client may switch to (A1111's sd_model_checkpoint)
    ipadapter_dirs: tuple[str, ...] = ()  # IP-Adapter files a request may name (ComfyUI's models/ipadapter)
    clip_vision_dirs: tuple[str, ...] = ()  # their image encoders (models/clip_vision), found by the library
    outputs_dir: str = "outputs"  # where A1111 requests with save_images write their PNGs (txt2img-images/, ...)
    max_waiting: int = 16  # requests queued behind the running one; more get 429
    max_batch: int = 1  # >1: waiting requests with the same settings run as one batch (equal up to rounding)
    # a request's limits (the schema's Limits): every door checks them through GenerationRequest's build/check
    max_side: int = SERVER.max_side
    max_steps: int = SERVER.max_steps
    max_style_steps: int = SERVER.max_style_steps
    max_images: int = SERVER.max_images
    max_prompt_chars: int = SERVER.max_prompt_chars
    max_upload_bytes: int = 20 << 20  # one uploaded image
    max_style_images: int = 200  # images in one style upload
    max_ip_images: int = 16  # IP-Adapter reference pictures in one request (their embeddings are averaged)
    max_image_pixels: int = MAX_PIXELS  # an uploaded image's width x height, read from its header before decoding
    log_prompts: bool = False  # request logs name prompts only when asked
    ui: bool = True  # the Gradio web UI at /
    predictor: str | None = None  # aesthetic predictor for the style's score (name or file); None: no score

    def __post_init__(self):
        if self.api_key is None and not is_loopback(self.host):
            raise StylegradError(f"serving on {self.host} (reachable from other machines) needs --api-key KEY "
                                 "(or $STYLEGRAD_API_KEY); clients then send 'Authorization: Bearer KEY'")
        if self.api_key is not None and len(self.api_key) < 8:
            raise StylegradError("--api-key must be at least 8 characters")
        for name in ("max_waiting", "max_batch", "max_upload_bytes", "max_style_images", "max_image_pixels",
                     "max_ip_images"):
            if getattr(self, name) < 1:
                raise StylegradError(f"{name} must be >= 1")
        self.limits  # noqa: B018 - refuses a limit below 1 now, not at the first request

    @property
    def limits(self) -> Limits:
        """What one request may ask for here."""
        return Limits(max_side=self.max_side, max_steps=self.max_steps, max_style_steps=self.max_style_steps,
                      max_images=self.max_images, max_prompt_chars=self.max_prompt_chars)


def is_loopback(host: str) -> bool:
    """Only this machine can reach it ('' and 0.0.0.0 mean every interface)."""
    if host == "localhost":
        return True
    try:
        return ipaddress.ip_address(host).is_loopback
    except ValueError:  # a host name: only 'localhost' is known to stay on this machine
        return False


def default_dirs(env: str) -> tuple[str, ...]:
    value = os.environ.get(env)
    return tuple(p for p in value.split(os.pathsep) if p) if value else ()
