"""The CLI's one ``Error:`` line: the library's description of any error (``stylegrad.errors.describe``), with
the CLI's own words where it has them: request fields as the flags that set them, and which flags to lower when
memory runs out."""

from __future__ import annotations

from stylegrad.errors import RequestError, describe, is_out_of_memory

MEMORY = "out of memory: try a smaller --width/--height or --n, fewer --style-steps, or another --device"
# request fields whose flag is not simply '--' + the field with dashes
FLAGS = {"prompt": "PROMPT", "loras": "--lora", "embeddings": "--embedding", "ip_images": "--ip-image",
         "hypernetworks": "--hypernetwork"}


def flag(field: str) -> str:
    """The flag that sets a request field: ``style_options.lr`` -> ``--style-lr``, ``loras[1]`` -> ``--lora``."""
    name = field.split("[", 1)[0]
    if name.startswith("style_options."):
        name = "style_" + name.removeprefix("style_options.")
    return FLAGS.get(name, "--" + name.replace("_", "-"))


def error_line(e: BaseException) -> str:
    if is_out_of_memory(e):
        return MEMORY
    if isinstance(e, RequestError):
        return str(e.renamed(flag(e.field)))
    return describe(e)
