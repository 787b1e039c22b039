"""Options of the method, in one frozen dataclass; the CLI's flags, defaults and help come from its fields."""

from __future__ import annotations

from dataclasses import asdict, dataclass, field, fields
from typing import TYPE_CHECKING

from stylegrad.errors import StylegradError

if TYPE_CHECKING:  # torch is imported where tuning starts: the CLI builds its flags from these fields without it
    import torch

    from stylegrad.aesthetic.adam import AdamSettings


def _opt(default, help: str, infotext: str | None = None):
    """A field with its help text and its name in the PNG metadata (A1111's extension's where it has one)."""
    return field(default=default, metadata={"help": help, "infotext": infotext})


# The consistent mode as measured on the small world (bench/consistency.py; bench/methods.py's row): every prompt
# tuned until its text embedding's cosine to the style reaches 0.5, at most 50 steps, at the world's rate (DEMO_LR):
# StyleOptions(lr=DEMO_LR, **CONSISTENT_DEFAULTS). The goal is a cosine in the style's CLIP space, so another model
# or style wants its own (target_gain, relative to each prompt's start, carries over without one).
CONSISTENT_DEFAULTS = {"steps": 50, "target_similarity": 0.5}


@dataclass(frozen=True)
class StyleOptions:
    """How strongly and in which way a style personalizes a prompt (defaults: the paper's)."""

    steps: int = _opt(10, "Adam steps on the text encoder per prompt (the paper uses 5-20; 0 = no style)",
                      "Aesthetic steps")
    lr: float = _opt(1e-4, "Adam learning rate (the paper's; higher = stronger, faster, less faithful)",
                     "Aesthetic LR")
    weight: float = _opt(1.0, "blend of tuned and original prompt states: 0 = original, 1 = tuned (the paper)",
                         "Aesthetic weight")
    slerp: bool = _opt(False, "blend with per-token spherical interpolation instead of linear", "Aesthetic slerp")
    text: str | None = _opt(None, "text that rotates the style target towards (or away from) a description",
                            "Aesthetic text")
    text_angle: float = _opt(0.1, "how far the target moves towards the text (0..1, slerp fraction)",
                             "Aesthetic slerp angle")
    text_negative: bool = _opt(False, "use style minus text as the direction (steer away from the text)",
                               "Aesthetic text negative")
    regularization: float = _opt(0.0, "penalty on the mean squared distance of the 77 tuned conditioning states "
                                 "from the original ones", "Aesthetic regularization")
    target_similarity: float | None = _opt(None, "consistent strength: stop each prompt once its cosine to the "
                                           "style reaches this (steps becomes a cap)", "Aesthetic target similarity")
    target_gain: float | None = _opt(None, "consistent strength: stop each prompt once its cosine to the style has "
                                     "closed this fraction of its starting distance to 1 (steps becomes a cap)",
                                     "Aesthetic target gain")
    personalize_negative: bool = _opt(False, "also tune the negative prompt (as the AUTOMATIC1111 extension)",
                                      "Aesthetic personalize negative")
    towers: str = _opt("both", "SDXL: the text towers to tune, l (CLIP-L), g (OpenCLIP bigG) or both; SD1.x/SD2.x "
                       "have one", "Aesthetic towers")
    betas: tuple[float, float] = _opt((0.9, 0.999), "Adam betas", "Aesthetic betas")
    eps: float = _opt(1e-8, "Adam epsilon", "Aesthetic eps")

    def __post_init__(self):
        checks = [
            ("steps", self.steps, isinstance(self.steps, int) and self.steps >= 0, "a whole number >= 0"),
            ("lr", self.lr, self.lr > 0, "> 0"),
            ("weight", self.weight, 0.0 <= self.weight <= 1.0 or not self.slerp, "in [0, 1] with slerp"),
            ("text_angle", self.text_angle, 0.0 <= self.text_angle <= 1.0, "in [0, 1]"),
            ("regularization", self.regularization, self.regularization >= 0, ">= 0"),
            ("betas", self.betas, len(self.betas) == 2 and all(0 <= b < 1 for b in self.betas), "two numbers in [0, 1)"),
            ("eps", self.eps, self.eps > 0, "> 0"),
            ("towers", self.towers, self.towers in ("l", "g", "both"), "l, g or both"),
        ]
        if self.target_similarity is not None:
            checks.append(
                ("target_similarity", self.target_similarity, -1.0 < self.target_similarity <= 1.0, "in (-1, 1]")
            )
        if self.target_gain is not None:
            checks.append(("target_gain", self.target_gain, 0.0 < self.target_gain <= 1.0, "in (0, 1]"))
            checks.append(("target_similarity", self.target_similarity, self.target_similarity is None,
                           "unset with target_gain (one goal at a time)"))
        for name, value, ok, want in checks:
            if not ok:
                raise StylegradError(f"style option {name}={value!r} must be {want}")

    @property
    def active(self) -> bool:
        return self.steps > 0 and self.weight != 0.0

    def key(self) -> tuple:
        return tuple(asdict(self).values())

    def adam(self, device: torch.device) -> AdamSettings:
        from stylegrad.aesthetic.adam import AdamSettings

        return AdamSettings.for_device(device, self.lr, tuple(self.betas), self.eps)

    def infotext_fields(self) -> dict[str, object]:
        """Every option under its PNG-metadata name."""
        return {f.metadata["infotext"]: " ".join(map(str, v)) if isinstance(v := getattr(self, f.name), tuple) else v
                for f in fields(self)}

    @classmethod
    def from_infotext(cls, values: dict[str, str]) -> StyleOptions:
        """The options written by ``infotext_fields`` (missing ones keep their defaults)."""
        kw = {}
        for f in fields(cls):
            raw = values.get(f.metadata["infotext"])
            if raw is None or raw == "":
                continue
            default = f.default
            if isinstance(default, bool):
                kw[f.name] = raw.strip().lower() == "true"
            elif isinstance(default, tuple):
                kw[f.name] = tuple(float(x) for x in raw.replace(",", " ").split())
            elif isinstance(default, int):
                kw[f.name] = int(raw)
            elif f.name == "text" or isinstance(default, str):
                kw[f.name] = raw
            else:
                kw[f.name] = None if raw == "None" else float(raw)
        return cls(**kw)
