"""Vocab-parallel multi-hot cross-entropy (MCE) for the superposition phase.

For a position with logits z (vocab-sharded over TP) and a bag of s next-bag targets y_1..y_s:

    MCE(z, y) = logsumexp(z) - sum_j w_j * z[y_j],    w_j = g(j) * valid_j / sum_k g(k) * valid_k

with g the within-bag weighting (uniform by default). Ignored targets drop out of the sum and the
normaliser; duplicates count once per occurrence; a position with no valid target has loss 0 and no
gradient. Gradient: (softmax(z) - sum_j w_j onehot(y_j)) * grad_out.

One logsumexp serves all s targets, so the loss costs about one Megatron cross-entropy. The collectives
are Megatron's vocab-parallel CE's: an all-reduce MAX of the row max, and an all-reduce SUM carrying both
the sum of exponentials and the weighted target-logit sum (each rank adds the targets in its vocab range).
Full-vocab logits are never gathered. Backward needs no communication.

This module knows nothing of training: it maps logits and targets to per-position losses.
"""

from __future__ import annotations

from typing import Optional

import torch
import torch.distributed as dist

WEIGHTINGS = ("uniform", "power", "exp", "first")


def bag_slot_weights(bag_size: int, weighting: str, dtype=torch.float32, device=None) -> torch.Tensor:
    """Unnormalised within-bag weights g(i) for slots i = 1..s, shape [s].

    uniform: 1; power: 1/i; exp: exp(-i); first: 1 for i = 1 else 0 (see `target_weights` for how a
    masked first slot is handled).
    """
    if weighting not in WEIGHTINGS:
        raise ValueError(f"unknown TST weighting {weighting!r}; choose one of {WEIGHTINGS}")
    if bag_size < 1:
        raise ValueError(f"bag size must be >= 1, got {bag_size}")
    slots = torch.arange(1, bag_size + 1, dtype=torch.float64)
    if weighting == "uniform":
        g = torch.ones_like(slots)
    elif weighting == "power":
        g = 1.0 / slots
    elif weighting == "exp":
        g = torch.exp(-(slots - 1.0))  # exp(-i) up to a constant factor, which normalisation removes
    else:
        g = (slots == 1).to(torch.float64)
    return g.to(dtype=dtype, device=device)


def target_weights(valid_lbs: torch.Tensor, weighting: str, dtype=torch.float32) -> torch.Tensor:
    """Normalised per-target weights w [..., s] from the valid-target mask [..., s].

    Weights are g(i) over the valid slots, renormalised to sum to 1; rows without a valid target are 0.
    For `first`, the earliest valid slot takes all the weight (normally slot 1; a later one only when
    the immediate next token is masked out).
    """
    bag_size = valid_lbs.shape[-1]
    if weighting == "first":
        first_valid = torch.argmax(valid_lbs.to(torch.int8), dim=-1, keepdim=True)
        w = torch.zeros(valid_lbs.shape, dtype=dtype, device=valid_lbs.device)
        w.scatter_(-1, first_valid, 1.0)
        return w * valid_lbs
    g = bag_slot_weights(bag_size, weighting, dtype=dtype, device=valid_lbs.device)
    w = g * valid_lbs
    norm = w.sum(dim=-1, keepdim=True)
    return w / torch.where(norm > 0, norm, torch.ones_like(norm))


def positions_with_targets(targets: torch.Tensor, ignore_index: int = -100) -> torch.Tensor:
    """Bool mask [...] of positions that have at least one valid target in targets [..., s]."""
    return (targets != ignore_index).any(dim=-1)


def _tp_rank_and_size(tp_group):
    """(group, rank, size) of the vocab-sharding group; size 1 when nothing is sharded."""
    if tp_group is None:
        try:
            from megatron.core import parallel_state

            if parallel_state.model_parallel_is_initialized():
                tp_group = parallel_state.get_tensor_model_parallel_group()
        except ImportError:  # pragma: no cover - megatron-core is a hard dependency
            pass
    if tp_group is None or not dist.is_initialized():
        return None, 0, 1
    return tp_group, dist.get_rank(tp_group), dist.get_world_size(tp_group)


def _validate(logits: torch.Tensor, targets: torch.Tensor) -> None:
    if logits.dim() != 3:
        raise ValueError(f"logits must be [L, b, V/tp], got shape {tuple(logits.shape)}")
    if targets.dim() != 3 or targets.shape[:2] != logits.shape[:2]:
        raise ValueError(
            f"targets must be [L, b, s] matching logits [L, b, V/tp] = {tuple(logits.shape)}, "
            f"got shape {tuple(targets.shape)}"
        )
    if targets.shape[-1] < 1:
        raise ValueError("targets must hold at least one target per position (bag size s >= 1)")
    if targets.dtype.is_floating_point or targets.dtype == torch.bool:
        raise ValueError(f"targets must be integer token ids, got {targets.dtype}")
    if not logits.dtype.is_floating_point:
        raise ValueError(f"logits must be floating point, got {logits.dtype}")


