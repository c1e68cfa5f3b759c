"""Compiled blocks (compile.py), fp8 matmuls (modules/fp8.py) and the speed check (commands/bench_speed.py)."""

import pytest
import torch
import torch.nn.functional as F
from torch._dynamo.utils import counters

from builders import randomize_, small_transformer_config
from cogvx_core.compile import compile_blocks, compiler_problem, is_compiled
from cogvx_core.modules.fp8 import FP8, Fp8Linear, fp8_linear, quantize, to_fp8_fast
from cogvx_core.transformer import build_transformer


def _model(seed=0, **overrides):
    cfg = small_transformer_config("5b", **overrides)
    return randomize_(build_transformer(cfg, device="cpu"), seed=seed, qk_gain=1.0).eval().requires_grad_(False)


def _inputs(model, frames=3, size=8, batch=2, seed=1):
    g = torch.Generator().manual_seed(seed)
    cfg = model.config
    x = torch.randn(batch, cfg["in_channels"], frames, size, size, generator=g)
    ctx = torch.randn(batch, cfg["max_text_seq_length"], cfg["text_embed_dim"], generator=g)
    return x, ctx


def _graphs() -> int:
    return counters["stats"]["unique_graphs"]


def _steps(model, x, ctx, timesteps):
    with torch.no_grad():
        return [model(x, torch.full((x.shape[0],), t), ctx) for t in timesteps]


def test_blocks_share_one_graph_and_steps_do_not_recompile():
    torch._dynamo.reset()
    model = _model(num_layers=3)
    x, ctx = _inputs(model)
    eager = _steps(model, x, ctx, [900, 500, 100])
    compile_blocks(model, backend="eager")
    assert is_compiled(model)
    before = _graphs()
    compiled = _steps(model, x, ctx, [900, 500])  # first run: one graph for all three blocks
    assert _graphs() - before == 1
    compiled += _steps(model, x, ctx, [100])  # a second run at the same size: no new graph
    assert _graphs() - before == 1
    for a, b in zip(compiled, eager):
        assert torch.equal(a, b)
    x2, ctx2 = _inputs(model, frames=2)  # another size: one new graph
    _steps(model, x2, ctx2, [700, 300])
    assert _graphs() - before == 2


@pytest.mark.slow
@pytest.mark.skipif(compiler_problem("cpu") is not None, reason=str(compiler_problem("cpu")))
def test_inductor_compiles_once_and_matches_eager():
    """inductor on the CPU (needs a C++ compiler; skipped with the reason when none is installed)."""
    torch._dynamo.reset()
    model = _model(num_layers=2)
    x, ctx = _inputs(model)
    eager = _steps(model, x, ctx, [900, 100])
    compile_blocks(model)
    before = _graphs()
    compiled = _steps(model, x, ctx, [900, 100])
    compiled += _steps(model, x, ctx, [900])
    assert _graphs() - before == 1
    for a, b in zip(compiled, eager + eager[:1]):
        assert ((a - b).norm() / b.norm()).item() < 1e-4


def test_fp8_linear_matches_the_dequantized_product():
    """The fp8 product equals a float product of the same quantized operands (scales applied)."""
    g = torch.Generator().manual_seed(0)
    x, w, b = torch.randn(40, 64, generator=g), torch.randn(32, 64, generator=g) / 8, torch.randn(32, generator=g)
    wq, ws = quantize(w)
    xq, xs = quantize(x)
    assert wq.dtype == FP8 and wq.float().abs().max() == 448  # the whole fp8 range is used
    want = F.linear(xq.float() * xs, wq.float() * ws, b)
    for dtype in (torch.float32, torch.bfloat16):
        got = fp8_linear(x.to(dtype), wq, ws, b.to(dtype))
        assert got.dtype == dtype
        tol = 1e-5 if dtype == torch.float32 else 1e-2
        assert ((got.float() - want).norm() / want.norm()).item() < tol
    rel = ((fp8_linear(x, wq, ws, b) - F.linear(x, w, b)).norm() / F.linear(x, w, b).norm()).item()
    assert 1e-3 < rel < 0.08  # fp8 rounding: a few percent, not nothing


def test_fp8_fast_model_keeps_close_to_the_full_precision_one():
    model = _model()
    x, ctx = _inputs(model)
    t = torch.tensor([500, 500])
    with torch.no_grad():
        want = model(x, t, ctx)
        to_fp8_fast(model, names=lambda name: name.startswith("transformer_blocks."))
        got = model(x, t, ctx)  # the CPU path: fp8 storage, dequantized weights (and a note)
    converted = [m for m in model.modules() if isinstance(m, Fp8Linear)]
    assert converted and all(m.weight.dtype == FP8 for m in converted)
    assert type(model.proj_out) is not Fp8Linear  # only the named layers
    rel = ((got - want).norm() / want.norm()).item()
    assert 0 < rel < 0.1


def test_speed_check_runs_every_setting_on_a_small_config():
    from cogvx_core.commands.bench_speed import REFERENCE_SETTINGS, SETTINGS, SMALL, format_rows, speed_check

    rows = speed_check(**{**SMALL, "steps": 4}, dtype=torch.float32, device="cpu", compile_backend="eager",
                       say=lambda *_: None)
    by = {r["setting"]: r for r in rows}
    assert set(by) == set(SETTINGS + REFERENCE_SETTINGS)
    assert by["compiled+teacache"]["passes_skipped"] > 0 and by["eager"]["passes_skipped"] == 0
    assert by["compiled"]["rel_l2_vs_eager"] < 1e-6  # the same math
    assert by["diffusers-eager"]["rel_l2_vs_eager"] < 1e-5  # ours and the reference run the same loop
    assert "| compiled+fp8 |" in format_rows(rows)
