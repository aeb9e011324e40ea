"""A Megatron parallel layout and its process groups, for tests and benchmarks that set them up themselves
(`megatron_tst.testing.distributed`); training runs get theirs from Megatron-LM's `initialize_megatron`."""

from __future__ import annotations

import dataclasses
import socket
from typing import Optional


@dataclasses.dataclass(frozen=True)
class Layout:
    """A Megatron parallel layout; data parallelism takes what the world size leaves."""

    tp: int = 1
    pp: int = 1
    ep: int = 1
    cp: int = 1
    vpp: Optional[int] = None
    etp: Optional[int] = None

    def model_parallel_size(self) -> int:
        return self.tp * self.pp * self.cp

    @classmethod
    def from_args(cls, args) -> "Layout":
        """The layout of Megatron-LM-named arguments."""
        return cls(tp=args.tensor_model_parallel_size, pp=args.pipeline_model_parallel_size,
                   ep=args.expert_model_parallel_size, cp=args.context_parallel_size,
                   vpp=args.virtual_pipeline_model_parallel_size, etp=args.expert_tensor_parallel_size)


def initialize_parallel_state(layout: Layout) -> None:
    """(Re-)initialise megatron's parallel state with `layout` in this process (torch.distributed is up)."""
    from megatron.core import parallel_state

    if parallel_state.model_parallel_is_initialized():
        parallel_state.destroy_model_parallel()
    parallel_state.initialize_model_parallel(
        tensor_model_parallel_size=layout.tp,
        pipeline_model_parallel_size=layout.pp,
        virtual_pipeline_model_parallel_size=layout.vpp,
        context_parallel_size=layout.cp,
        expert_model_parallel_size=layout.ep,
        expert_tensor_parallel_size=layout.etp,
    )


def free_port() -> int:
    """A TCP port free on this machine right now (for a process group's rendezvous)."""
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]
