"""CogVXLoraLoader in plain Python: the node chain with a LoRA equals diffusers' load_lora_weights at that strength."""

import numpy as np
import pytest
import torch

from builders import psnr, reference_pipeline
from cogvx_core import load_transformer
from cogvx_core.lora import add_trainable_lora, applied_loras, save_lora
from nodes import NODE_CLASS_MAPPINGS as N
from tests.nodes.test_generation import PROMPT, SEED, STEPS, decode, encode, load, sample


def _make_lora(models_root):
    model = load_transformer(models_root / "cogvideox" / "tiny-5b" / "transformer")
    params = add_trainable_lora(model, rank=4, alpha=8, init="gaussian")
    with torch.no_grad():
        for p in params:
            p.normal_(0, 0.3, generator=torch.Generator().manual_seed(p.numel()))
    (models_root / "loras").mkdir(exist_ok=True)
    return save_lora(models_root / "loras" / "style.safetensors", model, rank=4, alpha=8, variant="5b")


@pytest.mark.slow
def test_lora_node_matches_reference_and_reweights_without_reload(models):
    lora = _make_lora(models)
    assert "style.safetensors" in N["CogVXLoraLoader"].INPUT_TYPES()["required"]["lora_name"][0]
    model, vae, t5 = load("tiny-5b")
    latent = N["CogVXEmptyLatent"]().make("5b", 9, 160, 96, 1, model=model)["result"][0]
    (with_lora,) = N["CogVXLoraLoader"]().load(model, "style.safetensors", 0.7)
    assert model.loras == () and len(with_lora.loras) == 1  # the input handle is untouched
    ours = decode(vae, sample(with_lora, t5, latent))

    pipe = reference_pipeline(models / "cogvideox" / "tiny-5b", "t2v")
    pipe.load_lora_weights(str(lora), adapter_name="style")
    pipe.set_adapters(["style"], [0.7])
    ref = pipe(prompt=PROMPT, negative_prompt="", num_inference_steps=STEPS, guidance_scale=6.0, num_frames=9,
               height=96, width=160, generator=torch.Generator().manual_seed(SEED), max_sequence_length=12,
               output_type="np").frames[0]
    ref = (np.asarray(ref) * 255).round().astype(np.uint8)
    assert psnr(ours, ref) >= 50

    base = decode(vae, sample(model, t5, latent))  # the plain handle runs without the LoRA afterwards
    assert psnr(base, ref) < 40
    assert applied_loras(model.transformer) == []
    (weaker,) = N["CogVXLoraLoader"]().load(model, "style.safetensors", 0.2)  # same file: no reload, new strength
    mid = decode(vae, sample(weaker, t5, latent))
    assert 0 < np.abs(mid.astype(int) - base.astype(int)).mean() < np.abs(ours.astype(int) - base.astype(int)).mean()
