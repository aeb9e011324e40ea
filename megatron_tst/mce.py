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

Two entry points share the same factored forward steps (`_global_row_max`, `_weighted_target_logit`,
`_sum_exp_and_target_logit`, `_logit_gradient`):

- `vocab_parallel_multi_hot_cross_entropy(logits, targets)`: the loss over logits the output layer made;
- `fused_linear_vocab_parallel_multi_hot_cross_entropy(hidden, weight, targets)`: the output layer and the
  loss fused, in chunks of positions: only a chunk's logits exist at a time, backward keeps the per-position
  logsumexp and recomputes each chunk's logits (the idea of Liger-Kernel's and Apple's Cut Cross-Entropy
  fused linear cross-entropy, here vocab-parallel, sequence-parallel and multi-target).

`tp_group=None` means "not sharded" in both (never an implicit global group). The checks that need the
values of the targets or a collective (target ids inside the vocabulary, equal shard widths across the
group) run only with `validate=True`, the default for direct callers; the model's loss path passes
`validate=False` so that no micro-batch waits on a host-device synchronisation.

This module knows nothing of training: it maps logits (or hidden states and the output weight) and targets
to per-position losses.
"""

from __future__ import annotations

from typing import Optional

import torch
import torch.distributed as dist

WEIGHTINGS = ("uniform", "power", "exp", "first")
#: The target id of an absent target (PyTorch's and Megatron's cross-entropy default).
IGNORE_INDEX = -100


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


def positions_with_targets(targets: torch.Tensor, ignore_index: int = IGNORE_INDEX) -> torch.Tensor:
    """Bool mask [...] of positions that have at least one valid target in targets [..., s]."""
    return (targets != ignore_index).any(dim=-1)



def _tp_rank_and_size(tp_group):
    """(group, rank, size) of the vocab-sharding group; (None, 0, 1) when `tp_group` is None (not sharded)."""
    if tp_group is None:
        return None, 0, 1
    if not dist.is_initialized():
        raise ValueError("tp_group was given but torch.distributed is not initialised")
    return tp_group, dist.get_rank(tp_group), dist.get_world_size(tp_group)


def _check_targets(targets: torch.Tensor) -> None:
    if targets.shape[-1] < 1:
        raise ValueError("targets must hold at least one target per position (bag size s >= 1)")
    if targets.dtype.is_floating_point or targets.dtype == torch.bool:
        raise ValueError(f"targets must be integer token ids, got {targets.dtype}")


def _validate(logits: torch.Tensor, targets: torch.Tensor) -> None:
    if logits.dim() != 3:
        raise ValueError(f"logits must be [L, b, V/tp], got shape {tuple(logits.shape)}")
    if targets.dim() != 3 or targets.shape[:2] != logits.shape[:2]:
        raise ValueError(
            f"targets must be [L, b, s] matching logits [L, b, V/tp] = {tuple(logits.shape)}, "
            f"got shape {tuple(targets.shape)}"
        )
    _check_targets(targets)
    if not logits.dtype.is_floating_point:
        raise ValueError(f"logits must be floating point, got {logits.dtype}")


def _check_values(targets, ignore_index, vocab_local, tp_group, tp_size, what) -> None:
    """Host-synchronising checks (validate=True only): equal shard widths across the group, ids in range."""
    if tp_size > 1:
        width = torch.tensor([vocab_local, -vocab_local], dtype=torch.int64, device=targets.device)
        dist.all_reduce(width, op=dist.ReduceOp.MAX, group=tp_group)
        max_width, neg_min_width = width.tolist()
        if max_width != vocab_local or -neg_min_width != vocab_local:
            raise ValueError(
                f"{what} not vocab-sharded as the TP group says: this rank holds {vocab_local} vocab entries, "
                f"others hold between {-neg_min_width} and {max_width} (pass the group the vocabulary is "
                f"sharded over as tp_group, or tp_group=None for unsharded {what})"
            )
    vocab_size = vocab_local * tp_size
    valid = targets != ignore_index
    out_of_range = valid & ((targets < 0) | (targets >= vocab_size))
    if bool(out_of_range.any()):
        bad = targets[out_of_range][0].item()
        raise ValueError(
            f"target id {bad} is outside the vocabulary [0, {vocab_size}) implied by {what} of width "
            f"{vocab_local} at TP={tp_size} (ignore_index is {ignore_index})"
        )


# ----------------------------------------------------------------------------------------------------------
# The factored steps, shared by the unfused and the fused loss. Positions are flattened or not: every step
# works on the last dimension (vocabulary shard, or bag slots) and keeps the leading ones.


def _shard_targets(targets, weighting, ignore_index, vocab_start, vocab_local, dtype):
    """This shard's view of the targets [..., s]: (local_index, local_weights, has_target).

    local_index: int64 [..., s], the target's column in this vocab shard (0 where not local);
    local_weights: [..., s] in `dtype`, the normalised weight w_j where the target lives in this shard, else 0;
    has_target: bool [...], positions with at least one valid target (on every rank).
    """
    valid = targets != ignore_index
    weights = target_weights(valid, weighting, dtype=dtype)
    is_local = valid & (targets >= vocab_start) & (targets < vocab_start + vocab_local)
    local_index = torch.where(is_local, targets - vocab_start, torch.zeros_like(targets))
    return local_index, weights * is_local, valid.any(dim=-1)


def _global_row_max(logits, tp_group, tp_size):
    """Step 1: the row max over the full vocabulary [...] (local max, then all-reduce MAX over the group)."""
    row_max = logits.amax(dim=-1)
    if tp_size > 1:
        dist.all_reduce(row_max, op=dist.ReduceOp.MAX, group=tp_group)
    return row_max


def _weighted_target_logit(shifted, local_index, local_weights):
    """Step 2: this shard's part of sum_j w_j * z[y_j] [...], from logits already shifted by the row max."""
    return (shifted.gather(-1, local_index) * local_weights).sum(dim=-1)


