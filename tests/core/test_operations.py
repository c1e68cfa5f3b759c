"""Pluggable layer operations: the transformer, the VAE and T5 build from a host's namespace (here one shaped like
ComfyUI's `comfy.ops.manual_cast`: every layer casts its weight in forward and counts its calls) with the same
results as the core's own layers."""

import pytest
import torch
from builders import PIPELINE_VAE, randomize_, small_transformer_config, write_tiny_t5
from torch import nn

from cogvx_core.errors import CogVXError
from cogvx_core.modules import causal_conv
from cogvx_core.modules import ops as core_ops
from cogvx_core.text import load_text_encoder
from cogvx_core.transformer import build_transformer
from cogvx_core.vae import build_vae


def _host_ops():
    """A namespace like comfy.ops.manual_cast: torch subclasses whose forward casts weight and bias to the input."""
    calls = {}

    def casting(base):
        class Layer(base):
            comfy_cast_weights = True

            def forward(self, x):
                calls[base.__name__] = calls.get(base.__name__, 0) + 1
                if isinstance(self, nn.Embedding):
                    return super().forward(x)
                weight = None if self.weight is None else self.weight.to(x.dtype)
                bias = None if getattr(self, "bias", None) is None else self.bias.to(x.dtype)
                if isinstance(self, nn.Linear):
                    return nn.functional.linear(x, weight, bias)
                if isinstance(self, nn.LayerNorm):
                    return nn.functional.layer_norm(x, self.normalized_shape, weight, bias, self.eps)
                if isinstance(self, nn.GroupNorm):
                    return nn.functional.group_norm(x, self.num_groups, weight, bias, self.eps)
                return self._conv_forward(x, weight, bias)

        Layer.__name__ = base.__name__
        return Layer

    class Ops:
        Linear, Conv2d, Conv3d = casting(nn.Linear), casting(nn.Conv2d), casting(nn.Conv3d)
        LayerNorm, GroupNorm, Embedding = casting(nn.LayerNorm), casting(nn.GroupNorm), casting(nn.Embedding)

    return Ops, calls


def _from(ops, layer: nn.Module) -> bool:
    return isinstance(layer, tuple(getattr(ops, name) for name in core_ops.LAYERS))


def _layers(model: nn.Module) -> list[nn.Module]:
    return [m for m in model.modules() if isinstance(m, (nn.Linear, nn.Conv2d, nn.Conv3d, nn.LayerNorm, nn.GroupNorm))]


@pytest.mark.parametrize("variant", ["2b", "1.5-5b"])
def test_transformer_from_host_operations_matches(variant):
    ops, calls = _host_ops()
    cfg = small_transformer_config(variant)
    ours = randomize_(build_transformer(cfg, device="cpu"))
    host = build_transformer(cfg, device="cpu", operations=ops)
    host.load_state_dict(ours.state_dict())
    assert all(_from(ops, m) for m in _layers(host))
    g = torch.Generator().manual_seed(0)
    t = 4 if variant == "1.5-5b" else 3
    x, ctx = torch.randn(1, 16, t, 16, 24, generator=g), torch.randn(1, 12, 32, generator=g)
    with torch.no_grad():
        assert torch.equal(host(x, torch.tensor([500]), ctx), ours(x, torch.tensor([500]), ctx))
    assert calls["Linear"] > 0 and calls["LayerNorm"] > 0


def test_vae_from_host_operations_matches_chunked_too(monkeypatch):
    ops, calls = _host_ops()
    ours = randomize_(build_vae(dict(PIPELINE_VAE), device="cpu")).eval()
    host = build_vae(dict(PIPELINE_VAE), device="cpu", operations=ops).eval()
    host.load_state_dict(ours.state_dict())
    assert all(_from(ops, m) for m in _layers(host))
    assert isinstance(host.decoder.conv_in.conv, ops.Conv3d)  # time chunking over the host's Conv3d
    z = torch.randn(1, 16, 3, 4, 6, generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        want = ours.decode(z)
        assert torch.equal(host.decode(z), want)
        monkeypatch.setattr(causal_conv, "SAFE_CONV_GIB", 1.5e-4)  # full-size convs in 2 time chunks
        before = calls["Conv3d"]
        assert torch.equal(host.decode(z), want)
    assert calls["Conv3d"] > 2 * before  # more calls: the chunks, each through the host's forward


def test_t5_adopts_host_operations(tmp_path):
    ops, calls = _host_ops()
    write_tiny_t5(tmp_path)
    ours = load_text_encoder(tmp_path)
    host = load_text_encoder(tmp_path, operations=ops)
    assert isinstance(host.model.shared, ops.Embedding)
    assert all(isinstance(m, ops.Linear) for m in host.model.modules() if isinstance(m, nn.Linear))
    assert torch.equal(host.encode(["a red circle"]), ours.encode(["a red circle"]))
    assert calls["Linear"] > 0 and calls["Embedding"] > 0


def test_bad_operations_are_refused():
    class Missing:
        Linear = nn.Linear

    with pytest.raises(CogVXError, match="lacks the layer classes"):
        core_ops.resolve(Missing)

    class NotTorch:
        Linear, Conv2d, Conv3d, LayerNorm, GroupNorm = nn.Linear, nn.Conv2d, nn.Conv3d, nn.LayerNorm, nn.GroupNorm
        Embedding = type("Embedding", (), {})

    with pytest.raises(CogVXError, match="must subclass"):
        build_transformer(small_transformer_config("5b"), operations=NotTorch)
    assert core_ops.resolve(None) is core_ops
