"""ComfyUI entry point when this repository itself sits in ``custom_nodes/`` (Comfy registry, git clone): the nodes
of ``stylegrad.apps.comfyui``, from the installed stylegrad or else from this checkout."""

import os
import sys

try:
    import stylegrad  # noqa: F401  (installed into ComfyUI's Python: pip install stylegrad)
except ImportError:
    sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))

from stylegrad.apps.comfyui import NODE_CLASS_MAPPINGS, NODE_DISPLAY_NAME_MAPPINGS  # noqa: E402

__all__ = ["NODE_CLASS_MAPPINGS", "NODE_DISPLAY_NAME_MAPPINGS"]
