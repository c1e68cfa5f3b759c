"""DDIM / DPM sampling loops against diffusers 0.42.1 schedulers driven the way CogVideoXPipeline drives them.

The "model" is a deterministic fake: a fixed random channel mix of the latents, a timestep-dependent term and a
per-prompt term, so cond and uncond differ. The reference loop below holds latents in diffusers' (B, T, C, H, W)
layout and follows pipeline_cogvideox.py's denoising loop line by line; ours runs cogvx_core.samplers.sample on
(B, C, T, H, W). Every intermediate latent and x0 must be bit-identical, and both generators must end in the same state.
"""

import math

import pytest
import torch

from cogvx_core.errors import CancelledError, CogVXError
from cogvx_core.noise import randn_like_reference
from cogvx_core.samplers import dynamic_guidance_scale, sample
from cogvx_core.schedule import NoiseSchedule

pytest.importorskip("diffusers", reason="diffusers is the reference oracle for these parity tests")
from diffusers import CogVideoXDDIMScheduler, CogVideoXDPMScheduler  # noqa: E402
from diffusers.utils.torch_utils import randn_tensor  # noqa: E402

CONFIG = {  # released CogVideoX-5b scheduler_config.json fields (spec 1.3)
    "beta_end": 0.012, "beta_schedule": "scaled_linear", "beta_start": 0.00085, "clip_sample": False,
    "num_train_timesteps": 1000, "prediction_type": "v_prediction", "rescale_betas_zero_snr": True,
    "set_alpha_to_one": True, "snr_shift_scale": 1.0, "steps_offset": 0, "timestep_spacing": "trailing",
}
SHAPE = (2, 4, 3, 4, 6)  # ours: (B, C, T, H, W); the reference's is (B, T, C, H, W) = (2, 3, 4, 4, 6)
SEED = 1234


