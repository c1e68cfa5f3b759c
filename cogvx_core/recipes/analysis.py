"""The deterministic judge of synthetic clips: which colour, shape and motion a video shows, and how much it flickers.

`analyse(frames)` reads a (T, H, W, 3) clip with no learned parts:

1. background: the median colour of the frame borders over all frames. Most of the border must be close to it,
   otherwise nothing is judged (random noise, textured scenes -> "unknown").
2. object: each pixel's `alpha` = its projection on the line from the background colour to the object's colour
   (0 background, 1 object), so blur, edges and noise only move a pixel along or slightly off that line. The object's
   colour is seeded from the pixels far from the background and refined from its most saturated fifth. The object
   mask is the half-way level set (alpha > 0.5, which blur barely moves on straight edges), reduced per frame to the
   connected blob around the strongest response (stray artefacts do not count).
3. colour: the nearest named colour (`synthetic.PALETTE`) to the object's colour; trusted only when the object's core
   is of one colour (a patch of random noise is not).
4. direction: the blob centroid's displacement from the first to the last frame, read off a least-squares line through
   the centroids of all frames (one bad frame cannot flip it); the dominant axis and its sign, "static" below a
   minimum displacement.
5. shape: per frame, an ideal circle, square and triangle (4 orientations), each blurred, is fitted to the object's
   alpha: the area and second moments fix the box and the blur of each hypothesis (a Gaussian blur keeps the area and
   adds sigma^2 to both variances), and the fit is 1 - relative squared error. Fill ratio of the box (circle pi/4,
   square 1, triangle 1/2) and corners are thereby both checked, and a blurred square is compared with a blurred
   circle, not with a sharp one. The clearest third of the frames (least soft edges) decide; the answer is trusted
   when the runner-up fits clearly worse and the blur is small against the object (a shape blurred to a blob has no
   shape).

Every attribute has a confidence in [0, 1]; below `MIN_CONFIDENCE` the answer is "unknown": the judge refuses
rather than guesses. `judge(frames, caption)` compares an analysis with a caption of `synthetic.caption`'s form;
`flicker(frames)` is the CogVideoX paper's flickering measure.
"""

from __future__ import annotations

import math
import re

import numpy as np
import torch
import torch.nn.functional as F

from ..errors import CogVXError
from .synthetic import COLOUR_NAMES, DIRECTIONS, PALETTE, SHAPES, UNSEEN_SHAPE_COLOURS, coverage

UNKNOWN = "unknown"
STATIC = "static"
ATTRIBUTES = ("background", "colour", "shape", "direction")
MIN_CONFIDENCE = 0.25  # an attribute below this confidence is reported as "unknown"

BORDER_TOLERANCE = 0.2  # RGB distance within which a border pixel counts as background
MIN_UNIFORMITY = 0.6  # share of the border that must be background for anything to be judged
FAR_FROM_BACKGROUND = 0.25  # RGB distance of the pixels that seed the object's colour estimate
MAX_NAME_DISTANCE = 0.45  # a colour farther than this from every named colour has no name
MIN_AREA_FRACTION = 0.002  # an object smaller than this share of the frame is absent from that frame
MIN_DISPLACEMENT = 0.06  # first-to-last displacement (fraction of the frame) below which the object is static
ALPHA_FLOOR = 0.1  # alpha below this is background on both sides of a shape fit (keeps noise out of the moments)

# Moments of the ideal shapes inscribed in a box of half-extents (rx, ry), per (shape, apex direction):
# area = A * rx * ry, variance along x = kx * rx^2, along y = ky * ry^2, centroid - box centre = (ox * rx, oy * ry).
SHAPE_MOMENTS = {
    ("circle", "up"): (math.pi, 1 / 4, 1 / 4, 0.0, 0.0),
    ("square", "up"): (4.0, 1 / 3, 1 / 3, 0.0, 0.0),
    ("triangle", "up"): (2.0, 1 / 6, 2 / 9, 0.0, 1 / 3),
    ("triangle", "down"): (2.0, 1 / 6, 2 / 9, 0.0, -1 / 3),
    ("triangle", "left"): (2.0, 2 / 9, 1 / 6, 1 / 3, 0.0),
    ("triangle", "right"): (2.0, 2 / 9, 1 / 6, -1 / 3, 0.0),
}


