"""Buckets, the seeded batch plan, and Frame Pack: a batch of mixed durations trains each clip exactly as alone."""

import pytest
import torch

from cogvx_core.errors import CogVXError
from builders import small_transformer_config
from cogvx_core.train.buckets import BatchPlan, Buckets, assign, buckets_for, make_buckets, pack, parse_resolutions
from cogvx_core.train.trainer import Trainer, TrainSettings
from cogvx_core.transformer import build_transformer
from cogvx_core.variants import VARIANTS
from trainkit import small_dataset


def test_duration_buckets_follow_the_variant_frame_rules():
    assert make_buckets(VARIANTS["5b"], 49, 480, 720).frame_counts == (1, 9, 17, 25, 33, 41, 49)
    assert make_buckets(VARIANTS["1.5-5b"], 81, 768, 1360).frame_counts == (1, 17, 33, 49, 65, 81)
    assert make_buckets(VARIANTS["5b"], 13, 480, 720).frame_counts == (1, 9, 13)
    with pytest.raises(CogVXError, match="4k\\+1 frames; use 49"):
        make_buckets(VARIANTS["5b"], 48, 480, 720)
    with pytest.raises(CogVXError, match="multiples of 16"):
        make_buckets(VARIANTS["5b"], 49, 470, 720)
    with pytest.raises(CogVXError, match="learned positions for 720x480 only"):
        make_buckets(VARIANTS["5b-i2v"], 49, 480, 480)
    with pytest.raises(CogVXError, match="4k\\+1"):
        make_buckets(VARIANTS["5b"], 49, 480, 720, frame_counts=[1, 10])


def test_assign_longest_duration_and_nearest_aspect():
    b = Buckets(resolutions=((480, 720), (720, 480), (512, 512)), frame_counts=(1, 9, 17, 25))
    assert assign(20, 1080, 1920, b) == (17, 480, 720)  # landscape
    assert assign(100, 1920, 1080, b) == (25, 720, 480)  # portrait
    assert assign(9, 500, 520, b) == (9, 512, 512)  # square-ish
    assert assign(5, 500, 520, b) == (1, 512, 512)  # shorter than every video bucket
    assert parse_resolutions("720x480, 480x720") == [(480, 720), (720, 480)]
    with pytest.raises(CogVXError, match="WIDTHxHEIGHT"):
        parse_resolutions("720by480")


def test_batch_plan_is_seeded_covers_every_item_and_never_mixes_groups():
    groups = ["a"] * 5 + ["b"] * 3
    plan = BatchPlan(groups, batch_size=2, world_size=2, seed=1)
    assert plan.batches_per_epoch == 3 + 2
    again = BatchPlan(groups, batch_size=2, world_size=2, seed=1)
    epoch = [plan.batch(s, r) for s in range(5) for r in range(2)]
    assert epoch == [again.batch(s, r) for s in range(5) for r in range(2)]
    seen = [i for batch in epoch[:5] for i in batch]
    assert set(seen) == set(range(8))  # one epoch: every item (topped-up batches repeat a few)
    for batch in epoch:
        assert len({groups[i] for i in batch}) == 1 and len(batch) == 2
    assert [plan.batch(s, 0) for s in range(10)] != [BatchPlan(groups, 2, world_size=2, seed=2).batch(s, 0)
                                                     for s in range(10)]


def test_pack_pads_and_masks():
    a, b = torch.ones(4, 3, 2, 2), torch.full((4, 1, 2, 2), 2.0)
    batch, mask = pack([a, b])
    assert batch.shape == (2, 4, 3, 2, 2) and mask.tolist() == [[True, True, True], [True, False, False]]
    assert torch.equal(batch[1, :, :1], b) and batch[1, :, 1:].abs().sum() == 0
    assert pack([a, a])[1] is None


@pytest.mark.parametrize("variant", ["5b", "2b", "1.5-5b"])
def test_frame_pack_batch_equals_each_clip_alone(model_folder, tmp_path, variant):
    """A 9-frame clip and a 1-frame image in one padded, masked batch: each sample's loss (and the gradient of their
    mean) equals what the clip gives alone."""
    folder = model_folder(variant)
    transformer, ds = small_dataset(folder, tmp_path / "data", frames=(9, 1), size=(32, 32))
    trainer = Trainer(transformer, ds, TrainSettings(steps=1, rank=4, batch_size=2, mixed_precision="no"),
                      scaling_factor=0.7)
    with torch.no_grad():  # a non-zero LoRA, so its gradients are not trivially zero
        for p in trainer.params:
            p.normal_(0, 0.05)
    g = torch.Generator().manual_seed(0)
    clips = [trainer._clip_latents(i, None, ds) for i in range(2)]
    assert clips[0].shape[1] != clips[1].shape[1]
    noises = [torch.randn(c.shape, generator=g) for c in clips]
    contexts = [ds.context(i) for i in range(2)]
    t = torch.tensor([300, 800])

    latents, mask = pack(clips)
    noise, _ = pack(noises)
    packed = trainer.compute_loss(latents, noise, t, torch.stack(contexts), mask)
    packed.mean().backward()
    packed_grads = [p.grad.clone() for p in trainer.params]
    trainer.optimizer.zero_grad()
    alone = []
    for i in range(2):
        loss = trainer.compute_loss(clips[i][None], noises[i][None], t[i:i + 1], contexts[i][None])
        (loss / 2).backward()
        alone.append(loss.detach())
    torch.testing.assert_close(packed.detach(), torch.cat(alone), rtol=2e-5, atol=0)
    for p, pg in zip(trainer.params, packed_grads):
        torch.testing.assert_close(pg, p.grad, rtol=1e-4, atol=1e-7)
    # without the attention mask the padding leaks into the real tokens (the masking is what makes it exact)
    fn = trainer._key_mask
    trainer._key_mask = lambda *a: None
    with torch.no_grad():
        leaky = trainer.compute_loss(latents, noise, t, torch.stack(contexts), mask)
    trainer._key_mask = fn
    assert not torch.allclose(leaky[1], alone[1], rtol=1e-4)


def test_buckets_for_a_model_use_its_own_size_and_name():
    released = build_transformer(VARIANTS["1.5-5b"].transformer_config(), device="meta")
    assert released.default_size() == (81, 768, 1360)  # the release's, not its config's sample size
    small = build_transformer(small_transformer_config("5b", use_learned_positional_embeddings=True), device="meta")
    small.name = "mini"
    assert small.default_size() == (9, 128, 192) and small.learned_size == (128, 192)  # its config's sample size
    b = buckets_for(small)
    assert b.resolutions == ((128, 192),) and b.frame_counts == (1, 9)
    assert buckets_for(small, 17, 128, 192).frame_counts == (1, 9, 17)
    with pytest.raises(CogVXError, match=r"mini has learned positions for 192x128 only"):
        buckets_for(small, height=64)
    plain = build_transformer(small_transformer_config("5b"), device="meta")
    assert plain.learned_size is None and buckets_for(plain, height=64, width=64).resolutions == ((64, 64),)
