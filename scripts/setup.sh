#!/usr/bin/env bash
# One-shot set-up on a fresh machine; re-running only checks what is there. It installs, and says so as it goes:
#   1. torch, only when none is importable: exactly torch==2.13.0, which this project's machines (and CI) serve as a
#      local CPU build; an unpinned `pip install torch` would pull a multi-GB CUDA build. On a CUDA machine install
#      your torch first. Elsewhere set TORCH_INDEX (e.g. https://download.pytorch.org/whl/cpu) to take it from there.
#   2. this package in editable mode with its runtime dependencies (pyproject.toml: safetensors, transformers,
#      sentencepiece, einops, imageio, imageio-ffmpeg, protobuf, numpy) and its test extra (pytest, and diffusers,
#      peft and accelerate: the reference implementations the tests compare against).
set -euo pipefail
cd "$(dirname "$0")/.."
PY=${PYTHON:-python3}
TORCH_INDEX=${TORCH_INDEX:-}
if version=$("$PY" -c "import torch; print(torch.__version__)" 2>/dev/null); then
    echo "setup: torch $version is installed; keeping it"
else
    echo "setup: installing torch 2.13.0 (CPU build)${TORCH_INDEX:+ from $TORCH_INDEX}"
    "$PY" -m pip install -q "torch==2.13.0" ${TORCH_INDEX:+--index-url "$TORCH_INDEX"}
fi
echo "setup: installing cogvx (editable) with its dependencies and the test extra (pytest, diffusers, peft, accelerate)"
"$PY" -m pip install -q -e ".[test]"
echo "setup: done"
