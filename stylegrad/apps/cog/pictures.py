"""The user's own pictures, sent as images or as zip files of images, as files a style can be made from.

A zip is untrusted: only its image members are read, each written under a name of ours (never the member's path,
so nothing lands outside the folder), and the count and the bytes unpacked are capped as they are written (a
small zip can unpack to gigabytes, and the sizes it states may lie)."""

from __future__ import annotations

import zipfile
from pathlib import Path

from stylegrad.aesthetic.embedding import IMAGE_SUFFIXES
from stylegrad.errors import RequestError

MAX_PICTURES = 1000
MAX_UNPACKED = 1 << 30  # bytes, all zips together


def collect(uploads: list, folder: Path, field: str = "style_images") -> list[Path]:
    """The picture files of ``uploads`` (images as they are, zips unpacked into ``folder``)."""
    found: list[Path] = []
    budget = [MAX_UNPACKED]  # bytes still allowed, counted as they are written (a member's stated size may lie)
    for i, upload in enumerate(uploads):
        path = Path(upload)
        if not zipfile.is_zipfile(path):
            found.append(path)
            continue
        with zipfile.ZipFile(path) as z:
            members = [m for m in z.infolist() if not m.is_dir() and _picture(m.filename)]
            if not members:
                raise RequestError(field, f"{{field}}[{i}] is a zip file with no pictures "
                                   f"({', '.join(sorted(IMAGE_SUFFIXES))}) in it")
            for j, m in enumerate(members):
                if len(found) == MAX_PICTURES:
                    raise RequestError(field, f"{{field}}: at most {MAX_PICTURES} pictures")
                out = folder / f"{i:03d}-{j:05d}{Path(m.filename).suffix.lower()}"
                with z.open(m) as src, open(out, "wb") as dst:
                    _copy(src, dst, budget, field)
                found.append(out)
    if len(found) > MAX_PICTURES:
        raise RequestError(field, f"{{field}}: at most {MAX_PICTURES} pictures")
    return found


def _picture(name: str) -> bool:
    """An image by its suffix, not macOS' resource forks (``__MACOSX/._x.png``)."""
    return Path(name).suffix.lower() in IMAGE_SUFFIXES and not Path(name).name.startswith(".")


def _copy(src, dst, budget: list[int], field: str) -> None:
    while block := src.read(1 << 20):
        budget[0] -= len(block)
        if budget[0] < 0:
            raise RequestError(field, f"{{field}}: the zip files unpack to more than {MAX_UNPACKED >> 20} MiB")
        dst.write(block)
