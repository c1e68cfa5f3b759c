"""A training folder -> a prepared dataset: clips and captions checked, bucketed, encoded once and cached.

Folder layouts (the first that applies):
  metadata.jsonl   one JSON object per line: the media path (relative to the folder) under "file_name", "file",
                   "video", "image" or "path", and the caption under "text", "caption" or "prompt"
  prompts.txt + videos.txt   line i of one belongs to line i of the other (the THUDM / cogvideox-factory layout)
  otherwise        every video (mp4, webm, gif, mov, mkv, avi), image (png, jpg, webp, bmp) and frame folder (a
                   folder of image frames) with a caption file of the same name: clip.mp4 + clip.txt,
                   photo.png + photo.txt, clip01/ + clip01.txt. Sub-folders without a caption of their own are searched.

Each clip is resampled to the model's frame rate (when its own is known), assigned its duration and resolution
buckets (buckets.py), resized to cover the bucket and centre cropped, encoded by the VAE, and its caption by T5; both
are cached (cache.py). Training then reads only the cache, so the VAE and T5 need not stay in memory.

Every problem in the folder (a missing or empty caption, an unreadable clip) is reported in one error that names
each file and the fix.
"""

from __future__ import annotations

import hashlib
import json
import logging
import os
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Callable

import numpy as np
import torch
import torch.nn.functional as F

from ..errors import CogVXError
from ..variants import Variant, latent_frames
from ..video_io import IMAGE_SUFFIXES, VIDEO_SUFFIXES, read_frames, read_image
from .buckets import Buckets, assign
from .cache import Cache, key_of, module_fingerprint

log = logging.getLogger(__name__)

MEDIA_KEYS = ("file_name", "file", "video", "image", "path", "media")
CAPTION_KEYS = ("text", "caption", "prompt")
CACHE_DIRNAME = ".cogvx_cache"
_MAX_LISTED = 20

Progress = Callable[[int, int], None]


# ---------------------------------------------------------------------------------------------------------------
# Finding clips and captions
# ---------------------------------------------------------------------------------------------------------------
@dataclass(frozen=True)
class MediaItem:
    path: Path
    caption: str
    kind: str  # "video", "image" or "frames"


def _kind(path: Path) -> str | None:
    if path.is_dir():
        return "frames"
    suffix = path.suffix.lower()
    return "video" if suffix in VIDEO_SUFFIXES else "image" if suffix in IMAGE_SUFFIXES else None


def _problems_error(root: Path, problems: list[str]) -> CogVXError:
    more = f"\n  ... and {len(problems) - _MAX_LISTED} more" if len(problems) > _MAX_LISTED else ""
    listed = "\n  ".join(problems[:_MAX_LISTED])
    return CogVXError(f"The training folder {root} has {len(problems)} problem(s):\n  {listed}{more}")


def _read_caption(path: Path, problems: list[str], media: Path) -> str | None:
    try:
        text = path.read_text(encoding="utf-8").strip()
    except UnicodeDecodeError:
        problems.append(f"{path}: the caption is not UTF-8 text; save it as UTF-8.")
        return None
    if not text:
        problems.append(f"{media}: its caption file {path.name} is empty; write the clip's description in it.")
        return None
    return text


def _is_frame_folder(path: Path) -> bool:
    files = [p for p in path.iterdir() if not p.name.startswith(".")]
    return bool(files) and all(p.is_file() and p.suffix.lower() in IMAGE_SUFFIXES for p in files)


