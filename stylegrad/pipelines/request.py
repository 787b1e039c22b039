"""Everything one image depends on, frozen and checked in one place: what ``generate``, ``compare`` and ``evaluate``
take, what the PNG records (A1111's field names where A1111 has one), and what ``generate --from IMAGE.png`` reads
back. Every front door (Python, CLI, batch lines, the server's APIs and web UI) makes its request through
``GenerationRequest`` (each field checked: types, finite numbers, ranges, prompt length, LoRA multipliers) and
``build`` (names resolved, a door's ``Limits``, the size an init image implies); a bad field is a ``RequestError``
naming it."""

from __future__ import annotations

import math
import random
from dataclasses import dataclass, field, fields, replace
from pathlib import Path
from typing import Protocol

from stylegrad import __version__
from stylegrad.aesthetic.options import StyleOptions
from stylegrad.errors import RequestError, StylegradError
from stylegrad.files.infotext import format_infotext, parse_infotext
from stylegrad.pipelines.limits import MAX_PROMPT_CHARS, MAX_SEED, SERVER, Limits
from stylegrad.pipelines.loading import DEFAULT_MODEL, a1111_sampler, sampler_id

__all__ = ["GenerationRequest", "Limits", "Names", "RequestError", "SERVER", "build", "check", "implied_size"]

NO_LIMITS = Limits()
MAX_CFG = 100.0
MAX_CLIP_SKIP = 11  # A1111's 'Clip skip' 12
MAX_STYLECODE_STRENGTH = 10.0
MAX_STYLE_WEIGHT = 10.0  # beyond [0, 1] (without slerp) the blend extrapolates; further than this is noise
MAX_REGULARIZATION = 1e6
MAX_IP_SCALE = 10.0  # IP-Adapter's image attention beyond 10x the text's only makes noise


@dataclass(frozen=True)
class GenerationRequest:
    """One image (or ``n`` with seeds ``seed .. seed+n-1``). Paths are as the user gave them. Every field is checked
    when the request is made (and again by ``dataclasses.replace``): a bad one is a ``RequestError`` naming it."""

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
    hypernetworks: tuple[str, ...] = ()  # 'FILE_OR_NAME[:MULT]', before the prompt's <hypernet:...> tags
    hypernetwork_reading: str = "a1111"  # a file without activate_output: 'a1111' reads it on, 'comfyui' off
    weighting: bool = True  # read A1111's emphasis syntax; False: brackets are plain text
    ip_adapter: str | None = None  # IP-Adapter file, or a name in the ipadapter folders (STYLEGRAD_IPADAPTER_DIR)
    ip_images: tuple[str, ...] = ()  # its reference pictures, their embeddings averaged (none: the style's, if sound)
    ip_scale: float = 1.0  # how strongly the pictures act (diffusers' set_ip_adapter_scale)
    ip_style: bool = False  # InstantStyle: the pictures act only on the family's style blocks
    ip_blocks: str | None = None  # more blocks ('layout', 'up.block_0', 'down.block_2:0,1'; see ipadapter/blocks.py)
    ip_image_encoder: str | None = None  # the CLIP vision encoder (folder, file or hub id); default: found

    def __post_init__(self):
        for name in ("loras", "embeddings", "ip_images"):
            value = getattr(self, name)
            if isinstance(value, str) or not isinstance(value, (list, tuple)):
                raise RequestError(name, f"must be a list of texts, got {value!r}"[:200])
            object.__setattr__(self, name, tuple(value))
        if isinstance(self.hypernetworks, str) or not isinstance(self.hypernetworks, (list, tuple)):
            raise RequestError("hypernetworks", f"must be a list of texts, got {self.hypernetworks!r}"[:200])
        object.__setattr__(self, "hypernetworks", tuple(self.hypernetworks))
        if self.sampler is not None:
            _text(self.sampler, "sampler", optional=True)
            try:
                object.__setattr__(self, "sampler", sampler_id(self.sampler))
            except StylegradError as e:
                raise RequestError("sampler", "{field}: " + str(e)) from None
        _validate(self)

    @property
    def styled(self) -> bool:
        return self.style is not None and self.style_options.active

    @property
    def uses_stylecode(self) -> bool:
        return bool(self.stylecode or self.stylecode_image)

    def with_seed(self, seed: int) -> GenerationRequest:
        return replace(self, seed=seed)


# -- the checks, one per kind of value -------------------------------------------------------------------------
def _shown(value) -> str:
    return repr(value) if len(repr(value)) <= 40 else repr(value)[:37] + "..."


