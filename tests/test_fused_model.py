"""The model with Megatron-LM's linear loss fusion (`--cross-entropy-loss-fusion --cross-entropy-fusion-impl
linear`) against the same model without it (TP=1, this process): both phases, tied and untied embeddings, dense
and MoE. The layouts (TP=2+SP, PP=2, TP=2 MoE) through Megatron-LM's loop are in test_layouts.py."""

import pytest
import torch
from model_harness import MBS, Case, L, V, build_model, make_microbatches, transformer_config, tst_config

from megatron_tst.model import FusedLossOutputLayer
from megatron_tst.superposition import TARGETS_KEY

pytestmark = pytest.mark.parallel


def _pair(moe, untie):
    models = []
    for fused in (False, True):
        torch.manual_seed(11)
        case = Case("fused" if fused else "unfused", moe_dispatcher=moe, linear_loss_fusion=fused)
        models.append(build_model(case, tst_config("power"), untie=untie))
    return models


def _rel(a, b):
    return float((a.double() - b.double()).norm() / b.double().norm().clamp_min(1e-30))


@pytest.mark.parametrize("moe", [None, "alltoall"])
@pytest.mark.parametrize("untie", [True, False])
def test_fused_equals_unfused_in_both_phases(megatron_single_process, moe, untie):
    unfused, fused = _pair(moe, untie)
    assert type(fused.output_layer) is FusedLossOutputLayer and type(unfused.output_layer) is not FusedLossOutputLayer
    assert list(fused.state_dict()) == list(unfused.state_dict())
    for name, param in fused.named_parameters():
        assert torch.equal(param, dict(unfused.named_parameters())[name]), name
    seen_outputs = []
    fused.output_layer.register_forward_hook(lambda module, args, output: seen_outputs.append(output[0].shape))
    for superposition in (True, False):
        batch = make_microbatches(superposition)[0]
        grad_out = batch["loss_mask"]
        results = []
        for model in (unfused, fused):
            model.zero_grad()
            if superposition:
                loss = model(batch["tokens"], None, None, labels=batch[TARGETS_KEY], tst_superposition=True)
            else:
                loss = model(batch["tokens"], batch["position_ids"], None, labels=batch["labels"],
                             loss_mask=batch["loss_mask"])  # as forward_step calls it
            (loss * grad_out).sum().backward()
            results.append((loss.detach(), {n: p.grad.clone() for n, p in model.named_parameters()}))
        (loss_u, grads_u), (loss_f, grads_f) = results
        assert loss_f.shape == (MBS, L) and loss_f.dtype == torch.float32
        assert _rel(loss_f, loss_u) < 1e-5, superposition
        for name, grad in grads_u.items():
            assert _rel(grads_f[name], grad) < 1e-5, (superposition, name)
    assert seen_outputs == [(L, MBS), (L, MBS)]  # the output layer returned losses, never [L, b, V] logits
    # Without labels (inference) the fused model's output layer still gives the logits.
    batch = make_microbatches(False)[0]
    logits = [m(batch["tokens"], batch["position_ids"], None) for m in (unfused, fused)]
    assert logits[1].shape == (MBS, L, V) and torch.equal(logits[0], logits[1])


@pytest.mark.parametrize("changes,message", [
    ({"mtp_num_layers": 1}, "multi-token prediction"),
    ({"defer_embedding_wgrad_compute": True}, "defer-embedding-wgrad-compute"),
])
def test_what_the_fusion_cannot_do_is_refused_at_build(megatron_single_process, changes, message):
    config = transformer_config(Case("refuse", linear_loss_fusion=True))
    for field, value in changes.items():
        object.__setattr__(config, field, value)
    with pytest.raises(ValueError, match=f"cross-entropy-fusion-impl linear.*{message}"):
        build_model(Case("refuse"), None, config=config)


def test_gathered_logits_are_refused(megatron_single_process):
    with pytest.raises(ValueError, match="parallel_output=False"):
        build_model(Case("gather", linear_loss_fusion=True), parallel_output=False)


def test_logits_that_reach_the_loss_with_the_fusion_configured_get_megatrons_cross_entropy(megatron_single_process):
    """(e.g. through 0.19's output_processor) Megatron-Core's own loss does not know impl 'linear': the model's
    loss then is Megatron's cross-entropy, computed by the MCE with s = 1."""
    from megatron.core.tensor_parallel import vocab_parallel_cross_entropy

    _, fused = _pair(None, True)
    g = torch.Generator().manual_seed(2)
    logits = torch.randn(L, MBS, V, generator=g)
    labels = torch.randint(0, V, (MBS, L), generator=g)
    got = fused.compute_language_model_loss(labels, logits.clone())
    expected = vocab_parallel_cross_entropy(logits.clone(), labels.t().contiguous()).t()
    torch.testing.assert_close(got, expected, rtol=1e-6, atol=1e-6)