class _VocabParallelMultiHotCrossEntropy(torch.autograd.Function):
    @staticmethod
    def forward(ctx, logits, targets, weighting, ignore_index, tp_group, inplace):
        tp_group, tp_rank, tp_size = _tp_rank_and_size(tp_group)
        vocab_local = logits.shape[-1]
        vocab_start = tp_rank * vocab_local

        # float64 stays float64 (gradcheck); everything else is computed in float32.
        compute_dtype = torch.float64 if logits.dtype == torch.float64 else torch.float32
        if inplace and logits.dtype == compute_dtype:
            probs = logits.detach()  # reuse the caller's buffer, as Megatron's CE does
        else:
            probs = logits.detach().to(compute_dtype, copy=True)

        # Row max over the full vocabulary. Two extra slots ride on the same all-reduce to check that
        # every rank holds the same vocab shard width (logits sharded as the TP group says).
        row_max = probs.amax(dim=-1)
        if tp_size > 1:
            width = torch.tensor([vocab_local, -vocab_local], dtype=compute_dtype, device=probs.device)
            packed = torch.cat([row_max.reshape(-1), width])
            dist.all_reduce(packed, op=dist.ReduceOp.MAX, group=tp_group)
            row_max = packed[:-2].view_as(row_max)
            max_width, neg_min_width = packed[-2:].tolist()
            if max_width != vocab_local or -neg_min_width != vocab_local:
                raise ValueError(
                    f"logits are not vocab-sharded as the TP group says: this rank holds {vocab_local} "
                    f"vocab entries, others hold between {-neg_min_width:.0f} and {max_width:.0f}"
                )
        probs.sub_(row_max.unsqueeze(-1))

        valid = targets != ignore_index
        vocab_size = vocab_local * tp_size
        out_of_range = valid & ((targets < 0) | (targets >= vocab_size))
        if bool(out_of_range.any()):
            bad = targets[out_of_range][0].item()
            raise ValueError(
                f"target id {bad} is outside the vocabulary [0, {vocab_size}) implied by logits of width "
                f"{vocab_local} at TP={tp_size} (ignore_index is {ignore_index})"
            )
        weights = target_weights(valid, weighting, dtype=compute_dtype)
        is_local = valid & (targets >= vocab_start) & (targets < vocab_start + vocab_local)
        local_index = torch.where(is_local, targets - vocab_start, torch.zeros_like(targets))
        local_weights = weights * is_local
        # sum_j w_j * (z[y_j] - max) over the targets that live in this rank's vocab range.
        target_logit = (probs.gather(-1, local_index) * local_weights).sum(dim=-1)

        probs.exp_()
        sum_exp = probs.sum(dim=-1)
        if tp_size > 1:
            packed = torch.stack([sum_exp, target_logit])
            dist.all_reduce(packed, op=dist.ReduceOp.SUM, group=tp_group)
            sum_exp, target_logit = packed[0], packed[1]

        has_target = valid.any(dim=-1)
        # log(sum exp(z - m)) - sum_j w_j (z_j - m) = logsumexp(z) - sum_j w_j z_j, since sum_j w_j = 1.
        loss = torch.where(has_target, torch.log(sum_exp) - target_logit, torch.zeros_like(sum_exp))
        probs.div_(sum_exp.unsqueeze(-1))

        ctx.save_for_backward(probs, local_index, local_weights, has_target)
        ctx.logits_dtype = logits.dtype
        return loss  # float32, or float64 for float64 logits (verification)

    @staticmethod
    def backward(ctx, grad_loss):
        probs, local_index, local_weights, has_target = ctx.saved_tensors
        # The softmax buffer becomes the gradient in place, as in Megatron's CE: no new logits-sized
        # buffer, but the graph can be differentiated once. float64 (verification, gradcheck) keeps it.
        grad = probs.clone() if probs.dtype == torch.float64 else probs
        grad.scatter_add_(-1, local_index, -local_weights)
        scale = torch.where(has_target, grad_loss.to(grad.dtype), torch.zeros_like(grad_loss, dtype=grad.dtype))
        grad.mul_(scale.unsqueeze(-1))
        return grad.to(ctx.logits_dtype), None, None, None, None, None


def vocab_parallel_multi_hot_cross_entropy(
    logits: torch.Tensor,
    targets: torch.Tensor,
    *,
    ignore_index: int = -100,
    weighting: str = "uniform",
    tp_group: Optional[dist.ProcessGroup] = None,
    inplace: bool = False,
) -> torch.Tensor:
    """Multi-hot cross-entropy over vocab-sharded logits.

    Args:
        logits: [L, b, V/tp] float32, bfloat16, float16 or float64; this rank's vocabulary shard
            (rank r holds ids [r*V/tp, (r+1)*V/tp), as Megatron's ColumnParallelLinear output layer).
        targets: [L, b, s] integer token ids of the next bag; `ignore_index` marks absent targets.
        ignore_index: the id of ignored targets.
        weighting: within-bag weighting, one of "uniform" (default), "power" (1/i), "exp" (exp(-i)),
            "first" (the earliest valid target only).
        tp_group: the tensor-parallel group the vocabulary is sharded over; None takes Megatron's TP
            group when parallel_state is initialised, else no sharding.
        inplace: reuse float32 logits as the softmax and then gradient buffer, exactly as Megatron's
            `vocab_parallel_cross_entropy` always does: saves one logits-sized float32 buffer, but the
            logits tensor is overwritten. The model's loss path sets it; leave it off otherwise.

    Returns:
        [L, b] per-position loss in float32 (float64 for float64 logits): the weighted mean over the position's valid targets of
        -log softmax(z)[y_j]; 0 where a position has no valid target (see `positions_with_targets`).

    Raises:
        ValueError: wrong shapes or dtypes, an unknown weighting, target ids outside the vocabulary,
            or logits whose shard width differs across the TP group.
    """
    _validate(logits, targets)
    if weighting not in WEIGHTINGS:
        raise ValueError(f"unknown TST weighting {weighting!r}; choose one of {WEIGHTINGS}")
    return _VocabParallelMultiHotCrossEntropy.apply(logits, targets, weighting, ignore_index, tp_group, inplace)
