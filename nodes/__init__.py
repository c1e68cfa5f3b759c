"""ComfyUI nodes: thin adapters over cogvx_core. Only nodes/host.py touches ComfyUI's own APIs."""

NODE_CLASS_MAPPINGS: dict = {}
NODE_DISPLAY_NAME_MAPPINGS: dict = {}
