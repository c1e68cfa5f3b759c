"""The tiny-model recipe at its toy scale: a complete diffusers-format folder that our loaders and diffusers (the test
oracle) both read, with the same videos from the same seed; a word-level tokenizer; recorded timings."""

from __future__ import annotations

import json

import pytest
import torch

from cogvx_core.checkpoints.t5 import load_t5_tokenizer
from cogvx_core.pipeline import load_pipeline
from cogvx_core.recipes.synthetic import PALETTE
from cogvx_core.recipes.tiny import TinyRecipe, all_captions, caption_spread, folder_size
from cogvx_core.text import load_text_encoder

PROMPT = "a red circle moves to the left on a black background"


@pytest.mark.slow
def test_the_folder_has_every_part(smoke_model):
    model, work, result = smoke_model
    for part in ("model_index.json", "scheduler/scheduler_config.json", "transformer/config.json",
                 "transformer/diffusion_pytorch_model.safetensors", "vae/config.json",
                 "vae/diffusion_pytorch_model.safetensors", "text_encoder/config.json",
                 "text_encoder/model.safetensors", "tokenizer/spiece.model", "tokenizer/tokenizer.json",
                 "cogvx_recipe.json"):
        assert (model / part).is_file(), part
    recipe = json.loads((model / "cogvx_recipe.json").read_text())
    assert set(recipe["times"]) == {"data", "text", "vae", "transformer", "total"}
    assert recipe["settings"]["seed"] == 0 and result["size_bytes"] == folder_size(model)
    assert not (model.parent / "model.tmp").exists()


@pytest.mark.slow
def test_our_loaders_read_it(smoke_model):
    model, _, _ = smoke_model
    pipe = load_pipeline(model)
    cfg = pipe.transformer.config
    assert pipe.variant.name == "5b" and cfg["use_rotary_positional_embeddings"]
    assert (cfg["sample_frames"], cfg["sample_height"], cfg["sample_width"]) == (9, 8, 8)
    assert pipe.vae.scaling_factor > 0 and pipe.vae.config["latent_channels"] == 16
    out = pipe.generate(PROMPT, frames=9, height=64, width=64, steps=2, seed=1)
    assert out.frames.shape == (1, 9, 64, 64, 3)


@pytest.mark.slow
def test_the_tokenizer_has_one_token_per_caption_word(smoke_model):
    model, _, _ = smoke_model
    tok = load_t5_tokenizer(model / "tokenizer")
    words = sorted({w for c in all_captions() for w in c.split()})
    assert "purple" in words and len(tok) == len(words) + 3  # pad, EOS, unk
    ids = tok(PROMPT).input_ids
    assert len(ids) == len(PROMPT.split()) + 1 and ids[-1] == tok.eos_token_id and tok.unk_token_id not in ids
    assert tok.unk_token_id in tok("a pink circle").input_ids  # a word it was not trained on


@pytest.mark.slow
def test_distinct_captions_get_distinct_contexts(smoke_model):
    model, _, _ = smoke_model
    encoder = load_text_encoder(model, max_length=TinyRecipe().text_length)
    spread = caption_spread(encoder, ["a red circle moves up on a black background",
                                      "a red circle moves down on a black background",
                                      "a blue circle moves up on a black background"])
    assert spread["min_nearest"] > 0.05 * spread["median_pair"]


@pytest.mark.slow
def test_diffusers_reads_the_folder_and_makes_the_same_video(smoke_model):
    pytest.importorskip("diffusers")
    from diffusers import CogVideoXPipeline

    model, _, _ = smoke_model
    ref = CogVideoXPipeline.from_pretrained(str(model), torch_dtype=torch.float32)
    ref.set_progress_bar_config(disable=True)
    kwargs = dict(num_frames=9, height=64, width=64, num_inference_steps=3, guidance_scale=6.0)
    expected = ref(PROMPT, generator=torch.Generator().manual_seed(5), output_type="pt", **kwargs).frames  # (B,T,C,H,W)
    ours = load_pipeline(model).generate(PROMPT, frames=9, height=64, width=64, steps=3, guidance=6.0,
                                         generator=torch.Generator().manual_seed(5)).frames  # (B, T, H, W, C)
    assert (ours - expected.permute(0, 1, 3, 4, 2)).abs().max() < 1e-4


def test_the_synthetic_palette_is_what_the_recipe_learns():
    # the recipe's vocabulary is the synthetic generator's: every colour word of a caption is a named colour
    assert all(w in PALETTE for c in all_captions() for w in (c.split()[1], c.split()[-2]))


