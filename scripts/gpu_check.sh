#!/usr/bin/env bash
# The one prepared GPU check (memory, offload and speed), for a lent GPU machine: one command, under 8 minutes on an
# H100, random weights of the released configs (no download), tables printed last and written under OUT.
#
#   bash scripts/gpu_check.sh [OUT]            # on the GPU (OUT defaults to out/gpu-check)
#   bash scripts/gpu_check.sh --small [OUT]    # the same commands on small configs on the CPU (a test of this script)
#
# 1. bench-gpu (docs/gpu-check.md): 5B at 49x480x720 with CFG: offload none, blocks at 8 and 6 GiB, fp8 weights at
#    6 GiB, the planned VAE decode; 1.5 at 81x768x1360 under 12 GiB; measured peaks beside the planner's.
# 2. bench-speed: 5B at 49x480x720: CogVX eager, compiled, compiled + TeaCache 0.3, compiled + fp8_fast, against
#    diffusers eager and compiled (when diffusers is installed: carry its wheel), with peak memory.
# Step counts are cut to fit the budget; both report per-step times, and bench-gpu projects them to 50 steps.
set -euo pipefail
cd "$(dirname "$0")/.."
PY=${PYTHON:-python3}
SMALL=()
if [[ "${1:-}" == "--small" ]]; then SMALL=(--small); shift; fi
OUT=${1:-out/gpu-check}
mkdir -p "$OUT"
start=$(date +%s)
"$PY" -m cogvx_core bench-gpu "${SMALL[@]}" --steps 20 --short-steps 5 --out "$OUT/bench-gpu" | tee "$OUT/bench-gpu.log"
settings=eager,compiled,compiled+teacache,compiled+fp8
if "$PY" -c "import diffusers" 2>/dev/null; then settings=$settings,diffusers-eager,diffusers-compiled; fi
"$PY" -m cogvx_core bench-speed "${SMALL[@]}" --steps 10 --settings "$settings" --json "$OUT/bench-speed.json" \
    | tee "$OUT/bench-speed.log"
echo
echo "gpu check done in $(( $(date +%s) - start )) s; tables:"
cat "$OUT/bench-gpu/bench_gpu.md"
tail -n 20 "$OUT/bench-speed.log"
