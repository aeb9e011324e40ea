"""The fused output layer + MCE against an independent float64 reference: TP=1 here, TP=2 (real gloo) with and
without sequence parallelism in one spawn; s=1 against Megatron's vocab_parallel_cross_entropy."""

import pytest
import torch
from reference import mce_reference, random_targets

from megatron_tst.mce import (
    WEIGHTINGS,
    default_chunk_size,
    positions_with_targets,
)
from megatron_tst.mce import (
    fused_linear_vocab_parallel_multi_hot_cross_entropy as fused,
)
from megatron_tst.mce import (
    vocab_parallel_multi_hot_cross_entropy as mce,
)
from megatron_tst.testing.distributed import Layout, run_distributed

L, B, H, V = 8, 3, 16, 64
TOL = {torch.float32: 1e-5, torch.bfloat16: 1e-2}


def _rel(actual, expected):
    return float((actual.double() - expected.double()).norm() / expected.double().norm().clamp_min(1e-30))


def _inputs(dtype, seed=0, length=L, vocab=V):
    g = torch.Generator().manual_seed(seed)
    hidden = (torch.randn(length, B, H, generator=g, dtype=torch.float64)).to(dtype)
    weight = (torch.randn(vocab, H, generator=g, dtype=torch.float64) * 0.7).to(dtype)
    grad_out = torch.rand(length, B, generator=g, dtype=torch.float64)
    return hidden, weight, grad_out


def _reference(hidden, weight, targets, grad_out, weighting="uniform", ignore_index=-100):
    """float64 loss and gradients of (hidden, weight) through explicit logits = hidden @ weight.T."""
    h = hidden.detach().double().requires_grad_(True)
    w = weight.detach().double().requires_grad_(True)
    loss = mce_reference(h @ w.T, targets, ignore_index=ignore_index, weighting=weighting)
    (loss * grad_out).sum().backward()
    return loss.detach(), h.grad, w.grad


def _loss_weights(seed, length=L):
    """Weights a loss is reduced with: a loss mask with zeros, and fractional entries."""
    g = torch.Generator().manual_seed(seed)
    weights = (torch.rand(length, B, generator=g, dtype=torch.float64) > 0.25).double()
    weights[0, 0] = 0.5
    return weights


@pytest.mark.unit
@pytest.mark.parametrize("eager", [False, True], ids=["recompute", "eager"])
@pytest.mark.parametrize("weighting", WEIGHTINGS)
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("bag,chunk_size", [(1, 5), (4, 7), (6, None)])
def test_loss_and_grads_match_float64_reference(weighting, dtype, bag, chunk_size, eager):
    """Any incoming gradient (recomputation in backward); with `loss_weights`, gradients computed in the forward
    for an incoming gradient c * loss_weights."""
    hidden, weight, grad_out = _inputs(dtype, seed=bag)
    loss_weights = None
    if eager:
        loss_weights = _loss_weights(seed=bag).to(dtype)
        grad_out = 0.37 * loss_weights.double()
    targets = random_targets(L, B, bag, V, seed=bag)  # duplicates, ignored slots, a position without targets
    h, w = hidden.clone().requires_grad_(True), weight.clone().requires_grad_(True)
    loss = fused(h, w, targets, weighting=weighting, chunk_size=chunk_size, loss_weights=loss_weights)
    assert loss.shape == (L, B) and loss.dtype == torch.float32
    (loss.double() * grad_out).sum().backward()
    ref_loss, ref_h, ref_w = _reference(hidden, weight, targets, grad_out, weighting)
    tol = TOL[dtype]
    assert _rel(loss, ref_loss) < tol
    assert _rel(h.grad, ref_h) < tol and h.grad.dtype == dtype
    assert _rel(w.grad, ref_w) < tol and w.grad.dtype == dtype
    empty = ~positions_with_targets(targets)
    assert empty.any()
    assert torch.all(loss[empty] == 0) and torch.all(h.grad[empty] == 0)