def _as_numpy(frames) -> np.ndarray:
    """(T, H, W, 3) tensor or array, float in [0, 1] or uint8 -> float32 numpy in [0, 1]."""
    if isinstance(frames, torch.Tensor):
        frames = frames.detach().cpu()
        frames = frames.numpy() if frames.dtype == torch.uint8 else frames.float().numpy()
    frames = np.asarray(frames)
    if frames.ndim == 3:  # a single image
        frames = frames[None]
    if frames.ndim != 4 or frames.shape[-1] != 3 or min(frames.shape[1:3]) < 8:
        raise CogVXError(f"frames of shape {tuple(frames.shape)}: expected (T, H, W, 3) RGB frames of at least 8x8 "
                         "pixels (ComfyUI's IMAGE layout); move the channel axis last.")
    if frames.dtype == np.uint8:
        return frames.astype(np.float32) / 255.0
    return np.clip(frames.astype(np.float32), 0.0, 1.0)


def name_colour(rgb) -> tuple[str, float]:
    """The nearest named colour and a confidence from its margin over the second nearest (0 when equidistant)."""
    names = tuple(PALETTE)
    table = np.asarray([PALETTE[n] for n in names], dtype=np.float32)  # (N, 3)
    distance = np.linalg.norm(table - np.asarray(rgb, dtype=np.float32)[None], axis=1)
    order = np.argsort(distance)
    d1, d2 = float(distance[order[0]]), float(distance[order[1]])
    if d1 > MAX_NAME_DISTANCE:
        return UNKNOWN, 0.0
    confidence = min(1.0, 2.0 * (d2 - d1) / (d2 + d1 + 1e-6)) * min(1.0, (MAX_NAME_DISTANCE - d1) / 0.2)
    return names[int(order[0])], max(0.0, confidence)


def _border(x: np.ndarray) -> np.ndarray:
    """(N, 3) pixels of the outer ring (about 1/32 of the frame wide) of every frame."""
    _, h, w, _ = x.shape
    b = max(1, round(min(h, w) / 32))
    ring = np.ones((h, w), dtype=bool)
    ring[b:h - b, b:w - b] = False
    return x[:, ring]


def _dilate(mask: np.ndarray) -> np.ndarray:
    """(T, H, W) boolean mask grown by one pixel in all 8 directions."""
    grown = mask.copy()
    grown[:, 1:] |= mask[:, :-1]
    grown[:, :-1] |= mask[:, 1:]
    out = grown.copy()
    out[:, :, 1:] |= grown[:, :, :-1]
    out[:, :, :-1] |= grown[:, :, 1:]
    return out


def _main_blob(alpha: np.ndarray, mask: np.ndarray) -> np.ndarray:
    """(T, H, W) mask reduced per frame to the 8-connected blob holding the strongest (3x3-smoothed) response."""
    t = len(mask)
    smooth = F.avg_pool2d(torch.from_numpy(alpha)[:, None], 3, stride=1, padding=1, count_include_pad=False)
    blob = np.zeros_like(mask)
    blob.reshape(t, -1)[np.arange(t), smooth.flatten(1).argmax(dim=1).numpy()] = True
    blob &= mask
    while True:  # grow the seed inside the mask until it stops changing (geodesic reconstruction)
        grown = _dilate(blob) & mask
        if np.array_equal(grown, blob):
            return blob
        blob = grown


def _gaussian_matrix(n: int, sigma: float) -> np.ndarray:
    """(n, n) matrix that blurs a length-n signal with a normalised Gaussian (identity for sigma < 0.3 px)."""
    if sigma < 0.3:
        return np.eye(n)
    d = np.arange(n)[:, None] - np.arange(n)[None, :]
    taps = np.arange(-int(4 * sigma) - 1, int(4 * sigma) + 2)
    return np.exp(-d * d / (2 * sigma * sigma)) / np.exp(-taps * taps / (2 * sigma * sigma)).sum()


def _object_window(alpha: np.ndarray, blob: np.ndarray, others: np.ndarray) -> dict | None:
    """One frame's object cut out with a margin for its blur halo: {"alpha": crop with other blobs removed,
    "fill": fill ratio of the blob's box, "softness": share of half-tone pixels (lower is clearer)}, or None when
    the object is cut by the frame edge (its box is then not its shape's box)."""
    h, w = blob.shape
    ys, xs = np.nonzero(blob)
    y0, y1, x0, x1 = ys.min(), ys.max() + 1, xs.min(), xs.max() + 1
    if (y1 - y0) < 3 or (x1 - x0) < 3:
        return None
    # Cut off = the object's full-strength core reaches the frame edge (a blurred halo touching it is fine).
    edge = np.concatenate([alpha[0, x0:x1], alpha[h - 1, x0:x1], alpha[y0:y1, 0], alpha[y0:y1, w - 1]])
    if edge.max() > 0.85:
        return None
    pad = 3 + max(y1 - y0, x1 - x0) // 4
    window = (slice(max(0, y0 - pad), min(h, y1 + pad)), slice(max(0, x0 - pad), min(w, x1 + pad)))
    crop = np.where(others[window], 0.0, alpha[window]).astype(np.float64)
    area = blob[y0:y1, x0:x1].sum()
    softness = float(((crop > 0.15) & (crop < 0.85)).sum() / area)
    return {"alpha": crop, "fill": float(area / ((y1 - y0) * (x1 - x0))), "softness": softness}


