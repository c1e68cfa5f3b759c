"""Synthetic captioned clips: one shape in one colour moving left, right, up or down over a plain background.

The data a small CogVideoX-architecture model can learn on a CPU, with captions whose every word can be checked
on the output by `cogvx_core.recipes.analysis`:

    "a red circle moves to the left on a black background"
    "a white square moves up on a blue background"

Vocabulary (the caption's four slots):
    colour      red, green, blue, yellow, white          (+ the spare colour "purple", only in split="spare")
    shape       circle, square, triangle                 (the triangle points up and fills half its box)
    direction   left, right, up, down                    ("moves to the left", "moves to the right", "moves up", ...)
    background  black, gray, white, blue, green          (never the shape's colour)

Held-out design (`split()`): of the 264 valid (colour, shape, direction, background) combinations, the 54 whose
vocabulary indices sum to a multiple of 5 are kept out of training:

    held out  <=>  (COLOUR_NAMES.index(c) + SHAPES.index(s) + DIRECTIONS.index(d) + BACKGROUND_NAMES.index(b)) % 5 == 0

The rule is fixed (no seed) and spreads evenly over every slot, so every word AND every pair of words (colour+shape,
shape+background, ...) still occurs in training: only the four-way composition is new at evaluation time.

Geometry: `size` is the side of the shape's square bounding box as a fraction of min(height, width); `speed` is the
distance the centre travels over the whole clip as a fraction of the frame's extent along the motion (so clips of 9
or 49 frames look alike); `start` is the centre at frame 0 as fractions of (width, height). `random_clip` picks a
start that keeps the shape fully inside the frame for the whole clip: sizes 0.35/0.40/0.45, speeds 0.25/0.35/0.50 (a
speed the shape's size leaves no room for is slowed down to fit).
Frames are rendered with 8x8 supersampling, so edges are anti-aliased and sub-pixel motion is smooth.

Keep shapes at least ~16 pixels wide (48x48 frames or larger at these sizes) when the output will be judged after a
VAE round trip: `analysis` reads smaller shapes blurred by 4x4-pixel detail loss less reliably.
"""

from __future__ import annotations

import json
import math
from dataclasses import asdict, dataclass, replace
from pathlib import Path
from typing import NamedTuple

import numpy as np
import torch

from ..errors import CogVXError

# Named colours (RGB in [0, 1]). A name means the same RGB as a shape colour and as a background.
PALETTE = {
    "red": (0.90, 0.10, 0.10),
    "green": (0.10, 0.75, 0.20),
    "blue": (0.10, 0.25, 0.95),
    "yellow": (0.95, 0.85, 0.10),
    "white": (1.00, 1.00, 1.00),
    "black": (0.00, 0.00, 0.00),
    "gray": (0.50, 0.50, 0.50),
    "purple": (0.60, 0.15, 0.80),
}
COLOUR_NAMES = ("red", "green", "blue", "yellow", "white")
BACKGROUND_NAMES = ("black", "gray", "white", "blue", "green")
SPARE_COLOUR_NAMES = ("purple",)  # never in the base data: the word a LoRA can teach later
# Shape colours no base clip has: the spare colour, and the colours the base data only gives backgrounds. A LoRA
# can teach any of them (see recipes/demos.py).
UNSEEN_SHAPE_COLOURS = SPARE_COLOUR_NAMES + ("black", "gray")
SHAPES = ("circle", "square", "triangle")
DIRECTIONS = ("left", "right", "up", "down")
# Unit motion per direction in image coordinates (x to the right, y downwards).
DIRECTION_VECTORS = {"left": (-1.0, 0.0), "right": (1.0, 0.0), "up": (0.0, -1.0), "down": (0.0, 1.0)}
DIRECTION_PHRASES = {"left": "moves to the left", "right": "moves to the right", "up": "moves up", "down": "moves down"}

# bounding-box side / min(height, width). Large, so that at 64x64 a shape spans 3-4 latent cells of the 8x VAE: with
# sizes 0.25-0.35 the tiny model drew half its circles square (shape right 50% against 84% on training prompts,
# after 5000 transformer steps each)
SIZES = (0.35, 0.40, 0.45)
SPEEDS = (0.25, 0.35, 0.50)  # travel over the clip / frame extent along the motion
MARGIN = 0.05  # gap kept between the shape and the frame edge, as a fraction of min(height, width)
SUPERSAMPLE = 8  # samples per pixel along each axis when rendering (8x8: area jitter under 1% while moving)
SPLITS = ("train", "heldout", "spare")


