"""The multi-hot cross-entropy against an independent float64 reference (TP=1, this process)."""

import pytest
import torch
from reference import mce_reference, random_targets

from megatron_tst.mce import (
    WEIGHTINGS,
    positions_with_targets,
    target_weights,
)
from megatron_tst.mce import (
    vocab_parallel_multi_hot_cross_entropy as mce,
)

pytestmark = pytest.mark.unit

L, B, V = 7, 3, 50


def _logits(dtype, seed=0, scale=3.0):
    g = torch.Generator().manual_seed(seed)
    return (torch.randn(L, B, V, generator=g, dtype=torch.float64) * scale).to(dtype)


def _rel_err(actual, expected):
    return float((actual.double() - expected).norm() / expected.norm().clamp_min(1e-30))


@pytest.mark.parametrize("weighting", WEIGHTINGS)
@pytest.mark.parametrize("dtype,tol", [(torch.float32, 1e-5), (torch.bfloat16, 1e-2)])
@pytest.mark.parametrize("bag", [1, 4, 6])
def test_loss_and_grad_match_float64_reference(weighting, dtype, tol, bag):
    logits = _logits(dtype, seed=bag).requires_grad_(True)
    targets = random_targets(L, B, bag, V, seed=bag)
    grad_out = torch.rand(L, B, generator=torch.Generator().manual_seed(7), dtype=torch.float64)

    loss = mce(logits, targets, weighting=weighting)
    assert loss.shape == (L, B) and loss.dtype == torch.float32
    (loss.double() * grad_out).sum().backward()

    ref_logits = logits.detach().double().requires_grad_(True)
    ref = mce_reference(ref_logits, targets, weighting=weighting)
    (ref * grad_out).sum().backward()

    assert _rel_err(loss, ref.detach()) < tol
    assert _rel_err(logits.grad, ref_logits.grad) < tol
    assert logits.grad.dtype == dtype
    # Positions without any valid target: exactly zero loss and gradient.
    empty = ~positions_with_targets(targets)
    assert empty.any()
    assert torch.all(loss[empty] == 0) and torch.all(logits.grad[empty] == 0)


def test_duplicates_count_once_per_occurrence():
    logits = _logits(torch.float64)
    # Bag {5, 5, 9}: token 5 carries 2/3 of the weight.
    targets = torch.tensor([5, 5, 9]).expand(L, B, 3).contiguous()
    log_probs = torch.log_softmax(logits, dim=-1)
    expected = -(2 * log_probs[..., 5] + log_probs[..., 9]) / 3
    torch.testing.assert_close(mce(logits, targets), expected)


def test_equals_megatron_vocab_parallel_cross_entropy_for_bag_of_one(megatron_single_process):
    from megatron.core.tensor_parallel import vocab_parallel_cross_entropy

    logits = _logits(torch.float32, seed=3)
    labels = torch.randint(0, V, (L, B), generator=torch.Generator().manual_seed(4))
    ours_in = logits.clone().requires_grad_(True)
    theirs_in = logits.clone().requires_grad_(True)
    ours = mce(ours_in, labels.unsqueeze(-1))
    theirs = vocab_parallel_cross_entropy(theirs_in.clone(), labels)  # Megatron overwrites its input
    torch.testing.assert_close(ours, theirs, rtol=1e-6, atol=1e-6)
    ours.sum().backward()
    theirs.sum().backward()
    torch.testing.assert_close(ours_in.grad, theirs_in.grad, rtol=1e-6, atol=1e-7)


def test_gradcheck_float64():
    logits = torch.randn(3, 2, 11, dtype=torch.float64, requires_grad=True)
    targets = random_targets(3, 2, 4, 11, seed=5)
    for weighting in WEIGHTINGS:
        assert torch.autograd.gradcheck(lambda z: mce(z, targets, weighting=weighting), (logits,))


def test_inplace_reuses_the_logits_buffer_and_gives_the_same_result():
    logits = _logits(torch.float32, seed=9)
    targets = random_targets(L, B, 4, V, seed=9)
    expected = mce(logits.clone(), targets)
    buffer = logits.clone()
    got = mce(buffer, targets, inplace=True)
    torch.testing.assert_close(got, expected, rtol=0, atol=0)
    assert not torch.equal(buffer, logits)  # the caller's logits became the softmax
    untouched = logits.clone()
    mce(untouched, targets)  # default: inputs are never modified
    assert torch.equal(untouched, logits)


def test_custom_ignore_index_and_power_weights():
    logits = _logits(torch.float64, seed=2)
    targets = random_targets(L, B, 5, V, ignore_index=-1, seed=2)
    torch.testing.assert_close(
        mce(logits, targets, ignore_index=-1, weighting="power").double(),
        mce_reference(logits, targets, ignore_index=-1, weighting="power"),
    )
    w = target_weights(targets != -1, "power", dtype=torch.float64)
    has = positions_with_targets(targets, ignore_index=-1)
    torch.testing.assert_close(w.sum(-1)[has], torch.ones(int(has.sum()), dtype=torch.float64))


@pytest.mark.parametrize(
    "logits_shape,targets_shape,kwargs,message",
    [
        ((L, B), (L, B, 2), {}, "logits must be"),
        ((L, B, V), (L, B), {}, "targets must be"),
        ((L, B, V), (L + 1, B, 2), {}, "targets must be"),
        ((L, B, V), (L, B, 0), {}, "at least one target"),
        ((L, B, V), (L, B, 2), {"weighting": "cosine"}, "unknown TST weighting"),
    ],
)
def test_bad_input_is_a_clear_value_error(logits_shape, targets_shape, kwargs, message):
    with pytest.raises(ValueError, match=message):
        mce(torch.zeros(logits_shape), torch.zeros(targets_shape, dtype=torch.long), **kwargs)


def test_target_outside_the_vocabulary_is_an_error():
    targets = torch.full((L, B, 2), 3)
    targets[2, 1, 1] = V + 4
    with pytest.raises(ValueError, match=f"target id {V + 4} is outside the vocabulary"):
        mce(_logits(torch.float32), targets)