def test_a_stage_is_reused_while_its_settings_stand_and_redone_when_they_change(tmp_path):
    import dataclasses

    from cogvx_core.recipes.tiny import build

    r = dataclasses.replace(TinyRecipe.smoke(), train_clips=3, heldout_clips=2, layout="random")
    build(tmp_path / "m", tmp_path / "w", r, say=lambda m: None, until="text")
    stages = json.loads((tmp_path / "w" / "stages.json").read_text())
    assert set(stages) == {"data", "text"} and stages["data"]["settings"]["layout"] == "random"
    first = (tmp_path / "w" / "data" / "train" / "clips.jsonl").read_text()
    build(tmp_path / "m", tmp_path / "w", r, say=lambda m: None, until="text")  # nothing to do
    assert json.loads((tmp_path / "w" / "stages.json").read_text()) == stages

    said = []
    build(tmp_path / "m", tmp_path / "w", dataclasses.replace(r, layout="centred"), say=said.append, until="text")
    again = json.loads((tmp_path / "w" / "stages.json").read_text())
    assert again["data"]["settings"]["layout"] == "centred" and again["text"] == stages["text"]
    assert (tmp_path / "w" / "data" / "train" / "clips.jsonl").read_text() != first
    assert any("settings changed" in m for m in said)


def test_centred_layout_keeps_sizes_and_speeds_and_centres_the_path():
    from cogvx_core.recipes.synthetic import centres
    from cogvx_core.recipes.tiny import recipe_clips

    r = TinyRecipe()
    free = recipe_clips(12, r, "train")
    centred = recipe_clips(12, dataclasses_replace(r, layout="centred"), "train")
    for a, b in zip(free, centred):
        assert (a.combo, a.size, a.speed) == (b.combo, b.size, b.speed)
        middle = centres(b)[[0, -1]].mean(axis=0)
        assert abs(middle[0] - 32) < 1e-6 and abs(middle[1] - 32) < 1e-6


def dataclasses_replace(obj, **kw):
    import dataclasses

    return dataclasses.replace(obj, **kw)


def test_unseen_colour_clips_for_the_vae_show_only_colours_no_base_clip_has():
    import dataclasses

    from cogvx_core.recipes.analysis import analyse
    from cogvx_core.recipes.synthetic import UNSEEN_SHAPE_COLOURS
    from cogvx_core.recipes.tiny import stage_settings, unseen_colour_clips

    r = TinyRecipe()
    clips = unseen_colour_clips(6, r)
    assert clips.shape == (6, r.frames, r.height, r.width, 3) and clips.dtype == torch.uint8
    assert all(analyse(c.float() / 255)["colour"] in UNSEEN_SHAPE_COLOURS for c in clips)
    assert torch.equal(clips, unseen_colour_clips(6, r))  # seeded
    # part of the VAE stage's settings (a change redoes the VAE, and so the transformer)
    fewer = dataclasses.replace(r, vae_unseen_colour_clips=8)
    assert stage_settings(fewer, "vae") != stage_settings(r, "vae")
    assert stage_settings(fewer, "transformer") != stage_settings(r, "transformer")


def test_the_recipe_transformer_is_a_5b_t2v_with_a_sincos_started_position_table():
    from cogvx_core.modules.embeddings import sincos_1d_table
    from cogvx_core.recipes.tiny import init_transformer
    from cogvx_core.variants import detect_variant

    cfg = TinyRecipe().transformer_config()
    assert cfg["use_learned_positional_embeddings"] and cfg["use_rotary_positional_embeddings"]
    assert detect_variant(cfg).name == "5b"  # the table alone does not make it image-to-video
    assert detect_variant({**cfg, "in_channels": 2 * cfg["out_channels"]}).name == "5b-i2v"
    model = init_transformer(cfg, 0)
    table = model.patch_embed.pos_embedding[0]  # (text + video tokens, D)
    text = cfg["max_text_seq_length"]
    torch.testing.assert_close(table[:text], sincos_1d_table(table.shape[1], text).float())
    grid = ((cfg["sample_frames"] - 1) // 4 + 1, cfg["sample_height"] // 2, cfg["sample_width"] // 2)
    torch.testing.assert_close(table[text:], model.sincos_table(*grid, torch.device("cpu"))[text:].float())
    assert table[text:].abs().sum() > 0
