"""How the nodes behave around the generation: snapping with notes, CONDITIONING from other encoders, refusals with
the fix, interrupts within a step, automatic tiling and out-of-memory retries, fresh state per input, previews."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from cogvx_core.errors import CogVXError
from cogvx_core.pipeline import prepare_latents
from nodes import NODE_CLASS_MAPPINGS as N
from nodes import host, preview


class Interrupted(BaseException):
    """Stands in for ComfyUI's InterruptProcessingException (also a BaseException)."""


@pytest.fixture(scope="module")
def tiny(models_root):
    import os

    old = os.environ.get("COGVX_MODELS_DIR")
    os.environ["COGVX_MODELS_DIR"] = str(models_root)
    try:
        (model,) = N["CogVXModelLoader"]().load("tiny-5b", "fp32")
        (i2v,) = N["CogVXModelLoader"]().load("tiny-1.5-i2v", "fp32")
        (vae,) = N["CogVXVAELoader"]().load("tiny-5b/vae", "fp32")
        (t5,) = N["CogVXT5Loader"]().load("tiny-5b/text_encoder", "fp32")
    finally:
        if old is None:
            os.environ.pop("COGVX_MODELS_DIR")
        else:
            os.environ["COGVX_MODELS_DIR"] = old
    return dict(model=model, i2v=i2v, vae=vae, t5=t5)


def small_model(variant):
    """A COGVX_MODEL handle of a random small transformer of `variant`'s architecture."""
    from builders import randomize_, small_transformer_config
    from cogvx_core.schedule import NoiseSchedule
    from cogvx_core.transformer import build_transformer
    from nodes.loaders import CogVXModel

    transformer = randomize_(build_transformer(small_transformer_config(variant), device="cpu")).eval()
    v = transformer.variant
    return CogVXModel(transformer, host.Managed(transformer, "diffusion"), NoiseSchedule.for_variant(v),
                      v.scaling_factor, v.invert_scale_latents, "random")


def cond(t5, text):
    return N["CogVXTextEncode"]().encode(t5, text)["result"][0]


def empty(variant="5b", frames=5, width=32, height=32, batch=1, model=None):
    return N["CogVXEmptyLatent"]().make(variant, frames, width, height, batch, model=model)


def run_sampler(tiny, latent, *, positive=None, negative=None, steps=2, cfg=6.0, seed=1, model=None, **kw):
    positive = positive if positive is not None else cond(tiny["t5"], "a fox")
    negative = negative if negative is not None else cond(tiny["t5"], "")
    (out,) = N["CogVXSampler"]().sample(model or tiny["model"], positive, negative, latent, seed, steps, cfg,
                                        "ddim", False, **kw)
    return out["samples"]


