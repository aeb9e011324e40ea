"""A run's progress and its exit conditions: what a checkpoint restores besides model, optimizer and LR
schedule (`TrainState`), Megatron-LM's exits (`ExitConditions`: --exit-signal-handler, --exit-duration-in-mins,
--exit-interval) and the launcher's requeue marker (`write_exit_marker`)."""

from __future__ import annotations

import dataclasses
import os
import signal
import time
from typing import Optional

import torch
import torch.distributed as dist

from megatron_tst.parallel import collective_device


@dataclasses.dataclass
class TrainState:
    """Progress of a run: what a checkpoint restores besides model, optimizer and schedule."""

    iteration: int = 0
    consumed_train_samples: int = 0  # baseline samples (Megatron-LM's unit of data progress)
    consumed_tokens: int = 0  # raw tokens
    num_floating_point_operations_so_far: float = 0.0
    wall_time_s: float = 0.0  # training time, summed over resumes
    # Bookkeeping, not progress: the iteration whose checkpoint in --save holds exactly this state (saved or
    # loaded there by this process), so a second save at it is skipped. Kept in memory, never read from the
    # tracker file, which may belong to another lineage (--ckpt-step rollback) and ranks could read differently.
    saved_iteration: Optional[int] = dataclasses.field(default=None, compare=False)

    def advance(self, samples: int, tokens: int, flops: float, seconds: float) -> None:
        self.iteration += 1
        self.consumed_train_samples += samples
        self.consumed_tokens += tokens
        self.num_floating_point_operations_so_far += flops
        self.wall_time_s += seconds

    def progress(self) -> dict:
        return {"consumed_samples": self.consumed_train_samples, "consumed_tokens": self.consumed_tokens,
                "flops": self.num_floating_point_operations_so_far, "wall_time_s": self.wall_time_s}


class ExitConditions:
    """Megatron-LM's exits: --exit-signal-handler (SIGTERM, and SLURM's SIGUSR1), --exit-duration-in-mins,
    --exit-interval. All ranks agree (one all-reduce) before anyone stops."""

    def __init__(self, args, start_time: Optional[float] = None):
        """start_time: seconds since the epoch the --exit-duration-in-mins clock counts from (Megatron-LM: the
        process start, the earliest over ranks, see `earliest_start_time`); default now."""
        self.args = args
        self.start = time.time() if start_time is None else start_time
        self.signalled = None
        if args.exit_signal_handler:
            for sig in (signal.SIGTERM, signal.SIGUSR1):
                signal.signal(sig, self._handler)

    def _handler(self, signum, frame):
        self.signalled = signal.Signals(signum).name

    def check(self, state: TrainState) -> Optional[str]:
        args = self.args
        reason = None
        if args.exit_signal_handler or args.exit_duration_in_mins:  # else no collective per step
            local = 0
            if self.signalled:
                local = 3
            elif args.exit_duration_in_mins and (time.time() - self.start) / 60 > args.exit_duration_in_mins:
                local = 2
            flag = torch.tensor([local], dtype=torch.int32, device=collective_device())
            dist.all_reduce(flag, op=dist.ReduceOp.MAX)
            reason = {3: "exit signal", 2: f"--exit-duration-in-mins {args.exit_duration_in_mins}"}.get(int(flag))
        if reason is None and args.exit_interval and state.iteration % args.exit_interval == 0:
            reason = f"--exit-interval {args.exit_interval}"
        return reason


def earliest_start_time(local_start_time: float) -> float:
    """The earliest of the ranks' start times (seconds since the epoch; all-reduce MIN, as Megatron-LM's
    pretrain() reduces _TRAIN_START_TIME). Every rank calls it."""
    value = torch.tensor([local_start_time], dtype=torch.float64, device=collective_device())
    dist.all_reduce(value, op=dist.ReduceOp.MIN)
    return float(value.item())


def write_exit_marker(iteration: int) -> None:
    """After a signal-triggered save, tell the launcher (launch/common.sh) to requeue: rank 0 writes the file
    named by $TST_EXIT_MARKER, if set, holding the iteration saved."""
    path = os.environ.get("TST_EXIT_MARKER")
    if path and dist.get_rank() == 0:
        with open(path, "w") as f:
            f.write(f"{iteration}\n")