def _scan_captioned(folder: Path, problems: list[str]) -> list[MediaItem]:
    items = []
    for path in sorted(folder.iterdir()):
        if path.name.startswith(".") or path.name in ("metadata.jsonl",):
            continue
        caption_file = path.with_name(path.stem + ".txt") if path.is_file() else path.with_name(path.name + ".txt")
        if path.is_dir():
            if caption_file.is_file() and _is_frame_folder(path):
                caption = _read_caption(caption_file, problems, path)
                if caption is not None:
                    items.append(MediaItem(path, caption, "frames"))
            elif caption_file.is_file():
                problems.append(f"{path}: has a caption ({caption_file.name}) but is not a folder of image frames "
                                f"only ({', '.join(IMAGE_SUFFIXES)}); remove other files from it.")
            else:
                items += _scan_captioned(path, problems)
            continue
        kind = _kind(path)
        if kind is None:
            continue
        if not caption_file.is_file():
            problems.append(f"{path}: no caption: write it in {caption_file.name} beside the file (or list the file "
                            "in a metadata.jsonl).")
            continue
        caption = _read_caption(caption_file, problems, path)
        if caption is not None:
            items.append(MediaItem(path, caption, kind))
    return items


def _scan_metadata(root: Path, problems: list[str]) -> list[MediaItem]:
    items = []
    meta = root / "metadata.jsonl"
    for n, line in enumerate(meta.read_text(encoding="utf-8").splitlines(), start=1):
        if not line.strip():
            continue
        try:
            row = json.loads(line)
        except json.JSONDecodeError as e:
            problems.append(f"{meta} line {n}: not valid JSON ({e}).")
            continue
        name = next((row[k] for k in MEDIA_KEYS if isinstance(row, dict) and k in row), None)
        caption = next((row[k] for k in CAPTION_KEYS if isinstance(row, dict) and k in row), None)
        if name is None:
            problems.append(f"{meta} line {n}: no media path; give it as \"file_name\".")
            continue
        path = root / str(name)
        if not isinstance(caption, str) or not caption.strip():
            problems.append(f"{path}: no caption in {meta.name} line {n}; add a non-empty \"text\".")
            continue
        kind = _kind(path) if path.exists() else None
        if not path.exists():
            problems.append(f"{path}: listed in {meta.name} line {n} but not found.")
        elif kind is None:
            problems.append(f"{path}: not a video, image or frame folder ({', '.join(VIDEO_SUFFIXES + IMAGE_SUFFIXES)}).")
        else:
            items.append(MediaItem(path, caption.strip(), kind))
    return items


def _scan_lists(root: Path, problems: list[str]) -> list[MediaItem]:
    prompts = (root / "prompts.txt").read_text(encoding="utf-8").splitlines()
    videos = (root / "videos.txt").read_text(encoding="utf-8").splitlines()
    prompts, videos = [p.strip() for p in prompts if p.strip()], [v.strip() for v in videos if v.strip()]
    if len(prompts) != len(videos):
        problems.append(f"{root}: prompts.txt has {len(prompts)} lines but videos.txt {len(videos)}; they must pair "
                        "up line by line.")
        return []
    items = []
    for caption, name in zip(prompts, videos):
        path = root / name
        kind = _kind(path) if path.exists() else None
        if kind is None:
            problems.append(f"{path}: listed in videos.txt but not found (or not a video, image or frame folder).")
        else:
            items.append(MediaItem(path, caption, kind))
    return items


def scan_folder(root: str | os.PathLike) -> list[MediaItem]:
    """Every clip of a training folder with its caption; one CogVXError lists every problem found."""
    root = Path(root)
    if not root.is_dir():
        raise CogVXError(f"{root}: no such folder. Give the folder that holds the training clips and captions.")
    problems: list[str] = []
    if (root / "metadata.jsonl").is_file():
        items = _scan_metadata(root, problems)
    elif (root / "prompts.txt").is_file() and (root / "videos.txt").is_file():
        items = _scan_lists(root, problems)
    else:
        items = _scan_captioned(root, problems)
    if problems:
        raise _problems_error(root, problems)
    if not items:
        raise CogVXError(f"{root}: no clips found. Put videos ({', '.join(VIDEO_SUFFIXES)}), images or frame folders "
                         "there, each with a caption file of the same name (clip.mp4 + clip.txt).")
    return items


