"""IP-Adapter as A1111 clients send it: a unit of the sd-webui-controlnet extension under
``alwayson_scripts['controlnet'].args`` (what ``webuiapi.ControlNetUnit`` builds), and the extension's
``/controlnet/*`` lists those clients read first.

The facts this follows are the extension's (``internal_controlnet/args.py``, ``scripts/api.py``, its API wiki):

- a unit is an object; ``enabled`` (absent: on, as the extension had it until May 2024, where the unit names a
  model), ``module`` (the preprocessor: the IP-Adapter CLIP ones are ``ip-adapter_clip_sd15`` (label
  ``ip-adapter_clip_h``), ``ip-adapter_clip_sdxl`` (``ip-adapter_clip_g``), ``ip-adapter_clip_sdxl_plus_vith`` and
  ``ip-adapter-auto``), ``model`` ('NAME [HASH]', A1111's old 8-digit hash, or the name alone), ``weight`` (the
  adapter's scale), ``image`` (base64 or a data URL; ``{"image", "mask"}``; a list of such objects: several
  pictures; ``[image, mask]``; ``input_image`` is the old name), ``mask``, ``guidance_start``/``guidance_end``;
- IP-Adapter preprocessors take no control mode, resolution or thresholds, and resize their picture themselves:
  ``control_mode``, ``resize_mode``, ``processor_res``, ``threshold_a/b``, ``pixel_perfect``, ``low_vram``,
  ``hr_option`` and the other fields are accepted and change nothing here, as there;
- what would change the picture and is not done here is refused in one line: part of the steps (guidance other
  than 0..1), per-block ``advanced_weighting``, masks, ``effective_region_mask``, ``ipadapter_input`` (a pickled
  tensor: never loaded), face-ID preprocessors, any non-IP-Adapter model or preprocessor, two adapters at once.

Several units of one adapter, or a unit with several pictures: all the pictures' embeddings are averaged into one
(the library's rule), at the units' one weight. A unit without a picture takes img2img's init image, as the
extension does."""

from __future__ import annotations

import hashlib
import re
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from stylegrad.errors import RequestError

SCRIPT = "controlnet"  # the extension's script title, as A1111 matches alwayson_scripts keys (any case)
API_VERSION = 3  # what the extension's /controlnet/version answers: clients pick field names from it
UNIT_COUNT = 3  # the extension's default control_net_unit_count
# the extension's IP-Adapter CLIP preprocessors: internal name -> the label its UI shows (module_list's aliases)
MODULES = {"ip-adapter-auto": "ip-adapter-auto", "ip-adapter_clip_sd15": "ip-adapter_clip_h",
           "ip-adapter_clip_sdxl": "ip-adapter_clip_g", "ip-adapter_clip_sdxl_plus_vith": "ip-adapter_clip_sdxl_plus_vith"}
ACCEPTED_MODULES = {*MODULES, *MODULES.values()}
FACE_MODULES = ("ip-adapter_face_id", "ip-adapter_face_id_plus", "ip-adapter_pulid", "instant_id")
NO_MODEL = ("", "none")
TITLE = re.compile(r"^(.*?)\s*\[([0-9a-fA-F]{8,64})\]$")  # 'ip-adapter_sd15 [6a3f6166]'
REFUSED = {  # fields that change the picture in the extension and are not done here: their 'unset' values
    "advanced_weighting": (None, []), "effective_region_mask": (None, ""), "ipadapter_input": (None, "", []),
}


@dataclass(frozen=True)
class Picture:
    """One reference picture as the client sent it (base64), its mask, and the field to name in an error."""

    data: str
    mask: str | None
    field: str


@dataclass
class IPUnits:
    """What the active IP-Adapter units ask for, put together: one adapter (the client's name for it), every
    picture, one scale; ``fields``: the schema field -> the client's name for it, for errors."""

    model: str
    pictures: list[Picture]
    scale: float
    fields: dict[str, str] = field(default_factory=dict)


def legacy_hash(path: str | Path) -> str:
    """A1111's old 8-digit model hash (the ControlNet extension's 'NAME [HASH]'): sha256 of the 64 KiB at 1 MiB."""
    with open(path, "rb") as f:
        f.seek(0x100000)
        return hashlib.sha256(f.read(0x10000)).hexdigest()[:8]


def model_titles(adapters: dict[str, Path]) -> dict[str, Path]:
    """'NAME [HASH]' -> file, as the extension's model_list names each model file."""
    return {f"{name} [{legacy_hash(path)}]": path for name, path in sorted(adapters.items())}