def _whole(value, name: str, lo: int, hi: int | None = None) -> None:
    if isinstance(value, bool) or not isinstance(value, int):
        raise RequestError(name, f"must be a whole number, got {_shown(value)}")
    if value < lo:
        raise RequestError(name, f"must be at least {lo}, got {value}")
    if hi is not None and value > hi:
        raise RequestError(name, f"must be at most {hi}, got {value}")


def _real(value, name: str, lo: float, hi: float, *, above: bool = False) -> None:
    """A finite number in [lo, hi] ((lo, hi] with ``above``): inf and nan never reach a model."""
    if isinstance(value, bool) or not isinstance(value, (int, float)):
        raise RequestError(name, f"must be a number, got {_shown(value)}")
    if not math.isfinite(value):
        raise RequestError(name, f"must be a finite number, got {value}")
    if value < lo or (above and value == lo) or value > hi:
        raise RequestError(name, f"must be in {'(' if above else '['}{lo:g}, {hi:g}], got {value:g}")


def _text(value, name: str, *, optional: bool = False, limit: int = MAX_PROMPT_CHARS, words: bool = False) -> None:
    """``words``: text a tokenizer reads (a file path may hold any bytes the file system allows)."""
    if value is None and optional:
        return
    if not isinstance(value, str):
        raise RequestError(name, f"must be text, got {_shown(value)}")
    if len(value) > limit:
        raise RequestError(name, f"must be at most {limit} characters, got {len(value)}")
    if words:
        try:
            value.encode("utf-8")
        except UnicodeEncodeError as e:  # a lone surrogate ('\ud800'): JSON can carry one, no tokenizer reads it
            raise RequestError(name, f"must be Unicode text: a lone surrogate at character {e.start}") from None


def _flag(value, name: str) -> None:
    if not isinstance(value, bool):
        raise RequestError(name, f"must be true or false, got {_shown(value)}")


def _lora_tags(prompt: str, name: str) -> None:
    from stylegrad.prompts.syntax import extract_tags

    try:
        extract_tags(prompt)
    except StylegradError as e:
        raise RequestError(name, "{field}: " + str(e)) from None


def _lora_arg(spec, name: str) -> None:
    """'FILE_OR_NAME[:TE[:UNET]]' with multipliers that are finite and in range (as a tag's)."""
    from stylegrad.addons.lora.library import parse_lora_arg
    from stylegrad.prompts.syntax import MAX_MULTIPLIER

    _text(spec, name)
    _, te, unet = parse_lora_arg(spec)
    for m in (te, unet):
        if not math.isfinite(m) or abs(m) > MAX_MULTIPLIER:
            raise RequestError(name, f"{{field}}: {spec!r}: multipliers must be numbers in "
                               f"-{MAX_MULTIPLIER:g}..{MAX_MULTIPLIER:g}")


def _style_values(values: dict, prefix: str = "style_options.") -> None:
    """The style options' own checks, plus what they allow and no model should get (inf, nan, huge rates)."""
    checks = {
        "steps": lambda v, n: _whole(v, n, 0),
        "lr": lambda v, n: _real(v, n, 0.0, 1.0, above=True),
        "weight": lambda v, n: _real(v, n, -MAX_STYLE_WEIGHT, MAX_STYLE_WEIGHT),
        "slerp": _flag,
        "text": lambda v, n: _text(v, n, optional=True, words=True),
        "text_angle": lambda v, n: _real(v, n, 0.0, 1.0),
        "text_negative": _flag,
        "regularization": lambda v, n: _real(v, n, 0.0, MAX_REGULARIZATION),
        "target_similarity": lambda v, n: v is None or _real(v, n, -1.0, 1.0, above=True),
        "target_gain": lambda v, n: v is None or _real(v, n, 0.0, 1.0, above=True),
        "personalize_negative": _flag,
        "towers": lambda v, n: None if v in ("l", "g", "both") else _fail(n, f"must be l, g or both, got {_shown(v)}"),
        "eps": lambda v, n: _real(v, n, 0.0, 1.0, above=True),
        "betas": _betas,
    }
    for key, value in values.items():
        if key not in checks:
            raise RequestError(prefix + key, "unknown field {field} (a style option is one of: "
                               + ", ".join(checks) + ")")
        checks[key](value, prefix + key)


