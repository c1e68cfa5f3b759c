"""The LoRA demonstration and the Explicit Uniform Sampling ablation at toy scale, and the curve statistics."""

from __future__ import annotations

import json

import pytest

from cogvx_core.recipes.demos import curve_variance, lora_demo, lora_split, moving_average, eus_ablation
from cogvx_core.synthetic import combos_for


def test_curve_variance_measures_jitter_around_the_trend():
    smooth = [1.0 - 0.001 * i for i in range(200)]
    jagged = [v + (0.05 if i % 2 else -0.05) for i, v in enumerate(smooth)]
    assert curve_variance(smooth, 25, skip=25)["residual_variance"] < 1e-12  # a straight line away from the ends
    assert curve_variance(jagged, 25, skip=25)["residual_variance"] == pytest.approx((0.05 * 24 / 25) ** 2, rel=1e-3)  # 13 of 25 alike
    assert curve_variance(jagged, 25, skip=100)["mean_loss"] == pytest.approx(sum(jagged[100:]) / 100)
    assert moving_average([1.0, 2.0, 3.0], 3) == [1.5, 2.0, 2.5]


def test_the_lora_split_keeps_judged_purple_combinations_out_of_training():
    train, judged = lora_split()
    assert set(train).isdisjoint(judged) and set(train) | set(judged) == set(combos_for("spare"))
    assert all(c.colour == "purple" for c in train + judged) and len(judged) == 15


def test_lora_demo_writes_its_lora_numbers_and_figure(smoke_model, tmp_path):
    model, _, _ = smoke_model
    result = lora_demo(model, tmp_path, smoke=True, say=lambda m: None)
    assert (tmp_path / "purple.safetensors").is_file() and (tmp_path / "lora_demo.png").is_file()
    saved = json.loads((tmp_path / "lora_demo.json").read_text())
    for when in ("before", "after"):
        for prompts in ("purple", "heldout"):
            assert 0 <= saved[when][prompts]["all"] <= 1
    assert result["purple_judged_combos"] == 2


def test_eus_ablation_writes_curves_numbers_and_figure(smoke_model, tmp_path):
    model, _, _ = smoke_model
    result = eus_ablation(model, tmp_path, smoke=True, say=lambda m: None)
    saved = json.loads((tmp_path / "eus_ablation.json").read_text())
    assert set(saved["losses"]) == {"explicit/0", "uniform/0"} and len(saved["losses"]["explicit/0"]) == 12
    assert saved["losses"]["explicit/0"] != saved["losses"]["uniform/0"]  # other timesteps
    assert result["variance_ratio"] > 0 and (tmp_path / "eus_ablation.png").is_file()