def find_adapter(model: str, adapters: dict[str, Path], where: str) -> Path:
    """The folder's adapter a unit's ``model`` names: by its name (any case), the bracketed hash optional but, when
    given, the file's (A1111's old 8-digit hash, or a prefix of its sha256)."""
    m = TITLE.match(model.strip())
    name, digest = (m.group(1), m.group(2).lower()) if m else (model.strip(), None)
    by_name = {k.lower(): v for k, v in adapters.items()}
    path = by_name.get(name.lower())
    if path is None:
        if not re.search(r"ip[-_]?adapter", name, re.IGNORECASE):
            raise RequestError(where, f"{{field}}: {model!r} is not an IP-Adapter model: this server runs IP-Adapter "
                               "units only (GET /controlnet/model_list lists them)")
        if not adapters:
            raise RequestError(where, f"{{field}}: {model!r}: this server has no IP-Adapter folder configured "
                               "(serve --ip-adapters)")
        raise RequestError(where, f"{{field}}: no IP-Adapter {name!r} in this server's folder (GET "
                           "/controlnet/model_list lists them)")
    if digest is not None:
        from stylegrad.files.hashes import sha256_file

        ok = digest == legacy_hash(path) if len(digest) == 8 else sha256_file(path).startswith(digest)
        if not ok:
            raise RequestError(where, f"{{field}}: the server's {path.name} has another hash than [{digest}] (it is "
                               f"[{legacy_hash(path)}]): another file of that name")
    return path


def _script_entry(scripts: dict[str, Any]) -> tuple[str, Any] | None:
    return next(((k, v) for k, v in scripts.items() if isinstance(k, str) and k.strip().lower() == SCRIPT), None)


def _number(unit: dict, key: str, default: float, where: str) -> float:
    value = unit.get(key, default)
    if isinstance(value, bool) or not isinstance(value, (int, float)):
        raise RequestError(f"{where}.{key}", f"must be a number, got {value!r}"[:120])
    return float(value)


def _pictures(unit: dict, where: str) -> list[Picture]:
    """The unit's pictures in every form the extension reads (a path on the server is not one: base64 only)."""
    if "input_image" in unit and unit.get("image") not in (None, ""):
        raise RequestError(f"{where}.input_image", "give {field} (the old name) or image, not both")
    key = "image" if unit.get("image") not in (None, "") else "input_image"
    image, mask = unit.get(key), unit.get("mask", unit.get("mask_image"))
    here = f"{where}.{key}"
    if image in (None, "", []):
        return []
    if isinstance(image, dict):
        return [Picture(image.get("image"), image.get("mask", mask), here)]
    if isinstance(image, str):
        return [Picture(image, mask, here)]
    if isinstance(image, (list, tuple)) and image and all(isinstance(x, dict) for x in image):
        return [Picture(x.get("image"), x.get("mask"), f"{here}[{i}]") for i, x in enumerate(image)]
    if isinstance(image, (list, tuple)) and len(image) == 2 and all(isinstance(x, (str, type(None))) for x in image):
        return [Picture(image[0], image[1], here)]  # the extension's [image, mask]
    raise RequestError(here, "{field}: a base64 picture, {\"image\": ..., \"mask\": ...}, or a list of such objects "
                       "(several pictures)")


def _active(unit: dict) -> bool:
    """The unit asks for something: enabled (or, without the field, naming a model, as the extension had it)."""
    enabled = unit.get("enabled")
    if enabled is None:
        return str(unit.get("model") or "").strip().lower() not in NO_MODEL
    return bool(enabled)


def _check_unit(unit: dict, where: str) -> None:
    """One line for what this unit asks and this server cannot honour."""
    module = str(unit.get("module") or "none").strip()
    if module.startswith(FACE_MODULES):
        raise RequestError(f"{where}.module", f"{{field}}: {module!r}: face-ID IP-Adapters (insightface) are not "
                           "supported here; use an ip-adapter_clip_* preprocessor")
    if module not in ACCEPTED_MODULES:
        raise RequestError(f"{where}.module", f"{{field}}: {module!r}: this server runs IP-Adapter units only, with "
                           f"an IP-Adapter CLIP preprocessor ({', '.join(MODULES)})")
    start = _number(unit, "guidance_start", 0.0, where)
    end = _number(unit, "guidance" if "guidance" in unit and "guidance_end" not in unit else "guidance_end", 1.0,
                  where)  # 'guidance': the old name
    if not 0 <= start <= end <= 1:
        raise RequestError(f"{where}.guidance_start", f"{{field}} and guidance_end must be 0 <= start <= end <= 1, "
                           f"got {start:g} and {end:g}")
    if (start, end) != (0.0, 1.0):
        raise RequestError(f"{where}.guidance_start", "{field}/guidance_end: an IP-Adapter over part of the steps is "
                           "not supported here (send 0 and 1)")
    for key, unset in REFUSED.items():
        if unit.get(key) not in unset:
            raise RequestError(f"{where}.{key}", "{field} is not supported for IP-Adapter units here")