def _betas(value, name: str) -> None:
    if not isinstance(value, (list, tuple)) or len(value) != 2:
        raise RequestError(name, f"must be two numbers in [0, 1), got {_shown(value)}")
    for i, b in enumerate(value):
        _real(b, f"{name}[{i}]", 0.0, 0.999999)


def _fail(name: str, problem: str):
    raise RequestError(name, problem)


def _validate(r: GenerationRequest) -> None:
    """Every field of ``r``, in the order the schema lists them."""
    _text(r.prompt, "prompt", words=True)
    _text(r.negative, "negative", words=True)
    _lora_tags(r.prompt, "prompt")
    _lora_tags(r.negative, "negative")
    _whole(r.seed, "seed", 0, MAX_SEED)
    _whole(r.steps, "steps", 1)
    _real(r.cfg, "cfg", 0.0, MAX_CFG)
    for name in ("width", "height"):
        v = getattr(r, name)
        if v is not None and (isinstance(v, bool) or not isinstance(v, int) or v < 8 or v % 8):
            raise RequestError(name, f"must be a positive multiple of 8, got {_shown(v)}")
    if r.clip_skip is not None:
        _whole(r.clip_skip, "clip_skip", 0, MAX_CLIP_SKIP)
    _text(r.model, "model")
    for name in ("init_image", "style", "clip_model", "stylecode", "stylecode_image", "stylecodes_model"):
        _text(getattr(r, name), name, optional=True)
    _real(r.strength, "strength", 0.0, 1.0, above=True)
    if not isinstance(r.style_options, StyleOptions):
        raise RequestError("style_options", f"must be StyleOptions, got {_shown(r.style_options)}")
    _style_values({f.name: getattr(r.style_options, f.name) for f in fields(StyleOptions)})
    _real(r.stylecode_strength, "stylecode_strength", 0.0, MAX_STYLECODE_STRENGTH)
    _flag(r.stylecode_guidance, "stylecode_guidance")
    _flag(r.weighting, "weighting")
    for i, spec in enumerate(r.loras):
        _lora_arg(spec, f"loras[{i}]")
    for i, spec in enumerate(r.embeddings):
        _text(spec, f"embeddings[{i}]")
    _hypernetwork_fields(r)
    if r.stylecode and r.stylecode_image:
        raise RequestError("stylecode_image", "give stylecode or {field}, not both")
    _ip_adapter_fields(r)
    if r.stylecode:
        from stylegrad.stylecodes.codec import parse_weighted

        try:
            parse_weighted(r.stylecode)  # a bad code fails before any model loads
        except StylegradError as e:
            raise RequestError("stylecode", "{field}: " + str(e)) from None


def _ip_adapter_fields(r: GenerationRequest) -> None:
    """IP-Adapter's fields: the pictures (or ``style``) only with an adapter, the block spec parsed now."""
    for name in ("ip_adapter", "ip_blocks", "ip_image_encoder"):
        _text(getattr(r, name), name, optional=True)
    for i, image in enumerate(r.ip_images):
        _text(image, f"ip_images[{i}]")
    _real(r.ip_scale, "ip_scale", 0.0, MAX_IP_SCALE)
    _flag(r.ip_style, "ip_style")
    if r.ip_adapter is None:
        for name in ("ip_images", "ip_style", "ip_blocks", "ip_image_encoder"):
            if getattr(r, name):
                raise RequestError(name, "{field} needs ip_adapter (an IP-Adapter file or name)")
        return
    if not r.ip_images and r.style is None:
        raise RequestError("ip_images", "ip_adapter needs reference pictures ({field}) or a style to act as them")
    if r.ip_blocks is not None:
        from stylegrad.addons.ipadapter.blocks import parse_blocks

        try:
            parse_blocks(r.ip_blocks)
        except StylegradError as e:
            raise RequestError("ip_blocks", "{field}: " + str(e)) from None


def _hypernetwork_fields(r: GenerationRequest) -> None:
    """'FILE_OR_NAME[:MULT]' with a finite multiplier in range (as a tag's), and how files are read."""
    from stylegrad.addons.hypernetworks.formats import READINGS
    from stylegrad.addons.hypernetworks.library import check_multiplier, parse_hypernetwork_arg

    for i, spec in enumerate(r.hypernetworks):
        _text(spec, f"hypernetworks[{i}]")
        try:
            check_multiplier(parse_hypernetwork_arg(spec)[1], repr(spec))
        except StylegradError as e:
            raise RequestError(f"hypernetworks[{i}]", "{field}: " + str(e)) from None
    if r.hypernetwork_reading not in READINGS:
        raise RequestError("hypernetwork_reading", f"must be one of {', '.join(READINGS)}, "
                           f"got {_shown(r.hypernetwork_reading)}")


