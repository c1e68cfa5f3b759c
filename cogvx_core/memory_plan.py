"""The memory planner: peak device memory of each stage of a request (text encoding, sampling, decode), before
anything is loaded. It drives `--offload auto`, the decode's tile size and `generate --plan`.

A stage's peak = the weights on the device during the stage + the activations of its largest moment:
  weights      exact: the models are built on the meta device and their tensors counted in their storage dtypes;
  sampling     one transformer call (`transformer.forward_activation_bytes`: the peak is inside a block's
               feed-forward) plus the sampler's latents;
  decode       per tile, the decoder's largest moment is at full resolution, in the first resnet of its last up
               block; it is counted in (B, frames of one chunk, H, W) "pixel units" times channels (see
               `DECODE_FRAME_UNITS`), plus the frame caches of the causal convs and the output video;
  text         T5's weights and a rough bound of its activations for one batch of prompts (~85 MiB for T5-XXL).
Predictions are checked against measured peaks in tests (CPU, live-tensor bytes; sampling within 2%, decode within
4%) and by `bench-gpu` (CUDA, torch.cuda.max_memory_allocated).
"""

from __future__ import annotations

import json
import math
import weakref
from dataclasses import asdict, dataclass, field, replace

import torch

from .errors import CogVXError
from .vae import Tiling, decode_tile_layout

GiB = 1024**3
T5_XXL = dict(vocab_size=32128, d_model=4096, d_kv=64, d_ff=10240, num_layers=24, num_heads=64,
              feed_forward_proj="gated-gelu", relative_attention_num_buckets=32)
MARGIN = 256 * 1024**2  # kept free beside the predicted peak: allocator rounding, cuBLAS / cuDNN workspaces


# ---------------------------------------------------------------------------------------------------------------
# Measuring (CPU and CUDA)
# ---------------------------------------------------------------------------------------------------------------
class LiveBytes(torch.utils._python_dispatch.TorchDispatchMode):
    """Counts the bytes of tensor storages created inside it that are still alive, and their peak: the activation
    memory of a CPU run (where torch has no allocator statistics). Kernels' internal scratch is not seen."""

    def __init__(self):
        super().__init__()
        self.current = self.peak = 0
        self._live: set[int] = set()
        self._outside: set[int] = set()  # storages made before (weights, inputs): their views are not new memory

    def _free(self, key: int, nbytes: int) -> None:
        self._live.discard(key)
        self.current -= nbytes

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        for t in torch.utils._pytree.tree_leaves((args, kwargs)):
            if isinstance(t, torch.Tensor) and t.device.type != "meta":
                key = t.untyped_storage().data_ptr()
                if key not in self._live:
                    self._outside.add(key)
        out = func(*args, **(kwargs or {}))
        for t in torch.utils._pytree.tree_leaves(out):
            if isinstance(t, torch.Tensor) and t.device.type != "meta":
                storage = t.untyped_storage()
                key = storage.data_ptr()
                if key in self._live or key in self._outside or storage.nbytes() == 0:
                    continue  # a view, an in-place result or a tensor made outside: not new memory
                self._live.add(key)
                self.current += storage.nbytes()
                self.peak = max(self.peak, self.current)
                weakref.finalize(storage, self._free, key, storage.nbytes())
        return out


# ---------------------------------------------------------------------------------------------------------------
# The request and its plan
# ---------------------------------------------------------------------------------------------------------------
@dataclass(frozen=True)
class Request:
    """What a run needs memory for. Configs are diffusers config dicts (T5: a T5Config dict, default T5-XXL).

    weight_dtype / text_weight_dtype: an fp8 dtype stores the big matmul weights in it (None: `dtype`).
    offload: none | model | blocks; resident/prefetch: block streaming; text_device: "device" or "cpu";
    tile: (height, width) of the decode's pixel tiles, None for an untiled decode.
    """

    transformer_config: dict
    vae_config: dict
    frames: int
    height: int
    width: int
    batch: int = 1
    cfg: bool = True
    dtype: torch.dtype = torch.bfloat16
    weight_dtype: torch.dtype | None = None
    text_config: dict | None = None
    text_weight_dtype: torch.dtype | None = None
    text_device: str = "device"
    offload: str = "none"
    resident: int = 0
    prefetch: int = 1
    tile: tuple[int, int] | None = None
    text_length: int = 226


