"""Names a client may use for styles, LoRAs and embeddings: files inside the configured folders, nothing else.

A request names a file by its stem ('watercolor', as A1111's lists show them) or by a path relative to a folder;
the resolved path must lie inside that folder after resolving '..' and symlinks, so no request reads a file the
operator did not put there."""

from __future__ import annotations

from pathlib import Path

from stylegrad.errors import StylegradError

STYLE_SUFFIXES = (".safetensors", ".pt", ".bin", ".npy")
ADDON_SUFFIXES = (".safetensors", ".pt", ".bin", ".ckpt")
IPADAPTER_SUFFIXES = (".safetensors", ".bin", ".pth", ".pt")  # as ComfyUI's and the ControlNet extension's folders


def listing(dirs, suffixes) -> dict[str, Path]:
    """stem -> file for every file with one of ``suffixes`` in ``dirs`` (sub-folders too); the first folder wins,
    and in a folder a .safetensors file wins over a pickle of the same stem."""
    found: dict[str, Path] = {}
    for d in dirs:
        root = Path(d)
        if not root.is_dir():
            continue
        files = sorted((p for p in root.rglob("*") if p.suffix.lower() in suffixes and p.is_file()),
                       key=lambda p: (p.stem, suffixes.index(p.suffix.lower())))
        for p in files:
            found.setdefault(p.stem, p)
    return found


def resolve(name: str, dirs, suffixes, what: str) -> Path:
    """The file ``name`` means in ``dirs``; a ``StylegradError`` (HTTP 422) for anything else."""
    if not isinstance(name, str) or not name or "\x00" in name:
        raise StylegradError(f"{what}: a name is needed")
    by_stem = listing(dirs, suffixes)
    if name in by_stem:
        return by_stem[name]
    for d in dirs:
        root = Path(d).resolve()
        candidate = (root / name).resolve()
        if candidate.suffix.lower() in suffixes and candidate.is_file() and candidate.is_relative_to(root):
            return candidate
    raise refusal(name, dirs, what)


def refusal(name: str, dirs, what: str) -> StylegradError:
    """The one answer to a name that is not a file in the folders (a request's field or a prompt's tag)."""
    if not dirs:
        return StylegradError(f"{what} '{name}': this server has no {what} folder configured")
    return StylegradError(f"{what} '{name}' is not in this server's {what} folders")


class FolderNames:
    """The server's ``Names`` (``pipelines.request.Names``): styles, LoRAs and embeddings only from its folders."""

    def __init__(self, styles_dirs, loras_dirs, embeddings_dirs, ipadapter_dirs=(), hypernetworks_dirs=()):
        self.styles_dirs, self.loras_dirs, self.embeddings_dirs = styles_dirs, loras_dirs, embeddings_dirs
        self.ipadapter_dirs = ipadapter_dirs
        self.hypernetworks_dirs = hypernetworks_dirs

    def style(self, name: str) -> str:
        return str(resolve(name, self.styles_dirs, STYLE_SUFFIXES, "style"))

    def lora(self, spec: str) -> str:
        """'NAME[:TE[:UNET]]' with NAME resolved inside the LoRA folders (never a path of the client's)."""
        name, _, weights = spec.partition(":")
        path = resolve(name, self.loras_dirs, ADDON_SUFFIXES, "LoRA")
        return f"{path}:{weights}" if weights else str(path)

    def embedding(self, name: str) -> str:
        return str(resolve(name, self.embeddings_dirs, ADDON_SUFFIXES, "embedding"))

    def hypernetwork(self, spec: str) -> str:
        """'NAME[:MULT]' with NAME resolved inside the hypernetwork folders."""
        from stylegrad.addons.hypernetworks.library import EXTENSIONS, parse_hypernetwork_arg

        name, mult = parse_hypernetwork_arg(spec)
        path = resolve(name, self.hypernetworks_dirs, EXTENSIONS, "hypernetwork")
        return f"{path}:{mult:g}"

    def ip_adapter(self, name: str) -> str:
        return str(resolve(name, self.ipadapter_dirs, IPADAPTER_SUFFIXES, "IP-Adapter"))
