"""`cogvx bench-parallel` (under torchrun): per-rank activation memory and the bytes one sampling step sends, for
sequence (Ulysses) and CFG parallelism, against one process and the analytic counts.

    torchrun --nproc-per-node 2 -m cogvx_core bench-parallel [--layers 2 --heads 8 --frames 25 --height 240 ...]

Every rank builds the same random transformer (the released architecture at a chosen width and depth) and first
runs the one-process forward itself, then the parallel one. Memory is the peak of live tensors torch allocates
during a forward (torch's MemTracker; weights, buffers and the inputs excluded), so it compares on CPU and GPU.
The text tokens stay on every rank, so a rank's ideal ratio is its share of the tokens, (text + video / N) / all.
"""

from __future__ import annotations

import json
import sys
import time

import torch

from ..errors import CogVXError

HELP = "measure parallel generation (run under torchrun): traffic per step and per-rank activation memory"

DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16}


def add_arguments(p) -> None:
    p.add_argument("--variant", default="5b", help="architecture (default 5b: 3D RoPE)")
    p.add_argument("--layers", type=int, default=2, help="transformer blocks (default 2; traffic is per block)")
    p.add_argument("--heads", type=int, default=8, help="attention heads (default 8; the released have 30/48)")
    p.add_argument("--head-dim", type=int, default=64, help="attention head width")
    p.add_argument("--frames", type=int, default=25, help="pixel frames (default 25 -> 7 latent frames)")
    p.add_argument("--height", type=int, default=240, help="pixel height")
    p.add_argument("--width", type=int, default=368, help="pixel width")
    p.add_argument("--dtype", choices=list(DTYPES), default="float32", help="weight and compute dtype")
    p.add_argument("--device", help="cpu or cuda (default: cuda when available)")
    p.add_argument("--out", help="write the results as JSON here (rank 0)")


def _peak_activation_bytes(model, inputs, fn):
    """(fn(), peak bytes of the tensors alive during fn, weights, buffers and the inputs excluded)."""
    from torch.distributed._tools.mem_tracker import MemTracker

    tracker = MemTracker()
    tracker.track_external(model, *inputs)  # the inputs are counted as "other", not as activations
    with tracker:
        out = fn()
    peak = {}
    for per_device in tracker.get_tracker_snapshot("peak").values():
        for kind, nbytes in per_device.items():
            peak[str(kind).rsplit(".", 1)[-1]] = peak.get(str(kind).rsplit(".", 1)[-1], 0) + nbytes
    return out, peak["Total"] - peak.get("PARAM", 0) - peak.get("BUFFER", 0) - peak.get("OTH", 0)


def _timed(fn, device):
    sync = torch.cuda.synchronize if device.type == "cuda" else (lambda: None)
    sync()
    start = time.perf_counter()
    out = fn()
    sync()
    return out, time.perf_counter() - start