# ---------------------------------------------------------------------------------------------------------------
# Reading, resampling and fitting one clip
# ---------------------------------------------------------------------------------------------------------------
def _source_fps(path: Path, kind: str) -> float | None:
    if kind != "video":
        return None
    try:
        if path.suffix.lower() == ".gif":
            from PIL import Image

            with Image.open(path) as im:
                ms = im.info.get("duration")
            return 1000.0 / ms if ms else None
        import imageio.v2 as imageio

        with imageio.get_reader(path) as reader:
            fps = reader.get_meta_data().get("fps")
        return float(fps) if fps else None
    except Exception:  # the frames themselves are read (and their errors reported) by read_frames
        return None


def read_media(item: MediaItem) -> tuple[torch.Tensor, float | None]:
    """(frames (T, H, W, 3) in [0, 1], the source fps or None). Errors name the file."""
    if item.kind == "image":
        image = read_image(item.path)
        return torch.from_numpy(np.array(image)).float()[None] / 255.0, None
    frames = read_frames(item.path)
    if frames.shape[0] == 0:
        raise CogVXError(f"{item.path}: this video has no frames; the file may be corrupt.")
    return frames, _source_fps(item.path, item.kind)


def resample_indices(count: int, source_fps: float | None, target_fps: float | None) -> list[int]:
    """Frame indices that play `count` frames at `source_fps` back at `target_fps` (nearest earlier frame).
    Rates within 5% are taken as equal (GIF frame times are whole hundredths of a second)."""
    if not source_fps or not target_fps or abs(source_fps / target_fps - 1) < 0.05:
        return list(range(count))
    step = source_fps / target_fps
    return [int(i * step + 1e-6) for i in range(int((count - 1) / step + 1e-6) + 1)]


def fit(frames: torch.Tensor, height: int, width: int) -> torch.Tensor:
    """(T, H, W, 3) in [0, 1] -> (3, T, height, width) in [-1, 1]: resized to cover, then centre cropped."""
    t, h, w, _ = frames.shape
    x = frames.permute(0, 3, 1, 2).float()  # (T, 3, H, W)
    scale = max(height / h, width / w)
    new_h, new_w = max(height, round(h * scale)), max(width, round(w * scale))
    if (new_h, new_w) != (h, w):
        x = F.interpolate(x, size=(new_h, new_w), mode="bilinear", antialias=True, align_corners=False)
    top, left = (new_h - height) // 2, (new_w - width) // 2
    x = x[:, :, top:top + height, left:left + width].clamp(0, 1)
    return (x * 2 - 1).permute(1, 0, 2, 3).contiguous()  # (3, T, H, W)


# ---------------------------------------------------------------------------------------------------------------
# The prepared dataset
# ---------------------------------------------------------------------------------------------------------------
@dataclass(frozen=True)
class Entry:
    """One training clip as prepared: where it came from, its bucket and its cache keys."""

    source: str
    caption: str
    kind: str
    frames: int  # pixel frames of its duration bucket
    height: int
    width: int
    latent_frames: int
    latent_key: str
    text_key: str


@dataclass
class CogVXDataset:
    """Prepared training data: entries whose latents and text embeddings are in `cache`."""

    entries: list[Entry]
    cache: Cache
    buckets: Buckets
    variant: str
    fps: float | None
    notes: list[str] = field(default_factory=list)

    def __len__(self) -> int:
        return len(self.entries)

    @property
    def fingerprint(self) -> str:
        """Changes when any clip, caption or preparation setting changes (a resumed run checks it)."""
        text = json.dumps([(e.latent_key, e.text_key) for e in self.entries])
        return hashlib.sha256(text.encode()).hexdigest()[:32]

    def group(self, i: int, frame_pack: bool = True) -> tuple:
        """The batch group of entry i: its size bucket, plus its duration without Frame Pack."""
        e = self.entries[i]
        return (e.height, e.width) if frame_pack else (e.height, e.width, e.frames)

    def posterior(self, i: int) -> tuple[torch.Tensor, torch.Tensor]:
        """(mean, logvar) of entry i's raw (unscaled) VAE posterior, each (C, t, h, w) on the CPU."""
        data = self.cache.get("latents", self.entries[i].latent_key)
        return data["mean"], data["logvar"]

    def context(self, i: int) -> torch.Tensor:
        """Entry i's T5 embedding (L, D) on the CPU."""
        return self.cache.get("text", self.entries[i].text_key)["context"]

    def summary(self) -> str:
        counts: dict = {}
        for e in self.entries:
            counts[(e.width, e.height, e.frames)] = counts.get((e.width, e.height, e.frames), 0) + 1
        parts = [f"{n} x {w}x{h}x{f}f" for (w, h, f), n in sorted(counts.items())]
        return f"{len(self.entries)} clips: " + ", ".join(parts)


