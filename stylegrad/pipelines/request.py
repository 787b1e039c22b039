"""Everything one image depends on, frozen: what ``generate``, ``compare`` and ``evaluate`` take, what the PNG
records (A1111's field names where A1111 has one), and what ``generate --from IMAGE.png`` reads back."""

from __future__ import annotations

from dataclasses import dataclass, field, replace
from pathlib import Path

from stylegrad import __version__
from stylegrad.aesthetic.options import StyleOptions
from stylegrad.errors import StylegradError
from stylegrad.files.infotext import format_infotext, parse_infotext
from stylegrad.pipelines.loading import DEFAULT_MODEL, a1111_sampler, sampler_id


@dataclass(frozen=True)
class GenerationRequest:
    """One image (or ``n`` with seeds ``seed .. seed+n-1``). Paths are as the user gave them."""

    prompt: str
    negative: str = ""
    seed: int = 0
    steps: int = 30
    cfg: float = 7.5
    width: int | None = None  # None: the model's
    height: int | None = None
    sampler: str | None = None  # short or A1111 name; None: the model's
    clip_skip: int | None = None  # diffusers' meaning: layers skipped before the last (A1111's "Clip skip" - 1)
    model: str = DEFAULT_MODEL
    init_image: str | None = None  # img2img
    strength: float = 0.75  # img2img only
    style: str | None = None  # aesthetic embedding file
    style_options: StyleOptions = field(default_factory=StyleOptions)
    clip_model: str | None = None  # whose projection defines the style space (default: the family's)
    stylecode: str | None = None  # a code, or 'A::2 B::1'
    stylecode_image: str | None = None  # make the code from this image
    stylecode_strength: float = 1.0
    stylecode_guidance: bool = False
    stylecodes_model: str | None = None
    loras: tuple[str, ...] = ()  # 'FILE_OR_NAME[:TE[:UNET]]', besides the prompt's <lora:...> tags
    embeddings: tuple[str, ...] = ()  # textual-inversion files 'FILE[:TOKEN]', besides the embeddings folders
    weighting: bool = True  # read A1111's emphasis syntax; False: brackets are plain text

    def __post_init__(self):
        object.__setattr__(self, "loras", tuple(self.loras))
        object.__setattr__(self, "embeddings", tuple(self.embeddings))
        if self.sampler is not None:
            object.__setattr__(self, "sampler", sampler_id(self.sampler))
        if not isinstance(self.steps, int) or self.steps < 1:
            raise StylegradError(f"steps must be a whole number >= 1, got {self.steps!r}")
        for name in ("width", "height"):
            v = getattr(self, name)
            if v is not None and (v < 8 or v % 8):
                raise StylegradError(f"{name} must be a positive multiple of 8, got {v}")
        if not 0.0 < self.strength <= 1.0:
            raise StylegradError(f"strength must be in (0, 1], got {self.strength}")
        if self.clip_skip is not None and self.clip_skip < 0:
            raise StylegradError(f"clip_skip must be >= 0, got {self.clip_skip}")
        if self.stylecode_strength < 0:
            raise StylegradError(f"stylecode_strength must be >= 0, got {self.stylecode_strength}")
        if self.stylecode and self.stylecode_image:
            raise StylegradError("give stylecode or stylecode_image, not both")
        if self.stylecode:
            from stylegrad.stylecodes.codec import parse_weighted

            parse_weighted(self.stylecode)  # a bad code fails before any model loads

    @property
    def styled(self) -> bool:
        return self.style is not None and self.style_options.active

    @property
    def uses_stylecode(self) -> bool:
        return bool(self.stylecode or self.stylecode_image)

    def with_seed(self, seed: int) -> GenerationRequest:
        return replace(self, seed=seed)


def infotext(request: GenerationRequest, *, size: tuple[int, int], sampler_name: str, style=None,
             stylecode: str | None = None, model_hash: str | None = None, extra: dict | None = None,
             addons: dict | None = None) -> str:
    """The PNG's ``parameters`` text, with every field the image depends on. ``style``: the loaded Style;
    ``stylecode``: the code used (made from ``stylecode_image`` when that was given)."""
    r = request
    fields: dict[str, object] = {
        "Steps": r.steps,
        "Sampler": sampler_name,
        "CFG scale": r.cfg,
        "Seed": r.seed,
        "Size": f"{size[0]}x{size[1]}",
        "Model hash": model_hash,
        "Model": Path(r.model).stem if Path(r.model).suffix else (Path(r.model).name or r.model),
        "Denoising strength": r.strength if r.init_image else None,
        "Clip skip": r.clip_skip + 1 if r.clip_skip else None,  # A1111 counts the last layer as 1
    }
    if style is not None and r.style is not None:
        fields.update({"Aesthetic embedding": style.name, "Aesthetic embedding hash": style.digest,
                       "Style file": r.style, **r.style_options.infotext_fields()})
    if stylecode:
        fields.update({"Stylecode": stylecode, "Stylecode strength": r.stylecode_strength,
                       "Stylecode guidance": r.stylecode_guidance, "Stylecode image": r.stylecode_image,
                       "Stylecodes model": r.stylecodes_model})
    fields.update(addons or {})
    fields.update(extra or {})
    fields.update({"Lora files": "|".join(r.loras) or None, "Embedding files": "|".join(r.embeddings) or None,
                   "Prompt weighting": None if r.weighting else "off", "Init image": r.init_image, "Model id": r.model,
                   "CLIP model": r.clip_model,
                   "Sampler id": r.sampler or "default", "Version": f"stylegrad {__version__}"})
    return format_infotext(r.prompt, r.negative, fields)


