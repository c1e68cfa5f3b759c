"""Training folders: layouts, errors that name the file, buckets and fps, and the content-keyed cache (a changed clip,
caption or setting re-encodes only what it changes)."""

import json

import pytest
import torch

from cogvx_core.errors import CogVXError
from cogvx_core.train.buckets import make_buckets
from cogvx_core.train.dataset import fit, prepare_dataset, read_media, resample_indices, scan_folder
from trainkit import load_parts, write_clip


class Counting:
    """Forwards to a VAE or text encoder and counts the encode calls."""

    def __init__(self, inner, method):
        self.inner, self.method, self.calls = inner, method, 0

    def __getattr__(self, name):
        if name == self.__dict__.get("method"):
            def counted(*a, **k):
                self.calls += 1
                return getattr(self.inner, name)(*a, **k)
            return counted
        return getattr(self.inner, name)


@pytest.fixture(scope="module")
def parts(model_folder):
    return load_parts(model_folder("5b"))


def _prepare(parts, data, cache, frames=9, size=(32, 48), fps=0):
    transformer, vae, text = parts
    vae, text = Counting(vae, "encode_posterior"), Counting(text, "encode_with_info")
    ds = prepare_dataset(data, vae=vae, text_encoder=text, variant=transformer.variant,
                         buckets=make_buckets(transformer.variant, frames, *size), cache_dir=cache, fps=fps)
    return ds, vae.calls, text.calls


def test_layouts(tmp_path):
    a = tmp_path / "captioned"
    a.mkdir()
    write_clip(a / "one.mp4", 9, caption="first")
    write_clip(a / "two.gif", 5, caption="second")
    write_clip(a / "three", 9, caption="third")  # a frame folder + three.txt
    write_clip(a / "four.png", 1, caption="fourth\n")
    (a / "nested").mkdir()
    write_clip(a / "nested" / "five.mp4", 9, caption="fifth")
    (a / "notes.txt").write_text("a stray text file is not a clip")
    items = scan_folder(a)
    assert sorted((i.path.name, i.kind, i.caption) for i in items) == [
        ("five.mp4", "video", "fifth"), ("four.png", "image", "fourth"), ("one.mp4", "video", "first"),
        ("three", "frames", "third"), ("two.gif", "video", "second")]

    b = tmp_path / "jsonl"
    (b / "clips").mkdir(parents=True)
    write_clip(b / "clips" / "x.mp4", 9)
    write_clip(b / "y.png", 1)
    (b / "metadata.jsonl").write_text(json.dumps({"file_name": "clips/x.mp4", "text": "ex"}) + "\n\n"
                                      + json.dumps({"image": "y.png", "caption": "why"}) + "\n")
    assert [(i.path.name, i.caption) for i in scan_folder(b)] == [("x.mp4", "ex"), ("y.png", "why")]

    c = tmp_path / "lists"
    c.mkdir()
    write_clip(c / "v.mp4", 9)
    (c / "prompts.txt").write_text("a prompt\n")
    (c / "videos.txt").write_text("v.mp4\n")
    assert [(i.path.name, i.caption) for i in scan_folder(c)] == [("v.mp4", "a prompt")]


def test_every_problem_is_named_in_one_error(tmp_path, parts):
    data = tmp_path / "data"
    data.mkdir()
    write_clip(data / "good.mp4", 9, caption="fine")
    write_clip(data / "uncaptioned.mp4", 9)
    write_clip(data / "blank.gif", 5, caption="   ")
    with pytest.raises(CogVXError) as e:
        scan_folder(data)
    msg = str(e.value)
    assert "2 problem(s)" in msg
    assert "uncaptioned.mp4: no caption: write it in uncaptioned.txt" in msg
    assert "blank.gif: its caption file blank.txt is empty" in msg

    (data / "uncaptioned.txt").write_text("now captioned")
    (data / "blank.txt").write_text("now captioned too")
    (data / "corrupt.mp4").write_bytes(b"\x00\x00\x00\x18ftypmp42 this is not a video")
    (data / "corrupt.txt").write_text("a broken clip")
    with pytest.raises(CogVXError, match=r"corrupt\.mp4: cannot decode this video") as e:
        _prepare(parts, data, tmp_path / "cache")
    assert "good.mp4" not in str(e.value)

    meta = tmp_path / "meta"
    meta.mkdir()
    (meta / "metadata.jsonl").write_text('{"file_name": "missing.mp4", "text": "x"}\n{"file_name": "a.mp4"}\n')
    write_clip(meta / "a.mp4", 9)
    with pytest.raises(CogVXError) as e:
        scan_folder(meta)
    assert "missing.mp4: listed in metadata.jsonl line 1 but not found" in str(e.value)
    assert "a.mp4: no caption in metadata.jsonl line 2" in str(e.value)
    with pytest.raises(CogVXError, match="no clips found"):
        scan_folder(tmp_path / "cache")
    with pytest.raises(CogVXError, match="no such folder"):
        scan_folder(tmp_path / "nowhere")


