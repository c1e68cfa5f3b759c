#!/usr/bin/env bash
# Builds a ComfyUI host for tests/host/test_comfyui_host.py from a ComfyUI source tree that is already on disk
# (this script downloads no ComfyUI: point it at a checkout or an unpacked archive, outside this repository).
#
#   bash scripts/setup_comfyui_host.sh VERSION DIR
#
# VERSION  the ComfyUI version the tree is (checked against DIR/comfyui_version.py): 0.20.1, 0.3.54 or 0.33.0
# DIR      the ComfyUI tree (main.py, requirements.txt, comfyui_version.py)
#
# It makes a virtual environment in DIR/.venv (or $COMFYUI_VENV) with ComfyUI's requirements, this pack's own
# runtime dependencies and comfy-cli (the headless client the test drives), plus playwright when Debian's chromium
# is installed (for the test's browser check), then prints the two variables the host test reads. Re-running it
# only checks what is there. torch comes from PyPI, a CUDA build: the test server runs it with --cpu all the same.
#
# The trees the host test is run on are ComfyUI's own commits: 0.3.54 = c7bb3e2b, 0.20.1 = f6d5068a, 0.33.0 = 783545f6
# (e.g. `git -C GITDIR archive COMMIT -- . ':(exclude)PATH' | tar -x -C DIR`; a mirror that lacks a few large
# tokenizer files of other models, such as comfy/text_encoders/llama_tokenizer/tokenizer.json, works with those
# files excluded: the pack and the test never use them).
set -euo pipefail

if [[ $# -ne 2 ]]; then
    echo "usage: $0 VERSION DIR   (DIR: a ComfyUI source tree of that version, outside this repository)" >&2
    exit 2
fi
VERSION=$1
DIR=$(cd "$2" && pwd)
REPO=$(cd "$(dirname "$0")/.." && pwd)
PY=${PYTHON:-python3}
VENV=${COMFYUI_VENV:-$DIR/.venv}
COMFY_CLI_VERSION=${COMFY_CLI_VERSION:-1.23.0}

for f in main.py requirements.txt comfyui_version.py; do
    [[ -f "$DIR/$f" ]] || { echo "$DIR has no $f: not a ComfyUI tree." >&2; exit 1; }
done
found=$(sed -n 's/^__version__ = "\(.*\)"/\1/p' "$DIR/comfyui_version.py")
if [[ "$found" != "$VERSION" ]]; then
    echo "$DIR is ComfyUI $found, not $VERSION: point at the right tree." >&2
    exit 1
fi
case "$REPO/" in "$DIR"/*) echo "Put the ComfyUI tree outside this repository." >&2; exit 1 ;; esac

# The same torch for every host, pinned exactly: torchaudio 2.11.1 (what `torchaudio==2.11.*` picks) does not load
# with torch 2.11.0, and ComfyUI imports torchaudio for its audio nodes.
TORCH_PINS=("torch==2.11.0" "torchvision==0.26.0" "torchaudio==2.11.0")
# What each host imports at start beyond the pack's needs: 0.33.0's dynamic VRAM manager is comfy-aimdo (its
# requirements.txt pins it), 0.20.1 and 0.33.0 use comfy-kitchen's kernels.
case "$VERSION" in
    0.33.*) HOST_IMPORTS="comfy_aimdo, comfy_kitchen" ;;
    0.20.*) HOST_IMPORTS="comfy_kitchen" ;;
    *) HOST_IMPORTS="" ;;
esac

if [[ ! -x "$VENV/bin/python" ]]; then
    "$PY" -m venv "$VENV"
fi
VPY="$VENV/bin/python"
"$VPY" -m pip install -q --upgrade pip
constraints=$(mktemp)
trap 'rm -f "$constraints"' EXIT
printf '%s\n' "${TORCH_PINS[@]}" > "$constraints"
"$VPY" -m pip install -q -c "$constraints" "${TORCH_PINS[@]}"
"$VPY" -m pip install -q -c "$constraints" -r "$DIR/requirements.txt"
# This pack's runtime dependencies (what ComfyUI-Manager would install from requirements.txt), and the client.
"$VPY" -m pip install -q -c "$constraints" -r "$REPO/requirements.txt" "comfy-cli==$COMFY_CLI_VERSION"
# The browser check of the host test drives the host's own frontend with Debian's chromium through playwright.
if [[ -x /usr/bin/chromium ]]; then
    "$VPY" -m pip install -q playwright
fi
"$VPY" -c "import torch, torchaudio, safetensors, transformers, sentencepiece${HOST_IMPORTS:+, $HOST_IMPORTS}
print('torch', torch.__version__, 'torchaudio', torchaudio.__version__)"

echo
echo "ComfyUI $VERSION host ready. Run the host test with:"
echo "  COMFYUI_PATH=$DIR COMFYUI_PYTHON=$VPY python3 -m pytest -q tests/host"
