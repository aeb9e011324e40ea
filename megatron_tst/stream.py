"""The sample stream of a TST run: which tokens Megatron's train sample `i` holds, and in which phase.

Megatron-LM's loop reads the train dataset by global sample index: its `single` sampler
(`megatron.training.datasets.data_samplers.MegatronPretrainingSampler`) hands data-parallel rank r of a step that
starts at `consumed_train_samples` = c the indices c + j*mbs*dp + r*mbs + [0, mbs), micro-batch j after micro-batch
j, and a resume starts the sampler at the checkpoint's consumed samples. So the phase of a sample is a function of
its index, and the phase switch and every resume follow from Megatron's own bookkeeping:

    sample i <  N_sup: a superposition row, one contiguous window of s*L raw tokens (+1 label token) of the
                       document stream: window i (bags `tokens.view(L, s)`, next-bag targets [L, s]);
    sample i >= N_sup: a recovery sample of L tokens, one piece (L tokens, [p*L, (p+1)*L] of a window) of the
                       windows after N_sup, read in blocks: G windows (G = the global batch size) over s steps, step
                       k of a block taking piece k of each of its G windows (`SamplePlan.baseline_sample`).

N_sup is what the superposition steps consume: `superposition_steps * global batch size` (with a batch-size
ramp-up, what Megatron's micro-batch calculator gives those steps). Windows are Megatron's `GPTDataset` samples at
sequence length s*L (`BlendedMegatronDatasetBuilder`: blends, splits, shuffling, caching all Megatron's): the
shuffle moves whole windows, so a step's G windows are as diverse as G of Megatron's stock samples. Baseline sample
b (the ids `--record-data-stream` writes) is piece b % s of window b // s, the L-sample Megatron's unshuffled
sample index puts there (a sample starts with the token that ends the previous one).

Blocks: any G consecutive recovery samples come from G distinct windows (also across block boundaries and under a
batch-size ramp, whose steps are at most G samples), and after each block exactly its G windows are consumed. A run
whose recovery phase ends inside a block reads a last, cut block instead: the m whole windows and e pieces of one
more that its remaining m*s + e samples hold, piece by piece across them, so that at the end of the run too the
trained tokens are a prefix of the window stream (its steps hold at most m + 1 <= G windows: the most a prefix
allows).

The invariant (tests/test_sample_layout.py): over the run every raw token of a prefix of the window stream is
trained on once, none skipped, across the switch and any resume (the mapping is a function of the sample index);
a run with the same data flags and `--tst-superposition-ratio 0` (the same-stream baseline of a comparison) reads
the same stream: the same windows in the same order, its recovery blocks starting at window 0.

The "segments" layout (`--tst-sample-layout segments`, a deviation from the paper kept for runs that must read a
stock Megatron-LM baseline's sample order) reads Megatron's stock `GPTDataset` of length L instead: superposition
row i is the s stock samples [i*s, i*s + s), whose targets never cross a segment boundary, and recovery sample i
is stock sample N_sup*s + (i - N_sup). Without `--tst-*` flags the train dataset is Megatron's stock one, untouched.

Items are dicts of tensors that torch's default collate stacks into micro-batches (`superposition_item`,
`stock_item`; a superposition item is recognised by its `tst_targets`), plus `sample_ids`: the baseline samples it
holds, for `--record-data-stream`, dropped before the model sees the batch.
"""

from __future__ import annotations

import dataclasses
import enum
import math
from typing import Optional

import torch

from megatron_tst.config import TSTConfig
from megatron_tst.mce import IGNORE_INDEX
from megatron_tst.superposition import make_stock_batch, make_superposition_batch

