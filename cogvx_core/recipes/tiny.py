"""The recipe of the built-in model `cogvx-tiny`: a small CogVideoX of the released architecture, trained by this
project's own code on synthetic clips (cogvx_core/recipes/synthetic.py), in one seeded command:

    python -m cogvx_core recipe tiny [--out DIR | --replace-builtin] [--work DIR]

Stages (each one's output is kept in the work folder, so a re-run continues after the last finished stage):
  1. data         train clips (the training caption combinations) and held-out clips (combinations never trained),
                  64x64, 9 frames (3 latent frames), each path centred in the frame, written as PNG frame folders
                  with captions
  2. text         a sentencepiece tokenizer trained on every caption word (the spare colour "purple" included, which
                  no training clip shows: the word a LoRA can teach later) and a small random T5 v1.1 encoder; it is
                  frozen, as CogVideoX keeps T5 frozen (distinct captions are already far apart: see `caption_spread`)
  3. vae          the 3D causal VAE of the released architecture with narrow widths, trained by train/vae.py on
                  MSE + a small KL (L1 and GAN terms exist, off here; the clips it learns from keep random
                  positions, plus clips of the shape colours no base clip has, so a LoRA's new colour decodes);
                  its latent scale (1 / std of the latents) goes into its config
  4. transformer  the expert transformer (5b: 3D RoPE, with 5b-I2V's additive position table started as the 3D
                  sin-cos table), trained from scratch by the project's trainer
                  (train/trainer.py, full fine-tuning mode) on the VAE latents and T5 embeddings it caches; a share of
                  the clips is also trained with the empty caption, so classifier-free guidance has an unconditional
                  branch to push away from
  5. package      a diffusers-format folder: model_index.json, transformer/, vae/, text_encoder/, tokenizer/,
                  scheduler/ (the 5b DDIM scheduler config), plus cogvx_recipe.json (settings, timings, VAE PSNR)

Every random draw comes from a seed in `TinyRecipe` (data, initial weights, batches, noise, timesteps). Wall time and
process CPU time of each stage are recorded, so the cost on a dedicated machine can be told from a shared one.
"""

from __future__ import annotations

import dataclasses
import io
import json
import logging
import shutil
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable

import numpy as np
import torch

from ..checkpoints.io import write_json
from ..errors import CogVXError
from .synthetic import (COLOUR_NAMES, SIZES, SPARE_COLOUR_NAMES, UNSEEN_SHAPE_COLOURS, Clip, all_combos, caption,
                         centred, dataset_clips, random_clip, render, render_uint8)

log = logging.getLogger(__name__)

DIFFUSERS_VERSION = "0.42.1"

# The 5b scheduler (spec 1.3): v-prediction, zero terminal SNR, trailing spacing, SNR shift 1.
SCHEDULER_CONFIG = {
    "_class_name": "CogVideoXDDIMScheduler", "_diffusers_version": DIFFUSERS_VERSION, "beta_end": 0.012,
    "beta_schedule": "scaled_linear", "beta_start": 0.00085, "clip_sample": False, "clip_sample_range": 1.0,
    "num_train_timesteps": 1000, "prediction_type": "v_prediction", "rescale_betas_zero_snr": True,
    "sample_max_value": 1.0, "set_alpha_to_one": True, "snr_shift_scale": 1.0, "steps_offset": 0,
    "thresholding": False, "timestep_spacing": "trailing", "trained_betas": None,
}
MODEL_INDEX = {
    "_class_name": "CogVideoXPipeline", "_diffusers_version": DIFFUSERS_VERSION,
    "scheduler": ["diffusers", "CogVideoXDDIMScheduler"], "text_encoder": ["transformers", "T5EncoderModel"],
    "tokenizer": ["transformers", "T5Tokenizer"], "transformer": ["diffusers", "CogVideoXTransformer3DModel"],
    "vae": ["diffusers", "AutoencoderKLCogVideoX"],
}