@dataclass
class Stage:
    name: str
    where: str  # what is on the device, in words
    weights: int  # bytes of weights on the device during the stage
    activations: int  # bytes of the stage's largest moment

    @property
    def peak(self) -> int:
        return self.weights + self.activations


@dataclass
class Plan:
    request: Request
    stages: list[Stage] = field(default_factory=list)

    @property
    def peak(self) -> int:
        return max(s.peak for s in self.stages)

    def stage(self, name: str) -> Stage:
        return next(s for s in self.stages if s.name == name)

    def fits(self, budget: int) -> bool:
        return self.peak + MARGIN <= budget

    def decode_kwargs(self) -> dict:
        """The decode's tile settings as `CogVideoXPipeline.generate` / `CausalVAE.decode` take them."""
        tile = self.request.tile
        return {} if tile is None else dict(tiling=Tiling(tile_height=tile[0], tile_width=tile[1]))

    def describe(self) -> str:
        r = self.request
        mode = r.offload + (f" ({r.resident} resident, prefetch {r.prefetch})" if r.offload == "blocks" else "")
        return (f"offload {mode}, {str(r.dtype).removeprefix('torch.')}"
                f"{', fp8 weights' if r.weight_dtype else ''}, T5 {'on the CPU' if r.text_device == 'cpu' else ''}"
                f"{'fp8' if r.text_weight_dtype and r.text_device != 'cpu' else ''}"
                f"{'on the device' if not r.text_weight_dtype and r.text_device != 'cpu' else ''}, decode "
                f"{'untiled' if r.tile is None else f'tiles {r.tile[1]}x{r.tile[0]}'}")

    def table(self, budget: int | None = None) -> str:
        rows = [f"{'stage':<9} {'weights':>9} {'activations':>12} {'peak':>9}  on the device"]
        for s in self.stages:
            rows.append(f"{s.name:<9} {gib(s.weights):>9} {gib(s.activations):>12} {gib(s.peak):>9}  {s.where}")
        r = self.request
        rows.append(f"{r.frames}x{r.height}x{r.width}, batch {r.batch}{', CFG' if r.cfg else ''}: {self.describe()}")
        line = f"peak {gib(self.peak)}"
        if budget is not None:
            verdict = "fits" if self.fits(budget) else "does NOT fit"
            line += f" + {gib(MARGIN)} margin: {verdict} in {gib(budget)}"
        rows.append(line)
        return "\n".join(rows)

    def as_dict(self) -> dict:
        r = {k: (str(v).removeprefix("torch.") if isinstance(v, torch.dtype) else v)
             for k, v in asdict(self.request).items() if not k.endswith("_config")}
        return dict(request=r, peak=self.peak, stages=[dict(asdict(s), peak=s.peak) for s in self.stages])


def gib(n: int) -> str:
    """Bytes in words: GiB with two decimals, MiB below 1 GiB."""
    return f"{n / GiB:.2f} GiB" if n >= GiB else f"{n / 1024**2:.1f} MiB"


# ---------------------------------------------------------------------------------------------------------------
# Weights (exact)
# ---------------------------------------------------------------------------------------------------------------
def _cached(fn):
    """Memoises a weight count by its arguments (configs as JSON): counting builds a meta model, ~0.1-1 s."""
    memo: dict = {}

    def wrapper(config, *args):
        key = (json.dumps(config, sort_keys=True, default=str), *args)
        if key not in memo:
            memo[key] = fn(config, *args)
        return memo[key]
    return wrapper


@_cached
def transformer_weights(config: dict, dtype: torch.dtype, weight_dtype: torch.dtype | None = None
                        ) -> tuple[int, list[int]]:
    """(bytes outside the blocks, bytes of each block) of the transformer in these storage dtypes."""
    from .checkpoints.transformer import _is_fp8_weight
    from .transformer import build_transformer

    model = build_transformer(config, device="meta", dtype=dtype)
    blocks = [0] * len(model.transformer_blocks)
    other = 0
    for name, t in list(model.named_parameters()) + list(model.named_buffers()):
        size = t.numel() * (weight_dtype.itemsize if weight_dtype and _is_fp8_weight(name) else t.element_size())
        if name.startswith("transformer_blocks."):
            blocks[int(name.split(".")[1])] += size
        else:
            other += size
    return other, blocks


@_cached
def vae_weights(config: dict, dtype: torch.dtype) -> int:
    from .vae import build_vae

    return sum(p.numel() for p in build_vae(config, device="meta").parameters()) * dtype.itemsize


