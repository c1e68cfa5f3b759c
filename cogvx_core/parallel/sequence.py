"""Ulysses sequence parallelism for the expert transformer: each rank of a sequence group holds 1/N of the video
tokens and every text token (the joint attention needs all of them on every rank).

Per block, everything but attention works token by token, so it runs on the local tokens unchanged. Around
attention, q, k and v (computed, QK-normed and RoPE-rotated on the local tokens with the rank's slice of the RoPE
table) go through one all-to-all that trades the token split for a head split: each rank then attends with
H/N heads over all tokens. A second all-to-all gives each rank its video tokens back with every head; the text
tokens' outputs (computed for H/N heads on each rank) are all-gathered. After the last block each rank projects its
tokens and the outputs are all-gathered, so every rank returns the whole prediction.

    with sequence_parallel(transformer, groups):   # installs the token split and the attention kernel
        v = transformer(x, t, context)              # equal to the one-process output

Token counts need not divide evenly (5b at 49x480x720 has 17550 video tokens): ranks hold n // N or n // N + 1.
"""

from __future__ import annotations

from contextlib import contextmanager

import torch

from . import comm
from .groups import ParallelGroups, check_heads


def token_counts(tokens: int, ranks: int) -> list[int]:
    """How many video tokens each rank holds: the first tokens % ranks ranks one more."""
    return [tokens // ranks + (1 if r < tokens % ranks else 0) for r in range(ranks)]


class SequenceShard:
    """The video-token split of one forward pass, shared by the transformer hook and every block's attention."""

    def __init__(self, groups: ParallelGroups):
        self.groups = groups
        self.group, self.size, self.rank = groups.seq_group, groups.seq_degree, groups.seq_rank
        self.traffic = groups.traffic
        self.text_len = 0
        self.counts: list[int] = []

    @property
    def start(self) -> int:
        return sum(self.counts[:self.rank])

    def shard(self, tokens: torch.Tensor, text_len: int, rope: torch.Tensor | None):
        """tokens (B, text_len + N, D) -> this rank's (B, text_len + n, D), and its rows of the RoPE table
        (N, d/2) -> (n, d/2). Position tables added to the tokens are sliced with them."""
        self.text_len = text_len
        self.counts = token_counts(tokens.shape[1] - text_len, self.size)
        lo, hi = text_len + self.start, text_len + self.start + self.counts[self.rank]
        local = torch.cat([tokens[:, :text_len], tokens[:, lo:hi]], dim=1)  # a copy: the full tokens can go
        if rope is not None:
            rope = rope[self.start:self.start + self.counts[self.rank]]
        return local, rope

    def gather(self, out: torch.Tensor) -> torch.Tensor:
        """This rank's per-token outputs (B, n, F) -> everyone's (B, N, F), in token order."""
        return torch.cat(comm.all_gather_padded(out, self.counts, self.group, self.traffic), dim=1)


class UlyssesAttention:
    """An attention kernel (B, H, S_local, d) x 3 -> (B, H, S_local, d) that attends over all ranks' tokens with
    H/N heads per rank, wrapping the block's own kernel (sdpa, sage, flash, ...)."""

    def __init__(self, inner, shard: SequenceShard):
        self.inner, self.shard = inner, shard

    def __call__(self, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor) -> torch.Tensor:
        s = self.shard
        n, me, text, counts = s.size, s.rank, s.text_len, s.counts
        b, heads, _, d = q.shape
        hs = heads // n
        full = [self._to_heads(t) for t in (q, k, v)]  # one at a time: one tensor's exchange buffers alive at once
        out = self.inner(*full)  # (B, hs, T + N, d)
        del full
        # head split -> token split: rank j gets its video tokens for this rank's heads
        send = torch.cat([part.reshape(-1) for part in out[:, :, text:].split(counts, dim=2)])
        unit = b * hs * d
        recv = comm.all_to_all(send, [unit * c for c in counts], [unit * counts[me]] * n, s.group, s.traffic, me)
        del send
        result = q.new_empty(b, heads, text + counts[me], d)
        result[:, :, text:] = recv.view(n, b, hs, counts[me], d).transpose(0, 1).reshape(b, heads, counts[me], d)
        del recv
        text_out = comm.all_gather(out[:, :, :text].contiguous(), s.group, s.traffic)  # n x (B, hs, T, d)
        for j, part in enumerate(text_out):
            result[:, j * hs:(j + 1) * hs, :text] = part
        return result  # (B, H, T + n_me, d)

    def _to_heads(self, t: torch.Tensor) -> torch.Tensor:
        """(B, H, T + n_me, d), this rank's tokens with every head -> (B, H/N, T + N, d), every token with this
        rank's heads: block j of the all-to-all carries this rank's video tokens for rank j's heads."""
        s = self.shard
        n, me, text, counts = s.size, s.rank, s.text_len, s.counts
        b, heads, _, d = t.shape
        hs = heads // n
        send = t[:, :, text:].reshape(b, n, hs, counts[me], d).transpose(0, 1).contiguous()  # (N, B, hs, n_me, d)
        unit = b * hs * d  # elements per video token in one block
        recv = comm.all_to_all(send.view(-1), [unit * counts[me]] * n, [unit * c for c in counts], s.group,
                               s.traffic, me)
        del send
        full = t.new_empty(b, hs, text + sum(counts), d)
        full[:, :, :text] = t[:, me * hs:(me + 1) * hs, :text]
        offset = text
        for part, c in zip(recv.split([unit * c for c in counts]), counts):
            full[:, :, offset:offset + c] = part.view(b, hs, c, d)
            offset += c
        return full


@contextmanager
def sequence_parallel(transformer, groups: ParallelGroups):
    """Runs `transformer` sequence-parallel over groups.seq_group inside the block (a no-op at degree 1)."""
    if groups.seq_degree == 1:
        yield transformer
        return
    check_heads(transformer.config["num_attention_heads"], groups.seq_degree, groups.cfg_degree)
    shard = SequenceShard(groups)
    blocks = [block.attn1 for block in transformer.transformer_blocks]
    kernels = [attn.attention_fn for attn in blocks]
    for attn, inner in zip(blocks, kernels):
        attn.attention_fn = UlyssesAttention(inner, shard)
    transformer.sequence_parallel = shard
    try:
        yield transformer
    finally:
        transformer.sequence_parallel = None
        for attn, inner in zip(blocks, kernels):
            attn.attention_fn = inner


def analytic_bytes(transformer, latent_shape: tuple[int, ...], text_len: int, degree: int, batch: int = 1,
                   itemsize: int = 4) -> dict[str, int]:
    """Bytes one rank sends per forward pass of `batch` sequences at sequence degree `degree` (the largest share
    when the tokens do not divide evenly): per block q, k, v out and the output back (all-to-all, 4 x its video
    tokens x (N-1)/N of the heads) and the text outputs of its heads (all-gather); the final outputs (all-gather)."""
    _, _, t, h, w = latent_shape
    cfg = transformer.config
    heads, d = cfg["num_attention_heads"], cfg["attention_head_dim"]
    p, pt = transformer.patch_size, transformer.patch_size_t
    n = max(token_counts((t // pt) * (h // p) * (w // p), degree))
    features = transformer.out_channels * p * p * pt
    per_block_a2a = 4 * batch * n * (heads // degree) * d * (degree - 1)
    per_block_text = batch * text_len * (heads // degree) * d * (degree - 1)
    return {"all_to_all": cfg["num_layers"] * per_block_a2a * itemsize,
            "all_gather": (cfg["num_layers"] * per_block_text + batch * n * features * (degree - 1)) * itemsize}
