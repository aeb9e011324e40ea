"""TSTConfig: what TST adds to a Megatron run, validated once with clear errors."""

from __future__ import annotations

import dataclasses
from typing import Optional

from megatron_tst.mce import IGNORE_INDEX, WEIGHTINGS

# What a superposition row is made of: "contiguous" (the paper's) or "segments" (s baseline samples; see TSTConfig).
SAMPLE_LAYOUTS = ("contiguous", "segments")


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

    def check_layout(self, seq_length: Optional[int], *, tensor_parallel_size: int = 1,
                     sequence_parallel: bool = False, context_parallel_size: int = 1,
                     pipeline_parallel_size: int = 1, untie_embeddings_and_output_weights: bool = True) -> None:
        """Refuse (ValueError) sizes a superposition step cannot run with: bags straddling parallel slices (or,
        with the "segments" layout, samples), and tied embeddings across pipeline stages. Plain sizes only, so
        that `parse_args` can check before any process starts and the model build checks again with its own
        config. With the default "contiguous" layout a row is s*L contiguous tokens, so any L works."""
        from megatron_tst.superposition import check_bag_layout  # megatron-core import, only when checking

        if seq_length is not None:
            if self.sample_layout == "segments" and seq_length % self.bag_size:
                raise ValueError(
                    f"--seq-length {seq_length} must be divisible by --tst-bag-size {self.bag_size} with "
                    f"--tst-sample-layout segments: a superposition sample is {self.bag_size} baseline samples and "
                    "bags must not straddle them (the default --tst-sample-layout contiguous takes any length)")
            check_bag_layout(seq_length, self.bag_size, tensor_parallel_size=tensor_parallel_size,
                             sequence_parallel=sequence_parallel, context_parallel_size=context_parallel_size)
        if not untie_embeddings_and_output_weights and pipeline_parallel_size > 1:
            raise ValueError("tied input/output embeddings across pipeline stages are not supported with TST: "
                             "use --untie-embeddings-and-output-weights (the paper's setting) or PP=1")