def _number(fields: dict, key: str, kind, default=None):
    raw = fields.get(key)
    if raw in (None, "", "None"):
        return default
    try:
        return kind(raw)
    except ValueError as e:
        raise StylegradError(f"the image's metadata has a bad '{key}': {raw!r}") from e


def request_from_infotext(text: str) -> GenerationRequest:
    """The request a stylegrad PNG was made with (an A1111 PNG gives its prompt and sampler settings)."""
    prompt, negative, f = parse_infotext(text)
    if not f:
        raise StylegradError("the image's parameters have no settings line to regenerate from")
    width = height = None
    if "Size" in f:
        try:
            width, height = (int(v) for v in str(f["Size"]).lower().split("x"))
        except ValueError as e:
            raise StylegradError(f"the image's metadata has a bad 'Size': {f['Size']!r}") from e
    sampler = f.get("Sampler id")
    if sampler is None and f.get("Sampler"):
        sampler = a1111_sampler(f["Sampler"], f.get("Schedule type"))  # None: no equivalent, the model's own
    clip_skip = _number(f, "Clip skip", int)
    style = f.get("Style file")
    init = f.get("Init image")
    return GenerationRequest(
        prompt=prompt, negative=negative, seed=_number(f, "Seed", int, 0), steps=_number(f, "Steps", int, 30),
        cfg=_number(f, "CFG scale", float, 7.5), width=width, height=height,
        sampler=None if sampler in (None, "default") else sampler,
        clip_skip=clip_skip - 1 if clip_skip and clip_skip > 1 else None,
        model=f.get("Model id") or f.get("Model") or DEFAULT_MODEL,  # A1111 PNGs name the checkpoint stem
        init_image=init,
        strength=_number(f, "Denoising strength", float, 0.75) if init else 0.75,
        style=style, style_options=StyleOptions.from_infotext(f) if style else StyleOptions(),
        clip_model=f.get("CLIP model") or None, stylecode=f.get("Stylecode") or None,
        stylecode_strength=_number(f, "Stylecode strength", float, 1.0),
        stylecode_guidance=str(f.get("Stylecode guidance", "False")).lower() == "true",
        stylecodes_model=f.get("Stylecodes model") or None,
        loras=_list(f.get("Lora files")), embeddings=_list(f.get("Embedding files")),
        weighting=f.get("Prompt weighting") != "off",
    )


# A1111 fields that change an image and that a diffusers pipeline does not reproduce
_NOT_HONOURED = {
    "Hires upscale": "the hires. fix second pass is not run",
    "Hires upscaler": None,
    "Face restoration": "face restoration is not run",
    "Variation seed": "variation seeds are not mixed in",
    "ENSD": "the eta noise seed delta is not applied",
    "Eta": None,
    "VAE": "the named VAE is not loaded (give it with --vae)",
    "Refiner": "the refiner pass is not run",
    "ADetailer model": "ADetailer is not run",
}


def foreign_notes(text: str) -> list[str]:
    """One line for each thing an A1111 (or other tool's) PNG asks for that ``generate --from`` cannot honour."""
    _, _, f = parse_infotext(text)
    if "Sampler id" in f:  # stylegrad's own PNG: everything it records is honoured
        return []
    notes = []
    if f.get("Sampler") and a1111_sampler(f["Sampler"], f.get("Schedule type")) is None:
        notes.append(f"sampler '{f['Sampler']}' has no diffusers equivalent here: the model's own sampler is used")
    schedule = (f.get("Schedule type") or "").lower()
    if schedule not in ("", "automatic", "karras"):
        notes.append(f"schedule type '{f['Schedule type']}' is not reproduced: the sampler's default is used")
    notes += [f"{key}: {why}" for key, why in _NOT_HONOURED.items() if why and f.get(key)]
    if f.get("RNG", "GPU").upper() != "CPU":
        notes.append("A1111 drew the starting noise on the GPU (its default RNG source) and its samplers are "
                     "k-diffusion's: stylegrad draws it on the CPU with diffusers' samplers, so the settings are the "
                     "same, the pixels are not")
    return notes


def _list(value: str | None) -> tuple[str, ...]:
    return tuple(v for v in (value or "").split("|") if v)


def expected_style_digest(text: str) -> str | None:
    """The style hash the PNG recorded, to check that the style file read back is the same."""
    return parse_infotext(text)[2].get("Aesthetic embedding hash")