LM_LOSS = "lm loss"  # Megatron-LM's name of the next-token loss
MCE_LOSS = "mce loss"
SAMPLE_IDS = "sample_ids"


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

    `tst.superposition_iters` if given, else floor(`tst.superposition_ratio` * train_iters) (TST_SPEC 1).
    Raises ValueError when no recovery step would be left (the recovery phase is required).
    """
    if tst is None:
        return 0
    if tst.superposition_iters is not None:
        steps = tst.superposition_iters
    else:
        steps = int(math.floor(tst.superposition_ratio * train_iters + 1e-9))
    if steps >= train_iters:
        raise ValueError(f"{steps} superposition steps leave no recovery phase in a {train_iters}-step run "
                         "(--train-iters, or --train-samples over the global batch size): the recovery phase is "
                         "required; lower --tst-superposition-ratio / --tst-superposition-iters")
    return steps


@dataclasses.dataclass(frozen=True)
class SamplePlan:
    """Where the phases sit in Megatron's train samples, derived once per run (`from_megatron`).

    Attributes:
        seq_length: L, positions per sample (Megatron's --seq-length).
        total_samples: Megatron's train samples of the whole run (--train-samples, or --train-iters x the global
            batch size).
        bag_size: s (1 without TST).
        superposition_steps: S, the optimizer steps of the superposition phase.
        superposition_samples: N_sup, the samples those steps consume (rows of s*L tokens each).
        sample_layout: "contiguous" (windows) or "segments" (s stock samples per row); see the module docstring.
        block_windows: G, the windows of a recovery block: the run's largest global batch (--global-batch-size, or
            where a batch-size ramp-up or schedule ends); 1 reads each window's pieces in consecutive samples. Only
            the contiguous layout has blocks.
        tst: whether the run has `--tst-*` flags (its train samples are TST's stream, also with 0 superposition
            steps: the same-stream baseline); otherwise they are Megatron's stock samples.
    """

    seq_length: int
    total_samples: int
    tst: bool = False
    bag_size: int = 1
    superposition_steps: int = 0
    superposition_samples: int = 0
    sample_layout: str = "contiguous"
    block_windows: int = 1

    @classmethod
    def from_megatron(cls, args, tst: Optional[TSTConfig]) -> "SamplePlan":
        """The plan of Megatron-LM's validated `args` (its micro-batch calculator initialised): the samples of the
        superposition steps and of the whole run are counted step by step with Megatron's own calculator, as its
        `update_train_iters` counts them, so that a batch-size ramp-up or step schedule places the switch on a step
        boundary (`--train-samples` gives the total). Raises ValueError (superposition_steps)."""
        from megatron.core.num_microbatches_calculator import (
            get_current_global_batch_size,
            update_num_microbatches,
        )

        train_iters = args.train_iters or _train_iters_of_samples(args)
        steps = superposition_steps(tst, train_iters)
        consumed = [0]  # Megatron's samples consumed after k steps
        for _ in range(steps if args.train_samples else train_iters):
            update_num_microbatches(consumed[-1], consistency_check=False)
            consumed.append(consumed[-1] + get_current_global_batch_size())
        superposition_samples, total = consumed[steps], args.train_samples or consumed[-1]
        # G: the largest step of the run (the batch size a ramp-up or step schedule ends at; --global-batch-size
        # is the first one under 0.19's --step-batch-size-schedule), so that every step reads distinct windows
        update_num_microbatches(max(total - 1, 0), consistency_check=False)
        largest = max(get_current_global_batch_size(), args.global_batch_size or 1)
        update_num_microbatches(0, consistency_check=False)
        return cls(seq_length=args.seq_length, total_samples=total, tst=tst is not None,
                   bag_size=tst.bag_size if tst else 1,
                   superposition_steps=steps, superposition_samples=superposition_samples,
                   sample_layout=tst.sample_layout if tst else "contiguous", block_windows=largest)

    # ------------------------------------------------------------------------------------------------ phases

    def phase_of_sample(self, index: int) -> Phase:
        return Phase.SUPERPOSITION if index < self.superposition_samples else Phase.RECOVERY

    def phase_at(self, iteration: int) -> Phase:
        """Phase of the step that starts after `iteration` completed steps."""
        return Phase.SUPERPOSITION if iteration < self.superposition_steps else Phase.RECOVERY

    # ------------------------------------------------------------------------------------------------ accounting

    def baseline_samples_before(self, consumed_samples: int) -> int:
        """Baseline samples of L tokens in Megatron's first `consumed_samples` train samples."""
        sup = min(consumed_samples, self.superposition_samples)
        return sup * self.bag_size + (consumed_samples - sup)

    def raw_tokens_before(self, consumed_samples: int) -> int:
        """Raw tokens in Megatron's first `consumed_samples` train samples (s*L per superposition row)."""
        return self.baseline_samples_before(consumed_samples) * self.seq_length

    def baseline_sample(self, index: int) -> int:
        """The baseline sample (piece b % s of window b // s) that recovery sample `index` >= N_sup reads.

        Contiguous layout: recovery samples go in blocks of G*s (G = `block_windows`) over windows N_sup + k*G ...;
        sample t of a block is piece t // G of the block's window t % G. The last block of the run, when the run
        ends inside it, is cut to the m windows and e pieces its m*s + e samples hold and read piece by piece
        across them (module docstring). Samples past the run (Megatron's sampler's one extra) follow in stream
        order. The segments layout reads stock samples in order: N_sup*s + (index - N_sup).
        """
        first = self.superposition_samples * self.bag_size  # window N_sup, piece 0
        r, recovery = index - self.superposition_samples, self.total_samples - self.superposition_samples
        if self.sample_layout != "contiguous" or not 0 <= r < recovery:
            return first + r
        block = self.block_windows * self.bag_size
        whole = recovery - recovery % block  # samples in whole blocks
        if r < whole:
            start, piece, window = r - r % block, *divmod(r % block, self.block_windows)
        else:
            start = whole
            piece, window = _piece_by_piece(r - whole, *divmod(recovery - whole, self.bag_size))
        return first + start + window * self.bag_size + piece

    @property
    def cut_block_start(self) -> int:
        """Index of the first sample of the run's last recovery block when the run ends inside it (it is cut short,
        `baseline_sample`); `total_samples` when the run ends on a block boundary or has no blocks (segments).
        Two plans with the same N_sup, s and G read every sample before the earlier of theirs alike."""
        if self.sample_layout != "contiguous":
            return self.total_samples
        return self.total_samples - (self.total_samples - self.superposition_samples) % (
            self.block_windows * self.bag_size)

    @property
    def samples_per_window(self) -> int:
        """Baseline samples per sample of the dataset the stream is cut from: s for windows, 1 for stock samples."""
        return self.bag_size if self.sample_layout == "contiguous" else 1

    @property
    def dataset_length(self) -> int:
        """Length of the run's train dataset: one sample past the run. Megatron-LM's `MegatronPretrainingSampler`
        asserts consumed samples < dataset length, also when a run that has ended is launched again (a requeued
        job): Megatron's stock GPTDataset, whole epochs, is longer than the run as well."""
        return self.total_samples + 1

    def source_samples_needed(self) -> int:
        """Samples of the source dataset (windows, or stock samples) the train dataset (`dataset_length`) reads."""
        baseline = self.baseline_samples_before(self.dataset_length)
        return -(-baseline // self.samples_per_window)

    def source_sequence_length(self) -> int:
        """The sequence length (tokens, without the label token) of the source dataset's samples."""
        return self.samples_per_window * self.seq_length

    def stream(self) -> dict:
        """What a run's stream is made of, for the resume checks (`loop.resume`)."""
        return {"sample_layout": self.sample_layout if self.tst else None,
                "samples_per_window": self.samples_per_window}


def _piece_by_piece(t: int, windows: int, extra: int) -> tuple:
    """(piece, window) of sample t of a block of `windows` whole windows and `extra` pieces of one more, read piece
    by piece across the windows: pieces 0..extra-1 of windows + 1 windows, then the rest of `windows` windows."""
    wide = extra * (windows + 1)
    if t < wide:
        return divmod(t, windows + 1)
    piece, window = divmod(t - wide, windows)
    return extra + piece, window


def _train_iters_of_samples(args) -> int:
    """Megatron-LM's `update_train_iters` for a --train-samples run, without changing `args`."""
    import copy

    from megatron.training.training import update_train_iters

    probe = copy.copy(args)
    update_train_iters(probe)
    return probe.train_iters


# ---------------------------------------------------------------------------------------------------- items


def stock_item(tokens_t: torch.Tensor, labels_t: torch.Tensor, loss_mask_t: torch.Tensor) -> dict:
    """A stock (recovery / baseline) sample from Megatron sample fields [L]: `superposition.make_stock_batch` of
    one row (causal: no attention mask; position ids 0..L-1)."""
    batch = make_stock_batch(tokens_t.unsqueeze(0), labels_t.unsqueeze(0), loss_mask_t.unsqueeze(0))
    return {key: value[0] for key, value in batch.items()}


def superposition_item(tokens_t: torch.Tensor, labels_t: torch.Tensor, loss_mask_t: torch.Tensor, bag_size: int, *,
                       segment_length: Optional[int] = None, ignore_index: int = IGNORE_INDEX) -> dict:
    """A superposition row from Megatron sample fields of s*L tokens: `superposition.make_superposition_batch` of
    one row: {"tokens": [s*L], "tst_targets": [L, s], "loss_mask": [L], "position_ids": [L]}, every field with the
    sequence first, in whole bags, so Megatron's context-parallel slicing of the collated batch cuts whole bags."""
    batch = make_superposition_batch(tokens_t.long().unsqueeze(0), labels_t.long().unsqueeze(0),
                                     loss_mask_t.unsqueeze(0), bag_size, segment_length=segment_length,
                                     ignore_index=ignore_index)
    return {key: value[0] for key, value in batch.items()}


class TSTTrainDataset(torch.utils.data.Dataset):
    """Megatron's train samples of a TST run, by global sample index (module docstring).

    Args:
        source: Megatron's GPTDataset of `plan.source_sequence_length()` tokens per sample (windows of s*L for the
            contiguous layout, stock samples of L for segments), with at least `plan.source_samples_needed()`
            samples.
        plan: the run's `SamplePlan` (of a run with `--tst-*` flags).
        ignore_index: the id of absent targets.

    Raises:
        ValueError: the source holds fewer samples than the run reads.
    """

    def __init__(self, source, plan: SamplePlan, ignore_index: int = IGNORE_INDEX):
        if not plan.tst:
            raise ValueError("TSTTrainDataset needs the plan of a run with --tst-* flags; a run without them reads "
                             "Megatron's stock dataset")
        if len(source) < plan.source_samples_needed():
            raise ValueError(f"the train dataset holds {len(source)} samples of {plan.source_sequence_length()} "
                             f"tokens, the run reads {plan.source_samples_needed()}")
        self.source, self.plan, self.ignore_index = source, plan, ignore_index

    def __len__(self) -> int:
        return self.plan.dataset_length

    def _fields(self, index: int) -> dict:
        # A recovery piece reads its whole window (GPTDataset reads samples whole), once per piece: 0.3-0.4 ms per
        # recovery sample at s=4, L=1024 on a 2-core CPU, blocks or consecutive pieces alike (data-loader time).
        sample = self.source[index]
        return {key: torch.as_tensor(sample[key]) for key in ("tokens", "labels", "loss_mask")}

    def __getitem__(self, index: int) -> dict:
        plan, s, length = self.plan, self.plan.bag_size, self.plan.seq_length
        if index < plan.superposition_samples:
            ids = range(index * s, index * s + s)
            if plan.sample_layout == "contiguous":
                fields, segment = self._fields(index), None
            else:
                pieces = [self._fields(i) for i in ids]
                fields = {key: torch.cat([p[key] for p in pieces]) for key in ("tokens", "labels", "loss_mask")}
                segment = length
            item = superposition_item(fields["tokens"], fields["labels"], fields["loss_mask"], s,
                                      segment_length=segment, ignore_index=self.ignore_index)
        else:
            baseline = plan.baseline_sample(index)
            ids = range(baseline, baseline + 1)
            if plan.sample_layout == "contiguous":
                window, piece = divmod(baseline, s)
                cut = slice(piece * length, (piece + 1) * length)
                fields = {key: value[cut] for key, value in self._fields(window).items()}
            else:
                fields = self._fields(baseline)
            item = stock_item(fields["tokens"], fields["labels"], fields["loss_mask"])
        item[SAMPLE_IDS] = torch.tensor(list(ids), dtype=torch.long)
        return item