def _shape_errors(crop: np.ndarray, noise_var: float) -> dict[str, float]:
    """How badly a blurred ideal circle, square and triangle explain an object's alpha (0 = perfectly).

    Noisy frames are first smoothed just enough to tame the noise (the fit models blur anyway). For each hypothesis
    the box size and the blur are solved from the object's area and second moments (a Gaussian blur keeps the area
    and adds sigma^2 to both variances); the error is the relative squared difference to that blurred template, less
    the share the remaining pixel noise explains.
    """
    pre = min(1.5, math.sqrt(noise_var / (4 * math.pi * 0.03 ** 2)))  # leaves ~0.03 alpha noise per pixel
    a = _gaussian_matrix(crop.shape[0], pre) @ crop @ _gaussian_matrix(crop.shape[1], pre).T
    a = np.clip(a, 0.0, 1.0)
    a[a < ALPHA_FLOOR] = 0.0
    noise_var = noise_var / (4 * math.pi * pre * pre) if pre >= 0.3 else noise_var
    hh, ww = a.shape
    m = a.sum()
    yy, xx = np.arange(hh) + 0.5, np.arange(ww) + 0.5  # pixel centres
    mx, my = (a.sum(axis=0) @ xx) / m, (a.sum(axis=1) @ yy) / m
    vx, vy = (a.sum(axis=0) @ (xx - mx) ** 2) / m, (a.sum(axis=1) @ (yy - my) ** 2) / m
    norm = (a * a).sum()
    noise_share = noise_var * float((a > 0).sum()) / norm
    errors = {}
    for (shape, orientation), (area_k, kx, ky, ox, oy) in SHAPE_MOMENTS.items():
        def box(sigma: float) -> tuple[float, float]:
            return math.sqrt(max(vx - sigma * sigma, 1e-6) / kx), math.sqrt(max(vy - sigma * sigma, 1e-6) / ky)

        # Blur spreads the moments: the blur is the sigma whose un-blurred box has the measured area.
        low, high = 0.0, math.sqrt(min(vx, vy))
        if area_k * math.prod(box(0.0)) > m:
            for _ in range(30):
                mid = (low + high) / 2
                low, high = (mid, high) if area_k * math.prod(box(mid)) > m else (low, mid)
        rx, ry = box(low)
        template = coverage(shape, hh, ww, mx - ox * rx, my - oy * ry, rx, ry, orientation, supersample=4)
        template = _gaussian_matrix(hh, low) @ template.astype(np.float64) @ _gaussian_matrix(ww, low).T
        template[template < ALPHA_FLOOR] = 0.0
        error = max(0.0, float(((a - template) ** 2).sum() / norm) - noise_share)
        if error < errors.get(shape, (math.inf, 0.0))[0]:
            errors[shape] = (error, low / min(rx, ry))
    return errors