def _sum_exp_and_target_logit(shifted, target_logit, tp_group, tp_size):
    """Step 3: exponentiate `shifted` in place and reduce (sum exp, target logit) over the group in ONE
    all-reduce SUM. Returns (sum_exp, target_logit); log(sum_exp) + row_max is the logsumexp."""
    shifted.exp_()
    sum_exp = shifted.sum(dim=-1)
    if tp_size > 1:
        packed = torch.stack([sum_exp, target_logit])
        dist.all_reduce(packed, op=dist.ReduceOp.SUM, group=tp_group)
        sum_exp, target_logit = packed[0], packed[1]
    return sum_exp, target_logit


def _position_loss(sum_exp, target_logit, has_target):
    """log(sum exp(z - m)) - sum_j w_j (z_j - m) = logsumexp(z) - sum_j w_j z_j (since sum_j w_j = 1); 0 where
    a position has no valid target."""
    return torch.where(has_target, torch.log(sum_exp) - target_logit, torch.zeros_like(sum_exp))


def _logit_gradient(probs, local_index, local_weights, has_target, grad_loss):
    """In place: softmax [..., V/tp] -> (softmax - sum_j w_j onehot(y_j)) * grad_loss, zero where no target."""
    probs.scatter_add_(-1, local_index, -local_weights)
    scale = torch.where(has_target, grad_loss.to(probs.dtype), torch.zeros_like(grad_loss, dtype=probs.dtype))
    probs.mul_(scale.unsqueeze(-1))
    return probs


def _compute_dtype(dtype):
    """float64 stays float64 (verification, gradcheck); everything else is computed in float32."""
    return torch.float64 if dtype == torch.float64 else torch.float32


# ----------------------------------------------------------------------------------------------------------
# The MCE over logits