class Combo(NamedTuple):
    """The four caption slots of a clip."""

    colour: str
    shape: str
    direction: str
    background: str


@dataclass(frozen=True)
class Clip:
    """Everything that determines one rendered clip (render(clip) is a pure function of it)."""

    shape: str
    colour: str
    direction: str
    background: str
    speed: float = 0.45  # centre travel over the clip, fraction of the frame's extent along the motion
    size: float = 0.26  # side of the bounding box, fraction of min(height, width)
    start: tuple[float, float] = (0.5, 0.5)  # centre at frame 0, fractions of (width, height)
    frames: int = 9
    height: int = 64
    width: int = 64

    def __post_init__(self):
        _check_name("shape", self.shape, SHAPES)
        _check_name("colour", self.colour, COLOUR_NAMES + UNSEEN_SHAPE_COLOURS)
        _check_name("direction", self.direction, DIRECTIONS)
        _check_name("background", self.background, BACKGROUND_NAMES)
        if self.colour == self.background:
            raise CogVXError(f"a {self.colour} shape on a {self.background} background would be invisible; "
                             "pick a background other than the shape's colour.")
        check_size(self.frames, self.height, self.width)
        if not (0 < self.size <= 1) or self.speed < 0:
            raise CogVXError(f"size {self.size} / speed {self.speed} out of range; size is a fraction in (0, 1] of the "
                             "frame, speed a non-negative fraction of the frame crossed over the clip.")
        object.__setattr__(self, "start", (float(self.start[0]), float(self.start[1])))

    @property
    def combo(self) -> Combo:
        return Combo(self.colour, self.shape, self.direction, self.background)

    def to_dict(self) -> dict:
        return asdict(self)


def _check_name(slot: str, name: str, choices: tuple[str, ...]) -> None:
    if name not in choices:
        raise CogVXError(f"unknown {slot} {name!r}; choose one of: {', '.join(choices)}.")


def check_size(frames: int, height: int, width: int) -> None:
    """CogVideoX's VAE wants 4k+1 frames; the renderer wants at least 16x16 pixels."""
    if frames < 1 or (frames - 1) % 4:
        raise CogVXError(f"frames={frames} is not 4k+1; use 5, 9, 13, 17, ... 49 (the VAE compresses time by 4 after "
                         "the first frame).")
    if height < 16 or width < 16:
        raise CogVXError(f"{height}x{width} is too small to draw a recognisable shape; use at least 16x16.")


def caption(clip: Clip | Combo) -> str:
    """'a {colour} {shape} moves {to the left|to the right|up|down} on a {background} background'."""
    return f"a {clip.colour} {clip.shape} {DIRECTION_PHRASES[clip.direction]} on a {clip.background} background"


def all_combos(colours: tuple[str, ...] = COLOUR_NAMES) -> list[Combo]:
    """Every valid caption combination (shape colour != background), in vocabulary order."""
    return [Combo(c, s, d, b) for c in colours for s in SHAPES for d in DIRECTIONS for b in BACKGROUND_NAMES
            if c != b]


def is_heldout(combo: Combo) -> bool:
    """The fixed held-out rule (see the module docstring): vocabulary indices summing to a multiple of 5."""
    index_sum = (COLOUR_NAMES.index(combo.colour) + SHAPES.index(combo.shape) + DIRECTIONS.index(combo.direction)
                 + BACKGROUND_NAMES.index(combo.background))
    return index_sum % 5 == 0


def split() -> tuple[list[Combo], list[Combo]]:
    """(train combos, held-out combos) over the base vocabulary; disjoint, together every valid combo."""
    combos = all_combos()
    return [c for c in combos if not is_heldout(c)], [c for c in combos if is_heldout(c)]


def spare_combos() -> list[Combo]:
    """Combos using the spare colour(s) only, for a later LoRA demonstration (never in train or heldout)."""
    return all_combos(SPARE_COLOUR_NAMES)


def combos_for(split_name: str) -> list[Combo]:
    if split_name not in SPLITS:
        raise CogVXError(f"unknown split {split_name!r}; choose one of: {', '.join(SPLITS)}.")
    if split_name == "spare":
        return spare_combos()
    train, heldout = split()
    return train if split_name == "train" else heldout


# ---- geometry and rendering ----

