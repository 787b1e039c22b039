"""The paper's aesthetic embeddings, as the published Cog model offers them by name (``aesthetic_embedding``).

stylegrad ships none of them: a deployment keeps the files (``NAME.pt``, as the paper's repository has them, or
``NAME.safetensors``) in a styles folder, ``$STYLEGRAD_STYLES_DIR`` (``cog.yaml`` downloads them into one at build
time). A name whose file is missing is one error saying where it was looked for and where to get it."""

from __future__ import annotations

from pathlib import Path

from stylegrad.errors import RequestError

# the embeddings of Gallego 2022 (arXiv:2209.12330), in the paper's repository's aesthetic_embeddings/ folder
NAMES = ("aivazovsky", "cloudcore", "fantasy", "flower_plant", "gloomcore", "glowwave", "laion_7plus", "sac_8plus",
         "watercolor")
NONE = "none"  # no style from a name (a style file or pictures may still give one)
SOURCE = "https://github.com/vicgalle/stable-diffusion-aesthetic-gradients/tree/HEAD/aesthetic_embeddings"
SUFFIXES = (".safetensors", ".pt")


def find(name: str, dirs: tuple[str, ...], field: str = "aesthetic_embedding") -> str:
    """The file of the paper's embedding ``name`` in the first of ``dirs`` that has it."""
    if name not in NAMES:
        raise RequestError(field, f"must be one of {', '.join(NAMES)} or {NONE}, got {name!r}")
    for folder in dirs:
        for suffix in SUFFIXES:
            path = Path(folder) / f"{name}{suffix}"
            if path.is_file():
                return str(path)
    where = ", ".join(dirs) if dirs else "no folder: STYLEGRAD_STYLES_DIR is not set"
    raise RequestError(field, f"{{field}} {name}: {name}.pt is not in this deployment's styles folders ({where}); "
                       f"put the paper's embeddings there ({SOURCE}), or send style_file or style_images")
