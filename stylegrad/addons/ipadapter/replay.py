"""``generate --from PNG`` for an image made with IP-Adapter: the adapter and pictures the PNG names, checked
against the hashes it records; what is missing or different is a note, and the image is made without the
adapter when its file or pictures cannot be had (as a missing LoRA is left out)."""

from __future__ import annotations

from dataclasses import replace
from pathlib import Path

from stylegrad.addons.ipadapter.library import AdapterLibrary
from stylegrad.errors import StylegradError
from stylegrad.files.hashes import sha256_file


def _without(request, why: str) -> tuple[object, list[str]]:
    return replace(request, ip_adapter=None, ip_images=(), ip_style=False, ip_blocks=None,
                   ip_image_encoder=None, ip_scale=1.0), [f"{why}: generating without the IP-Adapter"]


def replay_ip_adapter(request, fields: dict, folders: list[str] | None = None) -> tuple[object, list[str]]:
    """(the request with its adapter file found — by path, else by name in the ipadapter folders — or without
    it; the notes)."""
    if request.ip_adapter is None:
        return request, []
    notes = []
    name = fields.get("IP-Adapter") or Path(request.ip_adapter).stem
    path = Path(request.ip_adapter).expanduser()
    if not path.is_file():
        try:
            found = AdapterLibrary(folders).find(name)
        except StylegradError:
            found = None
        if found is None:
            return _without(request, f"IP-Adapter '{name}' is neither at {request.ip_adapter} nor in the ipadapter "
                            "folders")
        notes.append(f"IP-Adapter '{name}' read from {found} (the image names {request.ip_adapter})")
        request, path = replace(request, ip_adapter=str(found)), found
    recorded = fields.get("IP-Adapter hash")
    if recorded and sha256_file(path)[:10] != recorded:
        notes.append(f"IP-Adapter '{name}' differs from the one the image was made with ({sha256_file(path)[:10]}, "
                     f"the image records {recorded})")
    missing = [p for p in request.ip_images if not Path(p).is_file()]
    if missing:
        return _without(request, f"IP-Adapter picture{'s' if len(missing) > 1 else ''} {', '.join(missing)} not "
                        "found")
    hashes = (fields.get("IP-Adapter image hashes") or "").split()
    for p, h in zip(request.ip_images, hashes):
        if sha256_file(p)[:10] != h:
            notes.append(f"IP-Adapter picture {p} differs from the one the image was made with")
    return request, notes
