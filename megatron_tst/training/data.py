"""Data for both phases from Megatron-Core's datasets, with the baseline sample index as the unit of progress.

The stream invariant (kept here; tested by tests/test_sample_layout.py and tests/test_pretrain_e2e.py):

    A run reads one *block stream* B_0, B_1, B_2, ... of windows of Megatron's train dataset, and its baseline
    sample k is the k-th piece of L tokens (+1 label) of that stream. Baseline step n reads samples
    [c_n, c_n + G), a superposition step [c_n, c_n + s*G) (G = --global-batch-size, c_n =
    `consumed_train_samples` before the step). So across the superposition phase, the switch, the recovery
    phase and any resume, the raw tokens trained on are a prefix of the block stream, each once, none skipped;
    and a run with the same data flags and `--tst-superposition-ratio 0` (the baseline of the comparison)
    reads the same stream sample by sample.

What a window is depends on the sample layout (`SamplePlan.samples_per_window`):

* "contiguous" (default, the paper's Listing 1, TSTConfig.sample_layout): the train dataset is Megatron's
  `GPTDataset` built with sequence length s*L (through `BlendedMegatronDatasetBuilder`: blends, splits,
  caching all Megatron's). Its sample j is s*L + 1 contiguous tokens of the document stream; Megatron's
  shuffle index shuffles these windows, so blocks of s consecutive L-samples are shuffled as wholes, and in
  a blend each window (block) comes from one dataset of the blend. A superposition row is one window: bags
  `tokens.view(b, L, s)`, the extra token the last bag's one real target. Baseline sample k is tokens
  [(k % s)*L, (k % s + 1)*L + 1) of window k // s: exactly the L-sample that Megatron's unshuffled sample
  index puts there (sample k+1 starts with the token that ends sample k). Documents are packed as Megatron
  packs them: a window may span documents; EOD is an ordinary token (`--eod-mask-loss` drops, as in
  Megatron, the targets of positions whose input is EOD).
* "segments" (or no TST: s = 1): the train dataset is Megatron's stock `GPTDataset` of sequence length L
  (Megatron-LM's own sample order); a superposition row is the s consecutive samples
  [c + q*s, c + q*s + s), s unrelated windows of L tokens whose targets never cross a segment boundary.

Superposition steps start at a multiple of s (the phase comes first), so rows always align with windows.
Within a step, micro-batch j of data-parallel rank r holds rows j*mbs*dp + r*mbs + [0, mbs), Megatron-LM's
pretraining sampler order.
"""

from __future__ import annotations

import dataclasses
import json
import os
from typing import Iterator, List, Optional

import numpy as np
import torch

from megatron_tst.mce import IGNORE_INDEX
from megatron_tst.superposition import make_stock_batch, make_superposition_batch
from megatron_tst.training.schedule import Phase, SamplePlan


def check_stream_continuation(checkpoint_stream: Optional[dict], plan: SamplePlan, consumed_samples: int,
                              where: str = "the checkpoint") -> None:
    """Refuse (SystemExit) to continue a checkpoint's data stream with a run that reads another stream.

    `checkpoint_stream` is `SamplePlan.stream()` of the run that wrote the checkpoint (None: a checkpoint
    written before the sample layouts existed, or by Megatron-LM: both read Megatron's stock L-samples, i.e.
    samples_per_window 1). A run that consumed nothing continues anything. The way forward is named.
    """
    if consumed_samples == 0:
        return
    saved = checkpoint_stream or {"sample_layout": None, "samples_per_window": 1}
    saved_window, window = int(saved.get("samples_per_window", 1)), plan.samples_per_window
    if saved_window == window:
        return
    def describe(n):
        if n == 1:
            return ("Megatron's stock samples of --seq-length tokens (no TST, --tst-sample-layout segments, or a "
                    "checkpoint written by Megatron-LM or before megatron-tst had sample layouts)")
        return (f"contiguous windows of {n} x --seq-length tokens (--tst-sample-layout contiguous with "
                f"--tst-bag-size {n})")

    if saved_window == 1:
        forward = "add --tst-sample-layout segments to continue that stream exactly"
    else:
        forward = (f"continue with --tst-sample-layout contiguous and --tst-bag-size {saved_window} (the saving run's "
                   "data flags)")
    raise SystemExit(
        f"error: {where} consumed {consumed_samples} samples of {describe(saved_window)}, but this run would read "
        f"{describe(window)}: the data stream cannot be continued exactly (tokens would be repeated or skipped). "
        f"{forward[0].upper() + forward[1:]}, or start the data over on these weights with --finetune.")