def run(args) -> int:
    import torch.distributed as dist

    from ..parallel import make_groups
    from ..parallel.cfg import cfg_parallel, exchange
    from ..parallel.sequence import analytic_bytes, sequence_parallel, token_counts
    from ..train import ddp
    from ..transformer import build_transformer
    from ..variants import get_variant, latent_frames

    info = ddp.init_from_env(args.device)
    try:
        if not info.distributed:
            raise CogVXError("bench-parallel measures several processes: launch it with torchrun "
                             "--nproc-per-node N -m cogvx_core bench-parallel.")
        dtype, dev = DTYPES[args.dtype], info.device
        cfg = get_variant(args.variant).transformer_config(num_layers=args.layers, num_attention_heads=args.heads,
                                                          attention_head_dim=args.head_dim)
        torch.manual_seed(0)  # the same weights and inputs on every rank
        model = build_transformer(cfg, device=dev, dtype=dtype).eval()
        shape = (1, model.out_channels, latent_frames(args.frames), args.height // 8, args.width // 8)
        x = torch.randn(shape, device=dev, dtype=dtype)
        context = torch.randn(1, model.text_length, cfg["text_embed_dim"], device=dev, dtype=dtype)
        t = torch.tensor([500], device=dev)

        def forward():
            with torch.no_grad():
                return model(x, t, context)

        forward()  # warm-up (kernels, position-table caches)
        one, one_bytes = _peak_activation_bytes(model, (x, t, context), forward)
        _, one_seconds = _timed(forward, dev)
        results = {"device": str(dev), "world_size": info.world_size, "latents": list(shape),
                   "tokens": model.sequence_length(*shape[2:]), "text_tokens": model.text_length,
                   "config": {k: cfg[k] for k in ("num_layers", "num_attention_heads", "attention_head_dim")},
                   "one_process": {"activation_bytes": one_bytes, "seconds": one_seconds}}

        groups = make_groups("sequence", args.heads)
        with sequence_parallel(model, groups):
            forward()
            groups.traffic.reset()
            par, par_bytes = _peak_activation_bytes(model, (x, t, context), forward)
            sent = dict(groups.traffic.sent)
            _, par_seconds = _timed(forward, dev)
        analytic = analytic_bytes(model, shape, model.text_length, groups.seq_degree, itemsize=dtype.itemsize)
        video = model.sequence_length(*shape[2:]) - model.text_length
        share = (model.text_length + max(token_counts(video, groups.seq_degree))) / (model.text_length + video)
        results["sequence"] = {
            "activation_bytes": par_bytes, "activation_ratio": par_bytes / one_bytes, "seconds": par_seconds,
            "token_share": share,  # the ideal ratio: text tokens stay on every rank
            "sent_bytes": sent, "analytic_bytes": analytic,
            "sent_over_analytic": sum(sent.values()) / sum(analytic.values()),
            "max_rel_diff": float((par.double() - one.double()).norm() / one.double().norm())}

        if info.world_size == 2:  # CFG: each rank one half, then the halves are exchanged
            groups = make_groups("cfg")
            with cfg_parallel(model, groups):
                v = forward()
                groups.traffic.reset()
                exchange(v, groups)
            results["cfg"] = {"sent_bytes": dict(groups.traffic.sent),
                              "analytic_bytes": {"all_gather": v.numel() * v.element_size()}}

        peaks = [torch.zeros(1, dtype=torch.float64, device=dev) for _ in range(info.world_size)]
        dist.all_gather(peaks, torch.tensor([float(par_bytes)], dtype=torch.float64, device=dev))
        results["sequence"]["activation_bytes_per_rank"] = [int(p) for p in peaks]
        if info.is_main:
            _report(results)
            if args.out:
                with open(args.out, "w") as f:
                    json.dump(results, f, indent=1)
        return 0
    finally:
        ddp.shutdown(info)


def _report(r: dict) -> None:
    mib = 2**20
    s = r["sequence"]
    lines = [f"{r['world_size']} ranks on {r['device']}, latents {r['latents']}, {r['tokens']} tokens "
             f"({r['text_tokens']} text), {r['config']}",
             f"activation peak: one process {r['one_process']['activation_bytes'] / mib:.1f} MiB, sequence parallel "
             f"{max(s['activation_bytes_per_rank']) / mib:.1f} MiB per rank (ratio {s['activation_ratio']:.3f}; "
             f"the rank's share of the tokens {s['token_share']:.3f})",
             f"sequence traffic per forward and rank: sent {sum(s['sent_bytes'].values()) / mib:.2f} MiB "
             f"{ {k: round(v / mib, 3) for k, v in s['sent_bytes'].items()} }, analytic "
             f"{sum(s['analytic_bytes'].values()) / mib:.2f} MiB (ratio {s['sent_over_analytic']:.4f})",
             f"output relative difference to one process: {s['max_rel_diff']:.2e}; forward "
             f"{r['one_process']['seconds']:.2f} s one process, {s['seconds']:.2f} s parallel"]
    if "cfg" in r:
        c = r["cfg"]
        lines.append(f"cfg traffic per step and rank: sent {sum(c['sent_bytes'].values()) / mib:.3f} MiB, analytic "
                     f"{sum(c['analytic_bytes'].values()) / mib:.3f} MiB")
    print("\n".join(lines), file=sys.stderr)
