"""stylegrad's ComfyUI nodes. Link or copy this folder into ComfyUI's ``custom_nodes/`` (with stylegrad installed in
ComfyUI's Python), or install the repository as a custom node; ComfyUI imports it and reads the mappings."""

from stylegrad.apps.comfyui.nodes import NODE_CLASS_MAPPINGS, NODE_DISPLAY_NAME_MAPPINGS, register_folders

try:
    register_folders()
except ImportError:  # imported outside ComfyUI (docs, tests before their stand-ins): nothing to register
    pass

__all__ = ["NODE_CLASS_MAPPINGS", "NODE_DISPLAY_NAME_MAPPINGS"]