def parse_units(scripts: dict[str, Any], init_image: str | None = None) -> IPUnits | None:
    """The IP-Adapter request of ``alwayson_scripts`` (None: no active unit); ``init_image``: img2img's, the picture
    of a unit that has none."""
    entry = _script_entry(scripts or {})
    if entry is None:
        return None
    key, value = entry
    args = value.get("args", []) if isinstance(value, dict) else value
    base = f"alwayson_scripts['{key}'].args"
    if not isinstance(args, list):
        raise RequestError(base, "{field}: a list of ControlNet units (objects)")
    found: list[tuple[str, str, float, list[Picture]]] = []
    for i, unit in enumerate(args):
        where = f"{base}[{i}]"
        if not isinstance(unit, dict):
            raise RequestError(where, "{field}: a ControlNet unit is an object ({\"enabled\": true, \"module\": ..., "
                               "\"model\": ..., \"image\": ...})")
        if not _active(unit):
            continue
        model = str(unit.get("model") or "").strip()
        pictures = _pictures(unit, where)
        if model.lower() in NO_MODEL:
            if pictures:
                raise RequestError(f"{where}.model", "{field}: name an IP-Adapter (GET /controlnet/model_list)")
            continue  # an empty unit (webuiapi's default): nothing asked
        _check_unit(unit, where)
        if not pictures:
            if init_image is None:
                raise RequestError(f"{where}.image", "{field}: an IP-Adapter unit needs a picture (base64)")
            pictures = [Picture(init_image, None, "init_images[0]")]
        found.append((where, model, _number(unit, "weight", 1.0, where), pictures))
    if not found:
        return None
    models = {m.lower() for _, m, _, _ in found}
    names = {TITLE.sub(r"\1", m).lower() for m in models}
    if len(names) > 1:
        raise RequestError(base, "{field}: the units name " + ", ".join(sorted(names)) + ": one request takes one "
                           "IP-Adapter (give one adapter several pictures to average them)")
    if len({w for _, _, w, _ in found}) > 1:
        raise RequestError(f"{found[1][0]}.weight", "{field}: units of one IP-Adapter share one weight (their "
                           "pictures are averaged into one embedding)")
    where, model, weight, _ = found[0]
    return IPUnits(model, [p for *_, ps in found for p in ps], weight,
                   {"ip_adapter": f"{where}.model", "ip_scale": f"{where}.weight", "ip_images": f"{where}.image"})


async def read_pictures(units: IPUnits, settings) -> list:
    """The units' pictures as RGB images, each decoded off the event loop and checked as every upload is; a mask
    with anything in it is refused (an all-black one is the extension's 'no mask')."""
    from .images import read_image

    if len(units.pictures) > settings.max_ip_images:
        raise RequestError(units.fields["ip_images"], f"{{field}}: at most {settings.max_ip_images} IP-Adapter pictures "
                           f"per request, got {len(units.pictures)}")
    images = []
    for p in units.pictures:
        images.append(await read_image(p.data, settings.max_upload_bytes, p.field, settings.max_image_pixels))
        if p.mask not in (None, ""):
            mask = await read_image(p.mask, settings.max_upload_bytes, f"{p.field}.mask", settings.max_image_pixels)
            if mask.convert("L").getbbox() is not None:
                raise RequestError(f"{p.field}.mask", "{field}: IP-Adapter masks are not supported here (a list of two "
                                   "is the extension's [image, mask]; send several pictures as [{\"image\": ...}, "
                                   "{\"image\": ...}])")
    return images


def placeholders(n: int) -> tuple[str, ...]:
    """The request's ``ip_images`` until its job writes the decoded pictures under these names (service.py)."""
    return tuple(f"ip-image-{i}.png" for i in range(n))


def module_list(alias_names: bool) -> dict:
    """The extension's module_list answer: the IP-Adapter CLIP preprocessors (and 'none', which it always lists)."""
    names = ["none", *(MODULES.values() if alias_names else MODULES)]
    return {"module_list": names, "module_detail": {n: {"model_free": n == "none", "sliders": []} for n in names}}


def routes(app, service) -> None:
    """The extension's routes clients call before sending units (webuiapi's controlnet_* helpers)."""
    tags = ["ControlNet (IP-Adapter)"]

    @app.get("/controlnet/version", tags=tags, response_model=dict[str, int])
    async def version():
        return {"version": API_VERSION}

    @app.get("/controlnet/model_list", tags=tags, response_model=dict[str, list[str]])
    def model_list(update: bool = True):  # reads the folder and hashes: a plain function, off the event loop
        """The server's IP-Adapters as the extension names models ('NAME [HASH]', A1111's old 8-digit hash)."""
        return {"model_list": list(model_titles(service.ip_adapters()))}

    @app.get("/controlnet/module_list", tags=tags, response_model=dict[str, Any])
    async def modules(alias_names: bool = False):
        """The preprocessors a unit may name here: the IP-Adapter CLIP ones."""
        return module_list(alias_names)

    @app.get("/controlnet/settings", tags=tags, response_model=dict[str, int])
    async def settings():
        return {"control_net_unit_count": UNIT_COUNT}