def test_buckets_fps_and_stored_latents(tmp_path, parts):
    data = tmp_path / "data"
    data.mkdir()
    write_clip(data / "fast.mp4", 17, fps=16, caption="sixteen fps")  # 17 frames at 16 fps = 9 frames at 8 fps
    write_clip(data / "long", 25, caption="a long frame folder")  # no fps: all 25 frames -> the 17 bucket
    write_clip(data / "still.png", 1, caption="an image")
    ds, vae_calls, text_calls = _prepare(parts, data, tmp_path / "cache", frames=17, fps=8)
    by_name = {e.source.split("/")[-1]: e for e in ds.entries}
    assert (by_name["fast.mp4"].frames, by_name["long"].frames, by_name["still.png"].frames) == (9, 17, 1)
    assert {(e.height, e.width) for e in ds.entries} == {(32, 48)}
    assert vae_calls == 3 and text_calls == 3
    assert resample_indices(17, 16, 8) == [0, 2, 4, 6, 8, 10, 12, 14, 16]
    assert resample_indices(10, 8.33, 8) == list(range(10))  # GIF rounding: the same rate

    # the cached posterior is the VAE's on the resized, centre-cropped, resampled frames
    _, vae, _ = parts
    frames, _ = read_media(type("I", (), {"path": data / "fast.mp4", "kind": "video"})())
    pixels = fit(frames[resample_indices(17, 16, 8)], 32, 48)
    assert pixels.shape == (3, 9, 32, 48) and -1 <= float(pixels.min()) and float(pixels.max()) <= 1
    expected = vae.encode_posterior(pixels[None]).mean[0]
    mean, logvar = ds.posterior(ds.entries.index(by_name["fast.mp4"]))
    torch.testing.assert_close(mean, expected, rtol=1e-5, atol=1e-6)
    assert mean.shape == (16, 3, 4, 6) and logvar.shape == mean.shape
    assert ds.context(0).shape == (12, 32)


def test_cache_reuses_unchanged_entries_and_re_encodes_changed_ones(tmp_path, parts):
    data, cache = tmp_path / "data", tmp_path / "cache"
    data.mkdir()
    for i in range(3):
        write_clip(data / f"c{i}.mp4", 9, seed=i, caption=f"caption {i}")
    first, vae_calls, text_calls = _prepare(parts, data, cache)
    assert (vae_calls, text_calls) == (3, 3)

    again, vae_calls, text_calls = _prepare(parts, data, cache)
    assert (vae_calls, text_calls) == (0, 0) and again.fingerprint == first.fingerprint

    write_clip(data / "c1.mp4", 9, seed=99)  # a changed clip
    (data / "c2.txt").write_text("a new caption")  # a changed caption
    changed, vae_calls, text_calls = _prepare(parts, data, cache)
    assert (vae_calls, text_calls) == (1, 1)
    old, new = first.entries, changed.entries
    assert new[0] == old[0]
    assert new[1].latent_key != old[1].latent_key and new[1].text_key == old[1].text_key
    assert new[2].latent_key == old[2].latent_key and new[2].text_key != old[2].text_key
    assert changed.fingerprint != first.fingerprint

    resized, vae_calls, text_calls = _prepare(parts, data, cache, size=(32, 32))  # a changed setting
    assert (vae_calls, text_calls) == (3, 0)
    assert changed.cache.prune({"latents": {e.latent_key for e in resized.entries},
                                "text": {e.text_key for e in resized.entries}}) == 3 + 2
