"""`cogvx bench`: our transformer forward, VAE decode and T5 encode against the references (diffusers, transformers'
own T5 layers) in the same process.

Both run the same random weights on the same inputs; the report gives times, peak memory and ours/reference ratios.
diffusers is needed only here, and only when it is installed.
"""

from __future__ import annotations

import statistics
import sys
import time
from collections.abc import Callable

import torch

from ..checks import parse_numbers
from ..variants import get_variant, latent_frames
from .common import require_reference

HELP = "benchmark the transformer forward and VAE decode against the reference implementation"

DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}


def add_arguments(p) -> None:
    p.add_argument("--variant", default="5b", help="architecture of the benchmarked transformer (default 5b)")
    p.add_argument("--layers", type=int, default=2, help="transformer blocks (default 2; the released have 30/42)")
    p.add_argument("--frames", type=int, default=9, help="pixel frames (default 9 -> 3 latent frames)")
    p.add_argument("--height", type=int, default=256, help="pixel height of the latents' video")
    p.add_argument("--width", type=int, default=384, help="pixel width of the latents' video")
    p.add_argument("--dtype", choices=list(DTYPES), default="float32", help="compute dtype of both implementations")
    p.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu", help="cpu or cuda")
    p.add_argument("--repeats", type=int, default=3, help="transformer forwards per implementation")
    p.add_argument("--vae-latents", default="1,16,3,16,24", help="B,C,t,h,w of the latents the VAE decodes")
    p.add_argument("--vae-repeats", type=int, default=1, help="VAE decodes per implementation (each in a fresh "
                   "process on CPU)")
    p.add_argument("--t5-layers", type=int, default=2, help="T5-XXL encoder blocks for the T5 benchmark (default 2; "
                   "the released has 24)")
    p.add_argument("--only", choices=["transformer", "vae", "t5"], help="run one of the three benchmarks")
    p.add_argument("--compile", action="store_true", help="compile both transformers' blocks (regional "
                   "torch.compile, the same for both) before timing")


def _time_pair(ref_fn, our_fn, repeats: int, sync, clock=time.perf_counter) -> tuple[float, float]:
    """Median seconds of each, runs interleaved (ref, ours, ref, ...) so that load drift hits both alike. clock:
    time.process_time counts this process's CPU time only (on a one-thread CPU run, immune to other programs)."""
    ref_fn(), our_fn()  # warm-up
    sync()
    times: dict = {ref_fn: [], our_fn: []}
    for _ in range(repeats):
        for fn in (ref_fn, our_fn):
            start = clock()
            fn()
            sync()
            times[fn].append(clock() - start)
    return statistics.median(times[ref_fn]), statistics.median(times[our_fn])


def _clock(device) -> Callable[[], float]:
    """On one CPU thread, the process's CPU time (which other programs' load on a shared machine does not inflate);
    otherwise the wall clock."""
    one_cpu_thread = torch.device(device).type == "cpu" and torch.get_num_threads() == 1
    return time.process_time if one_cpu_thread else time.perf_counter


def _cuda_peak(fn) -> float:
    torch.cuda.synchronize()
    torch.cuda.empty_cache()
    torch.cuda.reset_peak_memory_stats()
    base = torch.cuda.memory_allocated()
    fn()
    torch.cuda.synchronize()
    return (torch.cuda.max_memory_allocated() - base) / 2**20


