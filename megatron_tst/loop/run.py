"""What the plugin derives once per run from Megatron-LM's validated arguments: `TSTRun` (`start`, `current`).

Megatron-LM calls our providers and forward step with no run object of ours; they read Megatron's `get_args()`
for Megatron's settings and `current()` for TST's: the TST settings, the sample plan (`megatron_tst.stream`) and
the per-rank data-stream recorder. Megatron's `args` is not extended with run state.
"""

from __future__ import annotations

import dataclasses
import json
import os
from typing import List, Optional

from megatron_tst.config import TSTConfig
from megatron_tst.stream import SamplePlan
from megatron_tst.superposition import TARGETS_KEY


@dataclasses.dataclass(frozen=True)
class TSTRun:
    """TST's view of a run.

    Attributes:
        tst: the `--tst-*` settings, or None (a plain Megatron run through this entry point).
        plan: where the phases sit in Megatron's train samples.
        record_data_stream: `--record-data-stream` directory, or None.
    """

    tst: Optional[TSTConfig]
    plan: SamplePlan
    record_data_stream: Optional[str] = None

    def record_micro_batch(self, batch: dict, sample_ids) -> None:
        """Append one training micro-batch's baseline sample ids and token ids to this rank's stream file
        (`--record-data-stream DIR`: DIR/rank<global rank>.jsonl, one JSON line per micro-batch)."""
        if not self.record_data_stream or sample_ids is None:
            return
        import torch
        from megatron.training import get_args

        os.makedirs(self.record_data_stream, exist_ok=True)
        path = os.path.join(self.record_data_stream, f"rank{torch.distributed.get_rank():04d}.jsonl")
        iteration = get_args().curr_iteration
        with open(path, "a") as f:
            f.write(json.dumps({"iteration": iteration, "phase": self.plan.phase_at(iteration).value,
                                "superposition": TARGETS_KEY in batch, "sample_ids": sample_ids.tolist(),
                                "tokens": batch["tokens"].tolist()}) + "\n")


_current: Optional[TSTRun] = None


def start(args) -> TSTRun:
    """Derive the run from Megatron-LM's validated `args` (micro-batch calculator initialised) and make it
    current. Raises ValueError for TST settings the run cannot have."""
    global _current
    tst = TSTConfig.from_args(args)
    _current = TSTRun(tst=tst, plan=SamplePlan.from_megatron(args, tst),
                      record_data_stream=getattr(args, "record_data_stream", None))
    return _current


def current() -> TSTRun:
    """The run `start` derived. Raises RuntimeError before it."""
    if _current is None:
        raise RuntimeError("no TST run is set up: megatron_tst.loop.run.start(args) runs once Megatron-LM's "
                           "arguments are validated (megatron_tst.pretrain does it)")
    return _current


def degenerate_settings(run: TSTRun, args, train_tokens: Optional[int]) -> List[str]:
    """Warnings for TST settings that train, but not as the user likely meant: a --tst-superposition-ratio that
    gives no superposition step in this run, and a superposition window (s x --seq-length + 1 tokens) longer than
    the whole train split (`train_tokens`; Megatron's GPTDataset then repeats the corpus inside every window)."""
    if run.tst is None:
        return []
    out = []
    tst, plan = run.tst, run.plan
    if plan.superposition_steps == 0 and tst.superposition_iters is None and tst.superposition_ratio > 0:
        steps = f"{args.train_iters} steps" if getattr(args, "train_iters", None) else "steps"
        out.append(f"--tst-superposition-ratio {tst.superposition_ratio} of this run's {steps} is "
                   "less than one step: no superposition step, the run trains as plain Megatron-LM (recovery only). "
                   "Raise the ratio or give --tst-superposition-iters N.")
    window = tst.bag_size * plan.seq_length + 1
    if train_tokens is not None and plan.superposition_steps > 0 and tst.sample_layout == "contiguous" \
            and window > train_tokens:
        out.append(f"a superposition window of --tst-bag-size {tst.bag_size} x --seq-length {plan.seq_length} "
                   f"(+1) = {window:,} tokens is longer than the whole train split ({train_tokens:,} tokens): every "
                   "window repeats the corpus. Use more data, a smaller --tst-bag-size or --seq-length.")
    return out