@pytest.mark.unit
def test_eager_gradients_refuse_an_incoming_gradient_of_another_form():
    hidden, weight, grad_out = _inputs(torch.float32, seed=3)
    targets = random_targets(L, B, 4, V, seed=3)
    weights = _loss_weights(seed=3).float()
    h, w = hidden.clone().requires_grad_(True), weight.clone().requires_grad_(True)
    loss = fused(h, w, targets, loss_weights=weights)
    with pytest.raises(RuntimeError, match="not one scalar times loss_weights"):
        (loss * grad_out.float()).sum().backward()
    # a plain masked sum / mean is fine, whatever the scalar (Megatron's loss scale, 1 / num tokens)
    loss = fused(h, w, targets, loss_weights=weights)
    ((loss * weights).sum() / weights.sum() * 1024.0).backward()
    with torch.no_grad():  # evaluation: no gradients computed, the same loss
        assert torch.equal(fused(h, w, targets, loss_weights=weights), loss.detach())
    with pytest.raises(ValueError, match="loss_weights must be"):
        fused(h, w, targets, loss_weights=weights[:-1])
    # the gradients exist once: a second backward through the same loss is refused, not doubled
    loss = fused(h, w, targets, loss_weights=weights)
    (loss * weights).sum().backward(retain_graph=True)
    with pytest.raises(RuntimeError, match="second backward"):
        (loss * weights).sum().backward()


@pytest.mark.unit
def test_equals_the_unfused_mce_on_the_logits_and_does_not_depend_on_the_chunks():
    hidden, weight, grad_out = _inputs(torch.float32, seed=3)
    targets = random_targets(L, B, 5, V, seed=3)
    logits = (hidden @ weight.T).requires_grad_(True)
    unfused = mce(logits, targets, weighting="power")
    (unfused * grad_out).sum().backward()
    for chunk_size in (1, 4, 17, L * B, 10_000, None):
        h, w = hidden.clone().requires_grad_(True), weight.clone().requires_grad_(True)
        loss = fused(h, w, targets, weighting="power", chunk_size=chunk_size)
        (loss * grad_out).sum().backward()
        torch.testing.assert_close(loss, unfused, rtol=1e-6, atol=1e-6)
        torch.testing.assert_close(h.grad, logits.grad.float() @ weight, rtol=1e-5, atol=1e-6)
        torch.testing.assert_close(w.grad, logits.grad.float().reshape(-1, V).T @ hidden.reshape(-1, H),
                                   rtol=1e-5, atol=1e-6)


@pytest.mark.unit
def test_targets_without_bag_dimension_and_custom_ignore_index():
    hidden, weight, grad_out = _inputs(torch.float64, seed=4)
    labels = torch.randint(0, V, (L, B), generator=torch.Generator().manual_seed(4))
    labels[2, 1] = -1
    flat = fused(hidden, weight, labels, ignore_index=-1)
    torch.testing.assert_close(flat, fused(hidden, weight, labels.unsqueeze(-1), ignore_index=-1))
    torch.testing.assert_close(flat, _reference(hidden, weight, labels.unsqueeze(-1), grad_out, ignore_index=-1)[0])
    assert flat[2, 1] == 0


@pytest.mark.unit
def test_gradcheck_float64():
    g = torch.Generator().manual_seed(5)
    hidden = torch.randn(3, 2, 5, generator=g, dtype=torch.float64, requires_grad=True)
    weight = torch.randn(11, 5, generator=g, dtype=torch.float64, requires_grad=True)
    targets = random_targets(3, 2, 4, 11, seed=5)
    for weighting in WEIGHTINGS:
        assert torch.autograd.gradcheck(
            lambda h, w: fused(h, w, targets, weighting=weighting, chunk_size=4), (hidden, weight))