def shape_inside(shape: str, x: np.ndarray, y: np.ndarray, cx: float, cy: float, rx: float, ry: float,
                 orientation: str = "up") -> np.ndarray:
    """Boolean: are the points (x, y) inside the shape centred at (cx, cy) with half-extents (rx, ry)?

    The shape fills the box [cx-rx, cx+rx] x [cy-ry, cy+ry]: circle -> ellipse touching all four sides, square ->
    the box, triangle -> apex at the middle of one side (`orientation`: where the apex points), base on the other.
    """
    u, v = (x - cx) / rx, (y - cy) / ry  # box -> [-1, 1]^2
    if shape == "circle":
        return u * u + v * v <= 1.0
    if shape == "square":
        return (np.abs(u) <= 1.0) & (np.abs(v) <= 1.0)
    if shape == "triangle":
        # Rotate the box so the apex is at v = -1; the half-width grows linearly from 0 there to 1 at v = +1.
        along, across = {"up": (v, u), "down": (-v, u), "left": (u, v), "right": (-u, v)}[orientation]
        return (along >= -1.0) & (along <= 1.0) & (np.abs(across) <= (along + 1.0) / 2.0)
    raise CogVXError(f"unknown shape {shape!r}; choose one of: {', '.join(SHAPES)}.")


def coverage(shape: str, height: int, width: int, cx: float, cy: float, rx: float, ry: float,
             orientation: str = "up", supersample: int = SUPERSAMPLE) -> np.ndarray:
    """(H, W) float32 in [0, 1]: the fraction of each pixel the shape covers (pixel (i, j) spans [j, j+1) x [i, i+1)).

    Only the pixels around the shape's box are sampled, so the cost does not grow with the frame size.
    """
    out = np.zeros((height, width), dtype=np.float32)
    x0, x1 = max(0, math.floor(cx - rx) - 1), min(width, math.ceil(cx + rx) + 1)
    y0, y1 = max(0, math.floor(cy - ry) - 1), min(height, math.ceil(cy + ry) + 1)
    if x0 >= x1 or y0 >= y1:
        return out
    s = supersample
    xs = x0 + (np.arange((x1 - x0) * s, dtype=np.float64) + 0.5) / s  # sub-pixel centres
    ys = y0 + (np.arange((y1 - y0) * s, dtype=np.float64) + 0.5) / s
    inside = shape_inside(shape, xs[None, :], ys[:, None], cx, cy, rx, ry, orientation)  # (h*s, w*s)
    out[y0:y1, x0:x1] = inside.reshape(y1 - y0, s, x1 - x0, s).mean(axis=(1, 3))
    return out


def centres(clip: Clip) -> np.ndarray:
    """(T, 2) centre (x, y) in pixels at each frame: a straight line at constant speed."""
    dx, dy = DIRECTION_VECTORS[clip.direction]
    travel = clip.speed * (clip.width if dx else clip.height)
    t = np.arange(clip.frames, dtype=np.float64) / max(clip.frames - 1, 1)  # 0 -> 1 over the clip
    x = clip.start[0] * clip.width + dx * travel * t
    y = clip.start[1] * clip.height + dy * travel * t
    return np.stack([x, y], axis=1)


def render(clip: Clip) -> torch.Tensor:
    """The clip as (T, H, W, 3) float32 in [0, 1]: background colour blended with the shape's colour by coverage."""
    radius = clip.size * min(clip.height, clip.width) / 2.0
    fg = np.asarray(PALETTE[clip.colour], dtype=np.float32)
    bg = np.asarray(PALETTE[clip.background], dtype=np.float32)
    frames = np.empty((clip.frames, clip.height, clip.width, 3), dtype=np.float32)
    for t, (cx, cy) in enumerate(centres(clip)):
        alpha = coverage(clip.shape, clip.height, clip.width, cx, cy, radius, radius)[..., None]  # (H, W, 1)
        frames[t] = bg + (fg - bg) * alpha
    return torch.from_numpy(frames)


def render_uint8(clips: list[Clip]) -> torch.Tensor:
    """Several clips rendered as uint8 (N, T, H, W, 3), the way a video file stores them (what the VAE trains on)."""
    return torch.stack([render(c).mul(255).round().to(torch.uint8) for c in clips])

