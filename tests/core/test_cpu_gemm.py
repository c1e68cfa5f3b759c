"""Big float32 CPU products through oneDNN (modules/cpu_gemm.py): same results as F.linear, taken only where safe."""

import pytest
import torch
import torch.nn.functional as F
from torch._dynamo.utils import counters
from torch.profiler import profile

from builders import reference_forward, reference_transformer, randomize_, rel_l2, small_transformer_config
from cogvx_core.compile import compile_blocks, compiler_problem
from cogvx_core.modules import cpu_gemm
from cogvx_core.modules.ops import Linear
from cogvx_core.transformer import build_transformer

pytestmark = pytest.mark.skipif(not cpu_gemm.AVAILABLE, reason="this torch build has no oneDNN (mkldnn)")

OP = cpu_gemm.OP_NAME


def _ran_onednn(fn) -> tuple[torch.Tensor, bool]:
    """fn()'s result, and whether the oneDNN op ran (the profiler lists the ops actually called)."""
    with profile() as prof:
        out = fn()
    return out, any(e.name == OP for e in prof.events())


def _big(seed=0, tokens=600, d_in=1024, d_out=1024):
    g = torch.Generator().manual_seed(seed)  # 600 x 1024 x 1024 = 6.3e8 multiply-adds: above GEMM_MIN_MACS
    x = torch.randn(1, tokens, d_in, generator=g)
    w = torch.randn(d_out, d_in, generator=g) / d_in**0.5
    b = torch.randn(d_out, generator=g)
    return x, w, b


def test_big_float32_product_runs_on_onednn_and_matches_f_linear():
    x, w, b = _big()
    assert x.numel() * w.shape[0] >= cpu_gemm.GEMM_MIN_MACS
    with torch.no_grad():
        got, used = _ran_onednn(lambda: cpu_gemm.linear(x, w, b))
    assert used
    want = F.linear(x.double(), w.double(), b.double())
    # float32 rounding only: both within a few ulps of the float64 product, and of each other
    assert rel_l2(got.double(), want) < 1e-6 and rel_l2(F.linear(x, w, b).double(), want) < 1e-6
    assert rel_l2(got, F.linear(x, w, b)) < 1e-6


@pytest.mark.parametrize("case", ["small", "bfloat16", "gradient", "non-contiguous weight", "disabled"])
def test_other_products_stay_on_f_linear(case, monkeypatch):
    x, w, b = _big()
    grad = False
    if case == "small":
        x = x[:, :16]
    elif case == "bfloat16":
        x, w, b = x.bfloat16(), w.bfloat16(), b.bfloat16()
    elif case == "gradient":  # the op has no backward: training must keep autograd's product
        w.requires_grad_(True)
        grad = True
    elif case == "non-contiguous weight":
        w = w.t().contiguous().t()
    elif case == "disabled":
        monkeypatch.setitem(cpu_gemm._state, "enabled", False)
    with torch.set_grad_enabled(grad):
        got, used = _ran_onednn(lambda: cpu_gemm.linear(x, w, b))
        want = F.linear(x, w, b)
    assert not used
    assert rel_l2(got, want) < 1e-6  # F.linear both times (MKL's last bit may move with the buffers' alignment)
    if grad:
        got.sum().backward()
        assert w.grad is not None


def test_set_enabled_switches_the_route():
    x, w, b = _big()
    try:
        cpu_gemm.set_enabled(False)
        with torch.no_grad():
            assert not _ran_onednn(lambda: cpu_gemm.linear(x, w, b))[1]
        cpu_gemm.set_enabled(True)
        with torch.no_grad():
            assert _ran_onednn(lambda: cpu_gemm.linear(x, w, b))[1]
    finally:
        cpu_gemm.set_enabled(True)


def test_core_linear_layer_takes_the_route():
    x, w, b = _big()
    layer = Linear(1024, 1024)
    with torch.no_grad():
        layer.weight.copy_(w)
        layer.bias.copy_(b)
        got, used = _ran_onednn(lambda: layer(x))
    assert used and rel_l2(got, F.linear(x, w, b)) < 1e-6


def test_transformer_on_onednn_keeps_reference_parity(monkeypatch):
    """Every product of a small model forced onto oneDNN (threshold 0): the reference parity bound still holds."""
    cfg = small_transformer_config("5b")
    ours = randomize_(build_transformer(cfg, device="cpu"), seed=3)
    ref = reference_transformer(cfg, ours.state_dict())
    g = torch.Generator().manual_seed(0)
    x = torch.randn(2, cfg["in_channels"], 3, 16, 24, generator=g)
    ctx = torch.randn(2, cfg["max_text_seq_length"], cfg["text_embed_dim"], generator=g)
    ts = torch.tensor([999, 421])
    monkeypatch.setattr(cpu_gemm, "GEMM_MIN_MACS", 0)
    with torch.no_grad():
        got, used = _ran_onednn(lambda: ours(x, ts, ctx))
        want = reference_forward(ref, x, ts, ctx, None)
    assert used
    assert rel_l2(got, want) <= 1e-5  # the bound of test_transformer.py's parity tests


