"""Which rank does what: rank 0 prints, the last rank holds the reduced losses and writes the logs (as in
Megatron-LM's print_rank_0 / print_rank_last), and a flag any rank raises reaches all of them."""

from __future__ import annotations

import os

import torch
import torch.distributed as dist

from megatron_tst.parallel import collective_device


def print_rank_0(message: str) -> None:
    """Print (flushed) on global rank 0. Before torch.distributed is up (the checks before heavy work) the
    launcher's RANK tells (torchrun and the SLURM launch scripts set it; absent: a single process, which prints)."""
    rank = dist.get_rank() if dist.is_initialized() else int(os.environ.get("RANK", "0"))
    if rank == 0:
        print(message, flush=True)


def is_last_rank() -> bool:
    """Whether this is the last global rank (the last pipeline stage's: it logs, as in Megatron-LM)."""
    return dist.get_rank() == dist.get_world_size() - 1


def any_rank(flag: bool) -> bool:
    """True on every rank when `flag` is True on any (one all-reduce MAX over the world; every rank calls it)."""
    value = torch.tensor([int(flag)], device=collective_device())
    dist.all_reduce(value, op=dist.ReduceOp.MAX)
    return bool(value.item())
