"""The ComfyUI host the host tests run against: COMFYUI_PATH (a ComfyUI tree) and COMFYUI_PYTHON (its Python, as
scripts/setup_comfyui_host.sh builds it). Without them the importing test module is skipped, loudly."""

from __future__ import annotations

import os

import pytest


def require_host(what: str) -> tuple[str, str]:
    """(COMFYUI_PATH, COMFYUI_PYTHON), or the module is skipped with the reason and what it would have checked."""
    path, python = os.environ.get("COMFYUI_PATH"), os.environ.get("COMFYUI_PYTHON")
    if not path or not python:
        pytest.skip(f"NO COMFYUI HOST: set COMFYUI_PATH (a ComfyUI tree) and COMFYUI_PYTHON (its python; see "
                    f"scripts/setup_comfyui_host.sh) to {what}", allow_module_level=True)
    return path, python