@pytest.mark.parametrize("backend", [
    "aot_eager",
    pytest.param("inductor", marks=[pytest.mark.slow, pytest.mark.skipif(
        compiler_problem("cpu") is not None, reason=str(compiler_problem("cpu")))]),
])
def test_compiled_block_keeps_the_op_and_one_graph(monkeypatch, backend):
    """Under torch.compile the product stays one opaque op; blocks still share one graph (weights are inputs)."""
    monkeypatch.setattr(cpu_gemm, "GEMM_MIN_MACS", 0)
    torch._dynamo.reset()
    cfg = small_transformer_config("5b", num_layers=3)
    model = randomize_(build_transformer(cfg, device="cpu"), seed=1).eval().requires_grad_(False)
    g = torch.Generator().manual_seed(1)
    x = torch.randn(2, cfg["in_channels"], 3, 8, 8, generator=g)
    ctx = torch.randn(2, cfg["max_text_seq_length"], cfg["text_embed_dim"], generator=g)
    ts = torch.tensor([900, 900])
    with torch.no_grad():
        eager = model(x, ts, ctx)
        compile_blocks(model, backend=backend)
        before = counters["stats"]["unique_graphs"]
        compiled, used = _ran_onednn(lambda: model(x, ts, ctx))
    assert used
    assert counters["stats"]["unique_graphs"] - before == 1
    if backend == "aot_eager":
        assert torch.equal(compiled, eager)
    else:  # inductor fuses the elementwise work: float32 rounding differs
        assert rel_l2(compiled, eager) < 1e-5


def test_feed_forward_fuses_gelu_but_not_past_a_hook(monkeypatch):
    """The FF's first product carries the GELU on oneDNN; a forward hook on that layer (how LoRAs add their branch)
    must see the product before the GELU, so then the GELU runs apart."""
    from cogvx_core.modules.expert_block import FeedForward

    monkeypatch.setattr(cpu_gemm, "GEMM_MIN_MACS", 0)
    torch.manual_seed(0)
    ff = FeedForward(64, 256).eval()
    x = torch.randn(2, 50, 64)
    proj, out_layer = ff.net[0].proj, ff.net[2]

    def expected(shift=0.0):
        h = F.gelu(F.linear(x, proj.weight, proj.bias) + shift, approximate="tanh")
        return F.linear(h, out_layer.weight, out_layer.bias)

    with torch.no_grad():
        got, used = _ran_onednn(lambda: ff(x))
        assert used and rel_l2(got, expected()) < 1e-6
        proj.register_forward_hook(lambda module, args, out: out + 1.0)
        assert rel_l2(ff(x), expected(1.0)) < 1e-6


def test_a_failing_onednn_falls_back_to_f_linear_once_and_for_all(monkeypatch, caplog):
    """A oneDNN error costs the speed-up, not the run: F.linear's result, one warning, the route off after."""
    x, w, b = _big()

    def broken(*args):
        raise ValueError("vector::reserve")

    monkeypatch.setattr(cpu_gemm, "_onednn_product", broken)
    monkeypatch.setitem(cpu_gemm._state, "enabled", True)
    with torch.no_grad(), caplog.at_level("WARNING"):
        got = cpu_gemm.linear(x, w, b)
        # MKL's sums may differ in the last bit with the buffers' alignment: compare at float32 rounding
        assert rel_l2(got, F.linear(x, w, b)) < 1e-6
        assert not cpu_gemm.enabled()
        assert "vector::reserve" in caplog.text and "F.linear" in caplog.text
        assert rel_l2(cpu_gemm.linear(x, w, b, "gelu_tanh"), F.gelu(F.linear(x, w, b), approximate="tanh")) < 1e-6


def test_a_second_copy_of_the_module_has_its_own_op(tmp_path):
    """A host may import the core twice under two names; each copy registers and runs its own op and state."""
    import importlib.util

    spec = importlib.util.spec_from_file_location("another_name_for_cpu_gemm", cpu_gemm.__file__)
    other = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(other)
    assert other.OP_NAME != cpu_gemm.OP_NAME
    x, w, b = _big()
    calls = []
    real = other._onednn_product
    other._onednn_product = lambda *a: calls.append(1) or real(*a)
    with torch.no_grad():
        got = other.linear(x, w, b)
        mine, used = _ran_onednn(lambda: cpu_gemm.linear(x, w, b))
    assert calls == [1] and used  # each copy's op calls its own function
    assert rel_l2(got, F.linear(x, w, b)) < 1e-6 and rel_l2(mine, got) < 1e-6