@pytest.mark.unit
def test_bag_of_one_equals_megatron_vocab_parallel_cross_entropy(megatron_single_process):
    from megatron.core.tensor_parallel import vocab_parallel_cross_entropy

    hidden, weight, grad_out = _inputs(torch.float32, seed=6)
    labels = torch.randint(0, V, (L, B), generator=torch.Generator().manual_seed(6))
    h, w = hidden.clone().requires_grad_(True), weight.clone().requires_grad_(True)
    ours = fused(h, w, labels, chunk_size=5)
    (ours * grad_out.float()).sum().backward()
    h_ref, w_ref = hidden.clone().requires_grad_(True), weight.clone().requires_grad_(True)
    theirs = vocab_parallel_cross_entropy(h_ref @ w_ref.T, labels)
    (theirs * grad_out.float()).sum().backward()
    torch.testing.assert_close(ours, theirs, rtol=1e-6, atol=1e-6)
    torch.testing.assert_close(h.grad, h_ref.grad, rtol=1e-5, atol=1e-6)
    torch.testing.assert_close(w.grad, w_ref.grad, rtol=1e-5, atol=1e-6)


@pytest.mark.unit
@pytest.mark.parametrize("eager", [False, True], ids=["recompute", "eager"])
def test_half_precision_gemm_operands_as_on_gpus(monkeypatch, eager):
    """The GPU's path on this CPU: bf16 GEMM operands (`_gemm_dtype` answers as on a GPU) and a logits budget of
    a few rows, so that the float32 weight gradient accumulates over row blocks of the vocabulary (never a second
    whole [V/tp, h] float32 temporary); loss and both gradients still match float64."""
    import megatron_tst.mce as mce_module

    monkeypatch.setattr(mce_module, "_gemm_dtype", lambda dtype, device, compute_dtype: dtype)
    monkeypatch.setattr(mce_module, "CHUNK_LOGITS_BYTES", 5 * H * 4)  # blocks of 5 of the V = 64 rows
    hidden, weight, grad_out = _inputs(torch.bfloat16, seed=9)
    loss_weights = _loss_weights(seed=9).to(torch.bfloat16) if eager else None
    if eager:
        grad_out = 0.37 * loss_weights.double()
    targets = random_targets(L, B, 4, V, seed=9)
    h, w = hidden.clone().requires_grad_(True), weight.clone().requires_grad_(True)
    loss = fused(h, w, targets, chunk_size=7, loss_weights=loss_weights)
    (loss.double() * grad_out).sum().backward()
    ref_loss, ref_h, ref_w = _reference(hidden, weight, targets, grad_out)
    assert _rel(loss, ref_loss) < TOL[torch.bfloat16]
    assert _rel(h.grad, ref_h) < TOL[torch.bfloat16] and _rel(w.grad, ref_w) < TOL[torch.bfloat16]


@pytest.mark.unit
def test_default_chunk_size_bounds_the_chunk_logits():
    assert default_chunk_size(131072, 4096) == 256
    assert default_chunk_size(32768, 4096) == 1024
    assert default_chunk_size(10**8, 4096) == 16  # never fewer than 16 positions
    assert default_chunk_size(64, 10) == 10  # never more than there are


@pytest.mark.unit
@pytest.mark.parametrize(
    "hidden_shape,weight_shape,targets_shape,kwargs,message",
    [
        ((L, B), (V, H), (L, B, 2), {}, "hidden must be"),
        ((L, B, H), (V, H + 1), (L, B, 2), {}, "weight must be"),
        ((L, B, H), (V, H), (L + 1, B, 2), {}, "targets must be"),
        ((L, B, H), (V, H), (L, B, 0), {}, "at least one target"),
        ((L, B, H), (V, H), (L, B, 2), {"weighting": "cosine"}, "unknown TST weighting"),
        ((L, B, H), (V, H), (L, B, 2), {"chunk_size": 0}, "chunk_size"),
    ],
)
def test_bad_input_is_a_clear_value_error(hidden_shape, weight_shape, targets_shape, kwargs, message):
    with pytest.raises(ValueError, match=message):
        fused(torch.zeros(hidden_shape), torch.zeros(weight_shape), torch.zeros(targets_shape, dtype=torch.long),
              **kwargs)