def default_cache_dir(folder: str | os.PathLike) -> Path:
    return Path(folder) / CACHE_DIRNAME


def prepare_dataset(folder: str | os.PathLike, *, vae, text_encoder, variant: Variant, buckets: Buckets,
                    cache_dir: str | os.PathLike | None = None, fps: float | None = None,
                    progress: Progress | None = None, rank: int = 0, world_size: int = 1,
                    barrier: Callable[[], None] | None = None) -> CogVXDataset:
    """Scans `folder`, encodes what the cache lacks (this rank's share: entries i with i % world_size == rank) and
    returns the dataset. fps: the frame rate clips are resampled to (default: the variant's; 0 keeps each clip's
    own). `barrier` (data parallel) waits until every rank has written its share."""
    items = scan_folder(folder)
    cache = Cache(cache_dir or default_cache_dir(folder))
    target_fps = float(variant.fps if fps is None else fps) or None
    vae_id = module_fingerprint(vae, {"config": getattr(vae, "config", None)})
    text_id = module_fingerprint(text_encoder.model, {"vocab": len(text_encoder.tokenizer),
                                                      "max_length": text_encoder.max_length})
    probes = _Probes(cache)
    problems: list[str] = []
    entries: list[Entry] = []
    decoded: dict[int, tuple[torch.Tensor, float | None]] = {}
    notes: list[str] = []
    for i, item in enumerate(items):
        try:
            digest = cache.media_digest(item.path)
            probe = probes.get(digest)
            if probe is None:
                frames, source_fps = read_media(item)
                decoded[i] = (frames, source_fps)
                probe = probes.put(digest, frames, source_fps)
        except CogVXError as e:
            problems.append(str(e))
            continue
        except OSError as e:
            problems.append(f"{item.path}: cannot be read ({e}).")
            continue
        available = len(resample_indices(probe["frames"], probe["fps"], target_fps))
        frames, h, w = assign(available if item.kind != "image" else 1, probe["height"], probe["width"], buckets)
        if item.kind != "image" and frames == 1 and available > 1:
            notes.append(f"{item.path.name}: {available} frames is shorter than every video bucket; trained as one "
                         "frame")
        elif item.kind != "image" and frames * 2 <= available:
            notes.append(f"{item.path.name}: {available} frames, trained on the first {frames} (longest bucket)")
        latent_key = key_of("latents", {"media": digest, "frames": frames, "size": [h, w], "fps": target_fps,
                                        "crop": "center", "vae": vae_id})
        text_key = key_of("text", {"caption": item.caption, "encoder": text_id})
        entries.append(Entry(str(item.path), item.caption, item.kind, frames, h, w, latent_frames(frames),
                             latent_key, text_key))
    cache.save_digests()
    probes.save()
    if problems:
        raise _problems_error(Path(folder), problems)

    todo = [i for i, e in enumerate(entries) if i % world_size == rank
            and not (cache.has("latents", e.latent_key) and cache.has("text", e.text_key))]
    for n, i in enumerate(todo):
        e = entries[i]
        if not cache.has("latents", e.latent_key):
            frames, source_fps = decoded.pop(i, None) or read_media(items[i])
            picked = resample_indices(frames.shape[0], source_fps, target_fps)[:e.frames]
            pixels = fit(frames[picked], e.height, e.width)  # (3, F, H, W)
            with torch.no_grad():
                posterior = vae.encode_posterior(pixels[None].to(vae.device, vae.dtype))
            cache.put("latents", e.latent_key, {"mean": posterior.mean[0], "logvar": posterior.logvar[0]},
                      {"source": e.source, "frames": e.frames, "size": f"{e.width}x{e.height}"})
        if not cache.has("text", e.text_key):
            context, info = text_encoder.encode_with_info([e.caption])
            context = context[0]  # (L, D)
            notes += [f"{Path(e.source).name}: {note}" for note in info[0].notes]
            cache.put("text", e.text_key, {"context": context}, {"caption": e.caption[:200]})
        if progress is not None:
            progress(n + 1, len(todo))
    if barrier is not None:
        barrier()
    for note in notes:
        log.info(note)
    return CogVXDataset(entries, cache, buckets, variant.name, target_fps, notes)


