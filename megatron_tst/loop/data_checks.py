"""Checks of the data flags before heavy work: each .bin matches its .idx, its token ids fit the vocabulary, and
every member of a --data-path blend has documents in every split --split gives a share.

Megatron-LM would otherwise fail deep inside dataset building (a bare AssertionError in blended_dataset.py, an
endless sample-index loop for an empty member split) or train on ids outside the embedding table.
"""

from __future__ import annotations

import os
from typing import List, Optional

import numpy as np


def data_prefixes(args) -> List[str]:
    """The dataset prefixes of every --*data-path flag (Megatron blends: 'PREFIX ...' or 'W1 PREFIX1 W2 ...')."""
    from megatron.core.datasets.utils import get_blend_from_list

    prefixes = []
    for flag in ("data_path", "train_data_path", "valid_data_path", "test_data_path"):
        paths = getattr(args, flag, None)
        if paths:
            prefixes += get_blend_from_list(list(paths))[0]
    return prefixes


def check_data(args, vocab_size: int) -> None:
    """Before heavy work: `validate_data_files` and `check_splits` for these flags (nothing with --mock-data or
    --data-args-path). Raises ValueError naming the file or member, what is wrong and the way forward."""
    if args.mock_data or getattr(args, "data_args_path", None):
        return
    validate_data_files(data_prefixes(args), vocab_size)
    check_splits(args)


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


def check_splits(args) -> None:
    """Before heavy work: every --data-path member has documents in every split --split gives a share, or the
    whole split is empty (then it is skipped, as the validation split without documents is). A member with an
    empty split inside a blend would end in Megatron-Core's bare AssertionError (blended_dataset.py) or an
    endless sample-index loop. Raises ValueError naming the member, the split and the ways forward."""
    if args.mock_data or not args.data_path:
        return
    from megatron_tst.loop.providers import dataset_config

    config = dataset_config(args)
    prefixes, weights = config.blend
    empty_by_split = empty_splits(config)
    no_validation = config.split_matrix[1] is None or len(empty_by_split[1]) == len(prefixes)
    if no_validation and args.eval_iters and not getattr(args, "skip_train", False):
        # Megatron-LM would evaluate a missing split (a TypeError in the forward step) at the first --eval-interval
        raise ValueError(f"--split {args.split} leaves the validation split without documents, but --eval-iters "
                         f"{args.eval_iters} asks for validation: pass --eval-iters 0 (no validation), or give the "
                         "validation split a share in --split (or --valid-data-path)")
    for index, empty in enumerate(empty_by_split):
        if not empty or (len(empty) == len(prefixes) and weights is None and index > 0):
            continue
        members = ", ".join(empty)
        raise ValueError(
            f"--data-path member(s) {members} hold no document in the {_SPLIT_NAMES[index]} split of --split "
            f"{args.split} (too few documents for its share): raise that split's share in --split, leave "
            f"{'them' if len(empty) > 1 else 'it'} out of the blend, or give the splits separately "
            "(--train-data-path, --valid-data-path, --test-data-path)")


def train_split_tokens(args) -> Optional[int]:
    """Tokens in the documents of the train split (every --data-path member, or --train-data-path), as
    Megatron's GPTDataset cuts the split by documents; None with --mock-data or no data path."""
    if args.mock_data or not (args.data_path or getattr(args, "train_data_path", None)):
        return None
    from megatron.core.datasets.indexed_dataset import IndexedDataset

    from megatron_tst.loop.providers import dataset_config

    config = dataset_config(args)
    if config.blend_per_split is not None:
        prefixes, split_range = (config.blend_per_split[0] or [[]])[0], (0.0, 1.0)
    else:
        prefixes, split_range = config.blend[0], config.split_matrix[0]
    if split_range is None:
        return 0
    total = 0
    for prefix in prefixes:
        dataset = IndexedDataset(prefix, mmap=True)
        documents = dataset.document_indices
        count = len(documents) - 1
        first, last = int(round(split_range[0] * count)), int(round(split_range[1] * count))
        lengths = dataset.sequence_lengths[documents[first]:documents[last]]
        total += int(np.sum(lengths, dtype=np.int64))
    return total