class _VocabParallelMultiHotCrossEntropy(torch.autograd.Function):
    @staticmethod
    def forward(ctx, logits, targets, weighting, ignore_index, tp_group, inplace):
        tp_group, tp_rank, tp_size = _tp_rank_and_size(tp_group)
        vocab_local = logits.shape[-1]
        compute_dtype = _compute_dtype(logits.dtype)
        if inplace and logits.dtype == compute_dtype:
            probs = logits.detach()  # reuse the caller's buffer, as Megatron's CE does
        else:
            probs = logits.detach().to(compute_dtype, copy=True)

        local_index, local_weights, has_target = _shard_targets(
            targets, weighting, ignore_index, tp_rank * vocab_local, vocab_local, compute_dtype)
        row_max = _global_row_max(probs, tp_group, tp_size)
        probs.sub_(row_max.unsqueeze(-1))
        target_logit = _weighted_target_logit(probs, local_index, local_weights)
        sum_exp, target_logit = _sum_exp_and_target_logit(probs, target_logit, tp_group, tp_size)
        loss = _position_loss(sum_exp, target_logit, has_target)
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
        _logit_gradient(grad, local_index, local_weights, has_target, grad_loss)
        return grad.to(ctx.logits_dtype), None, None, None, None, None


def vocab_parallel_multi_hot_cross_entropy(
    logits: torch.Tensor,
    targets: torch.Tensor,
    *,
    ignore_index: int = IGNORE_INDEX,
    weighting: str = "uniform",
    tp_group: Optional[dist.ProcessGroup] = None,
    inplace: bool = False,
    validate: bool = True,
) -> torch.Tensor:
    """Multi-hot cross-entropy over vocab-sharded logits.

    Args:
        logits: [L, b, V/tp] float32, bfloat16, float16 or float64; this rank's vocabulary shard
            (rank r holds ids [r*V/tp, (r+1)*V/tp), as Megatron's ColumnParallelLinear output layer).
        targets: [L, b, s] integer token ids of the next bag; `ignore_index` marks absent targets.
        ignore_index: the id of ignored targets.
        weighting: within-bag weighting, one of "uniform" (default), "power" (1/i), "exp" (exp(-i)),
            "first" (the earliest valid target only).
        tp_group: the tensor-parallel group the vocabulary is sharded over (the model passes its
            `pg_collection.tp`); None: the logits hold the whole vocabulary (no collectives).
        inplace: reuse float32 logits as the softmax and then gradient buffer, exactly as Megatron's
            `vocab_parallel_cross_entropy` always does: saves one logits-sized float32 buffer, but the
            logits tensor is overwritten. The model's loss path sets it; leave it off otherwise.
        validate: check target ids against the vocabulary and the shard width against the group (a
            host-device synchronisation and one extra all-reduce); the model's path turns it off.

    Returns:
        [L, b] per-position loss in float32 (float64 for float64 logits): the weighted mean over the
        position's valid targets of -log softmax(z)[y_j]; 0 where a position has no valid target
        (see `positions_with_targets`). Same collectives as Megatron's `vocab_parallel_cross_entropy`
        (megatron/core/tensor_parallel/cross_entropy.py): all-reduce MAX, then one all-reduce SUM.

    Raises:
        ValueError: wrong shapes or dtypes, an unknown weighting; with `validate`, target ids outside the
            vocabulary or logits whose shard width differs across the TP group.
    """
    _validate(logits, targets)
    if weighting not in WEIGHTINGS:
        raise ValueError(f"unknown TST weighting {weighting!r}; choose one of {WEIGHTINGS}")
    if validate:
        group, _, tp_size = _tp_rank_and_size(tp_group)
        _check_values(targets, ignore_index, logits.shape[-1], group, tp_size, "logits")
    return _VocabParallelMultiHotCrossEntropy.apply(logits, targets, weighting, ignore_index, tp_group, inplace)


# ----------------------------------------------------------------------------------------------------------
# The output layer and the MCE fused, in chunks of positions

#: How far the incoming gradient may be from c * loss_weights (relative to its largest entry) with eager gradients.
EAGER_GRADIENT_RTOL = 1e-4

#: Default budget of one chunk's float32 logits shard, in bytes (see `default_chunk_size`).
CHUNK_LOGITS_BYTES = 128 * 2**20


