"""Step caching (cache.py) and its calibration (calibrate.py) on the built-in model and on small random models."""

import json

import numpy as np
import pytest
import torch

from cogvx_core.cache import (CACHE_FILE, PUBLISHED_COEFFICIENTS, CacheRun, StepCache, parse_cache, polynomial,
                              read_coefficients, relative_l1, resolve)
from cogvx_core.calibrate import calibrate, fit
from cogvx_core.errors import CogVXError
from cogvx_core.models import TINY_MODEL
from cogvx_core.pipeline import load_pipeline
from cogvx_core.variants import get_variant

PROMPTS = ["a red circle moves to the left on a black background", "a blue square moves up on a gray background"]
LINEAR = (0.0, 0.0, 0.0, 1.0, 0.0)  # TeaCache polynomial y = x


@pytest.fixture(scope="module")
def tiny():
    return load_pipeline(TINY_MODEL, device="cpu")


def _generate(pipe, cache=None, steps=8, sampler="ddim", guidance=6.0):
    return pipe.generate(PROMPTS, frames=9, height=64, width=64, steps=steps, sampler=sampler, seed=3,
                         guidance=guidance, decode_frames=False, cache=cache)


def test_off_counts_every_pass_and_zero_threshold_is_exact(tiny):
    base = _generate(tiny)
    assert (base.passes.computed, base.passes.skipped) == (8, 0)  # one pass a step: CFG halves share it
    for cache in (StepCache("fbcache", 0.0), StepCache("teacache", 0.0, (0.0, 0.0, 0.0, 0.0, 1e-3))):
        out = _generate(tiny, cache)
        assert (out.passes.computed, out.passes.skipped) == (8, 0)
        assert torch.equal(out.latents, base.latents)  # computing through the cache changes no bit


@pytest.mark.parametrize("kind", ["teacache", "fbcache"])
def test_huge_threshold_skips_all_but_first_and_last(tiny, kind):
    cache = StepCache(kind, 1e9, LINEAR if kind == "teacache" else None)
    out = _generate(tiny, cache, steps=6)
    assert (out.passes.computed, out.passes.skipped) == (2, 4)
    assert not torch.equal(out.latents, _generate(tiny, steps=6).latents)


def test_teacache_skips_where_the_accumulated_embedding_change_stays_under_the_threshold(tiny):
    """The skipped steps follow from the time embeddings alone: recompute them by hand."""
    steps, threshold = 12, 0.75
    model = tiny.transformer
    with torch.no_grad():
        ts = tiny.schedule.timesteps(steps)
        tembs = [model.time_embedding(torch.full((2 * len(PROMPTS),), int(t)), model.dtype) for t in ts]
    expected, acc = [], 0.0
    for i in range(steps):
        if i > 0:
            acc += relative_l1(tembs[i], tembs[i - 1])
        skip = 0 < i < steps - 1 and acc < threshold
        expected.append(skip)
        if not skip:
            acc = 0.0
    assert 0 < sum(expected) < steps - 2  # the threshold makes a mixed pattern
    seen = []

    class Watch(CacheRun):
        def blocks(self, *a):
            before = self.skipped
            out = super().blocks(*a)
            seen.append(self.skipped > before)
            return out

    run = Watch(StepCache("teacache", threshold, LINEAR), steps)
    _generate(tiny, run, steps=steps)
    assert seen == expected


def test_skipped_pass_reuses_the_cached_residual(tiny):
    """A skipped pass gives the transformer's output for (new tokens + residual of the last computed pass)."""
    model = tiny.transformer
    x = torch.randn(1, 16, 3, 8, 8, generator=torch.Generator().manual_seed(0))
    ctx = torch.randn(1, 16, 64, generator=torch.Generator().manual_seed(1))
    run = CacheRun(StepCache("teacache", 1e9, LINEAR), 3)
    from cogvx_core.cache import attached

    with torch.no_grad(), attached(model, run):
        first = model(x, torch.tensor([900]), ctx)
        second = model(x, torch.tensor([800]), ctx)  # skipped: same tokens, same residual, other timestep head
    assert (run.computed, run.skipped) == (1, 1)
    with torch.no_grad():
        full_900 = model(x, torch.tensor([900]), ctx)
    assert torch.equal(first, full_900)
    assert not torch.equal(second, first)  # the output head still sees the new timestep
    assert model.step_cache is None  # detached after the run


def test_cache_cuts_work_and_stays_close_on_the_tiny_model(tiny):
    base = _generate(tiny, steps=20)
    out = _generate(tiny, StepCache("fbcache", 0.1), steps=20)
    assert out.passes.skipped >= 5
    rel = ((out.latents - base.latents).norm() / base.latents.norm()).item()
    assert rel < 0.1


