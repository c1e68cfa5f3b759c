"""CogVXCache in plain Python: a handle carrying the cache setting; the sampler computes and skips passes with it."""

import json
import logging

import numpy as np
import pytest

from cogvx_core.errors import CogVXError
from nodes import NODE_CLASS_MAPPINGS as N
from tests.nodes.test_generation import decode, load, sample


def test_cache_node_carries_the_setting_and_the_sampler_skips(models, tmp_path, caplog):
    model, vae, t5 = load("tiny-5b")
    latent = N["CogVXEmptyLatent"]().make("5b", 9, 160, 96, 1, model=model)["result"][0]
    base = sample(model, t5, latent)["samples"]

    with pytest.raises(CogVXError, match="calibrate-cache"):  # a small random model has no published coefficients
        N["CogVXCache"]().apply(model, "teacache", 0.3)

    (exact,) = N["CogVXCache"]().apply(model, "fbcache", 0.0)
    assert model.cache is None and exact.cache.kind == "fbcache"  # the input handle is untouched
    assert (sample(exact, t5, latent)["samples"] == base).all()  # threshold 0 computes every pass

    calibration = tmp_path / "fit.json"
    calibration.write_text(json.dumps({"teacache": {"coefficients": [0.0, 0.0, 0.0, 1.0, 0.0]}}))
    (cached,) = N["CogVXCache"]().apply(model, "teacache", 100.0, coefficients_file=str(calibration))
    assert cached.cache.coefficients == (0.0, 0.0, 0.0, 1.0, 0.0)
    with caplog.at_level(logging.WARNING):
        out = sample(cached, t5, latent)["samples"]  # 3 steps: the middle one reuses the residual
    assert "2 computed, 1 skipped" in caplog.text
    assert not (out == base).all()
    assert float((out - base).norm() / base.norm()) < 0.5
    assert decode(vae, {"samples": out}).shape == decode(vae, {"samples": base}).shape

    (off,) = N["CogVXCache"]().apply(cached, "off", 0.3)
    assert off.cache is None and (sample(off, t5, latent)["samples"] == base).all()


def test_loader_offers_fp8_fast_storage(models):
    choices = N["CogVXModelLoader"]().INPUT_TYPES()["required"]["weight_storage"][0]
    assert "fp8_e4m3fn_fast" in choices
    (model,) = N["CogVXModelLoader"]().load("tiny-5b", "bf16", "fp8_e4m3fn_fast")
    from cogvx_core.modules.fp8 import Fp8Linear

    assert any(isinstance(m, Fp8Linear) for m in model.transformer.modules())
    assert np.isfinite(float(next(m for m in model.transformer.modules() if isinstance(m, Fp8Linear)).weight_scale))
