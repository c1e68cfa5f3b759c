#!/usr/bin/env bash
# One-shot set-up on a fresh machine; re-running only checks what is there. It installs, and says so as it goes:
#   1. torch, only when none is importable: torch 2.13.0, the CPU build, from the PyTorch CPU index ($TORCH_INDEX);
#      a plain `pip install torch` on Linux pulls a multi-GB CUDA build. On a CUDA machine install your torch first.
#   2. this package in editable mode with its runtime dependencies (pyproject.toml: safetensors, transformers,
#      sentencepiece, einops, imageio, imageio-ffmpeg, protobuf, numpy) and its test extra (pytest, and diffusers,
#      peft and accelerate: the reference implementations the tests compare against).
set -euo pipefail
cd "$(dirname "$0")/.."
PY=${PYTHON:-python3}
TORCH_INDEX=${TORCH_INDEX:-https://download.pytorch.org/whl/cpu}
if version=$("$PY" -c "import torch; print(torch.__version__)" 2>/dev/null); then
    echo "setup: torch $version is installed; keeping it"
else
    echo "setup: installing torch 2.13.0 (CPU build) from $TORCH_INDEX"
    "$PY" -m pip install -q "torch==2.13.0" --index-url "$TORCH_INDEX"
fi
echo "setup: installing cogvx (editable) with its dependencies and the test extra (pytest, diffusers, peft, accelerate)"
"$PY" -m pip install -q -e ".[test]"
echo "setup: done"
