"""Models that ship inside the package.

`cogvx-tiny/` is a small CogVideoX of the released architecture (5b transformer with 3D RoPE plus the additive
position table of 5b-I2V, the 3D causal VAE, a T5 v1.1 encoder) trained by `python -m cogvx_core recipe tiny` on
synthetic clips of one coloured shape moving over a plain background along a path centred in the frame, 64x64 pixels,
9 frames. It is the default model of `generate` and `eval`, and the model loader nodes list it, so everything runs
without a download. It only knows its synthetic captions:
"a {red|green|blue|yellow|white} {circle|square|triangle} moves {to the left|to the right|up|down} on a
{black|gray|white|blue|green} background".
"""

from __future__ import annotations

from pathlib import Path

TINY_MODEL_NAME = "cogvx-tiny"
TINY_MODEL = Path(__file__).resolve().parent / TINY_MODEL_NAME


def builtin_models() -> dict[str, Path]:
    """Name -> folder of every built-in model that is present (a source checkout without it lists none)."""
    return {TINY_MODEL_NAME: TINY_MODEL} if (TINY_MODEL / "model_index.json").is_file() else {}