def default_chunk_size(vocab_local: int, positions: int) -> int:
    """Positions per chunk when `chunk_size=None`: as many as keep one chunk's float32 logits shard
    [chunk, V/tp] within `CHUNK_LOGITS_BYTES` (128 MiB: 256 positions at V/tp = 131,072), at least 16, at
    most all `positions`. Chosen with tools/bench_fused_mce.py (README: "The fused output layer + loss vs the
    unfused ones": 256 rather than 128 positions at V = 131,072 made the CPU case 17 % faster)."""
    return max(1, min(positions, max(16, CHUNK_LOGITS_BYTES // (4 * max(1, vocab_local)))))


# torch >= 2.13 names the tensor collectives *_single (the old names warn); same semantics.
_all_gather_rows = getattr(dist, "all_gather_single", None) or dist.all_gather_into_tensor
_reduce_scatter = getattr(dist, "reduce_scatter_single", None) or dist.reduce_scatter_tensor


def _gather_rows(rows_local, tp_group, tp_size):
    """[n, h] on each rank -> [tp * n, h], rank-major (Megatron's sequence-parallel all-gather, first dim)."""
    out = rows_local.new_empty((tp_size * rows_local.shape[0],) + tuple(rows_local.shape[1:]))
    _all_gather_rows(out, rows_local.contiguous(), group=tp_group)
    return out


def _reduce_scatter_rows(rows, tp_group, tp_size):
    """[tp * n, h] partial sums on each rank -> this rank's [n, h] block of their sum (reduce-scatter)."""
    out = rows.new_empty((rows.shape[0] // tp_size,) + tuple(rows.shape[1:]))
    _reduce_scatter(out, rows.contiguous(), op=dist.ReduceOp.SUM, group=tp_group)
    return out


def _gemm_dtype(dtype, device, compute_dtype):
    """The operand dtype of the fused path's GEMMs. On GPUs the inputs' own (bf16/fp16 tensor-core GEMMs,
    float32 accumulation); on CPUs, which have no fast half-precision GEMM (here 3.5x slower than float32),
    the float32 compute dtype: the weight is cast once per call, each chunk's hidden rows as they are used."""
    return dtype if device.type != "cpu" else compute_dtype


def _mm(a, b, out_dtype):
    """a @ b with the result in `out_dtype` (float32): directly from the GEMM's float32 accumulator where
    torch has it (`out_dtype=`, CUDA), else the GEMM's output cast."""
    if a.dtype == out_dtype:
        return torch.mm(a, b)
    if a.is_cuda:
        try:
            return torch.mm(a, b, out_dtype=out_dtype)
        except (TypeError, RuntimeError, NotImplementedError):  # older torch / unsupported dtype
            pass
    return torch.mm(a, b).to(out_dtype)


def _add_mm_(acc, a, b):
    """acc += a @ b in acc's dtype (float32), in place; acc [m, k], a [m, n], b [n, k].

    With operands of another dtype (bf16/fp16 on GPUs) each GEMM returns a fresh float32 result: it runs over
    row blocks of acc, each temporary within `CHUNK_LOGITS_BYTES`, so that the weight gradient [V/tp, h] is never
    held twice (one whole-size float32 temporary per chunk would double it at the peak)."""
    if a.dtype == acc.dtype:
        return acc.addmm_(a, b)
    block = max(1, CHUNK_LOGITS_BYTES // (acc.element_size() * acc.shape[1]))
    for start in range(0, acc.shape[0], block):
        acc[start:start + block] += _mm(a[start:start + block], b, acc.dtype)
    return acc


class _FusedLinearVocabParallelMultiHotCrossEntropy(torch.autograd.Function):
    """hidden [N_local, h], weight [V/tp, h], per-position targets [N, s] -> loss [N] (see the public function).

    Under sequence parallelism the N positions are rank-major: rank r holds rows [r*N_local, (r+1)*N_local),
    and chunk k of every rank's rows is gathered at once, so a chunk covers tp*n positions.
    """

    @staticmethod
    def forward(ctx, hidden, weight, targets, weighting, ignore_index, tp_group, sequence_parallel, chunk_size,
                loss_weights):
        tp_group, tp_rank, tp_size = _tp_rank_and_size(tp_group)
        sp = sequence_parallel and tp_size > 1
        spread = tp_size if sp else 1
        n_local, vocab_local = hidden.shape[0], weight.shape[0]
        compute_dtype = _compute_dtype(hidden.dtype)
        gemm_dtype = _gemm_dtype(hidden.dtype, hidden.device, compute_dtype)
        local_index, local_weights, has_target = _shard_targets(
            targets, weighting, ignore_index, tp_rank * vocab_local, vocab_local, compute_dtype)
        step = max(1, -(-chunk_size // spread))  # local rows per chunk
        weight_t = weight.detach().to(gemm_dtype).t()
        loss = torch.empty(spread, n_local, dtype=compute_dtype, device=hidden.device)
        logsumexp = torch.empty(spread, n_local, dtype=compute_dtype, device=hidden.device)
        index_r, weights_r, has_r = (t.view((spread, n_local) + tuple(t.shape[1:]))
                                     for t in (local_index, local_weights, has_target))
        # Eager gradients (`loss_weights` given, see the public function): computed here from each chunk's
        # softmax, scaled by the incoming gradient's one scalar in backward; no recomputation.
        eager = loss_weights is not None
        want_hidden, want_weight = ctx.needs_input_grad[0], ctx.needs_input_grad[1]
        if eager:
            lw_r = loss_weights.to(compute_dtype).view(spread, n_local)
            weight_g = weight_t.t()
            grad_hidden_w = (torch.empty(hidden.shape, dtype=compute_dtype, device=hidden.device) if want_hidden
                             else None)
            grad_weight_w = (torch.zeros(weight.shape, dtype=compute_dtype, device=weight.device) if want_weight
                             else None)
        with torch.no_grad():
            for start in range(0, n_local, step):
                stop = min(n_local, start + step)
                rows = _gather_rows(hidden[start:stop], tp_group, tp_size) if sp else hidden[start:stop]
                logits = _mm(rows.to(gemm_dtype), weight_t, compute_dtype)  # [spread*n, V/tp]
                row_max = _global_row_max(logits, tp_group, tp_size)
                logits.sub_(row_max.unsqueeze(-1))
                chunk_index = index_r[:, start:stop].reshape(logits.shape[0], -1)
                chunk_weights = weights_r[:, start:stop].reshape(logits.shape[0], -1)
                target_logit = _weighted_target_logit(logits, chunk_index, chunk_weights)
                sum_exp, target_logit = _sum_exp_and_target_logit(logits, target_logit, tp_group, tp_size)
                chunk_has = has_r[:, start:stop].reshape(-1)
                loss[:, start:stop] = _position_loss(sum_exp, target_logit, chunk_has).view(spread, -1)
                logsumexp[:, start:stop] = (row_max + torch.log(sum_exp)).view(spread, -1)
                if eager:  # logits holds exp(z - max): the softmax is one division away
                    grad_logits = _logit_gradient(
                        logits.div_(sum_exp.unsqueeze(-1)), chunk_index, chunk_weights, chunk_has,
                        lw_r[:, start:stop].reshape(-1)).to(gemm_dtype)
                    if want_hidden:
                        partial = _mm(grad_logits, weight_g, compute_dtype)  # this shard's part [spread*n, h]
                        grad_hidden_w[start:stop] = (_reduce_scatter_rows(partial, tp_group, tp_size) if sp
                                                     else partial)
                    if want_weight:
                        _add_mm_(grad_weight_w, grad_logits.t(), rows.to(gemm_dtype))
                    del grad_logits
                del logits
        ctx.eager = eager
        if eager:
            if want_hidden and tp_size > 1 and not sp:  # as ColumnParallelLinear's backward all-reduces it
                dist.all_reduce(grad_hidden_w, op=dist.ReduceOp.SUM, group=tp_group)
            ctx.save_for_backward(loss_weights.to(compute_dtype), grad_hidden_w, grad_weight_w)
            ctx.dtypes, ctx.eager_used = (hidden.dtype, weight.dtype), False
            return loss.view(-1)
        ctx.save_for_backward(hidden, weight, local_index, local_weights, has_target, logsumexp.view(-1))
        ctx.tp_group, ctx.tp_size, ctx.sp, ctx.step = tp_group, tp_size, sp, step
        ctx.compute_dtype, ctx.gemm_dtype = compute_dtype, gemm_dtype
        return loss.view(-1)

    @staticmethod
    def backward(ctx, grad_loss):
        if ctx.eager:
            return _FusedLinearVocabParallelMultiHotCrossEntropy._eager_backward(ctx, grad_loss)
        hidden, weight, local_index, local_weights, has_target, logsumexp = ctx.saved_tensors
        tp_group, tp_size, sp, step = ctx.tp_group, ctx.tp_size, ctx.sp, ctx.step
        compute_dtype, gemm_dtype = ctx.compute_dtype, ctx.gemm_dtype
        spread = tp_size if sp else 1
        n_local = hidden.shape[0]
        want_hidden, want_weight = ctx.needs_input_grad[0], ctx.needs_input_grad[1]
        grad_hidden = torch.empty_like(hidden) if want_hidden else None
        # The weight gradient accumulates over chunks in float32 (float64 for verification).
        grad_weight = torch.zeros(weight.shape, dtype=compute_dtype, device=weight.device) if want_weight else None
        weight_g = weight.to(gemm_dtype)
        index_r, weights_r, has_r, lse_r, grad_r = (
            t.reshape((spread, n_local) + tuple(t.shape[1:]))
            for t in (local_index, local_weights, has_target, logsumexp, grad_loss))
        for start in range(0, n_local, step):
            stop = min(n_local, start + step)
            rows = _gather_rows(hidden[start:stop], tp_group, tp_size) if sp else hidden[start:stop]
            rows = rows.to(gemm_dtype)
            n = rows.shape[0]
            logits = _mm(rows, weight_g.t(), compute_dtype)
            probs = logits.sub_(lse_r[:, start:stop].reshape(n, 1)).exp_()  # the softmax, from the saved lse
            grad_logits = _logit_gradient(
                probs, index_r[:, start:stop].reshape(n, -1), weights_r[:, start:stop].reshape(n, -1),
                has_r[:, start:stop].reshape(n), grad_r[:, start:stop].reshape(n)).to(gemm_dtype)
            del logits, probs
            if want_hidden:
                partial = _mm(grad_logits, weight_g, compute_dtype).to(hidden.dtype)  # this shard's part [n, h]
                grad_hidden[start:stop] = _reduce_scatter_rows(partial, tp_group, tp_size) if sp else partial
            if want_weight:
                _add_mm_(grad_weight, grad_logits.t(), rows)
        if want_hidden and tp_size > 1 and not sp:
            # The hidden states were replicated over the group: their gradient sums every vocab shard's part,
            # as ColumnParallelLinear's backward all-reduces it (megatron/core/tensor_parallel/layers.py).
            dist.all_reduce(grad_hidden, op=dist.ReduceOp.SUM, group=tp_group)
        if want_weight:
            grad_weight = grad_weight.to(weight.dtype)
        return grad_hidden, grad_weight, None, None, None, None, None, None, None

    @staticmethod
    def _eager_backward(ctx, grad_loss):
        """The forward's gradients times c, the scalar with grad_loss = c * loss_weights (asserted on the device:
        no host synchronisation; a CPU tensor asserts at once, a CUDA one asynchronously)."""
        if ctx.eager_used:
            raise RuntimeError("fused_linear_vocab_parallel_multi_hot_cross_entropy(loss_weights=...) computed its "
                               "gradients once, in the forward: a second backward through it is not supported "
                               "(call it without loss_weights to backpropagate twice)")
        ctx.eager_used = True
        loss_weights, grad_hidden_w, grad_weight_w = ctx.saved_tensors
        hidden_dtype, weight_dtype = ctx.dtypes
        g = grad_loss.reshape(-1).to(loss_weights.dtype)
        c = (g * loss_weights).sum() / (loss_weights * loss_weights).sum().clamp_min(torch.finfo(g.dtype).tiny)
        residual = (g - c * loss_weights).abs().amax()
        torch._assert_async(residual <= EAGER_GRADIENT_RTOL * g.abs().amax(),
                            "fused_linear_vocab_parallel_multi_hot_cross_entropy(loss_weights=...): the loss's "
                            "gradient is not one scalar times loss_weights (reduce the loss with those weights, "
                            "or call it without loss_weights)")
        # In place: no second [V/tp, h] float32 buffer at the peak (the gradients are used once, checked above).
        grad_hidden = grad_hidden_w.mul_(c).to(hidden_dtype) if grad_hidden_w is not None else None
        grad_weight = grad_weight_w.mul_(c).to(weight_dtype) if grad_weight_w is not None else None
        return grad_hidden, grad_weight, None, None, None, None, None, None, None


def fused_linear_vocab_parallel_multi_hot_cross_entropy(
    hidden: torch.Tensor,
    weight: torch.Tensor,
    targets: torch.Tensor,
    *,
    ignore_index: int = IGNORE_INDEX,
    weighting: str = "uniform",
    tp_group: Optional[dist.ProcessGroup] = None,
    sequence_parallel: bool = False,
    chunk_size: Optional[int] = None,
    validate: bool = True,
    loss_weights: Optional[torch.Tensor] = None,
) -> torch.Tensor:
    """The output layer and the multi-hot cross-entropy fused: per-position loss from hidden states.

    Equals `vocab_parallel_multi_hot_cross_entropy(hidden @ weight.T, targets)` (with the hidden states gathered
    over the group first under sequence parallelism) without ever holding the logits of more than one chunk
    of positions: the forward keeps only the logsumexp per position, the backward recomputes each chunk's
    logits from it. Collectives per chunk are the MCE's (all-reduce MAX, one all-reduce SUM), plus, under
    sequence parallelism, the all-gather of the chunk's hidden states (forward and backward) and the
    reduce-scatter of their gradient, as Megatron's ColumnParallelLinear output layer does for the whole
    sequence (megatron/core/tensor_parallel/layers.py, `linear_with_grad_accumulation_and_async_allreduce`).

    Args:
        hidden: [L, b, h] final hidden states (the output layer's input), or this rank's [L/tp, b, h] slice under
            sequence parallelism (rank r holds positions [r*L/tp, (r+1)*L/tp), Megatron's layout). float32,
            bfloat16, float16 or float64; same dtype as `weight`.
        weight: [V/tp, h], this rank's shard of the output layer (Megatron's ColumnParallelLinear layout: rank r
            holds vocabulary ids [r*V/tp, (r+1)*V/tp)), or the tied embedding table's shard.
        targets: [L, b, s] integer token ids (s = 1 for next-token training), or [L, b]; the whole sequence on
            every rank, also under sequence parallelism.
        ignore_index, weighting: as in `vocab_parallel_multi_hot_cross_entropy`.
        tp_group: the group the vocabulary is sharded over (and the sequence, with `sequence_parallel`); None:
            `weight` is the whole vocabulary.
        sequence_parallel: `hidden` is this rank's sequence slice (ignored when the group has one rank).
        chunk_size: positions (of the L*b, after the sequence-parallel gather) per chunk; None:
            `default_chunk_size`. Under sequence parallelism each rank contributes ceil(chunk_size / tp) rows.
        validate: check target ids and the shard widths across the group (a host-device synchronisation and an
            extra all-reduce); the model's loss path turns it off.
        loss_weights: None, or [L, b] the weights the caller reduces the returned loss with (Megatron's
            `loss_mask`: the masked sum / mean of the loss function). Given, and with gradients wanted, the
            gradients are computed in the forward from each chunk's softmax (three GEMMs of the logits' size in
            all, not four: no recomputation; Liger-Kernel's fused linear cross-entropy does the same for its
            reduced loss) and kept until backward (this shard's float32 weight gradient and the hidden states'),
            and the backward scales them by the one scalar c with grad_loss = c * loss_weights. A gradient of
            another form is not silently mis-applied: a device-side assertion fails (at once on CPU,
            asynchronously on CUDA).

    Returns:
        [L, b] per-position loss, float32 (float64 for float64 inputs). Its gradient flows to `hidden` (the full
        gradient: summed over the vocabulary shards by an all-reduce, or reduce-scattered to this rank's slice
        under sequence parallelism) and to `weight` (this shard's; accumulated in float32 over chunks). The
        GEMMs run in the inputs' dtype on GPUs with float32 accumulation (and float32 logits where torch's
        `mm(out_dtype=)` exists, else rounded as the unfused output layer rounds them), in float32 on CPUs;
        every softmax statistic is float32.

    Raises:
        ValueError: wrong shapes or dtypes, an unknown weighting, a bad chunk_size; with `validate`, target ids
            outside the vocabulary or weight shards of different widths across the group.
    """
    if hidden.dim() != 3:
        raise ValueError(f"hidden must be [L, b, h] ([L/tp, b, h] under sequence parallelism), "
                         f"got shape {tuple(hidden.shape)}")
    if weight.dim() != 2 or weight.shape[1] != hidden.shape[-1]:
        raise ValueError(f"weight must be [V/tp, h] with h = {hidden.shape[-1]} (the hidden size), "
                         f"got shape {tuple(weight.shape)}")
    if not hidden.dtype.is_floating_point or hidden.dtype != weight.dtype:
        raise ValueError(f"hidden and weight must share one floating dtype, got {hidden.dtype} and {weight.dtype}")
    if weighting not in WEIGHTINGS:
        raise ValueError(f"unknown TST weighting {weighting!r}; choose one of {WEIGHTINGS}")
    if chunk_size is not None and (not isinstance(chunk_size, int) or chunk_size < 1):
        raise ValueError(f"chunk_size must be a positive number of positions or None, got {chunk_size!r}")
    group, _, tp_size = _tp_rank_and_size(tp_group)
    sp = sequence_parallel and tp_size > 1
    length = hidden.shape[0] * (tp_size if sp else 1)
    if targets.dim() == 2:
        targets = targets.unsqueeze(-1)
    if targets.dim() != 3 or tuple(targets.shape[:2]) != (length, hidden.shape[1]):
        raise ValueError(
            f"targets must be [L, b, s] or [L, b] with [L, b] = {(length, hidden.shape[1])} (hidden "
            f"{tuple(hidden.shape)}{' gathered over ' + str(tp_size) + ' sequence-parallel ranks' if sp else ''}), "
            f"got shape {tuple(targets.shape)}")
    _check_targets(targets)
    if validate:
        _check_values(targets, ignore_index, weight.shape[0], group, tp_size, "weight")
    positions = length * hidden.shape[1]
    if loss_weights is not None:
        if tuple(loss_weights.shape) != (length, hidden.shape[1]) or not loss_weights.dtype.is_floating_point:
            raise ValueError(f"loss_weights must be a floating [L, b] = {(length, hidden.shape[1])} tensor (the "
                             f"weights the loss is reduced with), got {loss_weights.dtype} {tuple(loss_weights.shape)}")
        if not (torch.is_grad_enabled() and (hidden.requires_grad or weight.requires_grad)):
            loss_weights = None  # no backward: nothing to compute eagerly
    if chunk_size is None:
        chunk_size = default_chunk_size(weight.shape[0], positions)
    loss = _FusedLinearVocabParallelMultiHotCrossEntropy.apply(
        hidden.reshape(-1, hidden.shape[-1]), weight, targets.reshape(positions, -1), weighting, ignore_index,
        group, sp, chunk_size, None if loss_weights is None else loss_weights.detach().reshape(-1))
    return loss.view(length, hidden.shape[1])
