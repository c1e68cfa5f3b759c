"""LoRA (and full) fine-tuning of CogVideoX text-to-video transformers.

    dataset.py    a folder of clips + captions -> a prepared, cached dataset (prepare_dataset, save/load_manifest)
    cache.py      the content-and-settings-keyed cache of VAE latents and T5 embeddings
    buckets.py    resolution and duration buckets, the seeded batch plan, Frame Pack (pack, attention_key_mask)
    timesteps.py  Explicit Uniform Sampling (TimestepSampler)
    objective.py  the v-prediction, zero-SNR loss as the reference trainers compute it
    trainer.py    the loop: TrainSettings, Trainer (steps, validation, checkpoints, exact resume, NaN rollback)
    estimate.py   the memory and time estimate made before the first step
    ddp.py        data parallel under torchrun
    plot.py       the loss chart
"""