def validate_data_files(prefixes: List[str], vocab_size: int, max_tokens_checked: int = 50_000_000) -> None:
    """Before any heavy work: each .bin matches its .idx, and its token ids fit the model's vocabulary.

    Scans up to `max_tokens_checked` tokens per file for the largest id. Raises ValueError.
    """
    from megatron.core.datasets.indexed_dataset import IndexedDataset

    for prefix in prefixes:
        try:
            dataset = IndexedDataset(prefix, mmap=True)
        except Exception as err:  # a truncated or foreign .idx
            raise ValueError(f"{prefix}.idx cannot be read as a Megatron index: {err}") from err
        expected = int(np.sum(dataset.index.sequence_lengths, dtype=np.int64))
        dtype = np.dtype(dataset.index.dtype)
        actual = os.path.getsize(prefix + ".bin") // dtype.itemsize
        if actual != expected:
            raise ValueError(f"{prefix}.bin holds {actual} tokens but {prefix}.idx describes {expected}: "
                             "the .bin and .idx do not belong together")
        tokens = np.memmap(prefix + ".bin", dtype=dtype, mode="r")[:max_tokens_checked]
        largest = int(tokens.max()) if tokens.size else -1
        if largest >= vocab_size:
            raise ValueError(f"{prefix}.bin holds token id {largest}, outside the model's vocabulary of {vocab_size} "
                             "(was the data tokenized with another tokenizer or a larger --vocab-size?)")


def _blend(paths):
    """Megatron's (prefixes, weights or None) of a --*data-path value; None when not given."""
    from megatron.core.datasets.utils import get_blend_from_list

    return get_blend_from_list(list(paths)) if paths else None


def _dataset_config(args, tokenizer, sequence_length: Optional[int] = None):
    from megatron.core.datasets.gpt_dataset import GPTDatasetConfig

    per_split = None
    if args.train_data_path or args.valid_data_path or args.test_data_path:
        per_split = [_blend(args.train_data_path), _blend(args.valid_data_path), _blend(args.test_data_path)]
    return GPTDatasetConfig(
        random_seed=args.seed, sequence_length=sequence_length or args.seq_length,
        blend=None if per_split else _blend(args.data_path), blend_per_split=per_split,
        split=None if per_split else args.split, path_to_cache=args.data_cache_path, tokenizer=tokenizer,
        reset_position_ids=False, reset_attention_mask=False, eod_mask_loss=args.eod_mask_loss,
        create_attention_mask=False,
    )


_SPLIT_NAMES = ("train", "validation", "test")


def _documents_in_split(prefix: str, split_range) -> int:
    """Documents of `prefix` that Megatron's split (start, end) fractions give a split (as GPTDataset cuts)."""
    from megatron.core.datasets.indexed_dataset import IndexedDataset

    documents = len(IndexedDataset(prefix, mmap=True).document_indices) - 1
    start, end = split_range
    return max(int(round(end * documents)) - int(round(start * documents)), 0)


def empty_splits(config) -> List[List[str]]:
    """Per split (train, validation, test): the --data-path members that hold no document in it (a split of
    weight 0 in --split, or per-split paths, count as not empty: nothing is built there)."""
    if config.mock or config.blend_per_split is not None:
        return [[], [], []]
    out = []
    for split_range in config.split_matrix:
        out.append([] if split_range is None else
                   [p for p in config.blend[0] if _documents_in_split(p, split_range) == 0])
    return out


