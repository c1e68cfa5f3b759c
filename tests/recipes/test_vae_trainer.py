"""The VAE trainer: it learns, resumes exactly, checks its settings, and its optional GAN term runs."""

from __future__ import annotations

import pytest
import torch

from cogvx_core.errors import CogVXError
from cogvx_core.recipes.synthetic import dataset_clips, render
from cogvx_core.train.vae import (PatchDiscriminator3D, VAETrainer, VAETrainSettings, kl_to_unit_gaussian,
                                  reconstruction_psnr, to_model_input)
from cogvx_core.vae import build_vae

CONFIG = dict(block_out_channels=[16, 16, 16, 16], layers_per_block=1, norm_num_groups=8, latent_channels=16)


def clips(n=6, size=16, frames=9):
    return torch.stack([render(c).mul(255).round().to(torch.uint8)
                        for c in dataset_clips(n, seed=0, frames=frames, height=size, width=size)])


def fresh_vae(seed=0):
    torch.manual_seed(seed)
    return build_vae(CONFIG, device="cpu")


def settings(**kw):
    base = dict(steps=6, batch_size=2, learning_rate=2e-3, warmup_steps=1, mixed_precision="no", seed=3)
    return VAETrainSettings(**{**base, **kw})


def test_input_layout_and_kl():
    x = clips(2)
    assert to_model_input(x).shape == (2, 3, 9, 16, 16)
    assert to_model_input(torch.full((1, 1, 2, 2, 3), 255, dtype=torch.uint8)).eq(1).all()
    mean, logvar = torch.zeros(3, 4), torch.zeros(3, 4)
    assert kl_to_unit_gaussian(mean, logvar) == 0  # the unit Gaussian itself
    assert kl_to_unit_gaussian(mean + 2, logvar) == pytest.approx(2.0)  # 0.5 * mean^2


@pytest.mark.slow
def test_training_lowers_the_reconstruction_loss():
    data = clips(4)
    vae = fresh_vae()
    trainer = VAETrainer(vae, data, settings(steps=25, batch_size=4, learning_rate=3e-3))
    trainer.run()
    first = sum(h["l1"] for h in trainer.history[:3]) / 3
    last = sum(h["l1"] for h in trainer.history[-3:]) / 3
    assert last < 0.7 * first, (first, last)
    assert not vae.training and not any(p.requires_grad for p in vae.parameters())
    assert len(reconstruction_psnr(vae, data)) == 4


def test_a_resumed_run_ends_exactly_where_an_uninterrupted_one_does(tmp_path):
    data = clips(4)
    straight = VAETrainer(fresh_vae(), data, settings(crop=8, crop_steps=3))
    straight.run()

    first = VAETrainer(fresh_vae(), data, settings(crop=8, crop_steps=3), checkpoint_dir=tmp_path)
    first.run(until=4)
    first.save_checkpoint()
    resumed_vae = fresh_vae(seed=99)  # other weights: all must come from the checkpoint
    resumed = VAETrainer(resumed_vae, data, settings(crop=8, crop_steps=3), checkpoint_dir=tmp_path, fresh=False)
    assert resumed.resume() == 4
    resumed.run()
    assert [h["loss"] for h in resumed.history] == [h["loss"] for h in straight.history]
    for (name, a), b in zip(straight.vae.state_dict().items(), resumed_vae.state_dict().values()):
        assert torch.equal(a, b), name


def test_resume_refuses_other_settings(tmp_path):
    data = clips(2)
    t = VAETrainer(fresh_vae(), data, settings(), checkpoint_dir=tmp_path)
    t.run(until=1)
    t.save_checkpoint()
    other = VAETrainer(fresh_vae(), data, settings(learning_rate=1e-4), checkpoint_dir=tmp_path)
    with pytest.raises(CogVXError, match="learning_rate"):
        other.resume()
    assert VAETrainer(fresh_vae(), data, settings(), checkpoint_dir=tmp_path / "empty").resume() is None


def test_crops_are_taken_during_the_crop_phase_only():
    t = VAETrainer(fresh_vae(), clips(2, size=32), settings(crop=16, crop_steps=2))
    assert t.batch(0).shape[-2:] == (16, 16) and t.batch(1).shape[-2:] == (16, 16)
    assert t.batch(2).shape[-2:] == (32, 32)
    assert torch.equal(t.batch(1), t.batch(1))  # a pure function of the step


def test_the_gan_term_trains_a_discriminator():
    t = VAETrainer(fresh_vae(), clips(2), settings(steps=2, gan_weight=0.1))
    before = [p.detach().clone() for p in t.discriminator.parameters()]
    t.run()
    assert all(h["gan"] != 0 for h in t.history)
    assert any(not torch.equal(a, b) for a, b in zip(before, t.discriminator.parameters()))
    assert PatchDiscriminator3D()(torch.zeros(1, 3, 5, 32, 32)).shape == (1, 1, 5, 4, 4)


def test_clips_the_vae_cannot_round_trip_are_refused():
    with pytest.raises(CogVXError, match="odd number of latent frames"):
        VAETrainer(fresh_vae(), clips(2, frames=5), settings())


@pytest.mark.parametrize("bad, message", [
    (dict(steps=0), "at least 1"), (dict(learning_rate=-1.0), "positive"), (dict(crop=12), "multiple of 8"),
    (dict(kl_weight=-1.0), "0 or more"), (dict(mixed_precision="fp8"), "bf16"),
])
def test_bad_settings_are_refused(bad, message):
    with pytest.raises(CogVXError, match=message):
        VAETrainer(fresh_vae(), clips(2), settings(**bad))


def test_clips_must_be_uint8_videos():
    with pytest.raises(CogVXError, match="uint8"):
        VAETrainer(fresh_vae(), clips(2).float(), settings())