class FakeModel:
    """A deterministic stand-in for the transformer on (B, C, T, H, W) latents, output in the latents' dtype."""

    def __init__(self, channels=4):
        g = torch.Generator().manual_seed(7)
        self.mix = torch.randn(channels, channels, generator=g) * 0.4
        self.time_term = torch.randn(channels, 1, 1, 1, generator=g)
        self.prompt_term = torch.randn(channels, 1, 1, 1, generator=g)
        self.calls = []

    def __call__(self, x, t, prompts):  # x (B, C, T, H, W), prompts: one float per batch chunk ([uncond, cond])
        self.calls.append((x.shape[0], int(t)))
        x32 = x.contiguous().float()
        out = torch.einsum("dc,bcthw->bdthw", self.mix.to(x.device), x32)
        out = out + math.sin(int(t) / 97.0) * self.time_term.to(x.device)
        per_item = torch.tensor(prompts, device=x.device).repeat_interleave(x.shape[0] // len(prompts))
        out = out + per_item.view(-1, 1, 1, 1, 1) * self.prompt_term.to(x.device)
        return out.to(x.dtype)


NEG, POS = -0.5, 1.0  # the fake "prompt embeddings" of the uncond and cond branches


def reference_loop(model, latents, timesteps, num_inference_steps, scheduler, *, guidance, dynamic_cfg, generator):
    """pipeline_cogvideox.py's denoising loop with the given latents (B, T, C, H, W); returns per-step records."""
    do_classifier_free_guidance = guidance > 1.0
    prompts = [NEG, POS] if do_classifier_free_guidance else [POS]
    dtype = latents.dtype
    records = []
    old_pred_original_sample = None
    for i, t in enumerate(timesteps):
        latent_model_input = torch.cat([latents] * 2) if do_classifier_free_guidance else latents
        noise_pred = model(latent_model_input.permute(0, 2, 1, 3, 4), t, prompts).permute(0, 2, 1, 3, 4)
        noise_pred = noise_pred.float()
        guidance_scale = guidance
        if dynamic_cfg:
            guidance_scale = 1 + guidance * (
                (1 - math.cos(math.pi * ((num_inference_steps - t.item()) / num_inference_steps) ** 5.0)) / 2
            )
        if do_classifier_free_guidance:
            noise_pred_uncond, noise_pred_text = noise_pred.chunk(2)
            noise_pred = noise_pred_uncond + guidance_scale * (noise_pred_text - noise_pred_uncond)
        if not isinstance(scheduler, CogVideoXDPMScheduler):
            latents, x0 = scheduler.step(noise_pred, t, latents, return_dict=False)
        else:
            latents, old_pred_original_sample = scheduler.step(
                noise_pred, old_pred_original_sample, t, timesteps[i - 1] if i > 0 else None, latents,
                generator=generator, return_dict=False)
            x0 = old_pred_original_sample
        latents = latents.to(dtype)
        records.append((latents, x0))
    return records


def our_predict(model):
    def predict(latents, t, do_cfg):
        if do_cfg:
            uncond, cond = model(torch.cat([latents, latents]), t, [NEG, POS]).chunk(2)
            return cond, uncond
        return model(latents, t, [POS]), None
    return predict


def run_both(sampler, dtype, guidance, dynamic_cfg, num_steps=50, strength=None, device="cpu", config=CONFIG):
    """Run the reference and our loop from the same seed; return (reference records, our records, generators)."""
    cls = CogVideoXDPMScheduler if sampler == "dpm" else CogVideoXDDIMScheduler
    scheduler = cls.from_config(config)
    scheduler.set_timesteps(num_steps, device=device)  # the pipeline keeps timesteps on its device
    ref_timesteps, ref_n = scheduler.timesteps, num_steps
    schedule = NoiseSchedule.from_config(config)
    timesteps = schedule.timesteps(num_steps)
    if strength is not None:  # video-to-video: the tail of the schedule, noise added at its first timestep
        ref_timesteps = ref_timesteps[num_steps - min(int(num_steps * strength), num_steps):]
        ref_n = len(ref_timesteps)
        timesteps = schedule.strength_timesteps(timesteps, strength)

    ref_shape = (SHAPE[0], SHAPE[2], SHAPE[1], SHAPE[3], SHAPE[4])
    g_ref = torch.Generator().manual_seed(SEED)
    ref_latents = randn_tensor(ref_shape, generator=g_ref, device=torch.device(device), dtype=dtype)
    g_ours = torch.Generator().manual_seed(SEED)
    latents = randn_like_reference(SHAPE, g_ours, dtype, device)
    assert torch.equal(latents.permute(0, 2, 1, 3, 4), ref_latents)
    if strength is not None:
        clean = torch.randn(ref_shape, generator=torch.Generator().manual_seed(5)).to(device, dtype)
        ref_latents = scheduler.add_noise(clean, ref_latents, ref_timesteps[:1].repeat(SHAPE[0]))
        latents = schedule.add_noise(clean.permute(0, 2, 1, 3, 4), latents, timesteps[:1].repeat(SHAPE[0]))

    ref_model, our_model = FakeModel(), FakeModel()
    ref = reference_loop(ref_model, ref_latents, ref_timesteps, ref_n, scheduler, guidance=guidance,
                         dynamic_cfg=dynamic_cfg, generator=g_ref)
    ours = []

    def callback(i, n, lat, x0):
        assert n == len(timesteps)
        ours.append((lat.clone(), x0.clone()))

    out = sample(our_predict(our_model), latents, schedule=schedule, timesteps=timesteps, sampler=sampler,
                 guidance=guidance, dynamic_cfg=dynamic_cfg, generator=g_ours, callback=callback,
                 num_steps=num_steps)
    assert out.dtype == dtype and out.shape == SHAPE and out.device.type == device
    assert torch.equal(out, ours[-1][0])
    assert our_model.calls == ref_model.calls
    return ref, ours, g_ref, g_ours


def assert_same_run(ref, ours, g_ref, g_ours):
    assert len(ref) == len(ours)
    for i, ((ref_lat, ref_x0), (lat, x0)) in enumerate(zip(ref, ours)):
        assert torch.isfinite(lat).all()
        assert lat.dtype == ref_lat.dtype and x0.dtype == ref_x0.dtype, i
        # Bit-identical, not just close (the task's bar is max abs diff < 1e-6 in fp32).
        assert torch.equal(lat.permute(0, 2, 1, 3, 4), ref_lat), (i, (lat.permute(0, 2, 1, 3, 4) - ref_lat).abs().max())
        assert torch.equal(x0.permute(0, 2, 1, 3, 4), ref_x0), i
    assert torch.equal(g_ours.get_state(), g_ref.get_state())  # the same number of random draws


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=["fp32", "bf16"])
@pytest.mark.parametrize("guidance, dynamic_cfg", [(1.0, False), (6.0, False), (6.0, True)],
                         ids=["no-cfg", "cfg", "dynamic-cfg"])
