"""TSTConfig: what TST adds to a Megatron run, validated once with clear errors."""

from __future__ import annotations

import dataclasses
from typing import Optional

from megatron_tst.mce import IGNORE_INDEX, WEIGHTINGS

# What a superposition row is made of: "contiguous" (the paper's) or "segments" (s baseline samples; see TSTConfig).
SAMPLE_LAYOUTS = ("contiguous", "segments")
# The command-line flags TSTConfig is made of (Megatron-LM's extra arguments, `megatron_tst.loop.arguments`).
TST_FLAGS = ("--tst-bag-size", "--tst-superposition-ratio", "--tst-superposition-iters", "--tst-weighting",
             "--tst-sample-layout")


@dataclasses.dataclass(frozen=True)
class TSTConfig:
    """Token-superposition settings.

    Attributes:
        bag_size: s, tokens averaged into one position (paper: 4..8; 16 at 10B-A1B).
        superposition_ratio: r, the fraction of all optimizer steps trained with superposition (paper:
            0.2..0.4). Exclusive with `superposition_iters`.
        superposition_iters: the number of superposition steps, instead of a ratio.
        weighting: within-bag target weighting of the multi-hot cross-entropy.
        ignore_index: the target id of absent targets.
        sample_layout: what a superposition row is made of (`SAMPLE_LAYOUTS`): "contiguous" (default, the
            paper's Listing 1: one contiguous window of s*L raw tokens of the document stream) or "segments"
            (s consecutive baseline samples of Megatron's shuffled `GPTDataset`, s unrelated windows of L
            tokens: a deviation from the paper, kept for runs that need a stock Megatron-LM baseline's exact
            sample order). See `megatron_tst.training.data` for the data stream each one reads.
    """

    bag_size: int
    superposition_ratio: Optional[float] = None
    superposition_iters: Optional[int] = None
    weighting: str = "uniform"
    ignore_index: int = IGNORE_INDEX
    sample_layout: str = "contiguous"

    def __post_init__(self):
        if not isinstance(self.bag_size, int) or self.bag_size < 1:
            raise ValueError(f"--tst-bag-size must be an integer >= 1, got {self.bag_size!r}")
        if self.superposition_ratio is not None and self.superposition_iters is not None:
            raise ValueError("give --tst-superposition-ratio or --tst-superposition-iters, not both")
        if self.superposition_ratio is None and self.superposition_iters is None:
            raise ValueError("TST needs --tst-superposition-ratio or --tst-superposition-iters")
        if self.superposition_ratio is not None and not 0.0 <= self.superposition_ratio < 1.0:
            raise ValueError(
                f"--tst-superposition-ratio must be in [0, 1) (the recovery phase is required), "
                f"got {self.superposition_ratio}"
            )
        if self.superposition_iters is not None and self.superposition_iters < 0:
            raise ValueError(f"--tst-superposition-iters must be >= 0, got {self.superposition_iters}")
        if self.weighting not in WEIGHTINGS:
            raise ValueError(f"--tst-weighting must be one of {WEIGHTINGS}, got {self.weighting!r}")
        if self.sample_layout not in SAMPLE_LAYOUTS:
            raise ValueError(f"--tst-sample-layout must be one of {SAMPLE_LAYOUTS}, got {self.sample_layout!r}")

    @classmethod
    def from_args(cls, args) -> Optional["TSTConfig"]:
        """The TST settings of Megatron-LM's parsed `args` (the `--tst-*` flags, `loop.arguments`); None when no
        `--tst-*` flag is given (a plain Megatron run). Raises ValueError naming the flag."""
        given = [flag for flag in TST_FLAGS if getattr(args, flag[2:].replace("-", "_"), None) is not None]
        if not set(given) & set(TST_FLAGS[:3]):
            if given:
                raise ValueError(f"{given[0]} needs --tst-bag-size and --tst-superposition-ratio (or "
                                 "--tst-superposition-iters)")
            return None
        if args.tst_bag_size is None:
            raise ValueError(f"{' '.join(given)} needs --tst-bag-size")
        return cls(bag_size=args.tst_bag_size, superposition_ratio=args.tst_superposition_ratio,
                   superposition_iters=args.tst_superposition_iters, weighting=args.tst_weighting or "uniform",
                   sample_layout=args.tst_sample_layout or "contiguous")

    def check_layout(self, seq_length: int, *, tensor_parallel_size: int = 1, sequence_parallel: bool = False,
                     context_parallel_size: int = 1) -> None:
        """Refuse (ValueError) sizes a superposition step cannot run with: bags straddling parallel slices of the
        L positions (TST_SPEC 2) or, with the "segments" layout, samples. With the default "contiguous" layout a
        row is s*L contiguous tokens, so any L works."""
        from megatron_tst.superposition import check_bag_layout  # megatron-core import, only when checking

        if self.sample_layout == "segments" and seq_length % self.bag_size:
            raise ValueError(
                f"--seq-length {seq_length} must be divisible by --tst-bag-size {self.bag_size} with "
                f"--tst-sample-layout segments: a superposition sample is {self.bag_size} baseline samples and "
                "bags must not straddle them (the default --tst-sample-layout contiguous takes any length)")
        check_bag_layout(seq_length, self.bag_size, tensor_parallel_size=tensor_parallel_size,
                         sequence_parallel=sequence_parallel, context_parallel_size=context_parallel_size)
