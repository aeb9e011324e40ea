"""Token superposition: bags of s contiguous tokens in, next bags out.

Input side (`superposed_embedding`): a sample of s*L raw tokens is split into L bags of s contiguous
tokens; each position's input is the arithmetic mean of its bag's token embeddings, accumulated in float32
and cast back to the model dtype. No projection, scaling or position inside a bag; the transformer sees
L positions (RoPE over 0..L-1), so a superposition step costs what a baseline step costs.

Output side (`build_bag_targets`): the position of bag i (raw tokens [i*s, i*s+s-1]) predicts the next
bag, raw tokens [(i+1)*s, (i+1)*s+s-1], i.e. labels [i*s+s-1, i*s+2s-2] (labels are tokens shifted by one).
So no token is ever a target of the position whose bag contains it.

Rows: by default (the paper's Listing 1) a row is one contiguous window of s*L raw tokens of the document
stream, plus the one following token: Megatron's sample fields of a dataset with sequence length s*L
(training/data.py). Bags are `tokens.view(b, L, s)`; targets run across document boundaries like inputs
(EOD is an ordinary token; Megatron's loss_mask, e.g. --eod-mask-loss, removes targets). Last position:
the window carries one token past its end (labels[-1]), so the last bag has exactly one real target, that
token; its other s-1 slots are ignored: the paper's "labels shifted left by s-1, padded with ignore values".
With `segment_length` L (the "segments" layout, a deviation from the paper) a row is s independent baseline
samples of L tokens: targets never cross a segment boundary and each segment's last bag has one target.

Parallelism (same rules as Megatron's stock embedding; bags are formed before any split):
- tensor parallel: each rank looks up only its vocab shard (zeros elsewhere), averages its partial
  embeddings per bag, then all-reduces (or reduce-scatters under sequence parallelism) the [L, b, h]
  bag means: that communication is s times smaller than the baseline's over s*L tokens.
- sequence parallel: each TP rank receives positions [r*L/tp, (r+1)*L/tp) of the averaged sequence, so a
  bag is never split; requires L % tp == 0.
- context parallel: Megatron splits a sample along the sequence into 2*cp chunks. Apply that split to the
  bag batch (`megatron.core.utils.get_batch_on_this_cp_rank` on tokens [b, s*L] and targets [b, L, s]
  along dim 1 does it): with L % (2*cp) == 0 every chunk is s*L/(2*cp) tokens = L/(2*cp) whole bags,
  and the chunk's targets are the matching L/(2*cp) rows of targets.
"""

from __future__ import annotations

from typing import Optional

import torch
import torch.nn.functional as F
from megatron.core import tensor_parallel

from megatron_tst.mce import IGNORE_INDEX
from megatron_tst.platform import mcore_compat


def check_bag_layout(
    num_positions: int,
    bag_size: int,
    *,
    tensor_parallel_size: int = 1,
    sequence_parallel: bool = False,
    context_parallel_size: int = 1,
) -> None:
    """Raise ValueError if L positions of bags cannot be laid out over the parallel groups."""
    if bag_size < 1:
        raise ValueError(f"TST bag size must be >= 1, got {bag_size}")
    if num_positions < 1:
        raise ValueError(f"sequence length (positions) must be >= 1, got {num_positions}")
    if sequence_parallel and num_positions % tensor_parallel_size:
        raise ValueError(
            f"sequence parallelism splits the {num_positions} superposed positions over TP={tensor_parallel_size} "
            f"ranks: the sequence length must be divisible by the TP size"
        )
    if context_parallel_size > 1 and num_positions % (2 * context_parallel_size):
        raise ValueError(
            f"context parallelism splits the {num_positions} superposed positions into 2*CP = "
            f"{2 * context_parallel_size} chunks: the sequence length must be divisible by {2 * context_parallel_size}"
        )


