"""NoiseSchedule against diffusers 0.42.1 CogVideoX schedulers (the test-only oracle) and the spec's numbers."""

import types

import pytest
import torch

from cogvx_core.errors import CogVXError
from cogvx_core.schedule import NoiseSchedule

pytest.importorskip("diffusers", reason="diffusers is the reference oracle for these parity tests")
from diffusers import CogVideoXDDIMScheduler, CogVideoXDPMScheduler  # noqa: E402
from diffusers.pipelines.cogvideo.pipeline_cogvideox_video2video import CogVideoXVideoToVideoPipeline  # noqa: E402

# The released scheduler_config.json of CogVideoX-2b (spec 1.3); the 5b / 1.5 ones differ only in snr_shift_scale.
RELEASED_2B = {
    "_class_name": "CogVideoXDDIMScheduler",
    "_diffusers_version": "0.30.0.dev0",
    "beta_end": 0.012,
    "beta_schedule": "scaled_linear",
    "beta_start": 0.00085,
    "clip_sample": False,
    "clip_sample_range": 1.0,
    "num_train_timesteps": 1000,
    "prediction_type": "v_prediction",
    "rescale_betas_zero_snr": True,
    "sample_max_value": 1.0,
    "set_alpha_to_one": True,
    "snr_shift_scale": 3.0,
    "steps_offset": 0,
    "timestep_spacing": "trailing",
    "timestep_type": "discrete",
    "trained_betas": None,
}
RELEASED_5B = {**RELEASED_2B, "snr_shift_scale": 1.0}


def reference_scheduler(cfg, cls=CogVideoXDDIMScheduler):
    return cls.from_config(cfg)


@pytest.mark.parametrize("cfg", [RELEASED_2B, RELEASED_5B], ids=["shift3", "shift1"])
@pytest.mark.parametrize("cls", [CogVideoXDDIMScheduler, CogVideoXDPMScheduler])
def test_alphas_cumprod_bit_equal(cfg, cls):
    ref = reference_scheduler(cfg, cls)
    ours = NoiseSchedule.from_config(cfg)
    assert ours.alphas_cumprod.dtype == torch.float64
    assert torch.equal(ours.alphas_cumprod, ref.alphas_cumprod)
    assert float(ours.final_alpha_cumprod) == float(ref.final_alpha_cumprod) == 1.0
    assert float(ours.alphas_cumprod[999]) == 0.0  # zero terminal SNR


def test_variant_schedules_match_released_configs():
    assert torch.equal(NoiseSchedule.for_variant("2b").alphas_cumprod,
                       NoiseSchedule.from_config(RELEASED_2B).alphas_cumprod)
    for name in ("5b", "5b-i2v", "1.5-5b", "1.5-5b-i2v"):
        assert torch.equal(NoiseSchedule.for_variant(name).alphas_cumprod,
                           NoiseSchedule.from_config(RELEASED_5B).alphas_cumprod)
    s = NoiseSchedule.for_variant("5b")
    assert (s.prediction_type, s.timestep_spacing) == ("v_prediction", "trailing")


# Spec 4.1 table (computed independently in float64).
SPEC_VALUES = {
    3.0: {0: 0.9974543276, 19: 0.9465729792, 499: 0.0959695617, 979: 2.71943604e-05, 999: 0.0},
    1.0: {0: 0.9991500000, 19: 0.9810104569, 499: 0.2423591666, 979: 8.57878434e-05, 999: 0.0},
}


@pytest.mark.parametrize("shift", [3.0, 1.0])
def test_alphas_cumprod_spec_values(shift):
    ac = NoiseSchedule(snr_shift_scale=shift).alphas_cumprod
    for t, value in SPEC_VALUES[shift].items():
        assert float(ac[t]) == pytest.approx(value, rel=1e-8, abs=1e-12), t


def test_missing_keys_take_diffusers_defaults():
    # An empty config means diffusers' __init__ defaults: epsilon, leading spacing, no zero-SNR rescale, shift 3.
    ref = CogVideoXDDIMScheduler()
    ours = NoiseSchedule.from_config({})
    assert torch.equal(ours.alphas_cumprod, ref.alphas_cumprod)
    assert ours.prediction_type == "epsilon" and ours.timestep_spacing == "leading"
    ref.set_timesteps(50)
    assert torch.equal(ours.timesteps(50), ref.timesteps)


def test_set_alpha_to_one_false():
    cfg = {**RELEASED_5B, "set_alpha_to_one": False}
    ref, ours = reference_scheduler(cfg), NoiseSchedule.from_config(cfg)
    assert float(ours.final_alpha_cumprod) == float(ref.final_alpha_cumprod) == float(ref.alphas_cumprod[0])