@_cached
def text_weights(config: dict | None, dtype: torch.dtype, weight_dtype: torch.dtype | None = None) -> int:
    """Bytes of the T5 encoder as `load_t5_encoder` stores it (fp16 keeps `wo` in fp32; fp8 the big matmuls)."""
    from transformers import T5Config, T5EncoderModel

    from .checkpoints.t5 import _FP8_STORABLE, _keeps_fp32

    with torch.device("meta"):
        model = T5EncoderModel(T5Config(**(config or T5_XXL)))
    total = 0
    for name, p in model.named_parameters():  # the tied embedding once
        if weight_dtype is not None and _FP8_STORABLE.match(name):
            size = weight_dtype.itemsize
        else:
            size = 4 if dtype == torch.float16 and _keeps_fp32(name) else dtype.itemsize
        total += p.numel() * size
    return total


# ---------------------------------------------------------------------------------------------------------------
# Activations
# ---------------------------------------------------------------------------------------------------------------
def latent_grid(config: dict, frames: int, height: int, width: int) -> tuple[int, int, int]:
    """(latent frames incl. 1.5's front padding, latent height, latent width) of a pixel request."""
    pt = config.get("patch_size_t") or 1
    t = (frames - 1) // config.get("temporal_compression_ratio", 4) + 1
    return t + (pt - t % pt) % pt, height // 8, width // 8


def sampling_activations(config: dict, batch: int, frames: int, height: int, width: int, dtype: torch.dtype,
                         cfg: bool = True, text_length: int = 226) -> int:
    """Peak activation bytes of one transformer call (`forward_activation_bytes`) plus the sampler's latents."""
    from .transformer import forward_activation_bytes

    t, h, w = latent_grid(config, frames, height, width)
    latents = batch * config.get("in_channels", 16) * t * h * w * max(dtype.itemsize, 4)
    forward = forward_activation_bytes(config, (batch, 16, t, h, w), dtype, guidance=cfg, text_length=text_length)
    return forward + 8 * latents  # noise, x, x0 and the CFG copies of the sampler


def _decoder_cache_channels(config: dict) -> int:
    """Sum over the decoder's k=3 causal convs of (input channels x area relative to full resolution), i.e. the
    frame caches' size in full-resolution channel-frames per cached frame."""
    boc = list(reversed(config["block_out_channels"]))
    levels = len(boc)
    area = lambda i: 4.0 ** (i - (levels - 1))  # noqa: E731  up block i works at 1/4^(levels-1-i) of the pixels
    total = config["latent_channels"] * area(0) + 2 * 2 * boc[0] * area(0)  # conv_in, the mid block's 2 resnets
    prev = boc[0]
    for i, ch in enumerate(boc):
        for r in range(config["layers_per_block"] + 1):
            total += ((prev if r == 0 else ch) + ch) * area(i)
        prev = ch
    return int(total + boc[-1])  # conv_out


DECODE_FRAME_UNITS = 8.4  # (B, 1, H, W) x C0 tensors per chunk frame at the decoder's peak, measured (CPU, live bytes)


def decode_activations(vae_config: dict, batch: int, latent_frames: int, height: int, width: int,
                       dtype: torch.dtype, tile: tuple[int, int] | None = None) -> int:
    """Peak bytes of decoding (B, 16, latent_frames, height/8, width/8) and the pipeline's conversion of the video to
    [0, 1] float frames. Tile by tile (row-major, as the VAE runs them): the tile's chunk work at full resolution,
    plus what is held meanwhile: the previous row and the current row of finished tiles, and the output video."""
    cfg = {**_vae_defaults(), **vae_config}
    e = dtype.itemsize
    frames = _pixel_frames(cfg, latent_frames)
    video = batch * 3 * frames * height * width * e
    # The first chunk (2 latent frames + the odd remainder) runs without frame caches; later ones (2 latent frames,
    # 8 pixel frames) with every causal conv's 2 cached frames and the tile's output buffer.
    first = _pixel_frames(cfg, latent_frames if latent_frames < 2 else 2 + latent_frames % 2)

    def tile_peak(th: int, tw: int, held: int) -> int:
        unit = batch * th * tw * cfg["block_out_channels"][0] * e  # one full-resolution frame of C0 channels
        peak = held + DECODE_FRAME_UNITS * first * unit
        if latent_frames >= 4:
            caches = 2 * _decoder_cache_channels(cfg) * batch * th * tw * e
            peak = max(peak, held + batch * 3 * frames * th * tw * e + DECODE_FRAME_UNITS * 8 * unit + caches)
        return int(peak)

    layout = None if tile is None else decode_tile_layout(cfg, height // 8, width // 8,
                                                          Tiling(tile_height=tile[0], tile_width=tile[1]))
    if layout is None:  # untiled, or one tile covers the frame (the VAE then decodes untiled)
        peak = tile_peak(height, width, 0)
    else:
        rows, cols = [th for _, th in layout.rows], [tw for _, tw in layout.cols]
        peak, above = 0, []
        for r, th in enumerate(rows):
            row = []
            for tw in cols:
                held = sum(above) + sum(row) + (video if r or row else 0)  # the output exists after the first tile
                peak = max(peak, tile_peak(th, tw, held))
                row.append(batch * 3 * frames * th * tw * e)
            above = row
    convert = 2 * video + batch * 3 * frames * height * width * (4 if e < 4 else e)  # / 2 + 0.5, clamp, float()
    return int(max(peak, convert))