@pytest.mark.unit
def test_mixed_dtypes_and_targets_outside_the_vocabulary_are_refused():
    with pytest.raises(ValueError, match="share one floating dtype"):
        fused(torch.zeros(L, B, H), torch.zeros(V, H, dtype=torch.bfloat16), torch.zeros(L, B, 1, dtype=torch.long))
    targets = torch.full((L, B, 2), 3)
    targets[2, 1, 1] = V + 4
    with pytest.raises(ValueError, match=f"target id {V + 4} is outside the vocabulary"):
        fused(torch.zeros(L, B, H), torch.zeros(V, H), targets)
    # validate=False (the model's path) skips the value checks that synchronise with the device.
    fused(torch.zeros(L, B, H), torch.zeros(V, H), targets, validate=False)
    mce(torch.zeros(L, B, V), targets, validate=False)


# ----------------------------------------------------------------------------------------------------------------
# TP=2 over gloo, with and without sequence parallelism


def _tp2_checks():
    import torch.distributed as dist
    from megatron.core import parallel_state
    from megatron.core.tensor_parallel import vocab_parallel_cross_entropy

    rank = dist.get_rank()
    group = parallel_state.get_tensor_model_parallel_group()
    shard = slice(rank * V // 2, (rank + 1) * V // 2)
    rows = slice(rank * L // 2, (rank + 1) * L // 2)
    out = {}
    for dtype in (torch.float32, torch.bfloat16):
        for weighting in WEIGHTINGS:
            hidden, weight, grad_out = _inputs(dtype, seed=11)
            targets = random_targets(L, B, 6, V, seed=12)
            ref_loss, ref_h, ref_w = _reference(hidden, weight, targets, grad_out, weighting)
            for sp in (False, True):
                h = (hidden[rows] if sp else hidden).clone().requires_grad_(True)
                w = weight[shard].clone().requires_grad_(True)
                loss = fused(h, w, targets, weighting=weighting, tp_group=group, sequence_parallel=sp, chunk_size=5)
                (loss.double() * grad_out).sum().backward()
                key = f"{dtype}_{weighting}_sp{sp}"
                out[f"loss_{key}"] = _rel(loss, ref_loss)
                out[f"hgrad_{key}"] = _rel(h.grad, ref_h[rows] if sp else ref_h)
                out[f"wgrad_{key}"] = _rel(w.grad, ref_w[shard])
                out[f"hshape_{key}"] = tuple(h.grad.shape)
    # Eager gradients (loss_weights) under TP, with and without SP: the same reference.
    for dtype in (torch.float32, torch.bfloat16):
        hidden, weight, _ = _inputs(dtype, seed=15)
        targets = random_targets(L, B, 4, V, seed=15)
        weights = _loss_weights(seed=15)
        ref_loss, ref_h, ref_w = _reference(hidden, weight, targets, 0.25 * weights, "power")
        for sp in (False, True):
            h = (hidden[rows] if sp else hidden).clone().requires_grad_(True)
            w = weight[shard].clone().requires_grad_(True)
            loss = fused(h, w, targets, weighting="power", tp_group=group, sequence_parallel=sp, chunk_size=5,
                         loss_weights=weights.to(dtype))
            (loss.double() * weights).sum().mul(0.25).backward()
            key = f"eager_{dtype}_sp{sp}"
            out[f"loss_{key}"] = _rel(loss, ref_loss)
            out[f"hgrad_{key}"] = _rel(h.grad, ref_h[rows] if sp else ref_h)
            out[f"wgrad_{key}"] = _rel(w.grad, ref_w[shard])
    # s = 1 against Megatron's CE on the unfused logits of the same shard, both sharded over the group.
    hidden, weight, grad_out = _inputs(torch.float32, seed=13)
    labels = torch.randint(0, V, (L, B), generator=torch.Generator().manual_seed(13))
    for sp in (False, True):
        h = (hidden[rows] if sp else hidden).clone().requires_grad_(True)
        w = weight[shard].clone().requires_grad_(True)
        ours = fused(h, w, labels, tp_group=group, sequence_parallel=sp)
        (ours * grad_out.float()).sum().backward()
        h_ref, w_ref = hidden.clone().requires_grad_(True), weight[shard].clone().requires_grad_(True)
        theirs = vocab_parallel_cross_entropy(h_ref @ w_ref.T, labels)  # Megatron's CE: the global TP group
        (theirs * grad_out.float()).sum().backward()
        out[f"megatron_loss_sp{sp}"] = _rel(ours, theirs)
        out[f"megatron_wgrad_sp{sp}"] = _rel(w.grad, w_ref.grad)
        # Megatron's output layer all-reduces (or reduce-scatters) the hidden gradient over the group.
        full_h = h_ref.grad.clone()
        dist.all_reduce(full_h, group=group)
        out[f"megatron_hgrad_sp{sp}"] = _rel(h.grad, full_h[rows] if sp else full_h)
    # tp_group=None means "not sharded": full-vocabulary logits on a TP=2 rank give the unsharded loss.
    logits = hidden @ weight.T
    targets = random_targets(L, B, 3, V, seed=14)
    out["unsharded_mce"] = _rel(mce(logits, targets), mce_reference(logits.double(), targets))
    out["unsharded_fused"] = _rel(fused(hidden, weight, targets), mce_reference(logits.double(), targets))
    # A weight shard of another width than the group implies is refused, on both ranks.
    try:
        fused(hidden, weight[: V // 2 + rank], targets, tp_group=group)
        out["shard_error"] = None
    except ValueError as err:
        out["shard_error"] = str(err)
    return out


@pytest.fixture(scope="module")
def tp2_results():
    return run_distributed(_tp2_checks, world_size=2, layout=Layout(tp=2))


@pytest.mark.parallel
@pytest.mark.parametrize("sp", [False, True])
def test_tp2_matches_float64_reference(tp2_results, sp):
    for result in tp2_results:
        for dtype in (torch.float32, torch.bfloat16):
            for weighting in WEIGHTINGS:
                key = f"{dtype}_{weighting}_sp{sp}"
                for what in ("loss", "hgrad", "wgrad"):
                    assert result[f"{what}_{key}"] < TOL[dtype], (what, key, result[f"{what}_{key}"])
                assert result[f"hshape_{key}"] == ((L // 2 if sp else L), B, H)
            key = f"eager_{dtype}_sp{sp}"
            for what in ("loss", "hgrad", "wgrad"):
                assert result[f"{what}_{key}"] < TOL[dtype], (what, key, result[f"{what}_{key}"])


@pytest.mark.parallel
@pytest.mark.parametrize("sp", [False, True])
def test_tp2_bag_of_one_equals_megatron_cross_entropy(tp2_results, sp):
    for result in tp2_results:
        for what in ("loss", "hgrad", "wgrad"):
            assert result[f"megatron_{what}_sp{sp}"] < 1e-6, (what, result[f"megatron_{what}_sp{sp}"])


@pytest.mark.parallel
def test_tp_group_none_means_not_sharded(tp2_results):
    for result in tp2_results:
        assert result["unsharded_mce"] < 1e-6 and result["unsharded_fused"] < 1e-6


@pytest.mark.parallel
def test_tp2_refuses_a_weight_not_sharded_as_the_group_says(tp2_results):
    for result in tp2_results:
        assert "not vocab-sharded as the TP group says" in result["shard_error"]
