"""Generation on several processes (torch.distributed, launched by torchrun): CFG and Ulysses sequence parallelism
and the VAE decode split by tiles. groups.py says who does what; comm.py holds the counted collectives."""

from .groups import MODES, ParallelGroups, check_heads, make_groups

__all__ = ["MODES", "ParallelGroups", "check_heads", "make_groups"]
