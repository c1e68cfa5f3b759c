#!/usr/bin/env bash
# One-shot set-up on a fresh machine: CPU torch first (a plain `torch` request pulls a multi-GB CUDA build),
# then this package with its test extra. Idempotent: re-running only checks what is there.
set -euo pipefail
cd "$(dirname "$0")/.."
PY=${PYTHON:-python3}
if ! "$PY" -c "import torch" 2>/dev/null; then
    "$PY" -m pip install -q "torch==2.13.0"
fi
"$PY" -m pip install -q -e ".[test]"
