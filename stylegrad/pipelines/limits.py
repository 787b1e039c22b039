"""How much one generation request may ask for, defined once: the library and the CLI set no limits besides the
schema's own, a server sets ``SERVER`` (its flags change it). Plain Python, so argument parsers read the defaults
without importing a model library."""

from __future__ import annotations

from dataclasses import dataclass

MAX_SEED = 2**32 - 1  # A1111's seeds, and what every door accepts (-1, where a door allows it, means random)
MAX_PROMPT_CHARS = 20_000  # prompt or negative: about 60 chunks of 75 tokens, far beyond any real prompt


@dataclass(frozen=True)
class Limits:
    """A front door's limits on a request; None: no limit beyond the schema's."""

    max_side: int | None = None  # width and height, and those an init image implies, pixels
    max_steps: int | None = None  # denoising steps
    max_style_steps: int | None = None  # aesthetic-gradient steps
    max_images: int | None = None  # images per request (A1111's batch_size x n_iter)
    max_prompt_chars: int = MAX_PROMPT_CHARS  # the prompt and the negative, each

    def __post_init__(self):
        from stylegrad.errors import StylegradError

        for name in ("max_side", "max_steps", "max_style_steps", "max_images", "max_prompt_chars"):
            value = getattr(self, name)
            if value is not None and (not isinstance(value, int) or value < 1):
                raise StylegradError(f"{name} must be a whole number >= 1, got {value!r}")

    def as_dict(self) -> dict[str, int | None]:
        return {"max_side": self.max_side, "max_steps": self.max_steps, "max_style_steps": self.max_style_steps,
                "max_images": self.max_images, "max_prompt_chars": self.max_prompt_chars}


SERVER = Limits(max_side=2048, max_steps=150, max_style_steps=100, max_images=8)
