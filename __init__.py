"""ComfyUI entry point of the CogVX node pack. Importing it outside ComfyUI works (the nodes run in plain Python)."""

try:  # inside ComfyUI this file is imported as a package
    from .nodes import NODE_CLASS_MAPPINGS, NODE_DISPLAY_NAME_MAPPINGS
except ImportError:  # imported as a plain module (pytest rootdir, scripts)
    from nodes import NODE_CLASS_MAPPINGS, NODE_DISPLAY_NAME_MAPPINGS

WEB_DIRECTORY = "./web"

__all__ = ["NODE_CLASS_MAPPINGS", "NODE_DISPLAY_NAME_MAPPINGS", "WEB_DIRECTORY"]