@pytest.mark.parametrize("sampler", ["ddim", "dpm"])
def test_loop_matches_reference(sampler, dtype, guidance, dynamic_cfg):
    assert_same_run(*run_both(sampler, dtype, guidance, dynamic_cfg))


@pytest.mark.parametrize("sampler", ["ddim", "dpm"])
@pytest.mark.parametrize("num_steps", [1, 2, 13])
def test_short_runs_match_reference(sampler, num_steps):
    assert_same_run(*run_both(sampler, torch.float16, 4.5, True, num_steps=num_steps))


@pytest.mark.parametrize("sampler", ["ddim", "dpm"])
def test_video_to_video_tail_matches_reference(sampler):
    # Step sizes follow the full 50-step schedule while dynamic CFG counts the 40 steps run (as the V2V pipeline).
    assert_same_run(*run_both(sampler, torch.bfloat16, 6.0, True, num_steps=50, strength=0.8))


@pytest.mark.parametrize("sampler", ["ddim", "dpm"])
@pytest.mark.parametrize("spacing", ["leading", "linspace"])
def test_epsilon_prediction_matches_reference(sampler, spacing):
    # Not a released CogVideoX setting, but accepted by from_config, so it must behave as the reference too.
    config = {**CONFIG, "prediction_type": "epsilon", "rescale_betas_zero_snr": False, "snr_shift_scale": 3.0,
              "timestep_spacing": spacing, "steps_offset": 1}
    assert_same_run(*run_both(sampler, torch.float32, 6.0, False, num_steps=10, config=config))


def test_dpm_draws_one_two_two_one():
    schedule = NoiseSchedule()
    g = torch.Generator().manual_seed(0)
    g_count = torch.Generator().manual_seed(0)
    latents = torch.zeros(SHAPE)
    sample(our_predict(FakeModel()), latents, schedule=schedule, timesteps=schedule.timesteps(5), sampler="dpm",
           guidance=1.0, generator=g)
    for _ in range(1 + 2 * 3 + 1):
        torch.randn(SHAPE, generator=g_count)
    assert torch.equal(g.get_state(), g_count.get_state())


# Spec 4.5: w_t for w = 6, N = 50, trailing (the raw timestep, not the step index, goes into the formula).
SPEC_DYNAMIC_CFG = [
    2.2915, 2.5435, 6.9744, 6.4204, 2.7881, 4.2719, 1.0376, 4.1704, 1.6180, 6.9831, 1.0048, 2.8720, 6.9768, 1.6331,
    4.3297, 2.4366, 6.3773, 6.0068, 3.4479, 3.1981, 1.6548, 6.6100, 1.1947, 4.2953, 6.9854, 1.5213, 1.7616, 1.0579,
    4.1275, 1.4823, 2.0026, 5.9477, 4.1432, 6.5305, 6.1398, 6.9999, 6.1684, 1.1199, 2.0975, 6.6850, 6.9992, 2.3432,
    6.2128, 1.2505, 6.9996, 6.8644, 1.0636, 1.0000, 1.0000, 1.1234,
]