def test_parse_cache():
    assert parse_cache(None) is None and parse_cache("off") is None
    assert parse_cache("teacache") == StepCache("teacache", 0.3)
    assert parse_cache("fbcache:0.05") == StepCache("fbcache", 0.05)
    for bad in ("pab", "teacache:x", "fbcache:-1"):
        with pytest.raises(CogVXError):
            parse_cache(bad)


def test_resolve_published_file_and_refusal(tiny, tmp_path):
    cache = StepCache("teacache", 0.3)
    for name in ("2b", "5b", "5b-i2v", "1.5-5b", "1.5-5b-i2v"):
        got = resolve(cache, get_variant(name), released=True)
        assert got.coefficients == PUBLISHED_COEFFICIENTS[name]
    assert PUBLISHED_COEFFICIENTS["1.5-5b"] != PUBLISHED_COEFFICIENTS["5b"]  # 1.5 does not run with 5B's
    with pytest.raises(CogVXError, match="calibrate-cache"):
        resolve(cache, tiny.variant, released=False, model_dir=tmp_path)
    (tmp_path / CACHE_FILE).write_text(json.dumps({"teacache": {"coefficients": [1.0, 2.0, 3.0]}}))
    got = resolve(cache, tiny.variant, released=False, model_dir=tmp_path)
    assert got.coefficients == (1.0, 2.0, 3.0) and str(tmp_path) in got.source
    assert resolve(StepCache("fbcache", 0.1), tiny.variant, released=False) == StepCache("fbcache", 0.1)
    (tmp_path / "bad.json").write_text("{}")
    with pytest.raises(CogVXError, match="not a calibration file"):
        read_coefficients(tmp_path / "bad.json")


def test_shipped_calibration_of_the_builtin_model(tiny):
    assert not tiny.transformer.released_size
    coefficients = read_coefficients(TINY_MODEL)
    got = resolve(StepCache("teacache", 0.3), tiny.variant, released=False, model_dir=TINY_MODEL)
    assert got.coefficients == coefficients and len(coefficients) == 5


def test_fit_recovers_a_polynomial():
    x = list(np.linspace(0.01, 0.5, 40))
    true = (3.0, -2.0, 0.5, 1.2, 0.01)
    coefficients, r2 = fit(x, [polynomial(true, v) for v in x])
    assert np.allclose(coefficients, true, atol=1e-6) and r2 > 0.999999
    with pytest.raises(CogVXError, match="distinct"):
        fit([0.1, 0.1, 0.2], [1, 2, 3])


def test_calibrate_fits_the_model_it_runs(tiny):
    result = calibrate(tiny, PROMPTS, steps=[6, 10], batch_size=2, size=(9, 64, 64))
    t = result["teacache"]
    assert t["points"] == 5 + 9 == len(result["points"]["x"])
    # the fitted curve passes near the measured output changes
    pred = [polynomial(t["coefficients"], x) for x in result["points"]["x"]]
    assert np.mean(np.abs(np.subtract(pred, result["points"]["y"]))) < 0.5 * np.mean(result["points"]["y"])


def test_video_psnr():
    from cogvx_core.recipes.cache_report import video_psnr

    a = torch.zeros(2, 4, 4, 3)
    assert video_psnr(a, a) == 100.0
    b = a.clone()
    b[0, 0, 0, 0] = 1.0  # one value off by the full range in 96: mse 1/96
    assert abs(video_psnr(a, b) - 10 * np.log10(96)) < 1e-4


def test_compare_rows_against_the_uncached_run(tiny):
    from cogvx_core.recipes.cache_report import compare, format_table, speed_quality_chart

    settings = [StepCache("fbcache", 0.0), StepCache("teacache", 1e9, LINEAR, "test")]
    rows = compare(tiny, PROMPTS * 2, settings, sampler="ddim", steps=5, batch_size=2, size=(9, 64, 64))
    off, exact, skipping = rows
    assert [r["cache"] for r in rows] == ["off", "fbcache:0", "teacache:1e+09"]
    assert off["passes_computed"] == exact["passes_computed"] == 10 and exact["psnr_min"] == 100.0  # 2 batches
    assert (skipping["passes_computed"], skipping["passes_skipped"]) == (4, 6)
    assert skipping["psnr_mean"] < 100 and skipping["coefficients"] == "test"
    assert all(0 <= r["adherence"] <= 1 and r["cpu_seconds"] > 0 for r in rows)
    assert "| ddim | 5 | teacache:1e+09 |" in format_table(rows)
    assert speed_quality_chart(rows).size == (720, 420)