def check_splits(args, tokenizer=None) -> None:
    """Before heavy work: every --data-path member has documents in every split --split gives a share, or the
    whole split is empty (then it is skipped, as the validation split without documents is). A member with an
    empty split inside a blend would end in Megatron-Core's bare AssertionError (blended_dataset.py) or an
    endless sample-index loop. Raises ValueError naming the member, the split and the ways forward."""
    if args.mock_data or not args.data_path:
        return
    config = _dataset_config(args, tokenizer)
    prefixes, weights = config.blend
    for index, empty in enumerate(empty_splits(config)):
        if not empty or (len(empty) == len(prefixes) and weights is None and index > 0):
            continue
        members = ", ".join(empty)
        raise ValueError(
            f"--data-path member(s) {members} hold no document in the {_SPLIT_NAMES[index]} split of --split "
            f"{args.split} (too few documents for its share): raise that split's share in --split, leave "
            f"{'them' if len(empty) > 1 else 'it'} out of the blend, or give the splits separately "
            "(--train-data-path, --valid-data-path, --test-data-path)")


def build_datasets(args, tokenizer, sizes: List[Optional[int]], is_built_on_rank,
                   sequence_length: Optional[int] = None):
    """(train, valid, test) GPTDatasets of at least `sizes` samples, through Megatron-Core's builder.

    `sizes` as Megatron-LM's train_valid_test_num_samples (pretrain_gpt.py): an int per split (a weighted
    blend needs one for every split); a split without any document is asked for None (one pass over nothing:
    Megatron's GPTDataset would loop forever looking for samples there). `sequence_length` (default
    --seq-length) is the datasets' sample length in tokens (each sample carries one more token for its
    labels): s*L for the contiguous layout's windows (`SamplePlan.window_length`).
    """
    from megatron.core.datasets.blended_megatron_dataset_builder import BlendedMegatronDatasetBuilder
    from megatron.core.datasets.gpt_dataset import GPTDataset, MockGPTDataset

    config = _dataset_config(args, tokenizer, sequence_length)
    cls = MockGPTDataset if args.mock_data else GPTDataset
    sizes = list(sizes)
    if not args.mock_data and config.blend_per_split is None:
        for i, empty in enumerate(empty_splits(config)):
            if i > 0 and empty and len(empty) == len(config.blend[0]) and config.blend[1] is None:
                sizes[i] = None
    if config.blend_per_split is not None:
        for i, blend in enumerate(config.blend_per_split):
            if blend is None:
                sizes[i] = None  # not built
    train, valid, test = BlendedMegatronDatasetBuilder(cls, sizes, is_built_on_rank, config).build()
    if valid is not None and len(valid) == 0:
        valid = None
    if train is not None and len(train) == 0:
        raise ValueError("the train split holds no documents: check --data-path and --split")
    return train, valid, test