def analyse(frames) -> dict:
    """What a synthetic clip shows. frames: (T, H, W, 3), float in [0, 1] or uint8 (a tensor or an array).

    Returns {"background", "colour", "shape": a name or "unknown", "direction": left/right/up/down, "static" or
    "unknown", "confidence": {attribute: float in [0, 1]}, "details": {the measurements behind the answers}}.
    """
    x = _as_numpy(frames)  # (T, H, W, 3)
    t, h, w, _ = x.shape
    result = {**{k: UNKNOWN for k in ATTRIBUTES}, "confidence": {k: 0.0 for k in ATTRIBUTES}, "details": {}}
    conf, details = result["confidence"], result["details"]

    # 1. Background: the border's median colour, trusted only when most of the border is close to it.
    border = _border(x).reshape(-1, 3)
    bg = np.median(border, axis=0)
    uniformity = float((np.linalg.norm(border - bg, axis=1) < BORDER_TOLERANCE).mean())
    details.update(background_rgb=bg.round(3).tolist(), border_uniformity=round(uniformity, 3))
    if uniformity < MIN_UNIFORMITY:
        return result  # no plain background: not a synthetic clip
    plain = min(1.0, (uniformity - MIN_UNIFORMITY) / 0.25)
    bg_name, bg_conf = name_colour(bg)
    conf["background"] = bg_conf * plain

    # 2. Object: alpha along the background -> object colour line, seeded from the pixels far from the background.
    far = np.linalg.norm(x - bg, axis=-1) > FAR_FROM_BACKGROUND  # (T, H, W)
    min_area = max(4, int(MIN_AREA_FRACTION * h * w))
    fg = np.median(x[far], axis=0) if far.sum() >= min_area else None
    if fg is not None:
        for _ in range(2):  # refine: the object's colour is its most saturated fifth, where blur mixes in least
            axis = fg - bg
            alpha = ((x - bg) @ axis) / max(float(axis @ axis), 1e-6)  # (T, H, W)
            inside = alpha[alpha > 0.5]
            if inside.size < min_area:
                break
            core = x[alpha >= np.quantile(inside, 0.8)]  # (N, 3)
            fg = np.median(core, axis=0)
        # A real object has one colour: the core's spread around it (noise ~0.08) must stay small.
        spread = float(np.median(np.linalg.norm(core - fg, axis=1))) if inside.size >= min_area else 1.0
        axis = fg - bg
        alpha = (((x - bg) @ axis) / max(float(axis @ axis), 1e-6)).astype(np.float32)
        mask = _main_blob(alpha, alpha > 0.5)  # (T, H, W)
        area = mask.reshape(t, -1).sum(axis=1)
        present = area >= min_area
        details.update(colour_rgb=fg.round(3).tolist(), colour_spread=round(spread, 3),
                       frames_with_object=int(present.sum()))
    if fg is None or present.sum() < max(1, t // 2):
        _finish(result, bg_name)
        return result  # a plain background, or an object missing from most frames
    area_fraction = float(area[present].mean() / (h * w))
    details["area_fraction"] = round(area_fraction, 4)
    # An object covering most of the frame is no shape on a background (a colour wash, a scene change).
    small = 1.0 if area_fraction < 0.35 else max(0.0, (0.6 - area_fraction) / 0.25)
    trust = plain * small

    # 3. Colour: the object colour's nearest name.
    colour_name, colour_conf = name_colour(fg)
    uniform_colour = min(1.0, max(0.0, (0.25 - spread) / 0.12))
    conf["colour"] = colour_conf * uniform_colour * trust * float(present.mean())

    # 4. Direction: the centroid line's displacement from the first to the last frame, in fractions of the frame.
    index = np.nonzero(present)[0]
    blob = mask[present].astype(np.float64)  # (K, H, W)
    cy = (blob.sum(axis=2) @ np.arange(h)) / area[present]
    cx = (blob.sum(axis=1) @ np.arange(w)) / area[present]
    direction = UNKNOWN
    if len(index) >= 2:
        dx = np.polyfit(index, cx, 1)[0] * (t - 1) / w
        dy = np.polyfit(index, cy, 1)[0] * (t - 1) / h
        major, minor = max(abs(dx), abs(dy)), min(abs(dx), abs(dy))
        details["displacement"] = [round(float(dx), 4), round(float(dy), 4)]
        if major < MIN_DISPLACEMENT:
            direction = STATIC
            conf["direction"] = min(1.0, (MIN_DISPLACEMENT - major) / (MIN_DISPLACEMENT / 2)) * trust
        else:
            direction = ("right" if dx > 0 else "left") if abs(dx) >= abs(dy) else ("down" if dy > 0 else "up")
            strength = min(1.0, (major - MIN_DISPLACEMENT) / MIN_DISPLACEMENT)
            straight = min(1.0, max(0.0, (0.7 - minor / major) / 0.4))  # a diagonal has no single direction name
            conf["direction"] = strength * straight * trust

    # 5. Shape: blurred-template fits in the clearest third of the frames.
    shape = UNKNOWN
    border_alpha = ((_border(x) - bg) @ axis).ravel() / max(float(axis @ axis), 1e-6)
    noise_var = float((1.4826 * np.median(np.abs(border_alpha - np.median(border_alpha)))) ** 2)
    others = (alpha > 0.5) & ~mask
    windows = [wd for wd in (_object_window(alpha[i], mask[i], others[i]) for i in index) if wd is not None]
    if windows:
        clearest = sorted(windows, key=lambda wd: wd["softness"])[: max(1, len(windows) // 3)]
        per_frame = [_shape_errors(wd["alpha"], noise_var) for wd in clearest]
        errors = {s: float(np.mean([e[s][0] for e in per_frame])) for s in SHAPES}
        blur = {s: float(np.mean([e[s][1] for e in per_frame])) for s in SHAPES}
        ranked = sorted(SHAPES, key=errors.get)
        e1, e2 = errors[ranked[0]], errors[ranked[1]]
        details.update(shape_error={s: round(e, 4) for s, e in errors.items()}, shape_blur=round(blur[ranked[0]], 3),
                       fill_ratio=round(float(np.mean([f["fill"] for f in clearest])), 3))
        separation = min(1.0, max(0.0, ((e2 + 0.004) / (e1 + 0.004) - 1.0) / 0.6))  # runner-up clearly worse
        fitness = min(1.0, max(0.0, (0.3 - e1) / 0.15))  # and the winner actually fits
        resolved = min(1.0, max(0.0, (0.42 - blur[ranked[0]]) / 0.12))  # blur small against the object's size
        conf["shape"] = separation * fitness * resolved * trust
        shape = ranked[0]

    _finish(result, bg_name, colour_name, shape, direction)
    return result


def _finish(result: dict, background: str, colour: str = UNKNOWN, shape: str = UNKNOWN,
            direction: str = UNKNOWN) -> None:
    """Names below MIN_CONFIDENCE become "unknown"; confidences are rounded for printing."""
    for key, name in zip(ATTRIBUTES, (background, colour, shape, direction)):
        c = round(float(result["confidence"][key]), 4)
        result["confidence"][key] = c
        result[key] = name if c >= MIN_CONFIDENCE else UNKNOWN


_CAPTION = re.compile(r"^an? (?P<colour>\w+) (?P<shape>\w+) moves (?P<direction>to the left|to the right|up|down) "
                      r"on an? (?P<background>\w+) background\.?$")
_DIRECTION_WORDS = {"to the left": "left", "to the right": "right", "up": "up", "down": "down"}


def parse_caption(text: str) -> dict:
    """'a red circle moves to the left on a black background' -> {colour, shape, direction, background}."""
    match = _CAPTION.match(" ".join(text.strip().lower().split()))
    if not match:
        raise CogVXError(f"caption {text!r} is not of the synthetic form 'a {{colour}} {{shape}} moves {{to the left|"
                         "to the right|up|down}} on a {background} background'; write it in that form.")
    parsed = dict(match.groupdict())
    parsed["direction"] = _DIRECTION_WORDS[parsed["direction"]]
    for slot, choices in (("colour", COLOUR_NAMES + UNSEEN_SHAPE_COLOURS), ("shape", SHAPES),
                          ("direction", DIRECTIONS), ("background", tuple(PALETTE))):
        if parsed[slot] not in choices:
            raise CogVXError(f"caption {text!r}: unknown {slot} {parsed[slot]!r}; the judge knows "
                             f"{', '.join(choices)}.")
    return parsed


def judge(frames, caption: str) -> dict:
    """A clip against its caption: {"colour", "shape", "direction", "background": bool, "all": colour and shape and
    direction (prompt adherence; the background is reported apart), "analysis": analyse(frames)}.
    An "unknown" answer is never right."""
    expected = parse_caption(caption)
    found = analyse(frames)
    verdict = {key: found[key] == expected[key] for key in ("colour", "shape", "direction", "background")}
    verdict["all"] = verdict["colour"] and verdict["shape"] and verdict["direction"]
    verdict["analysis"] = found
    return verdict


def flicker(frames) -> float:
    """The CogVideoX paper's flickering measure: the L1 difference between each pair of adjacent frames.

    Yang et al., "CogVideoX: Text-to-Video Diffusion Models with an Expert Transformer" (ICLR 2025, arXiv:2408.06072),
    Table 1: "Flickering calculates the L1 difference between each pair of adjacent frames to evaluate the degree of
    flickering in the video" (lower is better). The paper states neither the pixel scale nor the reduction; here

        flicker = 1/(T-1) * sum_{t=1..T-1} mean_{h,w,c} |x_t - x_{t-1}|,   x in 8-bit units [0, 255],

    the mean absolute per-pixel change between consecutive frames. Real motion counts as well, as in the paper, so
    compare clips with the same content (a reconstruction with its source, two models on the same prompts).
    frames: (T, H, W, C), float in [0, 1] or uint8. A single frame has no pairs: 0.0.
    """
    if isinstance(frames, torch.Tensor):
        frames = frames.detach().cpu().numpy()
    frames = np.asarray(frames)
    if frames.ndim != 4:
        raise CogVXError(f"frames of shape {tuple(frames.shape)}: expected (T, H, W, C) frames.")
    x = frames.astype(np.float64) if frames.dtype == np.uint8 else frames.astype(np.float64) * 255.0
    if x.shape[0] < 2:
        return 0.0
    return float(np.abs(np.diff(x, axis=0)).mean())
