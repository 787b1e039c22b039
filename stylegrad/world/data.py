"""Procedural scenes: a colored shape on a background, drawn in one of several visual styles, with a caption.

Everything is a pure function of a seed, so the dataset is reproducible without storing it.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
from PIL import Image, ImageFilter

SIZE = 32
SHAPES = ("circle", "square", "triangle", "cross")
COLORS = {"red": (220, 40, 40), "green": (40, 170, 60), "blue": (40, 80, 220), "yellow": (235, 200, 30)}
STYLES = ("plain", "striped", "dotted", "outlined", "blurry")
BACKGROUNDS = ((245, 245, 240), (200, 200, 205), (40, 40, 48))
BACKGROUND_WORDS = ("light", "grey", "dark")
SIZE_WORDS = ("small", "large")  # radius below / above 9 pixels


@dataclass(frozen=True)
class Scene:
    shape: str
    color: str
    style: str
    background: int
    cx: float
    cy: float
    r: float

    def caption(self, with_style: bool, variant: int = 0) -> str:
        """Varied wordings (``variant`` 0..5), so a UNet trained on them sees a smooth text space rather than a
        handful of fixed states; variant 0 is the plain "a red circle"."""
        c, s = self.color, self.shape
        size = SIZE_WORDS[self.r >= 9]
        base = (f"a {c} {s}", f"{c} {s}", f"a {s}, {c}", f"a {size} {c} {s}",
                f"a {c} {s} on a {BACKGROUND_WORDS[self.background]} background", f"one {c} {s}")[variant % 6]
        if not with_style or self.style == "plain":
            return base
        return f"{base}, {self.style}" if variant % 2 == 0 else f"{self.style} {base}"


def _mask(scene: Scene) -> np.ndarray:
    """(SIZE, SIZE) bool: where the shape is."""
    y, x = np.mgrid[0:SIZE, 0:SIZE] + 0.5
    dx, dy, r = x - scene.cx, y - scene.cy, scene.r
    if scene.shape == "circle":
        return dx**2 + dy**2 <= r**2
    if scene.shape == "square":
        return (np.abs(dx) <= r * 0.85) & (np.abs(dy) <= r * 0.85)
    if scene.shape == "triangle":
        return (dy <= r * 0.8) & (dy >= -r) & (np.abs(dx) <= (dy + r) * 0.6)
    return ((np.abs(dx) <= r * 0.3) & (np.abs(dy) <= r)) | ((np.abs(dy) <= r * 0.3) & (np.abs(dx) <= r))


def render(scene: Scene) -> Image.Image:
    bg = np.array(BACKGROUNDS[scene.background], np.float32)
    fg = np.array(COLORS[scene.color], np.float32)
    img = np.broadcast_to(bg, (SIZE, SIZE, 3)).copy()
    mask = _mask(scene)
    y, x = np.mgrid[0:SIZE, 0:SIZE]
    if scene.style == "striped":
        paint = mask & (((x + y) // 2) % 2 == 0)
    elif scene.style == "dotted":
        paint = mask & ((x % 3 != 0) & (y % 3 != 0))  # 2x2 dots on a 3-pixel grid: the shape stays legible
    elif scene.style == "outlined":
        inner = mask.copy()
        for _ in range(2):  # a 2-pixel outline survives a 4x-downsampling autoencoder
            inner[1:-1, 1:-1] = inner[1:-1, 1:-1] & inner[:-2, 1:-1] & inner[2:, 1:-1] & inner[1:-1, :-2] & inner[1:-1, 2:]
            inner[0, :] = inner[-1, :] = inner[:, 0] = inner[:, -1] = False
        paint = mask & ~inner
    else:
        paint = mask
    img[paint] = fg
    out = Image.fromarray(img.astype(np.uint8))
    if scene.style == "blurry":
        out = out.filter(ImageFilter.GaussianBlur(1.3))
    return out


def sample(rng: np.random.Generator) -> Scene:
    r = float(rng.uniform(7.0, 11.0))
    return Scene(
        shape=SHAPES[rng.integers(len(SHAPES))],
        color=list(COLORS)[rng.integers(len(COLORS))],
        style=STYLES[rng.integers(len(STYLES))],
        background=int(rng.integers(len(BACKGROUNDS))),
        cx=float(rng.uniform(r, SIZE - r)),
        cy=float(rng.uniform(r, SIZE - r)),
        r=r,
    )


def dataset(n: int, seed: int, style_caption_p: float = 0.6, style: str | None = None, varied: bool = True):
    """n (image, caption, scene) triples; captions name the style with probability ``style_caption_p`` and use
    every wording when ``varied`` (else always "a red circle")."""
    rng = np.random.default_rng(seed)
    out = []
    for _ in range(n):
        s = sample(rng)
        if style is not None:
            s = Scene(s.shape, s.color, style, s.background, s.cx, s.cy, s.r)
        with_style, variant = bool(rng.random() < style_caption_p), int(rng.integers(6))
        out.append((render(s), s.caption(with_style, variant if varied else 0), s))
    return out


def caption_facts(caption: str) -> dict[str, str]:
    """What a caption says: {'color': 'red', 'shape': 'circle', 'style': ..., 'background': ..., 'size': ...},
    only the keys it mentions."""
    vocab = {"color": tuple(COLORS), "shape": SHAPES, "style": STYLES, "background": BACKGROUND_WORDS,
             "size": SIZE_WORDS}
    facts = {}
    for word in caption.replace(",", " ").split():
        for key, words in vocab.items():
            if word in words:
                facts[key] = word
    return facts


def scene_facts(scene: Scene) -> dict[str, str]:
    return {"color": scene.color, "shape": scene.shape, "style": scene.style,
            "background": BACKGROUND_WORDS[scene.background], "size": SIZE_WORDS[scene.r >= 9]}


def fits(caption: str, scene: Scene) -> bool:
    """Whether everything the caption says is true of the scene (a plain caption fits every style)."""
    facts = scene_facts(scene)
    return all(facts[k] == v for k, v in caption_facts(caption).items())


def class_captions() -> list[str]:
    """Every shape x color caption, for zero-shot probes."""
    return [f"a {c} {s}" for c in COLORS for s in SHAPES]


def write_examples(folder, style: str = "striped", n: int = 12, seed: int = 123) -> None:
    """The demo's bundled style images (``python -c "from stylegrad.world.data import write_examples;
    write_examples('stylegrad/world/examples')"`` regenerates them)."""
    from pathlib import Path

    out = Path(folder)
    out.mkdir(parents=True, exist_ok=True)
    for i, (image, _, scene) in enumerate(dataset(n, seed, style=style)):
        image.save(out / f"{style}-{i:02d}-{scene.color}-{scene.shape}.png")