@pytest.mark.parametrize("spacing", ["trailing", "leading", "linspace"])
def test_timesteps_all_step_counts(spacing):
    cfg = {**RELEASED_5B, "timestep_spacing": spacing, "steps_offset": 1 if spacing == "leading" else 0}
    ref, ours = reference_scheduler(cfg), NoiseSchedule.from_config(cfg)
    deviations = []
    for n in range(1, 1001):
        ref.set_timesteps(n)
        got = ours.timesteps(n)
        assert got.dtype == torch.int64 and len(got) == n
        expected = ref.timesteps
        if spacing == "trailing" and len(expected) != n:
            # The reference's float arange adds a bogus last timestep -1; we drop it (see NoiseSchedule.timesteps).
            assert len(expected) == n + 1 and int(expected[-1]) == -1
            deviations.append(n)
            expected = expected[:-1]
        assert torch.equal(got, expected), n
        for t in got[:3].tolist():
            assert ours.prev_timestep(t, n) == t - 1000 // n
    if spacing == "trailing":
        assert deviations[:3] == [61, 103, 121]
    else:
        assert deviations == []


def test_trailing_50_is_the_cogvideox_grid():
    ts = NoiseSchedule().timesteps(50)
    assert ts.tolist() == list(range(999, 0, -20))


def test_timestep_spacing_override():
    s = NoiseSchedule()
    ref = reference_scheduler({**RELEASED_5B, "timestep_spacing": "linspace"})
    ref.set_timesteps(30)
    assert torch.equal(s.timesteps(30, spacing="linspace"), ref.timesteps)


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float16])
def test_add_noise(dtype):
    ref, ours = reference_scheduler(RELEASED_5B), NoiseSchedule.from_config(RELEASED_5B)
    g = torch.Generator().manual_seed(3)
    x0_ref = torch.randn(2, 3, 4, 5, 6, generator=g).to(dtype)  # (B, T, C, H, W)
    noise_ref = torch.randn(2, 3, 4, 5, 6, generator=g).to(dtype)
    t = torch.tensor([799, 19])
    expected = ref.add_noise(x0_ref, noise_ref, t)
    # Ours in (B, C, T, H, W).
    got = ours.add_noise(x0_ref.permute(0, 2, 1, 3, 4), noise_ref.permute(0, 2, 1, 3, 4), t)
    assert got.dtype == expected.dtype == dtype
    assert torch.equal(got.permute(0, 2, 1, 3, 4), expected)
    # A plain int timestep broadcasts over the batch.
    got_int = ours.add_noise(x0_ref, noise_ref, 799)
    assert torch.equal(got_int, ref.add_noise(x0_ref, noise_ref, torch.tensor([799, 799])))


@pytest.mark.parametrize("n", [1, 7, 25, 50, 51])
@pytest.mark.parametrize("strength", [0.0, 0.05, 0.3, 0.5, 0.8, 0.999, 1.0])
def test_strength_timesteps_match_v2v_pipeline(n, strength):
    ref = reference_scheduler(RELEASED_5B)
    ref.set_timesteps(n)
    fake_pipe = types.SimpleNamespace(scheduler=ref)
    expected, expected_n = CogVideoXVideoToVideoPipeline.get_timesteps(fake_pipe, n, ref.timesteps, strength, "cpu")
    ours = NoiseSchedule()
    if len(expected) == 0:
        with pytest.raises(CogVXError, match="leaves no step"):
            ours.strength_timesteps(ours.timesteps(n), strength)
        return
    got = ours.strength_timesteps(ours.timesteps(n), strength)
    assert torch.equal(got, expected)
    assert len(got) == expected_n  # the step count the reference's dynamic CFG then uses


@pytest.mark.parametrize("cfg, match", [
    ({"prediction_type": "sample"}, "prediction_type"),
    ({"beta_schedule": "linear"}, "beta_schedule"),
    ({"trained_betas": [0.1] * 1000}, "trained_betas"),
    ({"_class_name": "EulerDiscreteScheduler"}, "not a CogVideoX scheduler"),
    ({"timestep_spacing": "karras"}, "timestep_spacing"),
    ({"snr_shift_scale": 0}, "snr_shift_scale"),
    ({"snr_shift_scale": "3"}, "snr_shift_scale"),
    ({"rescale_betas_zero_snr": "yes"}, "rescale_betas_zero_snr"),
    ({"num_train_timesteps": 1.5}, "num_train_timesteps"),
])
def test_from_config_rejects_unsupported(cfg, match):
    with pytest.raises(CogVXError, match=match):
        NoiseSchedule.from_config({**RELEASED_5B, **cfg})


def test_from_config_accepts_dpm_class_and_rejects_non_dict():
    assert NoiseSchedule.from_config({**RELEASED_5B, "_class_name": "CogVideoXDPMScheduler"}).snr_shift_scale == 1.0
    with pytest.raises(CogVXError, match="JSON object"):
        NoiseSchedule.from_config([RELEASED_5B])


@pytest.mark.parametrize("n", [0, 1001, 2.0, True])
def test_bad_step_counts(n):
    with pytest.raises(CogVXError, match="sampling steps"):
        NoiseSchedule().timesteps(n)


@pytest.mark.parametrize("strength", [-0.1, 1.5, "0.5"])
def test_bad_strength(strength):
    s = NoiseSchedule()
    with pytest.raises(CogVXError, match="strength"):
        s.strength_timesteps(s.timesteps(10), strength)