class _Probes:
    """Frame count, size and fps of each clip by content digest, kept beside the cache (no decode on later runs)."""

    def __init__(self, cache: Cache):
        self.file = cache.root / "probes.json"
        try:
            self.data = json.loads(self.file.read_text())
        except (OSError, ValueError):
            self.data = {}
        self.dirty = False

    def get(self, digest: str) -> dict | None:
        return self.data.get(digest)

    def put(self, digest: str, frames: torch.Tensor, fps: float | None) -> dict:
        probe = {"frames": int(frames.shape[0]), "height": int(frames.shape[1]), "width": int(frames.shape[2]),
                 "fps": fps}
        self.data[digest] = probe
        self.dirty = True
        return probe

    def save(self) -> None:
        if self.dirty:
            tmp = self.file.with_name(f"probes.{os.getpid()}.tmp")
            tmp.write_text(json.dumps(self.data))
            os.replace(tmp, self.file)
            self.dirty = False


MANIFEST_FORMAT = 1


def save_manifest(dataset: CogVXDataset, path: str | os.PathLike) -> Path:
    """Writes what a prepared dataset is (its entries, buckets and cache folder) as JSON, so a later process can
    train on it with load_manifest, without the VAE and T5 and without scanning the folder again."""
    path = Path(path)
    data = {"format": MANIFEST_FORMAT, "variant": dataset.variant, "fps": dataset.fps,
            "cache": str(dataset.cache.root.resolve()), "notes": dataset.notes,
            "buckets": {"resolutions": [list(r) for r in dataset.buckets.resolutions],
                        "frame_counts": list(dataset.buckets.frame_counts)},
            "entries": [asdict(e) for e in dataset.entries]}
    tmp = path.with_name(path.name + ".tmp")
    tmp.write_text(json.dumps(data, indent=1))
    os.replace(tmp, path)
    return path


def load_manifest(path: str | os.PathLike) -> CogVXDataset:
    """A dataset saved by save_manifest; its cache entries must still exist."""
    path = Path(path)
    try:
        data = json.loads(path.read_text())
    except (OSError, ValueError) as e:
        raise CogVXError(f"{path}: cannot read this dataset manifest ({e}); prepare the dataset again.")
    if data.get("format") != MANIFEST_FORMAT:
        raise CogVXError(f"{path}: dataset manifest format {data.get('format')} is not this version's; prepare the "
                         "dataset again.")
    cache = Cache(data["cache"])
    entries = [Entry(**e) for e in data["entries"]]
    missing = [e.source for e in entries if not (cache.has("latents", e.latent_key) and cache.has("text", e.text_key))]
    if missing:
        raise CogVXError(f"{path}: the cache lacks the encodings of {len(missing)} clip(s) (e.g. {missing[0]}); "
                         "prepare the dataset again.")
    b = data["buckets"]
    buckets = Buckets(tuple(tuple(r) for r in b["resolutions"]), tuple(b["frame_counts"]))
    return CogVXDataset(entries, cache, buckets, data["variant"], data["fps"], list(data.get("notes", [])))
