"""The phase schedule: which steps superpose, and how many baseline samples each step consumes.

The one place both are derived (TST_SPEC: the first r * train_iters steps superpose, then recovery):

    superposition_steps(tst, train_iters)   the number of superposition steps
    SamplePlan.from_args(args)              the plan of a parsed command line: phase of every step, samples per
                                            step, the data stream's windows (`megatron_tst.training.data`)

`arguments.parse_args` records the count as `args.tst_superposition_steps` (saved with checkpoints, as
Megatron-LM saves its args); everything else asks the plan.
"""

from __future__ import annotations

import dataclasses
import enum
import math
from typing import Optional

from megatron_tst.config import TSTConfig
from megatron_tst.forward_step import LM_LOSS, MCE_LOSS


class Phase(str, enum.Enum):
    """Training phase. The string values are what logs and metrics files carry."""

    SUPERPOSITION = "superposition"
    RECOVERY = "recovery"

    @property
    def loss_name(self) -> str:
        """The name of this phase's loss in the step's report and the log line ("mce loss" / "lm loss")."""
        return MCE_LOSS if self is Phase.SUPERPOSITION else LM_LOSS


def superposition_steps(tst: Optional[TSTConfig], train_iters: int) -> int:
    """Optimizer steps of the superposition phase in a `train_iters`-step run (0 without TST).

    `tst.superposition_iters` if given, else floor(`tst.superposition_ratio` * train_iters).
    Raises ValueError when no recovery step would be left (the recovery phase is required).
    """
    if tst is None:
        return 0
    if tst.superposition_iters is not None:
        steps = tst.superposition_iters
    else:
        steps = int(math.floor(tst.superposition_ratio * train_iters + 1e-9))
    if steps >= train_iters:
        raise ValueError(f"{steps} superposition steps leave no recovery phase in a {train_iters}-step run; "
                         "the recovery phase is required")
    return steps


@dataclasses.dataclass(frozen=True)
class SamplePlan:
    """How many baseline samples each step consumes, phase by phase, and how they sit in the train dataset.

    `sample_layout` is TSTConfig.sample_layout ("contiguous" | "segments"); it matters only with bag_size > 1.
    """

    global_batch_size: int
    train_iters: int
    bag_size: int = 1
    superposition_steps: int = 0
    sample_layout: str = "contiguous"

    @classmethod
    def from_args(cls, args) -> "SamplePlan":
        """The plan of a parsed command line (`arguments.parse_args`)."""
        tst = getattr(args, "tst", None)
        return cls(args.global_batch_size, args.train_iters, tst.bag_size if tst else 1,
                   superposition_steps(tst, args.train_iters), tst.sample_layout if tst else "contiguous")

    @property
    def samples_per_window(self) -> int:
        """Baseline samples per sample of the train dataset: s for the contiguous layout, else 1."""
        return self.bag_size if self.sample_layout == "contiguous" else 1

    def window_length(self, seq_length: int) -> int:
        """The sequence length (tokens, without the extra label token) of the train dataset's samples."""
        return self.samples_per_window * seq_length

    def dataset_samples(self, baseline_samples: int) -> int:
        """Samples of the train dataset that hold `baseline_samples` baseline samples."""
        return -(-baseline_samples // self.samples_per_window)

    def stream(self) -> dict:
        """What a checkpoint records about the stream it consumed (`data.check_stream_continuation`)."""
        return {"sample_layout": self.sample_layout if self.bag_size > 1 else None,
                "samples_per_window": self.samples_per_window}

    def phase_at(self, iteration: int) -> Phase:
        """Phase of the step that starts after `iteration` completed steps."""
        return Phase.SUPERPOSITION if iteration < self.superposition_steps else Phase.RECOVERY

    def bag_size_of(self, phase: Phase) -> int:
        """Baseline samples per row of a step of `phase`: s in superposition, 1 in recovery."""
        return self.bag_size if phase == Phase.SUPERPOSITION else 1

    def phase_end(self, phase: Phase) -> int:
        """The iteration at which `phase` ends (the superposition step count, or train_iters)."""
        return self.superposition_steps if phase == Phase.SUPERPOSITION else self.train_iters

    def samples_per_step(self, phase: Phase) -> int:
        return self.global_batch_size * self.bag_size_of(phase)

    def samples_before(self, iteration: int) -> int:
        """Baseline samples consumed by the first `iteration` steps."""
        sup = min(iteration, self.superposition_steps)
        return sup * self.samples_per_step(Phase.SUPERPOSITION) + (iteration - sup) * self.global_batch_size

    def total_samples(self) -> int:
        return self.samples_before(self.train_iters)