class _Rows(torch.utils.data.Dataset):
    """Rows of a stream that starts at baseline sample `first_sample`, `bag_size` baseline samples per row.

    `samples_per_window` w: baseline samples per dataset sample (module docstring). w = 1: row q is dataset
    samples first + q*s ... first + q*s + s - 1, concatenated (s segments). w = s = bag_size: row q is dataset
    sample first/s + q, one contiguous window. w > 1, bag_size 1: row q is baseline sample k = first + q,
    tokens [(k % w)*L, (k % w + 1)*L] (inclusive: the label token) of dataset sample k // w.
    """

    def __init__(self, dataset, first_sample: int, bag_size: int, samples_per_window: int = 1,
                 seq_length: Optional[int] = None):
        if samples_per_window > 1 and bag_size not in (1, samples_per_window):
            raise ValueError(f"rows of {bag_size} samples cannot be cut from windows of {samples_per_window}")
        if samples_per_window > 1 and bag_size > 1 and first_sample % samples_per_window:
            raise ValueError(f"a superposition stream must start at a window boundary (a multiple of "
                             f"{samples_per_window} baseline samples), not at sample {first_sample}")
        self.dataset, self.first_sample, self.bag_size = dataset, first_sample, bag_size
        self.window, self.seq_length = samples_per_window, seq_length
        self._cached = (None, None)  # (window index, its fields): recovery reads a window w times in a row

    def __len__(self):
        return len(self.dataset)

    def sample_ids(self, row: int) -> List[int]:
        start = self.first_sample + row * self.bag_size
        return list(range(start, start + self.bag_size))

    def _fields(self, index: int) -> dict:
        if self._cached[0] != index:
            sample = self.dataset[index]
            self._cached = (index, {key: torch.as_tensor(sample[key]) for key in ("tokens", "labels", "loss_mask")})
        return self._cached[1]

    def __getitem__(self, row: int) -> dict:
        ids = self.sample_ids(row)
        if self.window == 1:
            samples = [self._fields(i) for i in ids]
            out = {key: torch.cat([s[key] for s in samples]) for key in ("tokens", "labels", "loss_mask")}
        elif self.bag_size > 1:  # one whole window
            out = dict(self._fields(ids[0] // self.window))
        else:  # one L-piece of a window
            piece = ids[0] % self.window
            window = self._fields(ids[0] // self.window)
            cut = slice(piece * self.seq_length, (piece + 1) * self.seq_length)
            out = {key: value[cut] for key, value in window.items()}
        out["sample_ids"] = torch.tensor(ids)
        return out


class _StepSampler(torch.utils.data.Sampler):
    """Row indices of this DP rank's micro-batches, step after step (Megatron-LM's order)."""

    def __init__(self, num_steps, global_batch_size, micro_batch_size, dp_rank, dp_size):
        self.num_steps, self.gbs, self.mbs = num_steps, global_batch_size, micro_batch_size
        self.dp_rank, self.dp_size = dp_rank, dp_size

    def __len__(self):
        return self.num_steps * self.gbs // (self.mbs * self.dp_size)

    def __iter__(self):
        per_micro = self.mbs * self.dp_size
        for step in range(self.num_steps):
            for j in range(self.gbs // per_micro):
                start = step * self.gbs + j * per_micro + self.dp_rank * self.mbs
                yield list(range(start, start + self.mbs))


@dataclasses.dataclass
class _Collate:
    bag_size: int
    seq_length: int
    ignore_index: int
    contiguous: bool = False  # rows are one window each (no segment boundaries inside a row)

    def __call__(self, rows: List[dict]) -> dict:
        tokens = torch.stack([r["tokens"] for r in rows]).long()
        labels = torch.stack([r["labels"] for r in rows]).long()
        loss_mask = torch.stack([r["loss_mask"] for r in rows]).float()
        sample_ids = torch.stack([r["sample_ids"] for r in rows])
        if self.bag_size > 1:
            batch = make_superposition_batch(tokens, labels, loss_mask, self.bag_size,
                                             segment_length=None if self.contiguous else self.seq_length,
                                             ignore_index=self.ignore_index)
        else:
            batch = make_stock_batch(tokens, labels, loss_mask)
        batch["sample_ids"] = sample_ids
        return batch


def micro_batches(dataset, *, first_sample: int, num_steps: int, bag_size: int, global_batch_size: int,
                  micro_batch_size: int, dp_rank: int, dp_size: int, seq_length: int, ignore_index: int = IGNORE_INDEX,
                  num_workers: int = 0, samples_per_window: int = 1) -> Iterator[dict]:
    """This DP rank's micro-batches for `num_steps` steps starting at baseline sample `first_sample`.

    `dataset` holds windows of `samples_per_window` baseline samples of `seq_length` (L) tokens each
    (`SamplePlan.samples_per_window`: s for the contiguous layout, whose superposition rows are one window
    each; 1 for Megatron's stock samples, whose superposition rows are s segments).
    bag_size 1 gives stock micro-batches ({tokens, labels, loss_mask, position_ids} [mbs, L]); bag_size s > 1
    gives superposition micro-batches (superposition.make_superposition_batch of [mbs, s*L] rows). Every
    micro-batch also carries `sample_ids` [mbs, s] (the baseline samples it holds), which `strip_bookkeeping`
    removes before the model sees it. Raises ValueError for rows that do not fit the windows.
    """
    loader = torch.utils.data.DataLoader(
        _Rows(dataset, first_sample, bag_size, samples_per_window, seq_length),
        batch_sampler=_StepSampler(num_steps, global_batch_size, micro_batch_size, dp_rank, dp_size),
        collate_fn=_Collate(bag_size, seq_length, ignore_index, contiguous=samples_per_window > 1),
        num_workers=num_workers,
        pin_memory=torch.cuda.is_available(), persistent_workers=False,
        # Its own generator: a loader must not draw from the global RNG (dropout's stream), or creating one
        # at a resume or at the phase switch would shift that stream.
        generator=torch.Generator().manual_seed(first_sample),
    )
    return iter(loader)


def stage_iterators(model, dataset, *, first_sample: int, num_steps: int, bag_size: int, global_batch_size: int,
                    micro_batch_size: int, seq_length: int, ignore_index: int = IGNORE_INDEX, num_workers: int = 0,
                    samples_per_window: int = 1, recorder: Optional["StreamRecorder"] = None,
                    first_iteration: int = 0, phase: Phase = Phase.RECOVERY):
    """What Megatron's schedules take as `data_iterator`: per model chunk (virtual pipeline stage), this rank's
    micro-batch stream (`micro_batches`, bookkeeping stripped, recorded when `recorder` is given) if the chunk
    is a first or last pipeline stage, else None; a single iterator without virtual pipelining."""
    from megatron.core import parallel_state
    from megatron.core.num_microbatches_calculator import get_num_microbatches
    from megatron.core.utils import get_attr_wrapped_model

    iterators: List[Optional[Iterator[dict]]] = []
    for chunk in model:
        vp_stage = get_attr_wrapped_model(chunk, "vp_stage")
        needs = (parallel_state.is_pipeline_first_stage(ignore_virtual=False, vp_stage=vp_stage)
                 or parallel_state.is_pipeline_last_stage(ignore_virtual=False, vp_stage=vp_stage))
        if not needs or dataset is None:
            iterators.append(None)
            continue
        stream = micro_batches(
            dataset, first_sample=first_sample, num_steps=num_steps, bag_size=bag_size,
            global_batch_size=global_batch_size, micro_batch_size=micro_batch_size,
            dp_rank=parallel_state.get_data_parallel_rank(), dp_size=parallel_state.get_data_parallel_world_size(),
            seq_length=seq_length, ignore_index=ignore_index, num_workers=num_workers,
            samples_per_window=samples_per_window)
        iterators.append(strip_bookkeeping(stream, recorder, first_iteration, get_num_microbatches(), phase))
    return iterators[0] if len(iterators) == 1 else iterators


class StreamRecorder:
    """Writes, per micro-batch, the baseline sample ids and token ids this rank trains on (JSON lines)."""

    def __init__(self, directory: str, rank: int):
        os.makedirs(directory, exist_ok=True)
        self.path = os.path.join(directory, f"rank{rank:04d}.jsonl")

    def record(self, iteration: int, phase: Phase, batch: dict) -> None:
        with open(self.path, "a") as f:
            f.write(json.dumps({"iteration": iteration, "phase": phase.value,
                                "sample_ids": batch["sample_ids"].tolist(),
                                "tokens": batch["tokens"].tolist()}) + "\n")


def strip_bookkeeping(batches: Iterator[dict], recorder: Optional[StreamRecorder] = None,
                      first_iteration: int = 0, microbatches_per_step: int = 1,
                      phase: Phase = Phase.RECOVERY) -> Iterator[dict]:
    """Drop `sample_ids` (recording them first if asked) so that batches hold only model inputs."""
    for count, batch in enumerate(batches):
        if recorder is not None:
            recorder.record(first_iteration + count // microbatches_per_step, phase, batch)
        batch = dict(batch)
        batch.pop("sample_ids")
        yield batch