def _pixel_frames(vae_config: dict, latent_frames: int) -> int:
    """Pixel frames the decoder makes of one chunk of `latent_frames`."""
    from .modules.vae_blocks import expanded_frames

    for _ in range(int(math.log2(vae_config["temporal_compression_ratio"]))):
        latent_frames = expanded_frames(latent_frames)
    return latent_frames


def text_activations(config: dict | None, batch: int, length: int = 226) -> int:
    c = config or T5_XXL
    hidden = batch * length * (3 * c["d_ff"] + 6 * c["d_model"]) * 4
    scores = 3 * batch * c["num_heads"] * length * length * 4
    return hidden + scores


def _vae_defaults() -> dict:
    from .variants import VAE_DEFAULTS

    return VAE_DEFAULTS


# ---------------------------------------------------------------------------------------------------------------
# The plan
# ---------------------------------------------------------------------------------------------------------------
def plan(r: Request) -> Plan:
    """The peak device memory of each stage of `r` (see the module docstring)."""
    if r.offload not in ("none", "model", "blocks"):
        raise CogVXError(f"Unknown offload mode {r.offload!r}; use none, model or blocks.")
    other, blocks = transformer_weights(r.transformer_config, r.dtype, r.weight_dtype)
    if r.offload == "blocks" and not 0 <= r.resident <= len(blocks):
        raise CogVXError(f"resident blocks must be between 0 and {len(blocks)}; got {r.resident}.")
    transformer = other + sum(blocks)
    vae = vae_weights({**_vae_defaults(), **r.vae_config}, r.dtype)
    text_on_cpu = r.text_device == "cpu"
    t5 = 0 if text_on_cpu else text_weights(r.text_config, r.dtype, r.text_weight_dtype)
    if r.offload == "blocks":
        streamed = min(len(blocks) - r.resident, r.prefetch + 1)
        sampling_weights = other + sum(blocks[:r.resident]) + streamed * max(blocks, default=0)
        where = f"transformer: {r.resident} + {streamed} of {len(blocks)} blocks"
    else:
        sampling_weights, where = transformer, "transformer"
    everything = r.offload == "none"  # mode none: all three models stay on the device
    lat_t, lat_h, lat_w = latent_grid(r.transformer_config, r.frames, r.height, r.width)
    pad = lat_t - ((r.frames - 1) // 4 + 1)
    stages = [
        Stage("text", "nothing (T5 on the CPU)" if text_on_cpu else "T5" + (" + all" if everything else ""),
              (transformer + vae if everything else 0) + t5,
              0 if text_on_cpu else text_activations(r.text_config, r.batch, r.text_length)),
        Stage("sampling", where + (" + T5 + VAE" if everything else ""),
              sampling_weights + (vae + t5 if everything else 0),
              sampling_activations(r.transformer_config, r.batch, r.frames, r.height, r.width, r.dtype, r.cfg,
                                   r.text_length)),
        Stage("decode", "VAE" + (" + all" if everything else ""), vae + (transformer + t5 if everything else 0),
              decode_activations(r.vae_config, r.batch, lat_t - pad, r.height, r.width, r.dtype, r.tile)),
    ]
    return Plan(r, stages)


def tile_options(vae_config: dict, height: int, width: int) -> list[tuple[int, int] | None]:
    """Untiled, then the VAE's own tile (half its sample size) and smaller ones, largest first."""
    cfg = {**_vae_defaults(), **vae_config}
    h, w = cfg["sample_height"] // 2, cfg["sample_width"] // 2
    out: list[tuple[int, int] | None] = [None]
    while h >= 64 and w >= 64:
        if h < height or w < width:
            out.append((h, w))
        h, w = (h * 3 // 4) // 8 * 8, (w * 3 // 4) // 8 * 8
    return out


def choose(r: Request, budget: int, modes: tuple[str, ...] = ("none", "model", "blocks"),
           text_devices: tuple[str, ...] = ("device", "cpu")) -> Plan:
    """'auto': the fastest settings that fit `budget` bytes: offload none, model, then blocks with as many resident
    blocks as fit (among `modes`); T5 on the device, else on the CPU (among `text_devices`); the decode untiled, else
    the largest tile that fits. The weight dtypes are the request's: auto never changes a number. When nothing fits,
    the plan with the smallest peak (`fits` tells)."""
    n = len(transformer_weights(r.transformer_config, r.dtype, r.weight_dtype)[1])
    order = {"none": [0], "model": [0], "blocks": list(range(n, -1, -1))}
    best = None
    for text_device in text_devices:
        for mode in ("none", "model", "blocks"):
            if mode not in modes:
                continue
            for resident in order[mode]:
                p = plan(replace(r, offload=mode, resident=resident, text_device=text_device, tile=None))
                if max(p.stage("text").peak, p.stage("sampling").peak) + MARGIN <= budget:
                    for tile in tile_options(r.vae_config, r.height, r.width):
                        p = plan(replace(p.request, tile=tile))
                        if p.fits(budget):
                            return p
                if best is None or p.peak < best.peak:
                    best = p
    return best


def _stored_dtype(folder) -> torch.dtype:
    """The compute dtype `load_transformer` picks by default: the files' most common wide float dtype (bf16 for fp8)."""
    from .checkpoints.io import SafetensorsHeader, folder_weight_files

    dtypes = [d for f in folder_weight_files(folder, "transformer") for d, _ in SafetensorsHeader(f).tensors.values()
              if d.is_floating_point]
    wide = [d for d in dtypes if d.itemsize > 1]
    return max(set(wide), key=wide.count) if wide else torch.bfloat16


def request_for_folder(root, *, frames: int | None, height: int | None, width: int | None, batch: int = 1,
                       cfg: bool = True, dtype: torch.dtype | None = None, weight_dtype: torch.dtype | None = None,
                       text_weight_dtype: torch.dtype | None = None, has_image: bool = False) -> Request:
    """The Request of a generate run on a diffusers-format folder, from its config files only (nothing loaded):
    frames and size default and snap exactly as `CogVideoXPipeline.generate` does."""
    from pathlib import Path

    from .checkpoints.io import read_json
    from .variants import TRANSFORMER_DEFAULTS, detect_variant, snap_request

    root = Path(root)
    tcfg = {**TRANSFORMER_DEFAULTS, **read_json(root / "transformer" / "config.json", "transformer")}
    vcfg = read_json(root / "vae" / "config.json", "VAE") if (root / "vae" / "config.json").is_file() else {}
    text_file = root / "text_encoder" / "config.json"
    text_cfg = None
    if text_file.is_file():
        from transformers import T5Config

        text_cfg = {k: v for k, v in T5Config.from_dict(read_json(text_file, "T5")).to_dict().items()
                    if k in T5_XXL or k in ("dropout_rate",)}
    variant = detect_variant(tcfg)
    ref = variant.transformer_config()
    released = all(tcfg[k] == ref[k] for k in ("num_layers", "num_attention_heads", "attention_head_dim"))
    if not released:  # a small model: the size it was trained at (as the CLI does)
        frames = frames or tcfg["sample_frames"]
        height, width = height or tcfg["sample_height"] * 8, width or tcfg["sample_width"] * 8
    frames, height, width, _ = snap_request(variant, frames or variant.frames, height or variant.height,
                                            width or variant.width, has_image=has_image, released=released)
    dtype = dtype or _stored_dtype(root / "transformer")
    return Request(tcfg, vcfg, frames, height, width, batch=batch, cfg=cfg, dtype=dtype, weight_dtype=weight_dtype,
                   text_config=text_cfg, text_weight_dtype=text_weight_dtype,
                   text_length=tcfg["max_text_seq_length"])
