"""The LoRA demonstration and the Explicit Uniform Sampling ablation at toy scale, and the curve statistics."""

from __future__ import annotations

import json

import pytest

from cogvx_core.errors import CogVXError
from cogvx_core.recipes.demos import LORA_COLOUR, curve_variance, eus_ablation, lora_demo, lora_split, moving_average
from cogvx_core.recipes.synthetic import UNSEEN_SHAPE_COLOURS, all_combos, combos_for


def test_curve_variance_measures_jitter_around_the_trend():
    smooth = [1.0 - 0.001 * i for i in range(200)]
    jagged = [v + (0.05 if i % 2 else -0.05) for i, v in enumerate(smooth)]
    assert curve_variance(smooth, 25, skip=25)["residual_variance"] < 1e-12  # a straight line away from the ends
    assert curve_variance(jagged, 25, skip=25)["residual_variance"] == pytest.approx((0.05 * 24 / 25) ** 2, rel=1e-3)  # 13 of 25 alike
    assert curve_variance(jagged, 25, skip=100)["mean_loss"] == pytest.approx(sum(jagged[100:]) / 100)
    assert moving_average([1.0, 2.0, 3.0], 3) == [1.5, 2.0, 2.5]


@pytest.mark.parametrize("colour", ["black", "purple"])
def test_the_lora_split_keeps_judged_combinations_out_of_training(colour):
    train, judged = lora_split(colour)
    assert set(train).isdisjoint(judged) and set(train) | set(judged) == set(all_combos((colour,)))
    assert all(c.colour == colour and c.background != colour for c in train + judged)
    assert len(judged) == len(train + judged) // 4
    with pytest.raises(CogVXError, match="never drew"):
        lora_split("red")  # the base model draws red shapes: nothing new to teach


def test_no_base_clip_has_a_shape_of_a_colour_the_demo_teaches():
    base = {c.colour for c in combos_for("train") + combos_for("heldout")}
    assert base.isdisjoint(UNSEEN_SHAPE_COLOURS)


@pytest.mark.slow
def test_lora_demo_writes_its_lora_numbers_and_figure(smoke_model, tmp_path):
    model, _, _ = smoke_model
    result = lora_demo(model, tmp_path, smoke=True, say=lambda m: None)
    assert (tmp_path / f"{LORA_COLOUR}.safetensors").is_file() and (tmp_path / "lora_demo.png").is_file()
    saved = json.loads((tmp_path / "lora_demo.json").read_text())
    for when in ("before", "after"):
        for prompts in ("new", "heldout"):
            assert 0 <= saved[when][prompts]["all"] <= 1
    assert result["colour"] == LORA_COLOUR == "purple" and result["judged_combos"] == 2


@pytest.mark.slow
def test_eus_ablation_writes_curves_numbers_and_figure(smoke_model, tmp_path):
    model, _, _ = smoke_model
    result = eus_ablation(model, tmp_path, smoke=True, say=lambda m: None)
    saved = json.loads((tmp_path / "eus_ablation.json").read_text())
    assert set(saved["losses"]) == {"explicit/0", "uniform/0"} and len(saved["losses"]["explicit/0"]) == 12
    assert saved["losses"]["explicit/0"] != saved["losses"]["uniform/0"]  # other timesteps
    assert result["variance_ratio"] > 0 and (tmp_path / "eus_ablation.png").is_file()