# ---- snapping -----------------------------------------------------------------------------------------------------
def test_empty_latent_snaps_to_the_variant_and_says_so():
    out = empty("5b", 50, 100, 70, 2)
    assert out["result"][0]["samples"].shape == (2, 16, 13, 8, 12)  # 49 frames, 96x64
    notes = out["ui"]["text"]
    assert any("frames 50 -> 49" in n for n in notes) and any("size 100x70 -> 96x64" in n for n in notes)
    assert empty("5b", 49, 720, 480)["ui"]["text"] == []  # nothing to change, nothing said

    i2v = empty("5b-i2v", 49, 640, 640)
    assert i2v["result"][0]["samples"].shape == (1, 16, 13, 60, 90)  # 720x480: 5b-I2V's learned positions
    assert any("720x480" in n for n in i2v["ui"]["text"])
    wide = empty("1.5-5b-i2v", 81, 1920, 1080)["result"][0]["samples"]
    assert wide.shape[-2:] == (768 // 8, 1360 // 8)  # shorter side 768, longer at most 1360


def test_a_connected_model_sets_the_rules(tiny):
    # The small test model is not the released size: only the structural rules apply, whatever the combo says.
    out = empty("5b-i2v", 9, 64, 48, model=tiny["model"])
    assert out["result"][0]["samples"].shape == (1, 16, 3, 6, 8)


def test_snapping_notes_reach_the_host(monkeypatch):
    said = []
    monkeypatch.setattr(host, "say", lambda text, node_id=None: said.append((text, node_id)))
    N["CogVXEmptyLatent"]().make("5b", 48, 720, 480, 1, unique_id="7")
    assert said == [("frames 48 -> 49: the VAE needs 4k+1 frames", "7")]


# ---- conditioning from other encoders -------------------------------------------------------------------------------
def test_clip_text_encode_conditioning_is_fitted_to_the_text_length(tiny):
    latent = empty()["result"][0]
    ours = cond(tiny["t5"], "a fox")
    context = ours[0][0]  # (1, 12, 32)
    short = [[context[:, :5], {"pooled_output": None}]]  # like CLIPTextEncode: any length, extra keys
    padded = [[torch.cat([context[:, :5], torch.zeros(1, 7, 32)], dim=1), {}]]
    long = [[torch.cat([context, torch.randn(1, 65, 32)], dim=1), {}]]  # 77 tokens, cut to 12
    a = run_sampler(tiny, latent, positive=short)
    torch.testing.assert_close(a, run_sampler(tiny, latent, positive=padded), rtol=0, atol=0)
    torch.testing.assert_close(run_sampler(tiny, latent, positive=long), run_sampler(tiny, latent, positive=ours),
                               rtol=0, atol=0)
    with pytest.raises(CogVXError, match="768 channels.*T5-XXL"):
        run_sampler(tiny, latent, positive=[[torch.zeros(1, 77, 768), {}]])


def test_cfg_of_one_skips_the_negative(tiny):
    latent = empty()["result"][0]
    calls = []
    forward = tiny["model"].transformer.forward
    tiny["model"].transformer.forward = lambda x, *a: (calls.append(x.shape[0]), forward(x, *a))[1]
    try:
        run_sampler(tiny, latent, cfg=1.0, negative="not even conditioning")
    finally:
        del tiny["model"].transformer.forward
    assert calls == [1, 1]


# ---- refusals -------------------------------------------------------------------------------------------------------
def test_sampler_refuses_what_cannot_work_with_the_fix(tiny):
    latent = empty()["result"][0]
    with pytest.raises(CogVXError, match="image-to-video model: connect CogVXImageToVideo's image_cond"):
        run_sampler(tiny, latent, model=tiny["i2v"])
    with pytest.raises(CogVXError, match="text-to-video model and cannot take image_cond"):
        run_sampler(tiny, latent, image_cond={"samples": torch.zeros(1, 16, 1, 4, 4)})
    with pytest.raises(CogVXError, match="4 channels.*another model's VAE"):
        run_sampler(tiny, {"samples": torch.zeros(1, 4, 2, 4, 4)})
    with pytest.raises(CogVXError, match="video latent"):
        run_sampler(tiny, {"samples": torch.zeros(1, 4, 8, 8)})
    with pytest.raises(CogVXError, match="multiples of 16"):
        run_sampler(tiny, {"samples": torch.zeros(1, 16, 2, 5, 4)})
    with pytest.raises(CogVXError, match="2 prompts for a latent batch of 3"):
        run_sampler(tiny, empty(batch=3)["result"][0], positive=[[torch.zeros(2, 12, 32), {}]])
    with pytest.raises(CogVXError, match="works with text-to-video models only"):
        run_sampler(tiny, empty("1.5-5b-i2v", 9)["result"][0], model=tiny["i2v"], denoise=0.5,
                    image_cond={"samples": torch.zeros(1, 16, 1, 4, 4)})
    with pytest.raises(CogVXError, match="needs an even latent frame count for video-to-video; .* use 5 or 13"):
        run_sampler(tiny, empty("1.5-5b", 9)["result"][0], model=small_model("1.5-5b"), denoise=0.5)
    with pytest.raises(CogVXError, match="text-to-video model: image-to-video needs"):
        N["CogVXImageToVideo"]().encode(tiny["vae"], torch.rand(1, 32, 32, 3), "5b-i2v", 5, 32, 32, 1,
                                        model=tiny["model"])


# ---- interrupts -----------------------------------------------------------------------------------------------------
def test_cancel_stops_sampling_within_a_step(tiny, monkeypatch):
    checks = []

    def throw():
        checks.append(1)
        if len(checks) == 2:
            raise Interrupted()

    monkeypatch.setattr(host, "throw_if_interrupted", throw)
    calls = []
    forward = tiny["model"].transformer.forward
    tiny["model"].transformer.forward = lambda *a: (calls.append(1), forward(*a))[1]
    try:
        with pytest.raises(Interrupted):
            run_sampler(tiny, empty()["result"][0], steps=10)
    finally:
        del tiny["model"].transformer.forward
    assert len(calls) == 2  # stopped after the second of ten steps


def test_cancel_stops_decoding_between_chunks(tiny, monkeypatch):
    monkeypatch.setattr(host, "throw_if_interrupted", lambda: (_ for _ in ()).throw(Interrupted()))
    chunks = []
    decoder = tiny["vae"].vae.decoder.forward
    tiny["vae"].vae.decoder.forward = lambda *a: (chunks.append(1), decoder(*a))[1]
    try:
        with pytest.raises(Interrupted):
            N["CogVXDecode"]().decode(tiny["vae"], {"samples": torch.randn(1, 16, 7, 4, 4)}, "off")
    finally:
        del tiny["vae"].vae.decoder.forward
    assert len(chunks) == 1  # of 4 chunks (7 latent frames, 2 per chunk)


# ---- tiling and memory ----------------------------------------------------------------------------------------------
def _spy_decode(vae, fail_untiled=False):
    calls = []
    decode = vae.vae.decode

    def spy(z, **kwargs):
        calls.append(kwargs)
        if fail_untiled and kwargs.get("tiling") is None:
            raise torch.OutOfMemoryError("CUDA out of memory. Tried to allocate 8.00 GiB")
        return decode(z, **kwargs)

    vae.vae.decode = spy
    return calls


def test_auto_tiling_when_memory_is_short(tiny, monkeypatch):
    said = []
    monkeypatch.setattr(host, "say", lambda text, node_id=None: said.append(text))
    z = {"samples": torch.randn(1, 16, 1, 12, 12)}  # one 96x96 frame
    calls = _spy_decode(tiny["vae"])
    try:
        (untiled,) = N["CogVXDecode"]().decode(tiny["vae"], z, "auto", 64, 64, 0.25)  # plenty of memory
        monkeypatch.setattr(host, "free_memory", lambda device: 1024)
        (tiled,) = N["CogVXDecode"]().decode(tiny["vae"], z, "auto", 64, 64, 0.25)
    finally:
        del tiny["vae"].vae.decode
    assert calls[0] == {"tiling": None, "progress": calls[0]["progress"]}
    assert calls[1]["tiling"].tile_height == calls[1]["tiling"].tile_width == 64
    assert any("using 64x64 tiles" in s for s in said)
    assert untiled.shape == tiled.shape == (1, 96, 96, 3)
    assert not torch.equal(untiled, tiled)  # really tiled (blended seams)
    assert (untiled - tiled).abs().mean() < 0.1  # and still the same picture


def test_out_of_memory_retries_with_tiles(tiny, monkeypatch):
    said = []
    monkeypatch.setattr(host, "say", lambda text, node_id=None: said.append(text))
    calls = _spy_decode(tiny["vae"], fail_untiled=True)
    try:
        (frames,) = N["CogVXDecode"]().decode(tiny["vae"], {"samples": torch.randn(1, 16, 1, 12, 12)}, "auto",
                                              64, 64, 0.25)
        with pytest.raises(CogVXError, match="Out of memory in the VAE decode.*Set tiling to auto or on"):
            N["CogVXDecode"]().decode(tiny["vae"], {"samples": torch.randn(1, 16, 1, 12, 12)}, "off")
    finally:
        del tiny["vae"].vae.decode
    assert [c["tiling"] is not None for c in calls] == [False, True, False]
    assert frames.shape == (1, 96, 96, 3) and any("ran out of memory; retrying with tiles" in s for s in said)


def test_models_are_loaded_through_the_host_before_use(tiny, monkeypatch):
    loads = []
    for handle in (tiny["model"], tiny["vae"], tiny["t5"]):
        original = handle.managed.load
        monkeypatch.setattr(handle.managed, "load",
                            lambda need=0, _o=original, _k=handle.managed.kind: (loads.append((_k, need)), _o(need))[1])
    latent = empty()["result"][0]
    out = run_sampler(tiny, latent)
    N["CogVXDecode"]().decode(tiny["vae"], {"samples": out}, "off")
    kinds = [k for k, _ in loads]
    assert kinds == ["text", "text", "diffusion", "vae"]
    assert all(need > 0 for k, need in loads if k in ("diffusion", "vae"))  # room asked for the work itself


# ---- fresh state -----------------------------------------------------------------------------------------------------
def test_new_inputs_never_reuse_stale_results(tiny):
    node = N["CogVXImageToVideo"]()  # ComfyUI keeps one instance per node id across runs
    a = node.encode(tiny["vae"], torch.rand(1, 32, 32, 3), "1.5-5b-i2v", 5, 32, 32, 1, model=tiny["i2v"])["result"][1]
    b = node.encode(tiny["vae"], torch.rand(1, 32, 32, 3), "1.5-5b-i2v", 5, 32, 32, 1, model=tiny["i2v"])["result"][1]
    assert not torch.equal(a["samples"], b["samples"])
    encoder = N["CogVXTextEncode"]()
    assert not torch.equal(encoder.encode(tiny["t5"], "a fox")["result"][0][0][0],
                           encoder.encode(tiny["t5"], "a red owl")["result"][0][0][0])
    latent = empty()["result"][0]
    first = run_sampler(tiny, latent)
    torch.testing.assert_close(run_sampler(tiny, latent), first, rtol=0, atol=0)  # same inputs, same video
    assert not torch.equal(run_sampler(tiny, latent, positive=cond(tiny["t5"], "a red owl")), first)
    assert not torch.equal(run_sampler(tiny, latent, seed=2), first)


def test_outputs_never_alias_cached_inputs(tiny):
    latent = empty()["result"][0]
    before = latent["samples"].clone()
    run_sampler(tiny, latent)
    assert torch.equal(latent["samples"], before)


def test_end_image_goes_to_the_last_latent_frame(tiny):
    latent, image_cond = N["CogVXImageToVideo"]().encode(tiny["vae"], torch.rand(1, 32, 32, 3), "1.5-5b-i2v", 9, 32,
                                                         32, 1, end_image=torch.rand(1, 32, 32, 3),
                                                         model=tiny["i2v"])["result"]
    assert image_cond["samples"].shape == (1, 16, 2, 4, 4) and image_cond["cogvx_moments"].shape == (1, 32, 2, 4, 4)
    model = tiny["i2v"]
    moments = image_cond["cogvx_moments"]
    prepared = prepare_latents(model.transformer, model.schedule, batch=1, frames=9, height=32, width=32, steps=2,
                               generator=torch.Generator().manual_seed(0), scaling_factor=0.7,
                               invert_scale_latents=True, start_image=moments[:, :, :1], end_image=moments[:, :, 1:])
    assert prepared.pad == 1  # 3 latent frames, padded to 4 at the front for 1.5
    cond = prepared.image_latents
    assert cond.shape == (1, 16, 4, 4, 4)
    assert cond[:, :, 0].abs().sum() > 0 and cond[:, :, -1].abs().sum() > 0
    assert cond[:, :, 1:-1].abs().sum() == 0


# ---- video encode ---------------------------------------------------------------------------------------------------
def test_video_encode_trims_to_4k_plus_1_and_snaps_the_size(tiny):
    out = N["CogVXVideoEncode"]().encode(tiny["vae"], torch.rand(11, 40, 50, 3), 0, 0, 0)
    assert out["result"][0]["samples"].shape == (1, 16, 3, 4, 6)  # 9 frames of 48x32
    assert any("frames 11 -> 9" in n for n in out["ui"]["text"])
    assert any("50x40 -> 48x32" in n for n in out["ui"]["text"])
    assert N["CogVXVideoEncode"]().encode(tiny["vae"], torch.rand(9, 32, 32, 3), 5, 0, 0)["result"][0][
        "samples"].shape == (1, 16, 2, 4, 4)


# ---- previews -------------------------------------------------------------------------------------------------------
def test_previews_every_step_when_enabled(tiny, monkeypatch):
    shown = []

    class Bar:
        def __init__(self, total):
            self.total = total

        def update(self, done, preview=None):
            shown.append((done, self.total, preview))

    monkeypatch.setattr(host, "Progress", Bar)
    monkeypatch.setattr(host, "previews_enabled", lambda: True)
    run_sampler(tiny, empty(width=48, height=32)["result"][0], steps=3)
    assert [(d, t) for d, t, _ in shown] == [(1, 3), (2, 3), (3, 3)]
    assert all(p is not None and p.size == (6, 4) for _, _, p in shown)  # one latent frame, latent size
    monkeypatch.setattr(host, "previews_enabled", lambda: False)
    shown.clear()
    run_sampler(tiny, empty()["result"][0], steps=2)
    assert [p for _, _, p in shown] == [None, None]


def test_preview_projection_recovers_a_linear_decoder():
    weight = torch.randn(3, 16) * 0.2
    bias = torch.tensor([0.1, -0.2, 0.05])

    class LinearVAE:  # decodes each latent cell to an 8x8 block of one colour: W z + b
        config = {"latent_channels": 16}
        device, dtype = torch.device("cpu"), torch.float32

        def decode(self, z):
            rgb = torch.einsum("oc,bcthw->bothw", weight, z) + bias[None, :, None, None, None]
            return rgb.repeat_interleave(8, dim=-1).repeat_interleave(8, dim=-2)

    w, b = preview.fit_projection(LinearVAE())
    torch.testing.assert_close(w, weight, rtol=0, atol=1e-5)
    torch.testing.assert_close(b, bias, rtol=0, atol=1e-5)
    raw = torch.randn(1, 16, 3, 4, 5)
    image = np.asarray(preview.latent_to_image(raw, (w, b))).astype(float)  # (4, 5, 3) of the middle frame
    expected = ((torch.einsum("oc,chw->hwo", weight, raw[0, :, 1]) + bias).clamp(-1, 1) + 1) * 127.5
    assert np.abs(image - expected.numpy()).max() <= 1
    structure = np.asarray(preview.latent_to_image(raw, None)).astype(float)  # no colours: the structure, stretched
    assert structure.shape == (4, 5, 3) and structure.min() == 0 and structure.max() == 255


def test_preview_colours_travel_with_the_latents_of_their_vae(models, monkeypatch):
    """Each VAE fits its own colours once; the latents its nodes make carry them to the sampler, so a graph previews
    with the VAE that made the latent, whichever VAE was loaded last."""
    monkeypatch.setattr(host, "previews_enabled", lambda: True)
    (vae_a,) = N["CogVXVAELoader"]().load("tiny-5b/vae", "fp32")
    (vae_b,) = N["CogVXVAELoader"]().load("tiny-1.5-i2v/vae", "fp32")
    empty = N["CogVXEmptyLatent"]()
    with_a = empty.make("5b", 5, 48, 32, 1, vae=vae_a)["result"][0]
    with_b = empty.make("5b", 5, 48, 32, 1, vae=vae_b)["result"][0]
    weight_a, bias_a = with_a[preview.KEY]
    assert weight_a.shape == (3, 16) and bias_a.shape == (3,) and torch.isfinite(weight_a).all()
    assert with_a[preview.KEY] is vae_a.preview_colours  # fitted once per VAE
    assert not torch.equal(weight_a, with_b[preview.KEY][0])
    assert preview.colours(None, with_b) is with_b[preview.KEY]
    assert preview.KEY not in empty.make("5b", 5, 48, 32, 1)["result"][0]  # no VAE connected
    monkeypatch.setattr(host, "previews_enabled", lambda: False)
    assert preview.KEY not in empty.make("5b", 5, 48, 32, 1, vae=vae_a)["result"][0]  # previews off: nothing fitted


# ---- the host module outside ComfyUI --------------------------------------------------------------------------------
def test_host_falls_back_to_plain_python(tiny, caplog):
    assert host.IN_COMFY is False
    assert host.devices("vae")[1] == torch.device("cpu")
    assert host.Managed(torch.nn.Linear(2, 2), "diffusion").patcher is None
    assert tiny["model"].managed.load() == host.torch_device()
    host.Progress(3).update(1)  # no bar, nothing to interrupt
    host.throw_if_interrupted()
    assert host.previews_enabled() is False and host.t5_tokenizer_folder() is None
    assert host.free_memory(torch.device("cpu")) > 0
    with caplog.at_level("WARNING", logger="cogvx"):
        host.say("a note for the user", "3")
    assert "a note for the user" in caplog.text
    assert host.is_oom(torch.OutOfMemoryError("x")) and host.is_oom(RuntimeError("CUDA out of memory"))
    assert not host.is_oom(RuntimeError("shape mismatch"))


def test_loras_of_a_handle_apply_for_its_run_only(tiny, tmp_path):
    """Room for a LoRA node: a handle copy with `loras` samples with them; the plain handle gets the base model."""
    import dataclasses

    from safetensors.torch import save_file

    from cogvx_core.lora import applied_loras, load_lora

    g = torch.Generator().manual_seed(0)
    layers = {f"transformer.transformer_blocks.{i}.attn1.{n}": 128 for i in range(2) for n in ("to_q", "to_v")}
    tensors = {}
    for name, dim in layers.items():
        tensors[f"{name}.lora_A.weight"] = torch.randn(4, dim, generator=g) * 0.3
        tensors[f"{name}.lora_B.weight"] = torch.randn(dim, 4, generator=g) * 0.3
    save_file(tensors, tmp_path / "style.safetensors")
    with_lora = dataclasses.replace(tiny["model"], loras=((load_lora(tmp_path / "style.safetensors"), 1.0),))
    latent = empty()["result"][0]
    base = run_sampler(tiny, latent)
    styled = run_sampler(tiny, latent, model=with_lora)
    assert (styled - base).abs().max() > 1e-3
    assert applied_loras(tiny["model"].transformer) == [("style", 1.0)]
    torch.testing.assert_close(run_sampler(tiny, latent), base, rtol=0, atol=0)  # the LoRA is off again
    assert applied_loras(tiny["model"].transformer) == []


def test_every_node_sits_in_a_category_folder():
    for name, cls in N.items():
        assert cls.CATEGORY.startswith("CogVX/") and cls.CATEGORY.count("/") == 1, (name, cls.CATEGORY)