def bench_transformer(args) -> dict:
    from ..transformer import build_transformer

    variant = get_variant(args.variant)
    device, dtype = torch.device(args.device), DTYPES[args.dtype]
    cfg = variant.transformer_config(num_layers=args.layers)
    if cfg["patch_size_t"]:
        cfg.update(sample_height=300, sample_width=300)
    lat_t, lat_h, lat_w = latent_frames(args.frames), args.height // 8, args.width // 8
    if cfg["patch_size_t"] and lat_t % 2:
        lat_t += 1
    if cfg["use_learned_positional_embeddings"]:
        lat_t, lat_h, lat_w = 13, 60, 90
    ours = build_transformer(cfg, device="cpu", dtype=torch.float32)
    g = torch.Generator().manual_seed(0)
    with torch.no_grad():
        for p in ours.state_dict().values():
            p.copy_(torch.randn(p.shape, generator=g) * 0.02)
    from diffusers import CogVideoXTransformer3DModel
    from diffusers.pipelines.cogvideo.pipeline_cogvideox import CogVideoXPipeline
    import types

    ref = CogVideoXTransformer3DModel(**cfg)
    ref.load_state_dict(ours.state_dict(), strict=False)
    ours, ref = ours.to(device, dtype).eval(), ref.to(device, dtype).eval()
    if getattr(args, "compile", False):
        from ..compile import compile_blocks

        compile_blocks(ours)
        for block in ref.transformer_blocks:  # diffusers' CogVideoX lists no repeated blocks: the same by hand
            block.compile(dynamic=False, fullgraph=True)

    x = torch.randn(1, cfg["in_channels"], lat_t, lat_h, lat_w, generator=g).to(device, dtype)
    ctx = torch.randn(1, cfg["max_text_seq_length"], cfg["text_embed_dim"], generator=g).to(device, dtype)
    t = torch.tensor([500], device=device)
    ofs = torch.tensor([2.0], device=device) if cfg["ofs_embed_dim"] else None
    x_ref = x.permute(0, 2, 1, 3, 4).contiguous()

    def run_ref():
        rope = None
        if cfg["use_rotary_positional_embeddings"]:  # the reference pipeline makes its tables per call too
            fake = types.SimpleNamespace(transformer=ref, vae_scale_factor_spatial=8)
            rope = CogVideoXPipeline._prepare_rotary_positional_embeddings(fake, lat_h * 8, lat_w * 8, lat_t, device)
        return ref(hidden_states=x_ref, encoder_hidden_states=ctx, timestep=t, ofs=ofs, image_rotary_emb=rope,
                   return_dict=False)[0]

    def run_ours():
        return ours(x, t, ctx, ofs)

    sync = torch.cuda.synchronize if device.type == "cuda" else (lambda: None)
    result = {"tokens": ctx.shape[1] + lat_t * lat_h * lat_w // (4 * (cfg["patch_size_t"] or 1))}
    with torch.no_grad():
        err = ((run_ours().float() - run_ref().permute(0, 2, 1, 3, 4).float()).norm() /
               run_ref().float().norm()).item()
        clock = _clock(device)
        result["clock"] = clock.__name__
        result["reference_s"], result["ours_s"] = _time_pair(run_ref, run_ours, args.repeats, sync, clock)
        if device.type == "cuda":
            result["reference_peak_mib"], result["ours_peak_mib"] = _cuda_peak(run_ref), _cuda_peak(run_ours)
    result["time_ratio"] = result["ours_s"] / result["reference_s"]
    if "ours_peak_mib" in result:
        result["memory_ratio"] = result["ours_peak_mib"] / result["reference_peak_mib"]
    result["rel_l2"] = err
    return result


T5_XXL = dict(vocab_size=32128, d_model=4096, d_kv=64, d_ff=10240, num_heads=64)


def bench_t5(layers: int, repeats: int, device: str = "cpu", dtype=torch.float32, tokens: int = 226,
             size: dict = T5_XXL) -> dict:
    """T5-XXL's encoder (or another `size`) cut to `layers` blocks, random weights: our layers (ops.adopt, as the
    loader builds it) against transformers' own, one prompt of `tokens` tokens."""
    from transformers import T5Config, T5EncoderModel

    from ..modules.ops import adopt

    cfg = T5Config(**size, num_layers=layers, feed_forward_proj="gated-gelu", is_encoder_decoder=False,
                   use_cache=False)
    torch.manual_seed(0)
    ref = T5EncoderModel(cfg).to(device, dtype).eval().requires_grad_(False)
    ours = T5EncoderModel(cfg).to(device, dtype).eval().requires_grad_(False)
    ours.load_state_dict(ref.state_dict())
    adopt(ours)
    ids = torch.randint(1, cfg.vocab_size, (1, tokens), generator=torch.Generator().manual_seed(1)).to(device)
    sync = torch.cuda.synchronize if device.startswith("cuda") else (lambda: None)
    clock = _clock(device)
    with torch.no_grad():
        want, got = ref(input_ids=ids).last_hidden_state, ours(input_ids=ids).last_hidden_state
        err = ((got.float() - want.float()).norm() / want.float().norm()).item()
        ref_s, ours_s = _time_pair(lambda: ref(input_ids=ids), lambda: ours(input_ids=ids), repeats, sync, clock)
    return {"reference_s": ref_s, "ours_s": ours_s, "time_ratio": ours_s / ref_s, "rel_l2": err,
            "clock": clock.__name__, "tokens": tokens}


def run(args) -> int:
    require_reference("bench", "diffusers")
    torch.manual_seed(0)
    print(f"device {args.device}, dtype {args.dtype}, torch {torch.__version__}, threads {torch.get_num_threads()}")
    if args.only in (None, "transformer"):
        print(f"timing the transformer forward ({args.repeats} runs each) ...", file=sys.stderr, flush=True)
        r = bench_transformer(args)
        print(f"transformer forward ({args.variant} architecture, {args.layers} layers, {r['tokens']} tokens): "
              f"ours {r['ours_s'] * 1000:.1f} ms, reference {r['reference_s'] * 1000:.1f} ms, "
              f"ratio {r['time_ratio']:.3f}x [{r['clock']}]" +
              (f"; peak memory ours {r['ours_peak_mib']:.0f} MiB, reference {r['reference_peak_mib']:.0f} MiB, "
               f"ratio {r['memory_ratio']:.3f}x" if "memory_ratio" in r else "") +
              f"; output rel. L2 difference {r['rel_l2']:.1e}")
    if args.only in (None, "t5"):
        print(f"timing the T5 encode ({args.repeats} runs each) ...", file=sys.stderr, flush=True)
        r = bench_t5(args.t5_layers, args.repeats, device=args.device, dtype=DTYPES[args.dtype])
        print(f"T5 encode (T5-XXL layers, {args.t5_layers} blocks, {r['tokens']} tokens): "
              f"ours {r['ours_s'] * 1000:.1f} ms, transformers {r['reference_s'] * 1000:.1f} ms, "
              f"ratio {r['time_ratio']:.3f}x [{r['clock']}]; output rel. L2 difference {r['rel_l2']:.1e}")
    if args.only in (None, "vae"):
        from ..variants import VAE_DEFAULTS
        from .bench_vae import bench_vae

        shape = tuple(parse_numbers(args.vae_latents, "--vae-latents"))
        print(f"timing the VAE decode ({args.vae_repeats} run(s) each) ...", file=sys.stderr, flush=True)
        r = bench_vae(dict(VAE_DEFAULTS), shape, dtype=DTYPES[args.dtype], device=args.device,
                      repeats=args.vae_repeats)
        print(f"VAE decode (released VAE, latents {shape} -> frames {tuple(r['output_shape'])}): "
              f"ours {r['ours_time_s'] * 1000:.0f} ms, reference {r['reference_time_s'] * 1000:.0f} ms, ratio "
              f"{r['time_ratio']:.3f}x; peak memory ours {r['ours_peak_bytes'] / 2**20:.0f} MiB, reference "
              f"{r['reference_peak_bytes'] / 2**20:.0f} MiB, ratio {r['memory_ratio']:.3f}x "
              f"[{r['memory_method']}]; output rel. L2 difference {r['relative_l2_difference']:.1e}")
    return 0