def split_into_bags(tokens_bt: torch.Tensor, bag_size: int) -> torch.Tensor:
    """[b, s*L] token ids -> [b, L, s] bags of s contiguous tokens (a view)."""
    if tokens_bt.dim() != 2:
        raise ValueError(f"tokens must be [b, s*L], got shape {tuple(tokens_bt.shape)}")
    if bag_size < 1:
        raise ValueError(f"TST bag size must be >= 1, got {bag_size}")
    batch, length = tokens_bt.shape
    if length % bag_size:
        raise ValueError(
            f"token length {length} is not divisible by the bag size {bag_size}: a superposition sample "
            f"must hold s*L tokens"
        )
    return tokens_bt.view(batch, length // bag_size, bag_size)


def _run_forward_pre_hooks(module: torch.nn.Module, args: tuple) -> None:
    """The forward pre-hooks `module(*args)` would run, without its forward: Megatron-Core's DDP with
    --overlap-param-gather waits there for the module's parameters' all-gather
    (distributed_data_parallel.py, `_make_forward_pre_hook`); code that reads `module.weight` itself must too."""
    for hook_id, hook in list(module._forward_pre_hooks.items()):
        if hook_id in module._forward_pre_hooks_with_kwargs:
            hook(module, args, {})
        else:
            hook(module, args)


def superposed_embedding(
    embedding,
    tokens_bt: torch.Tensor,
    bag_size: int,
    position_ids_bl: Optional[torch.Tensor] = None,
) -> torch.Tensor:
    """Decoder input for superposed tokens, a drop-in for `LanguageModelEmbedding.forward`.

    Args:
        embedding: Megatron's `LanguageModelEmbedding` (its `word_embeddings` is a VocabParallelEmbedding).
        tokens_bt: [b, s*L] token ids.
        bag_size: s.
        position_ids_bl: [b, L] or [1, L] bag positions for learned absolute position embeddings;
            default 0..L-1. Unused with RoPE (the model applies RoPE over the L positions).

    Returns:
        [L, b, h] in the model dtype, or this rank's [L/tp, b, h] slice under sequence parallelism,
        after the embedding's dropout: exactly what the stock embedding returns for L tokens, with each
        token's embedding replaced by its bag's mean.
    """
    config = embedding.config
    mcore_compat.check_embedding_mirrored(embedding)
    bags_bls = split_into_bags(tokens_bt, bag_size)
    batch, num_positions, _ = bags_bls.shape
    words = embedding.word_embeddings
    _run_forward_pre_hooks(words, (tokens_bt,))  # this replaces words.forward: what must run before it runs here
    tp_group = words.tp_group
    tp_size = tp_group.size()
    check_bag_layout(num_positions, bag_size, tensor_parallel_size=tp_size,
                     sequence_parallel=config.sequence_parallel)

    # This rank's partial lookup, as VocabParallelEmbedding.forward does it.
    if tp_size > 1:
        outside = (tokens_bt < words.vocab_start_index) | (tokens_bt >= words.vocab_end_index)
        local_ids = torch.where(outside, torch.zeros_like(tokens_bt), tokens_bt - words.vocab_start_index)
    else:
        local_ids = tokens_bt
    if words.deterministic_mode:
        token_emb_bth = words.weight[local_ids]
    else:
        token_emb_bth = F.embedding(local_ids, words.weight)
    if tp_size > 1:
        token_emb_bth = token_emb_bth.masked_fill(outside.unsqueeze(-1), 0.0)

    # Bag mean, accumulated in float32, cast back before any communication.
    hidden = token_emb_bth.shape[-1]
    bag_sum_blh = token_emb_bth.view(batch, num_positions, bag_size, hidden).sum(dim=2, dtype=torch.float32)
    bag_mean_blh = (bag_sum_blh * (1.0 / bag_size)).to(token_emb_bth.dtype)

    if words.reduce_scatter_embeddings:
        # [b, L, h] -> [L, b, h], reduce over TP and keep this rank's L/tp positions.
        embeddings = tensor_parallel.reduce_scatter_to_sequence_parallel_region(
            bag_mean_blh.transpose(0, 1).contiguous(), group=tp_group
        )
    else:
        embeddings = tensor_parallel.reduce_from_tensor_model_parallel_region(bag_mean_blh, group=tp_group)
        if embedding.add_position_embedding:
            if position_ids_bl is None:
                position_ids_bl = torch.arange(num_positions, device=tokens_bt.device).unsqueeze(0)
            embeddings = embeddings + embedding.position_embeddings(position_ids_bl)
        embeddings = embeddings.transpose(0, 1).contiguous()

    if config.fp32_residual_connection:
        embeddings = embeddings.float()

    # Dropout, with the same RNG streams and sequence-parallel scatter as the stock embedding.
    if config.sequence_parallel:
        if not words.reduce_scatter_embeddings and embedding.scatter_to_sequence_parallel:
            embeddings = tensor_parallel.scatter_to_sequence_parallel_region(embeddings, group=tp_group)
        if config.clone_scatter_output_in_embedding and embedding.scatter_to_sequence_parallel:
            embeddings = embeddings.clone()
        with tensor_parallel.get_cuda_rng_tracker().fork():
            return embedding.embedding_dropout(embeddings)
    return embedding.embedding_dropout(embeddings)


def build_bag_targets(
    labels_bt: torch.Tensor,
    loss_mask_bt: Optional[torch.Tensor],
    bag_size: int,
    *,
    segment_length: Optional[int] = None,
    ignore_index: int = IGNORE_INDEX,
) -> tuple[torch.Tensor, torch.Tensor]:
    """Next-bag targets for every bag position, from Megatron sample fields.

    Args:
        labels_bt: [b, s*L] labels (the raw tokens shifted left by one, Megatron's `labels`).
        loss_mask_bt: [b, s*L] Megatron's `loss_mask` (0 drops that label as a target), or None.
        bag_size: s.
        segment_length: None (default): the row is one contiguous window (the paper's layout). Otherwise
            the length of the independent segments the row is made of (the baseline sequence length L for
            the "segments" layout, whose rows concatenate s baseline samples); must then be a multiple of s,
            so that no bag straddles two segments.
        ignore_index: id written into absent targets.

    Returns:
        targets_bls: [b, L, s] token ids of each position's next bag, `ignore_index` where absent.
        valid_bls: [b, L, s] bool, True where the target is real (in range, same segment, loss_mask 1).
    """
    if labels_bt.dim() != 2:
        raise ValueError(f"labels must be [b, s*L], got shape {tuple(labels_bt.shape)}")
    if loss_mask_bt is not None and loss_mask_bt.shape != labels_bt.shape:
        raise ValueError(
            f"loss_mask shape {tuple(loss_mask_bt.shape)} does not match labels {tuple(labels_bt.shape)}"
        )
    batch, length = labels_bt.shape
    num_positions = split_into_bags(labels_bt, bag_size).shape[1]
    segment_length = length if segment_length is None else segment_length
    if segment_length < 1 or segment_length % bag_size or length % segment_length:
        raise ValueError(
            f"segment length {segment_length} must be a multiple of the bag size {bag_size} and divide the "
            f"row length {length}: bags must not straddle samples"
        )

    device = labels_bt.device
    # Label index of target j of bag i: i*s + (s-1) + j.
    anchor_l = torch.arange(num_positions, device=device) * bag_size + (bag_size - 1)
    index_ls = anchor_l.unsqueeze(1) + torch.arange(bag_size, device=device).unsqueeze(0)
    same_segment_ls = (index_ls < length) & (
        torch.div(index_ls, segment_length, rounding_mode="floor")
        == torch.div(anchor_l, segment_length, rounding_mode="floor").unsqueeze(1)
    )
    index_ls = index_ls.clamp(max=length - 1)

    targets_bls = labels_bt[:, index_ls]
    valid_bls = same_segment_ls.unsqueeze(0).expand(batch, -1, -1)
    if loss_mask_bt is not None:
        valid_bls = valid_bls & (loss_mask_bt[:, index_ls] > 0)
    targets_bls = torch.where(valid_bls, targets_bls, torch.full_like(targets_bls, ignore_index))
    return targets_bls, valid_bls.contiguous()


TARGETS_KEY = "tst_targets"


def make_stock_batch(tokens_bt: torch.Tensor, labels_bt: torch.Tensor, loss_mask_bt: torch.Tensor) -> dict:
    """A stock (recovery / baseline) micro-batch from Megatron sample fields [b, L]: Megatron-LM's
    pretrain_gpt get_batch fields, with position ids 0..L-1 per row (no attention mask: causal).

    Returns {"tokens": [b, L] int64, "labels": [b, L] int64, "loss_mask": [b, L] float32,
    "position_ids": [b, L] int64}. Raises ValueError when the shapes differ.
    """
    if labels_bt.shape != tokens_bt.shape or loss_mask_bt.shape != tokens_bt.shape:
        raise ValueError(f"tokens {tuple(tokens_bt.shape)}, labels {tuple(labels_bt.shape)} and loss_mask "
                         f"{tuple(loss_mask_bt.shape)} must have one shape [b, L]")
    positions = torch.arange(tokens_bt.shape[1], device=tokens_bt.device).expand_as(tokens_bt).contiguous()
    return {"tokens": tokens_bt.long(), "labels": labels_bt.long(), "loss_mask": loss_mask_bt.float(),
            "position_ids": positions}


def make_superposition_batch(
    tokens_bt: torch.Tensor,
    labels_bt: torch.Tensor,
    loss_mask_bt: Optional[torch.Tensor],
    bag_size: int,
    *,
    segment_length: Optional[int] = None,
    ignore_index: int = IGNORE_INDEX,
) -> dict:
    """A superposition micro-batch from Megatron sample fields of s*L tokens per row (one contiguous window per
    row by default; `segment_length` as in `build_bag_targets`).

    Returns {"tokens": [b, s*L], "tst_targets": [b, L, s], "loss_mask": [b, L] float (1 where the position
    has at least one target), "position_ids": [b, L] int64, the bags' positions 0..L-1}. Every tensor has the
    sequence on dim 1, in whole bags, so Megatron's `get_batch_on_this_cp_rank` slices it for context
    parallelism (the position ids then say which bags a rank holds: learned absolute position embeddings need
    them there).
    """
    split_into_bags(tokens_bt, bag_size)
    if labels_bt.shape != tokens_bt.shape:
        raise ValueError(f"labels {tuple(labels_bt.shape)} and tokens {tuple(tokens_bt.shape)} differ in shape")
    targets_bls, valid_bls = build_bag_targets(labels_bt, loss_mask_bt, bag_size,
                                               segment_length=segment_length, ignore_index=ignore_index)
    batch, num_positions = targets_bls.shape[:2]
    return {
        "tokens": tokens_bt,
        TARGETS_KEY: targets_bls,
        "loss_mask": valid_bls.any(dim=-1).float(),
        "position_ids": torch.arange(num_positions, device=tokens_bt.device).unsqueeze(0).expand(batch, -1),
    }
