"""Reading and writing frames: video files (mp4, webm, gif through imageio-ffmpeg / pillow), PNG frame folders, images.

Frames are float tensors (T, H, W, 3) in [0, 1], ComfyUI's IMAGE layout.
"""

from __future__ import annotations

import errno
from pathlib import Path

import numpy as np
import torch
from PIL import Image

from .checks import check_frames, image_notes
from .errors import CogVXError
from .safe_write import atomic_path, check_fps, check_writable, fresh_folder, write_error

VIDEO_SUFFIXES = (".mp4", ".webm", ".gif", ".mov", ".mkv", ".avi")
IMAGE_SUFFIXES = (".png", ".jpg", ".jpeg", ".webp", ".bmp")


def to_uint8(frames: torch.Tensor) -> np.ndarray:
    """(T, H, W, 3) in [0, 1] -> uint8, rounded as PIL/diffusers' numpy_to_pil does ((x * 255).round())."""
    return (frames.detach().float().clamp(0, 1).cpu().numpy() * 255).round().astype(np.uint8)


def write_frames(frames: torch.Tensor, out: str | Path, fps: float = 8) -> Path:
    """Writes (T, H, W, 3) frames: .mp4/.webm/.gif as a video, any other path as a folder of lossless PNGs. Returns
    the path written: a video is complete under its name or not there (the previous file stays); frames go to a new
    folder, or to a numbered sub-folder of one that has files already (see safe_write.fresh_folder)."""
    out = Path(out)
    fps = check_fps(fps)
    check_frames(frames, "frames to write")
    check_writable(out)
    data = to_uint8(frames)
    suffix = out.suffix.lower()
    if suffix in (".mp4", ".webm", ".gif"):
        with atomic_path(out) as tmp:
            _encode(data, tmp, fps, out)
        return out
    out = fresh_folder(out)
    with atomic_path(out) as tmp:
        tmp.mkdir()
        for i, frame in enumerate(data):
            Image.fromarray(frame).save(tmp / f"{i:05d}.png")
    return out


def _encode(data: np.ndarray, path: Path, fps: float, name: Path) -> None:
    """(T, H, W, 3) uint8 -> a video file; an encoder failure is a CogVXError naming the file and the cause."""
    suffix = path.suffix.lower()
    try:
        if suffix == ".gif":
            Image.fromarray(data[0]).save(path, save_all=True, append_images=[Image.fromarray(f) for f in data[1:]],
                                          duration=max(1, round(1000 / fps)), loop=0)
        else:
            import imageio.v2 as imageio

            codec = "libvpx-vp9" if suffix == ".webm" else "libx264"
            with imageio.get_writer(path, fps=fps, codec=codec, quality=8, macro_block_size=1) as writer:
                for frame in data:
                    writer.append_data(frame)
    except OSError as e:  # a full disk kills ffmpeg: the pipe breaks
        raise (_encode_failed(name, e) if e.errno in (None, errno.EPIPE) else write_error(name, e)) from None
    except (RuntimeError, ValueError) as e:  # imageio-ffmpeg reports a dead ffmpeg as these
        raise _encode_failed(name, e) from None


def _encode_failed(name: Path, error: BaseException) -> CogVXError:
    text = str(error).strip().splitlines()
    first = text[0][:200] if text else type(error).__name__
    return CogVXError(f"{name}: {name.suffix} encoding failed ({first}); nothing was written. Write a folder of PNG "
                      "frames instead (an --out without a video suffix), or check the disk.")


def read_image(path: str | Path) -> Image.Image:
    path = Path(path)
    if not path.is_file():
        raise CogVXError(f"{path}: no such image file.")
    try:
        return Image.open(path).convert("RGB")
    except Exception as e:  # PIL raises many types for bad files
        raise CogVXError(f"{path}: cannot read this image ({e}); use a PNG or JPEG file.")


def read_image_notes(path: str | Path, target: tuple[int, int] | None = None) -> list[str]:
    """checks.image_notes for an image file, read with its alpha and gray channels (read_image drops them)."""
    with Image.open(path) as image:
        if image.mode not in ("L", "LA", "RGB", "RGBA"):
            image = image.convert("RGBA" if image.mode in ("P", "PA") or "transparency" in image.info else
                                  "L" if image.mode in ("1", "I", "I;16", "F") else "RGB")
        array = np.asarray(image).astype(np.float32) / 255.0
    pixels = torch.from_numpy(array.reshape(*array.shape[:2], -1))  # (H, W, C)
    return image_notes(pixels, target)


def read_frames(path: str | Path) -> torch.Tensor:
    """A video file or a folder of image frames (sorted by name) -> (T, H, W, 3) float in [0, 1]."""
    path = Path(path)
    if path.is_dir():
        files = sorted(p for p in path.iterdir() if p.suffix.lower() in IMAGE_SUFFIXES)
        if not files:
            raise CogVXError(f"{path}: this folder has no image frames ({', '.join(IMAGE_SUFFIXES)}).")
        arrays = [np.asarray(read_image(f)) for f in files]
        if len({a.shape for a in arrays}) > 1:
            raise CogVXError(f"{path}: the frames have different sizes; every frame must have the same size.")
        data = np.stack(arrays)
    elif path.is_file():
        if path.suffix.lower() not in VIDEO_SUFFIXES:
            raise CogVXError(f"{path}: not a video file ({', '.join(VIDEO_SUFFIXES)}) or a folder of frames.")
        try:
            import imageio.v2 as imageio

            decoded = [np.asarray(f)[..., :3] for f in imageio.mimread(path, memtest=False)]
        except Exception as e:
            raise CogVXError(f"{path}: cannot decode this video ({e}); the file may be corrupt.")
        if not decoded:
            raise CogVXError(f"{path}: this video has no frames; use a video with at least one frame.")
        data = np.stack(decoded)
    else:
        raise CogVXError(f"{path}: no such video file or frame folder.")
    return torch.from_numpy(data).float() / 255.0


def pil_to_model_input(image: Image.Image, height: int, width: int) -> torch.Tensor:
    """A PIL image -> (3, H, W) in [-1, 1], resized with Lanczos as the reference's image processor does."""
    if image.size != (width, height):
        image = image.resize((width, height), resample=Image.LANCZOS)
    array = np.asarray(image.convert("RGB")).astype(np.float32) / 255.0
    return torch.from_numpy(array).permute(2, 0, 1) * 2.0 - 1.0


def frames_to_model_input(frames: torch.Tensor, height: int, width: int) -> torch.Tensor:
    """(T, H, W, 3) in [0, 1] -> (3, T, height, width) in [-1, 1], each frame resized like an image if needed."""
    if frames.shape[1:3] != (height, width):
        out = [pil_to_model_input(Image.fromarray(f), height, width) for f in to_uint8(frames)]
        return torch.stack(out, dim=1)
    return frames.permute(3, 0, 1, 2).float() * 2.0 - 1.0


def model_output_to_frames(pixels: torch.Tensor) -> torch.Tensor:
    """VAE output (B, 3, T, H, W), about [-1, 1] -> frames (B, T, H, W, 3) float32 in [0, 1], as the reference's
    video processor post-processes it."""
    return (pixels / 2 + 0.5).clamp(0, 1).permute(0, 2, 3, 4, 1).float()
