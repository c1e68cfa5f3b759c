"""The training objective against the reference trainers' formula (diffusers' scheduler.get_velocity and the
1 / (1 - a_t) weight), and whole training steps against a diffusers + peft training loop on the same weights,
batches, noise and timesteps."""

import pytest
import torch

from builders import reference_forward, reference_transformer, rel_l2
from cogvx_core.schedule import NoiseSchedule
from cogvx_core.train.objective import v_prediction_loss
from cogvx_core.train.trainer import Trainer, TrainSettings
from trainkit import small_dataset


def _reference_scheduler(shift=1.0):
    from diffusers import CogVideoXDPMScheduler

    return CogVideoXDPMScheduler(beta_schedule="scaled_linear", prediction_type="v_prediction",
                                 timestep_spacing="trailing", rescale_betas_zero_snr=True, snr_shift_scale=shift)


def _reference_loss(scheduler, model_output, noisy, latents, timesteps):
    """The loss lines of diffusers' examples/cogvideo/train_cogvideox_lora.py (and THUDM's compute_loss)."""
    model_pred = scheduler.get_velocity(model_output, noisy, timesteps)
    weights = 1 / (1 - scheduler.alphas_cumprod[timesteps])
    while len(weights.shape) < len(model_pred.shape):
        weights = weights.unsqueeze(-1)
    b = model_pred.shape[0]
    return torch.mean((weights * (model_pred - latents) ** 2).reshape(b, -1), dim=1)


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("shift", [1.0, 3.0])
def test_loss_equals_the_reference_formula(dtype, shift):
    g = torch.Generator().manual_seed(0)
    shape = (3, 16, 2, 4, 6)
    latents, noise, v = (torch.randn(shape, generator=g).to(dtype) for _ in range(3))
    t = torch.tensor([0, 500, 999])
    ours_schedule = NoiseSchedule(snr_shift_scale=shift)
    ref_sched = _reference_scheduler(shift)
    noisy = ours_schedule.add_noise(latents, noise, t)
    assert torch.equal(noisy, ref_sched.add_noise(latents, noise, t))
    ours = v_prediction_loss(v, noisy, latents, t, ours_schedule.alphas_cumprod)
    ref = _reference_loss(ref_sched, v, noisy, latents, t)
    assert ours.dtype == ref.dtype == torch.float64
    torch.testing.assert_close(ours, ref, rtol=1e-12, atol=0)
    # a wrong weight or a wrong sign would move it far (the test can fail)
    assert not torch.allclose(ours, v_prediction_loss(-v, noisy, latents, t, ours_schedule.alphas_cumprod))


def test_frame_mask_averages_each_sample_over_its_own_frames():
    g = torch.Generator().manual_seed(1)
    latents, noise, v = (torch.randn(2, 4, 3, 2, 2, generator=g) for _ in range(3))
    ac = NoiseSchedule().alphas_cumprod
    t = torch.tensor([100, 900])
    mask = torch.tensor([[True, True, True], [True, False, False]])
    noisy = NoiseSchedule().add_noise(latents, noise, t)
    masked = v_prediction_loss(v, noisy, latents, t, ac, mask)
    alone = v_prediction_loss(v[1:, :, :1], noisy[1:, :, :1], latents[1:, :, :1], t[1:], ac)
    torch.testing.assert_close(masked[1:], alone, rtol=1e-12, atol=0)
    torch.testing.assert_close(masked[:1], v_prediction_loss(v[:1], noisy[:1], latents[:1], t[:1], ac))


def test_training_steps_match_a_diffusers_peft_loop(model_folder, tmp_path):
    """Same weights, LoRA init, batches, noise and timesteps: our trainer and the reference loop (diffusers model +
    peft LoRA + scheduler.add_noise / get_velocity + AdamW + clipping) end with the same LoRA and losses."""
    from peft import LoraConfig

    folder = model_folder("5b")
    transformer, ds = small_dataset(folder, tmp_path / "data", frames=(9, 9, 9))
    settings = TrainSettings(steps=4, rank=4, alpha=8, learning_rate=1e-3, mixed_precision="no", seed=3,
                             max_grad_norm=0.05)  # small clip norm: clipping is active and compared too
    base_state = {k: v.clone() for k, v in transformer.state_dict().items()}
    trainer = Trainer(transformer, ds, settings, scaling_factor=0.7)
    batches = [trainer.batch(step) for step in range(settings.steps)]

    cfg = transformer.config
    ref = reference_transformer(cfg, base_state)
    ref.add_adapter(LoraConfig(r=4, lora_alpha=8, init_lora_weights=True,
                               target_modules=["to_q", "to_k", "to_v", "to_out.0"]))
    ours_init = {n: p.detach().clone() for n, p in zip(trainer.param_names, trainer.params)}
    ref_params = dict(ref.named_parameters())
    pairs = []  # (ours name, peft name)
    for n in ours_init:
        layer, _, role = n.rpartition(".lora_adapters.0.")
        pairs.append((n, f"{layer}.{'lora_A' if role == 'down' else 'lora_B'}.default.weight"))
    with torch.no_grad():
        for ours_name, ref_name in pairs:
            ref_params[ref_name].copy_(ours_init[ours_name])
    lora = [ref_params[r] for _, r in pairs]
    opt = torch.optim.AdamW(lora, lr=1e-3, betas=(0.9, 0.95), eps=1e-8, weight_decay=1e-4)
    scheduler = _reference_scheduler()
    ref_losses = []
    for _, latents, mask, context, noise, t in batches:
        assert mask is None
        noisy = scheduler.add_noise(latents, noise, t)
        out = reference_forward(ref, noisy, t, context)
        loss = _reference_loss(scheduler, out, noisy, latents, t).mean()
        loss.backward()
        torch.nn.utils.clip_grad_norm_(lora, 0.05)
        opt.step()
        opt.zero_grad()
        ref_losses.append(loss.item())

    trainer.run()
    torch.testing.assert_close(torch.tensor(trainer.losses), torch.tensor(ref_losses), rtol=1e-5, atol=0)
    ours_final = dict(zip(trainer.param_names, trainer.params))
    for ours_name, ref_name in pairs:
        assert rel_l2(ours_final[ours_name].detach(), ref_params[ref_name].detach()) < 1e-4, ours_name
    moved = sum(rel_l2(ours_final[n].detach(), ours_init[n]) for n in ours_init if n.endswith("down"))
    assert moved > 1e-4  # training changed the LoRA (so the comparison means something)


def test_bench_train_workers_agree(tmp_path):
    """`cogvx bench-train`'s two workers (ours: the Trainer; reference: diffusers + peft) on the same setup give the
    same losses step by step (run in this process here; the command runs each in a fresh one)."""
    import argparse

    from cogvx_core.commands import bench_train

    p = argparse.ArgumentParser()
    bench_train.add_arguments(p)
    args = p.parse_args(["--layers", "1", "--heads", "2", "--height", "32", "--width", "48", "--rank", "4",
                         "--steps", "2", "--device", "cpu"])
    bench_train._prepare(args, tmp_path)
    ours = bench_train._worker_ours(args, tmp_path)
    ref = bench_train._worker_reference(args, tmp_path)
    assert len(ours["losses"]) == len(ref["losses"]) == 3 and len(ours["times"]) == 2
    torch.testing.assert_close(torch.tensor(ours["losses"]), torch.tensor(ref["losses"]), rtol=1e-5, atol=0)
    assert ours["rss_peak_mib"] >= ours["rss_before_mib"] > 0