# -- a front door's request ------------------------------------------------------------------------------------
def implied_size(request: GenerationRequest, image_size: tuple[int, int]) -> tuple[int, int]:
    """The picture img2img makes from an init image of ``image_size``: the request's width and height where given,
    else the image's, rounded down to a multiple of 8 (as the init image is resized)."""
    return img2img_size(request.width, request.height, image_size)


def img2img_size(width: int | None, height: int | None, image_size: tuple[int, int]) -> tuple[int, int]:
    """The one rule for the size img2img works at: ``width``/``height`` where given, else the image's, rounded down
    to a multiple of 8. The check above and the resize (images.fit_init_image) both use it."""
    w, h = width or image_size[0], height or image_size[1]
    return w - w % 8, h - h % 8


def check(request: GenerationRequest, limits: Limits = NO_LIMITS, *, n: int = 1,
          init_size: tuple[int, int] | None = None) -> GenerationRequest:
    """``request`` within a door's ``limits``, for ``n`` images; ``init_size``: the size of an init image given
    apart from the request (an upload), whose implied picture size is checked too."""
    _whole(n, "n", 1, limits.max_images)
    if request.seed + n - 1 > MAX_SEED:
        raise RequestError("seed", f"+ n - 1 must be at most {MAX_SEED}, got {request.seed} + {n} - 1")
    if limits.max_steps is not None:
        _whole(request.steps, "steps", 1, limits.max_steps)
    if limits.max_style_steps is not None:
        _whole(request.style_options.steps, "style_options.steps", 0, limits.max_style_steps)
    _text(request.prompt, "prompt", limit=limits.max_prompt_chars)
    _text(request.negative, "negative", limit=limits.max_prompt_chars)
    if limits.max_side is not None:
        for name in ("width", "height"):
            if getattr(request, name) is not None:
                _whole(getattr(request, name), name, 8, limits.max_side)
    if init_size is not None:
        w, h = implied_size(request, init_size)
        too_big = limits.max_side is not None and max(w, h) > limits.max_side
        if min(w, h) < 8 or too_big:
            want = f"8..{limits.max_side}" if limits.max_side else "at least 8"
            raise RequestError("init_image", f"is {init_size[0]}x{init_size[1]}, so the picture would be {w}x{h}: "
                               f"each side must be {want} (give width and height, or another image)")
    return request


class Names(Protocol):
    """How a door turns the names its clients give into files (a server: only inside its folders)."""

    def style(self, name: str) -> str: ...

    def lora(self, spec: str) -> str: ...  # 'NAME[:TE[:UNET]]' -> 'FILE[:TE[:UNET]]'

    def embedding(self, name: str) -> str: ...

    def hypernetwork(self, spec: str) -> str: ...  # 'NAME[:MULT]' -> 'FILE[:MULT]'


REQUEST_FIELDS = tuple(f.name for f in fields(GenerationRequest))


def random_seed() -> int:
    return random.randint(0, MAX_SEED)


def build(values: dict, limits: Limits = NO_LIMITS, *, n: int = 1, init_size: tuple[int, int] | None = None,
          names: Names | None = None, random_seed_allowed: bool = False) -> GenerationRequest:
    """The request a door's client asked for, ``values`` by the schema's field names (``style_options`` a mapping
    or ``StyleOptions``): unknown fields refused, ``names`` resolved (by the door's rules), seed -1 made random where
    the door allows it (once: the request records the seed used), every field and ``limits`` checked."""
    unknown = [k for k in values if k not in REQUEST_FIELDS]
    if unknown:
        raise RequestError(unknown[0], "unknown field {field} (a request's fields: " + ", ".join(REQUEST_FIELDS)
                           + ")")
    values = dict(values)
    if "prompt" not in values:
        raise RequestError("prompt", "is missing (a text)")
    options = values.get("style_options")
    if options is None:
        values.pop("style_options", None)
    elif not isinstance(options, (dict, StyleOptions)):
        raise RequestError("style_options", f"must be an object of style options, got {_shown(options)}")
    elif isinstance(options, dict):
        options = dict(options)
        if isinstance(options.get("betas"), list):
            options["betas"] = tuple(options["betas"])
        _style_values(options)
        try:
            values["style_options"] = StyleOptions(**options)
        except StylegradError as e:
            raise RequestError("style_options", "{field}: " + str(e)) from None
    if random_seed_allowed and values.get("seed") == -1:
        values["seed"] = random_seed()
    elif random_seed_allowed and isinstance(values.get("seed"), int) and values["seed"] < 0:
        raise RequestError("seed", f"must be -1 (a random seed) or 0..{MAX_SEED}, got {values['seed']}")
    for key in ("loras", "embeddings", "ip_images"):
        if isinstance(values.get(key), str):
            values[key] = (values[key],)
    if isinstance(values.get("hypernetworks"), str):
        values["hypernetworks"] = (values["hypernetworks"],)
    if names is not None:
        values = _resolved(values, names)
    return check(GenerationRequest(**values), limits, n=n, init_size=init_size)


