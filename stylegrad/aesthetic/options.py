"""Options of the method, in one frozen dataclass; the CLI's help text comes from the same place."""

from __future__ import annotations

from dataclasses import asdict, dataclass, field, fields

from stylegrad.errors import StylegradError


def _opt(default, help: str):
    return field(default=default, metadata={"help": help})


@dataclass(frozen=True)
class StyleOptions:
    """How strongly and in which way a style personalises a prompt (defaults: the paper's)."""

    steps: int = _opt(10, "Adam steps on the text encoder per prompt (the paper uses 5-20; 0 = no style)")
    lr: float = _opt(1e-4, "Adam learning rate (the paper's 1e-4; higher = stronger, faster, less faithful)")
    weight: float = _opt(1.0, "blend of tuned and original prompt states: 0 = original, 1 = tuned (the paper)")
    slerp: bool = _opt(False, "blend with per-token spherical interpolation instead of linear")
    text: str | None = _opt(None, "text that rotates the style target towards (or away from) a description")
    text_angle: float = _opt(0.1, "how far the target moves towards --style-text (0..1, slerp fraction)")
    text_negative: bool = _opt(False, "use style minus text as the direction (steer away from the text)")
    regularization: float = _opt(0.0, "penalty on the distance of tuned hidden states from the original ones")
    target_similarity: float | None = _opt(None, "stop early once the prompt's cosine to the style reaches this")
    personalize_negative: bool = _opt(False, "also tune the negative prompt (as the AUTOMATIC1111 extension)")
    betas: tuple[float, float] = _opt((0.9, 0.999), "Adam betas")
    eps: float = _opt(1e-8, "Adam epsilon")

    def __post_init__(self):
        checks = [
            ("steps", self.steps, isinstance(self.steps, int) and self.steps >= 0, "a whole number >= 0"),
            ("lr", self.lr, self.lr > 0, "> 0"),
            ("weight", self.weight, 0.0 <= self.weight <= 1.0 or not self.slerp, "in [0, 1] with slerp"),
            ("text_angle", self.text_angle, 0.0 <= self.text_angle <= 1.0, "in [0, 1]"),
            ("regularization", self.regularization, self.regularization >= 0, ">= 0"),
            ("eps", self.eps, self.eps > 0, "> 0"),
        ]
        if self.target_similarity is not None:
            checks.append(
                ("target_similarity", self.target_similarity, -1.0 < self.target_similarity <= 1.0, "in (-1, 1]")
            )
        for name, value, ok, want in checks:
            if not ok:
                raise StylegradError(f"style option {name}={value!r} must be {want}")

    @property
    def active(self) -> bool:
        return self.steps > 0 and self.weight != 0.0

    def key(self) -> tuple:
        return tuple(asdict(self).values())

    @classmethod
    def help(cls, name: str) -> str:
        return next(f.metadata["help"] for f in fields(cls) if f.name == name)