def test_dynamic_cfg_table():
    ts = NoiseSchedule().timesteps(50).tolist()
    got = [dynamic_guidance_scale(6.0, t, 50) for t in ts]
    assert got == pytest.approx(SPEC_DYNAMIC_CFG, abs=5e-5)


@pytest.mark.parametrize("guidance", [1.0, 0.5])
@pytest.mark.parametrize("dynamic_cfg", [False, True])
def test_guidance_at_most_one_skips_uncond(guidance, dynamic_cfg):
    flags = []

    def predict(latents, t, do_cfg):
        flags.append(do_cfg)
        return torch.zeros_like(latents), None

    schedule = NoiseSchedule()
    sample(predict, torch.zeros(SHAPE), schedule=schedule, timesteps=schedule.timesteps(4), guidance=guidance,
           dynamic_cfg=dynamic_cfg)
    assert flags == [False] * 4


def test_cfg_requires_uncond_prediction():
    schedule = NoiseSchedule()
    with pytest.raises(CogVXError, match="unconditional"):
        sample(lambda x, t, c: (x, None), torch.zeros(SHAPE), schedule=schedule, timesteps=schedule.timesteps(3))


def test_callback_can_cancel():
    schedule = NoiseSchedule()
    model = FakeModel()
    seen = []

    def callback(i, n, latents, x0):
        seen.append((i, n, latents.shape, x0.shape))
        if i == 2:
            raise CancelledError("stop")

    with pytest.raises(CancelledError):
        sample(our_predict(model), torch.zeros(SHAPE), schedule=schedule, timesteps=schedule.timesteps(10),
               sampler="dpm", generator=torch.Generator().manual_seed(0), callback=callback)
    assert seen == [(i, 10, torch.Size(SHAPE), torch.Size(SHAPE)) for i in range(3)]
    assert len(model.calls) == 3


@pytest.mark.parametrize("kwargs, match", [
    ({"sampler": "euler"}, "Unknown sampler"),
    ({"timesteps": []}, "No timesteps"),
    ({"timesteps": [1000, 500]}, "outside"),
    ({"num_steps": 2}, "num_steps"),
    ({"guidance": float("nan")}, "Guidance"),
])
def test_sample_rejects_bad_arguments(kwargs, match):
    schedule = NoiseSchedule()
    args = {"schedule": schedule, "timesteps": schedule.timesteps(5), **kwargs}
    with pytest.raises(CogVXError, match=match):
        sample(our_predict(FakeModel()), torch.zeros(SHAPE), **args)


def test_sample_rejects_4d_latents():
    schedule = NoiseSchedule()
    with pytest.raises(CogVXError, match="5-d"):
        sample(our_predict(FakeModel()), torch.zeros(2, 4, 4, 6), schedule=schedule, timesteps=schedule.timesteps(2))


needs_cuda = pytest.mark.skipif(not torch.cuda.is_available(),
                                reason="needs a CUDA device (CPU generator, CUDA latents)")


@needs_cuda
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=["fp32", "bf16"])
@pytest.mark.parametrize("sampler", ["ddim", "dpm"])
def test_cuda_loop_matches_reference(sampler, dtype):
    assert_same_run(*run_both(sampler, dtype, 6.0, True, device="cuda"))


@needs_cuda
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=["fp32", "bf16"])
def test_cpu_generator_with_cuda_latents(dtype):
    g_ref, g_ours = torch.Generator().manual_seed(SEED), torch.Generator().manual_seed(SEED)
    ref = randn_tensor((2, 3, 4, 4, 6), generator=g_ref, device=torch.device("cuda"), dtype=dtype)
    ours = randn_like_reference(SHAPE, g_ours, dtype, "cuda")
    assert ours.device.type == "cuda"
    assert torch.equal(ours.permute(0, 2, 1, 3, 4), ref)