@dataclass
class TinyRecipe:
    """Every setting of the recipe. `TinyRecipe()` is the shipped model; `TinyRecipe.smoke()` a seconds-long run."""

    seed: int = 0
    frames: int = 9
    height: int = 64
    width: int = 64
    train_clips: int = 1260  # 6 clips of each of the 210 training caption combinations
    heldout_clips: int = 54  # one per held-out combination (VAE PSNR and flicker)
    # "centred": each clip's path centred in the frame (synthetic.centred), so a caption fixes the video up to its
    # size and speed, which a model this small learns within the time budget; "random": free positions
    layout: str = "centred"
    # text encoder (T5 v1.1 layout, random and frozen)
    t5: dict = field(default_factory=lambda: dict(d_model=64, d_kv=32, d_ff=128, num_layers=2, num_heads=2,
                                                  relative_attention_num_buckets=16,
                                                  relative_attention_max_distance=32))
    text_length: int = 16  # tokens per prompt (the longest caption is 12 with EOS)
    # VAE (AutoencoderKLCogVideoX, narrow)
    vae: dict = field(default_factory=lambda: dict(block_out_channels=[16, 16, 32, 32], layers_per_block=1,
                                                   norm_num_groups=8, latent_channels=16))
    vae_clips: int = 1260  # the first vae_clips training clips (the same clips the transformer learns from)
    # extra VAE clips with shapes of the colours no base clip has (black, gray, purple: synthetic.UNSEEN_SHAPE_COLOURS),
    # so the VAE can decode the colour a LoRA later teaches the transformer (without them it could not: README)
    vae_unseen_colour_clips: int = 300
    # MSE only (PSNR is MSE): an L1 term's constant pull on the flat background slowed the shapes (+1.3 dB at 4000
    # steps without it). Most steps on 32x32 crops (a quarter of the cost), the last ones on whole frames.
    vae_train: dict = field(default_factory=lambda: dict(steps=10000, batch_size=4, learning_rate=2e-3,
                                                         warmup_steps=100, crop=32, crop_steps=9500,
                                                         l1_weight=0.0, mse_weight=1.0, kl_weight=1e-6,
                                                         mixed_precision="bf16"))
    # transformer (CogVideoXTransformer3DModel, 5b: 3D RoPE), plus the additive position table the released 5b-I2V
    # has, started as the 3D sin-cos table: with RoPE alone (relative positions) a model this small placed the shape
    # nowhere in particular within the budget, and a centred path needs absolute positions
    transformer: dict = field(default_factory=lambda: dict(num_attention_heads=4, attention_head_dim=32,
                                                           num_layers=4, time_embed_dim=128,
                                                           use_learned_positional_embeddings=True))
    transformer_train: dict = field(default_factory=lambda: dict(steps=19000, batch_size=16, learning_rate=3e-3,
                                                                 lr_schedule="cosine", warmup_steps=300,
                                                                 weight_decay=0.0, max_grad_norm=1.0,
                                                                 mixed_precision="no",
                                                                 gradient_checkpointing=False,
                                                                 timestep_sampling="explicit"))
    empty_caption_share: float = 0.1  # extra entries trained with the empty caption (the CFG unconditional branch)
    dtype: str = "float32"  # weights as shipped

    @classmethod
    def smoke(cls) -> "TinyRecipe":
        """The same stages at a toy scale (tests): a few clips, a few steps, the smallest widths."""
        return cls(train_clips=24, heldout_clips=4, vae_clips=24, vae_unseen_colour_clips=4,
                   vae=dict(block_out_channels=[16, 16, 16, 16], layers_per_block=1, norm_num_groups=8,
                            latent_channels=16),
                   vae_train=dict(steps=3, batch_size=2, learning_rate=1e-3, warmup_steps=1, crop=32, crop_steps=2,
                                  kl_weight=1e-6, mixed_precision="no"),
                   transformer=dict(num_attention_heads=1, attention_head_dim=64, num_layers=1, time_embed_dim=32),
                   transformer_train=dict(steps=3, batch_size=4, learning_rate=1e-3, warmup_steps=1,
                                          mixed_precision="no", gradient_checkpointing=False),
                   empty_caption_share=0.25)

    def transformer_config(self) -> dict:
        from ..variants import VARIANTS

        return VARIANTS["5b"].transformer_config(
            **self.transformer, text_embed_dim=self.t5["d_model"], max_text_seq_length=self.text_length,
            sample_height=self.height // 8, sample_width=self.width // 8, sample_frames=self.frames)

    def vae_config(self) -> dict:
        return {"_class_name": "AutoencoderKLCogVideoX", "_diffusers_version": DIFFUSERS_VERSION,
                **self.vae, "sample_height": self.height, "sample_width": self.width}


# ---------------------------------------------------------------------------------------------------------------
# Bookkeeping
# ---------------------------------------------------------------------------------------------------------------
STAGES = ("data", "text", "vae", "transformer")
STAGE_OUTPUTS = {"data": ("data",), "text": ("text",), "vae": ("vae", "vae_checkpoints", "vae_report.json"),
                 "transformer": ("transformer", "transformer_checkpoints", "transformer_report.json", "cache")}


def stage_settings(r: "TinyRecipe", stage: str) -> dict:
    """The settings a stage's result depends on (its own and its inputs'): a finished stage is reused only when
    these are unchanged."""
    base = {"seed": r.seed, "frames": r.frames, "height": r.height, "width": r.width,
            "shape_sizes": list(SIZES)}  # the generator's sizes: clips rendered before a change are stale
    own = {"data": {"train_clips": r.train_clips, "heldout_clips": r.heldout_clips, "layout": r.layout},
           "text": {"t5": r.t5, "text_length": r.text_length},
           "vae": {"vae": r.vae, "vae_clips": r.vae_clips, "vae_train": r.vae_train,
                   "vae_unseen_colour_clips": r.vae_unseen_colour_clips}}
    if stage == "transformer":
        deps = {k: v for name in ("data", "text", "vae") for k, v in own[name].items()}
        own["transformer"] = {**deps, "transformer": r.transformer, "transformer_train": r.transformer_train,
                              "empty_caption_share": r.empty_caption_share, "dtype": r.dtype}
    return json.loads(json.dumps({**base, **own[stage]}))


class StageClock:
    """Runs the stages, keeping in <work>/stages.json each finished stage's settings and its wall and process-CPU
    seconds (CPU time shows the cost apart from other load on the machine). A stage finished before with the same
    settings is not run again and keeps its recorded time; one whose settings changed is removed and run again."""

    def __init__(self, work: Path, say: Callable[[str], None]):
        self.work, self.file, self.say = work, work / "stages.json", say
        self.done = json.loads(self.file.read_text()) if self.file.is_file() else {}

    @property
    def times(self) -> dict:
        return {name: entry["times"] for name, entry in self.done.items()}

    def run(self, name: str, settings: dict, fn, *args, **kwargs):
        previous = self.done.get(name)
        if previous is not None and previous["settings"] != settings:
            self.say(f"[{name}] settings changed since the last run: redoing it")
            for part in STAGE_OUTPUTS[name]:
                path = self.work / part
                shutil.rmtree(path, ignore_errors=True) if path.is_dir() else path.unlink(missing_ok=True)
            self.done.pop(name)  # (the transformer's settings include every earlier stage's: it follows suit)
        partial_file = self.work / f".{name}_partial.json"  # time spent by runs of this stage that were stopped
        partial = json.loads(partial_file.read_text()) if partial_file.is_file() else {"wall_s": 0.0, "cpu_s": 0.0}
        wall, cpu = time.perf_counter(), time.process_time()

        def spent() -> dict:
            return {"wall_s": round(partial["wall_s"] + time.perf_counter() - wall, 1),
                    "cpu_s": round(partial["cpu_s"] + time.process_time() - cpu, 1)}

        self.say(f"[{name}] ...")
        try:
            result = fn(*args, **kwargs)
        except BaseException:  # interrupted: a later run continues from the stage's checkpoints, and its time adds
            if name not in self.done:
                write_json(partial_file, spent())
            raise
        if name not in self.done:
            self.done[name] = {"settings": settings, "times": spent()}
            write_json(self.file, self.done)
            partial_file.unlink(missing_ok=True)
        t = self.done[name]["times"]
        self.say(f"[{name}] done: {t['wall_s']}s (cpu {t['cpu_s']}s)")
        return result

    def total(self) -> dict:
        return {"wall_s": round(sum(t["wall_s"] for t in self.times.values()), 1),
                "cpu_s": round(sum(t["cpu_s"] for t in self.times.values()), 1), "threads": torch.get_num_threads()}


def say(message: str) -> None:
    """The recipes' default progress report: one line on stderr."""
    print(message, file=sys.stderr, flush=True)


def all_captions() -> list[str]:
    """Every caption the synthetic vocabulary can form (spare colour included): the tokenizer's corpus."""
    return [caption(c) for c in all_combos(COLOUR_NAMES + SPARE_COLOUR_NAMES)]


# ---------------------------------------------------------------------------------------------------------------
# 1. data
# ---------------------------------------------------------------------------------------------------------------
def recipe_clips(n: int, r: TinyRecipe, split: str) -> list[Clip]:
    """The first n clips of a split: synthetic.dataset_clips, with each path centred in the frame when
    r.layout == "centred" (size and speed stay random)."""
    clips = dataset_clips(n, seed=r.seed, frames=r.frames, height=r.height, width=r.width, split=split)
    return [centred(c) for c in clips] if r.layout == "centred" else clips


def write_clips(folder: Path, clips: list[Clip]) -> None:
    """PNG frame folders with captions (the trainer's layout) and clips.jsonl, as synthetic.make_dataset writes."""
    from ..video_io import write_frames

    shutil.rmtree(folder, ignore_errors=True)
    folder.mkdir(parents=True)
    lines = []
    for i, clip in enumerate(clips):
        name = f"{i:05d}"
        write_frames(render(clip), folder / name, fps=8)
        (folder / f"{name}.txt").write_text(caption(clip) + "\n", encoding="utf-8")
        lines.append(json.dumps({"name": name, "caption": caption(clip), **clip.to_dict()}))
    (folder / "clips.jsonl").write_text("".join(line + "\n" for line in lines), encoding="utf-8")


def make_data(r: TinyRecipe, work: Path) -> dict[str, Path]:
    folders = {"train": work / "data" / "train", "heldout": work / "data" / "heldout"}
    counts = {"train": r.train_clips, "heldout": r.heldout_clips}
    for split, folder in folders.items():
        done = folder / "clips.jsonl"
        if done.is_file() and len(done.read_text().splitlines()) == counts[split]:
            continue
        write_clips(folder, recipe_clips(counts[split], r, split))
    return folders


def render_clips(n: int, r: TinyRecipe, split: str) -> torch.Tensor:
    """The first n clips of a split, rendered in memory as uint8 (n, T, H, W, 3) (the same clips make_data writes)."""
    return render_uint8(recipe_clips(n, r, split))


# ---------------------------------------------------------------------------------------------------------------
# 2. text: tokenizer and T5 encoder
# ---------------------------------------------------------------------------------------------------------------
def train_tokenizer(folder: Path, captions: list[str]) -> None:
    """A sentencepiece word-level model of the caption vocabulary with T5's special ids (pad 0, EOS 1, unk 2), saved
    in the diffusers layout: spiece.model (for T5Tokenizer) and tokenizer.json (read without sentencepiece)."""
    import sentencepiece as spm
    from transformers import T5Tokenizer

    folder.mkdir(parents=True, exist_ok=True)
    words = sorted({w for c in captions for w in c.split()})
    model = io.BytesIO()
    spm.SentencePieceTrainer.train(
        sentence_iterator=iter(captions), model_writer=model, model_type="word", vocab_size=len(words) + 3,
        pad_id=0, eos_id=1, unk_id=2, bos_id=-1, character_coverage=1.0, num_threads=1, minloglevel=2)
    (folder / "spiece.model").write_bytes(model.getvalue())
    write_json(folder / "tokenizer_config.json", {"tokenizer_class": "T5Tokenizer", "extra_ids": 0,
                                                   "eos_token": "</s>", "unk_token": "<unk>", "pad_token": "<pad>",
                                                   "model_max_length": 226})
    # transformers converts the sentencepiece model; its tokenizer.json is then read without sentencepiece.
    converted = folder / ".converted"
    T5Tokenizer.from_pretrained(str(folder), local_files_only=True).save_pretrained(str(converted))
    shutil.move(str(converted / "tokenizer.json"), str(folder / "tokenizer.json"))
    shutil.rmtree(converted)


def build_text_encoder(folder: Path, vocab_size: int, t5: dict, seed: int) -> None:
    """A random T5 v1.1 encoder (gated GELU, relative attention) saved as text_encoder/ (config.json +
    model.safetensors). transformers' own initialisation, seeded."""
    from transformers import T5Config, T5EncoderModel

    config = T5Config(vocab_size=vocab_size, feed_forward_proj="gated-gelu", dropout_rate=0.0,
                      layer_norm_epsilon=1e-6, is_encoder_decoder=False, use_cache=False,
                      tie_word_embeddings=False, **t5)
    torch.manual_seed(seed)
    model = T5EncoderModel(config).eval()
    folder.mkdir(parents=True, exist_ok=True)
    model.save_pretrained(str(folder), safe_serialization=True)


def caption_spread(text_encoder, captions: list[str]) -> dict:
    """How far apart the encoder puts distinct captions: nearest-neighbour and median distance between the flattened
    contexts (a frozen random encoder is usable when no two captions land close together)."""
    with torch.no_grad():
        ctx = text_encoder.encode(captions, dtype=torch.float32).flatten(1)  # (N, L*D)
    d = torch.cdist(ctx, ctx)
    d.fill_diagonal_(float("inf"))
    nearest = d.min(dim=1).values
    return {"captions": len(captions), "min_nearest": round(float(nearest.min()), 3),
            "median_pair": round(float(d[d.isfinite()].median()), 3)}


def make_text(r: TinyRecipe, work: Path) -> Path:
    from ..text import load_text_encoder

    folder = work / "text"
    if not (folder / "text_encoder" / "model.safetensors").is_file():
        captions = all_captions()
        train_tokenizer(folder / "tokenizer", captions)
        from ..checkpoints.t5 import load_t5_tokenizer

        vocab = len(load_t5_tokenizer(folder / "tokenizer"))
        build_text_encoder(folder / "text_encoder", vocab, r.t5, r.seed)
    encoder = load_text_encoder(folder, max_length=r.text_length)
    spread = caption_spread(encoder, [caption(c) for c in all_combos()])
    if spread["min_nearest"] <= 0:
        raise CogVXError("Two distinct captions give the same T5 context; the tokenizer or the encoder is broken.")
    write_json(folder / "spread.json", spread)
    return folder


# ---------------------------------------------------------------------------------------------------------------
# 3. VAE
# ---------------------------------------------------------------------------------------------------------------
def latent_std(vae, clips: torch.Tensor, batch_size: int = 8) -> float:
    """Standard deviation of the posterior means of `clips` (uint8 (N, T, H, W, 3)): scaling factor = 1 / this."""
    from ..train.vae import to_model_input

    means = []
    with torch.no_grad():
        for i in range(0, len(clips), batch_size):
            means.append(vae.encode(to_model_input(clips[i:i + batch_size])).float())
    return float(torch.cat(means).std())


def save_vae(vae, folder: Path, config: dict, dtype: torch.dtype) -> None:
    from safetensors.torch import save_file

    folder.mkdir(parents=True, exist_ok=True)
    save_file({k: v.detach().to("cpu", dtype).contiguous() for k, v in vae.state_dict().items()},
              str(folder / "diffusion_pytorch_model.safetensors"), metadata={"format": "pt"})
    write_json(folder / "config.json", config)


def unseen_colour_clips(n: int, r: TinyRecipe) -> torch.Tensor:
    """n clips (uint8 (n, T, H, W, 3), random positions) cycling through every combination of a shape colour no base
    clip has; their own seed, apart from the data stage's."""
    combos = all_combos(UNSEEN_SHAPE_COLOURS)
    rng = np.random.default_rng([r.seed, 17])
    clips = [random_clip(combos[i % len(combos)], rng, r.frames, r.height, r.width) for i in range(n)]
    return render_uint8(clips)


def make_vae(r: TinyRecipe, work: Path, say=say) -> Path:
    from ..train.vae import VAETrainer, VAETrainSettings, reconstruction_psnr
    from ..vae import build_vae

    folder = work / "vae"
    if (folder / "config.json").is_file():
        return folder
    config = r.vae_config()
    torch.manual_seed(r.seed)
    vae = build_vae(config, device="cpu")
    # The VAE learns from the generator's clips as they are (random positions), whatever layout the transformer uses.
    clips = render_clips(r.vae_clips, dataclasses.replace(r, layout="random"), "train")
    if r.vae_unseen_colour_clips:
        clips = torch.cat([clips, unseen_colour_clips(r.vae_unseen_colour_clips, r)])
    heldout = render_clips(min(r.heldout_clips, 16), dataclasses.replace(r, layout="random"), "heldout")
    settings = VAETrainSettings(seed=r.seed, save_every=250, **r.vae_train)
    trainer = VAETrainer(vae, clips, settings, checkpoint_dir=work / "vae_checkpoints")
    start = trainer.resume() or 0
    if start:
        say(f"vae: resumed at step {start}")
    every = max(1, settings.steps // 20)

    def report(rec):
        if rec["step"] % every == 0 or rec["step"] == settings.steps:
            say(f"vae step {rec['step']}/{settings.steps} l1 {rec['l1']:.4f} mse {rec['mse']:.5f} kl {rec['kl']:.3f} "
                f"{rec['seconds']:.2f}s/step")

    trainer.run(on_step=report)
    psnr = reconstruction_psnr(vae, heldout)
    config["scaling_factor"] = round(1.0 / latent_std(vae, clips[:64]), 6)
    save_vae(vae, folder, config, torch.float32)
    write_json(work / "vae_report.json", {"heldout_psnr_mean": sum(psnr) / len(psnr), "heldout_psnr": psnr,
                                           "history_tail": trainer.history[-5:], "steps": trainer.step})
    return folder


# ---------------------------------------------------------------------------------------------------------------
# 4. transformer
# ---------------------------------------------------------------------------------------------------------------
def init_transformer(config: dict, seed: int):
    """A fresh transformer: torch's default initialisation, seeded, with every adaptive-norm modulation and the
    output projection zeroed (adaLN-Zero: each block starts as the identity, which trains faster from scratch)."""
    from ..modules.embeddings import sincos_1d_table
    from ..transformer import build_transformer
    from ..variants import latent_frames

    torch.manual_seed(seed)
    model = build_transformer(config, device="cpu", dtype=torch.float32)
    with torch.no_grad():
        for block in model.transformer_blocks:
            for norm in (block.norm1, block.norm2):
                norm.linear.weight.zero_()
                norm.linear.bias.zero_()
        model.norm_out.linear.weight.zero_()
        model.norm_out.linear.bias.zero_()
        model.proj_out.weight.zero_()
        model.proj_out.bias.zero_()
        if config.get("use_learned_positional_embeddings"):
            # Video rows: the 3D sin-cos table (2b's). Text rows (zero in 2b): 1D sin-cos of the token index, so the
            # model can tell "a white square on a blue background" from "a blue square on a white background".
            p, length = config["patch_size"], config["max_text_seq_length"]
            grid = (latent_frames(config["sample_frames"]), config["sample_height"] // p, config["sample_width"] // p)
            table = model.sincos_table(*grid, torch.device("cpu"))  # (text + video tokens, D), text rows 0
            table[:length] = sincos_1d_table(table.shape[1], length).to(table.dtype)
            model.patch_embed.pos_embedding.copy_(table[None])
    return model


def add_empty_captions(dataset, text_encoder, share: float):
    """The dataset plus `share` of its clips again with the empty caption (entries whose text is the encoded "").
    The trainer then learns the unconditional prediction that classifier-free guidance pushes away from."""
    from ..train.cache import key_of, module_fingerprint

    if share <= 0:
        return dataset
    key = key_of("text", {"caption": "", "encoder": module_fingerprint(text_encoder.model),
                          "max_length": text_encoder.max_length})
    if not dataset.cache.has("text", key):
        dataset.cache.put("text", key, {"context": text_encoder.encode([""])[0]}, {"caption": ""})
    every = max(1, round(1 / share))
    extra = [dataclasses.replace(e, caption="", text_key=key) for e in dataset.entries[::every]]
    return dataclasses.replace(dataset, entries=dataset.entries + extra)


def prepare_training_data(r: TinyRecipe, data: Path, cache: Path, vae_folder: Path, text_folder: Path):
    from ..checkpoints.vae import load_vae
    from ..text import load_text_encoder
    from ..train.buckets import make_buckets
    from ..train.dataset import prepare_dataset
    from ..variants import VARIANTS

    vae = load_vae(vae_folder, dtype=torch.float32)
    text_encoder = load_text_encoder(text_folder, max_length=r.text_length)
    variant = VARIANTS["5b"]
    buckets = make_buckets(variant, r.frames, r.height, r.width, frame_counts=[r.frames])
    dataset = prepare_dataset(data, vae=vae, text_encoder=text_encoder, variant=variant, buckets=buckets,
                              cache_dir=cache, fps=0)
    return dataset, text_encoder, vae.scaling_factor


def make_transformer(r: TinyRecipe, work: Path, folders: dict, vae_folder: Path, text_folder: Path,
                     say=say) -> Path:
    from ..schedule import NoiseSchedule
    from ..train.trainer import Trainer, TrainSettings

    folder = work / "transformer"
    if (folder / "config.json").is_file():
        return folder
    dataset, text_encoder, scaling_factor = prepare_training_data(r, folders["train"], work / "cache", vae_folder,
                                                                  text_folder)
    dataset = add_empty_captions(dataset, text_encoder, r.empty_caption_share)
    config = r.transformer_config()
    model = init_transformer(config, r.seed)
    settings = TrainSettings(full_finetune=True, seed=r.seed, save_every=500, keep_checkpoints=1,
                             **r.transformer_train)
    trainer = Trainer(model, dataset, settings, schedule=NoiseSchedule.from_config(SCHEDULER_CONFIG),
                      scaling_factor=scaling_factor, checkpoint_dir=work / "transformer_checkpoints")
    start = trainer.resume()
    if start:
        say(f"transformer: resumed at step {start}")
    every = max(1, settings.steps // 20)
    window: list[float] = []

    def report(rep):
        window.append(rep.loss)
        if rep.step % every == 0 or rep.step == settings.steps:
            say(f"transformer step {rep.step}/{settings.steps} loss {sum(window) / len(window):.4f} "
                f"lr {rep.lr:.2e} {rep.seconds:.3f}s/step")
            window.clear()

    trainer.run(on_step=report)
    trainer.deactivate()
    save_transformer(model, folder, config, torch.float32)
    write_json(work / "transformer_report.json", {"steps": trainer.step, "clips": len(dataset),
                                                   "losses": trainer.losses})
    return folder


def save_transformer(model, folder: Path, config: dict, dtype: torch.dtype) -> None:
    from safetensors.torch import save_file

    folder.mkdir(parents=True, exist_ok=True)
    state = {k: v.detach().to("cpu", dtype).contiguous() for k, v in model.state_dict().items()
             if ".lora_adapters." not in k}
    save_file(state, str(folder / "diffusion_pytorch_model.safetensors"), metadata={"format": "pt"})
    write_json(folder / "config.json", {"_class_name": "CogVideoXTransformer3DModel",
                                         "_diffusers_version": DIFFUSERS_VERSION, **config})


# ---------------------------------------------------------------------------------------------------------------
# 5. package
# ---------------------------------------------------------------------------------------------------------------
def package(out: Path, work: Path, r: TinyRecipe, times: dict) -> Path:
    """Copies the parts into a fresh diffusers-format folder `out` (replaced atomically when it exists)."""
    tmp = out.with_name(out.name + ".tmp")
    shutil.rmtree(tmp, ignore_errors=True)
    tmp.mkdir(parents=True)
    shutil.copytree(work / "transformer", tmp / "transformer")
    shutil.copytree(work / "vae", tmp / "vae")
    shutil.copytree(work / "text" / "text_encoder", tmp / "text_encoder")
    shutil.copytree(work / "text" / "tokenizer", tmp / "tokenizer")
    write_json(tmp / "scheduler" / "scheduler_config.json", SCHEDULER_CONFIG)
    write_json(tmp / "model_index.json", MODEL_INDEX)
    vae_report = json.loads((work / "vae_report.json").read_text())
    write_json(tmp / "cogvx_recipe.json", {
        "recipe": "python -m cogvx_core recipe tiny", "settings": dataclasses.asdict(r), "times": times,
        "vae_heldout_psnr": round(vae_report["heldout_psnr_mean"], 2),
        "caption_spread": json.loads((work / "text" / "spread.json").read_text()),
        "torch": torch.__version__})
    if out.exists():
        shutil.rmtree(out)
    tmp.rename(out)
    return out


def folder_size(folder: Path) -> int:
    return sum(p.stat().st_size for p in folder.rglob("*") if p.is_file())


def build(out: str | Path, work: str | Path, recipe: TinyRecipe | None = None, say=say,
          until: str = "transformer", replace_builtin: bool = False) -> dict:
    """Runs every stage (up to `until`), then packages; returns {"model", "times", "size_bytes"}. A work folder of
    an earlier run continues where that run stopped (stages whose settings changed are redone). `out` may be the
    shipped model's folder only with replace_builtin=True (checked before any work)."""
    from ..models import TINY_MODEL

    r = recipe or TinyRecipe()
    out, work = Path(out), Path(work)
    if out.resolve() == TINY_MODEL.resolve() and not replace_builtin:
        raise CogVXError(f"{out} is the shipped built-in model; the recipe replaces it only when asked: add "
                         "--replace-builtin (or write elsewhere with --out DIR).")
    if until not in STAGES:
        raise CogVXError(f"unknown stage {until!r}; choose one of: {', '.join(STAGES)}.")
    work.mkdir(parents=True, exist_ok=True)
    clock = StageClock(work, say)
    folders = clock.run("data", stage_settings(r, "data"), make_data, r, work)
    if until == "data":
        return {"work": str(work), "times": clock.times}
    text = clock.run("text", stage_settings(r, "text"), make_text, r, work)
    if until == "text":
        return {"work": str(work), "times": clock.times}
    vae = clock.run("vae", stage_settings(r, "vae"), make_vae, r, work, say)
    if until == "vae":
        return {"work": str(work), "times": clock.times}
    clock.run("transformer", stage_settings(r, "transformer"), make_transformer, r, work, folders, vae, text, say)
    times = dict(clock.times, total=clock.total())
    model = package(out, work, r, times)
    size = folder_size(model)
    say(f"wrote {model} ({size / 1e6:.2f} MB) in {times['total']['wall_s']}s")
    return {"model": str(model), "times": times, "size_bytes": size}