def _resolved(values: dict, names: Names) -> dict:
    """The names in ``values`` as the files ``names`` gives for them; its refusals name the field."""
    def one(resolve, value, name: str):
        _text(value, name)
        try:
            return resolve(value)
        except RequestError:
            raise
        except StylegradError as e:
            raise RequestError(name, "{field}: " + str(e)) from None

    out = dict(values)
    if out.get("style") is not None:
        out["style"] = one(names.style, out["style"], "style")
    for key, resolve in (("loras", names.lora), ("embeddings", names.embedding)):
        items = out.get(key) or ()
        if not isinstance(items, (list, tuple)):
            raise RequestError(key, f"must be a list of texts, got {_shown(items)}")
        out[key] = tuple(one(resolve, v, f"{key}[{i}]") for i, v in enumerate(items))
    if out.get("hypernetworks"):
        resolve = getattr(names, "hypernetwork", None)
        if resolve is None:
            raise RequestError("hypernetworks", "{field}: this door takes no hypernetworks")
        items = out["hypernetworks"]
        if not isinstance(items, (list, tuple)):
            raise RequestError("hypernetworks", f"must be a list of texts, got {_shown(items)}")
        out["hypernetworks"] = tuple(one(resolve, v, f"hypernetworks[{i}]") for i, v in enumerate(items))
    return out


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
    fields.update({"Hypernet files": "|".join(r.hypernetworks) or None,
                   "Hypernet reading": None if r.hypernetwork_reading == "a1111" else r.hypernetwork_reading})
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
    prompt = _with_legacy_hypernet(prompt, f)
    try:
        return _from_fields(f, prompt, negative, width, height, sampler, clip_skip)
    except RequestError as e:
        raise StylegradError(f"the image's metadata asks for what cannot be made: {e}") from None


def _from_fields(f: dict, prompt: str, negative: str, width, height, sampler, clip_skip) -> GenerationRequest:
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
        hypernetworks=_list(f.get("Hypernet files")), hypernetwork_reading=f.get("Hypernet reading") or "a1111",
        **_ip_adapter_from(f),
    )


def _ip_adapter_from(f: dict) -> dict:
    """The IP-Adapter fields a stylegrad PNG records ('IP-Adapter file', its pictures, scale, blocks, encoder)."""
    if not f.get("IP-Adapter file"):
        return {}
    return dict(ip_adapter=f["IP-Adapter file"], ip_images=_list(f.get("IP-Adapter images")),
                ip_scale=_number(f, "IP-Adapter scale", float, 1.0),
                ip_style=str(f.get("IP-Adapter style", "False")).lower() == "true",
                ip_blocks=f.get("IP-Adapter blocks") or None, ip_image_encoder=f.get("IP-Adapter encoder") or None)


def _with_legacy_hypernet(prompt: str, f: dict) -> str:
    """A1111 before extra networks (2022) wrote the one hypernetwork as 'Hypernet: NAME' with 'Hypernet strength:
    X' (written when below 1): the same as a ``<hypernet:NAME:X>`` tag, so the prompt gets one."""
    name = str(f.get("Hypernet") or "").strip()
    if not name or name == "None" or "<hypernet:" in prompt:
        return prompt
    strength = _number(f, "Hypernet strength", float, 1.0)
    return f"{prompt}<hypernet:{name}:{strength:g}>"


# A1111 fields that change an image and that a diffusers pipeline does not reproduce
_NOT_HONOURED = {
    "Hires upscale": "the hires. fix second pass is not run",
    "Hires upscaler": None,
    "Face restoration": "face restoration is not run",
    "Variation seed": "variation seeds are not mixed in",
    "ENSD": "the eta noise seed delta is not applied",
    "Eta": None,
    "VAE": "the named VAE is not loaded (load the model with that vae)",
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