def random_clip(combo: Combo, rng: np.random.Generator, frames: int = 9, height: int = 64,
                width: int = 64) -> Clip:
    """A clip of `combo` with a random size, speed and start that keep the shape fully visible throughout."""
    check_size(frames, height, width)
    size = float(rng.choice(SIZES))
    speed = float(rng.choice(SPEEDS))
    radius = size * min(height, width) / 2.0
    margin = MARGIN * min(height, width)
    dx, dy = DIRECTION_VECTORS[combo.direction]
    extent = width if dx else height
    # Free span of the centre along the motion; a speed that does not fit is slowed down to fit.
    span = max(extent - 2 * (radius + margin), 0.0)
    travel = min(speed * extent, span)
    speed = travel / extent

    def position(length: float, moving: float, sign: float) -> float:
        low, high = radius + margin, length - radius - margin - moving
        if high < low:  # no room (a path as long as the free span, by rounding, or a shape too large): centre the
            p = (length - moving) / 2.0  # path (this draws nothing, as before, so seeded datasets stay the same)
        else:
            p = float(rng.uniform(low, high))
        return p + moving if sign < 0 else p  # moving left/up: start at the far end

    x = position(width, travel if dx else 0.0, dx)
    y = position(height, travel if dy else 0.0, dy)
    return Clip(shape=combo.shape, colour=combo.colour, direction=combo.direction, background=combo.background,
                speed=speed, size=size, start=(x / width, y / height), frames=frames, height=height, width=width)


def centred(clip: Clip) -> Clip:
    """The same clip (shape, colours, size, speed, direction) with its path centred in the frame: the start is what
    the path's length leaves, so the shape passes through the middle half-way through the clip."""
    dx, dy = DIRECTION_VECTORS[clip.direction]
    return replace(clip, start=(0.5 - dx * clip.speed / 2, 0.5 - dy * clip.speed / 2))


def dataset_clips(n: int, seed: int = 0, frames: int = 9, height: int = 64, width: int = 64,
                  split: str = "train") -> list[Clip]:
    """The n clips of a dataset, deterministic for (seed, split, size); the first k of n are the clips of n=k.

    Combos are dealt in rounds: each round is a seeded permutation of the split's combos, so any n >= the number of
    combos covers every combo and counts stay balanced. Each clip's size, speed and start come from its own seeded
    generator.
    """
    if n < 0:
        raise CogVXError(f"n={n}: the number of clips cannot be negative.")
    combos = combos_for(split)
    tag = SPLITS.index(split)
    clips = []
    for i in range(n):
        round_, slot = divmod(i, len(combos))
        order = np.random.default_rng([seed, tag, 0, round_]).permutation(len(combos))
        rng = np.random.default_rng([seed, tag, 1, i])
        clips.append(random_clip(combos[order[slot]], rng, frames, height, width))
    return clips


def make_dataset(out: str | Path, n: int, seed: int = 0, frames: int = 9, height: int = 64, width: int = 64,
                 split: str = "train", video_format: str = "png") -> list[Path]:
    """Writes n clips to the folder `out` in the trainer's layout and returns the clip paths.

    Per clip: `00000/` (lossless PNG frames 00000.png, ...) or `00000.mp4` (video_format="mp4", H.264; lossy on
    colour edges, so PNG is the default), and `00000.txt` with its caption. `clips.jsonl` lists every clip's full
    spec and caption (ground truth for the analyser). Deterministic for a seed. A folder written before by
    make_dataset is replaced (only the clips its clips.jsonl lists are removed); any other non-empty folder is refused.
    """
    import shutil

    from ..video_io import write_frames

    if video_format not in ("png", "mp4"):
        raise CogVXError(f"video_format {video_format!r}: choose png (a folder of frames per clip) or mp4.")
    out = Path(out)
    index = out / "clips.jsonl"
    if index.is_file():  # an earlier synthetic dataset: remove its clips so none is left over from a larger run
        for line in index.read_text(encoding="utf-8").splitlines():
            name = json.loads(line)["name"]
            shutil.rmtree(out / name, ignore_errors=True)
            for suffix in (".mp4", ".txt"):
                (out / (name + suffix)).unlink(missing_ok=True)
        index.unlink()
    if out.is_dir() and any(out.iterdir()):
        raise CogVXError(f"{out} is not empty and holds no synthetic dataset; write to a new or empty folder so no "
                         "other files are mixed into the dataset.")
    out.mkdir(parents=True, exist_ok=True)
    paths, lines = [], []
    for i, clip in enumerate(dataset_clips(n, seed, frames, height, width, split)):
        name = f"{i:05d}"
        target = out / (name + ".mp4" if video_format == "mp4" else name)
        paths.append(write_frames(render(clip), target, fps=8))
        text = caption(clip)
        _write_text(out / f"{name}.txt", text + "\n")
        lines.append(json.dumps({"name": name, "caption": text, **clip.to_dict()}))
    _write_text(out / "clips.jsonl", "".join(line + "\n" for line in lines))
    return paths


def _write_text(path: Path, text: str) -> None:
    """A caption or index file, whole or not at all (a kill mid-write leaves no half caption)."""
    from ..safe_write import atomic_path

    with atomic_path(path) as tmp:
        tmp.write_text(text, encoding="utf-8")
