"""The TST model against a stock Megatron-Core GPTModel (TP=1, this process)."""

import pytest
import torch
from megatron.core.models.gpt import GPTModel
from model_harness import IGNORE, MBS, Case, L, S, build_model, make_microbatches
from reference import mce_reference, superposed_reference

from megatron_tst.model import TSTGPTModel
from megatron_tst.superposition import TARGETS_KEY
from megatron_tst.testing.distributed import Layout, run_distributed

pytestmark = pytest.mark.parallel


def _stock(case):
    return build_model(case, model_class=GPTModel)


def _ours(case, tst="default"):
    return build_model(case, tst)


@pytest.mark.parametrize("moe", [None, "alltoall"])
def test_recovery_step_is_the_stock_model_bit_for_bit(megatron_single_process, moe):
    case = Case("stock", moe_dispatcher=moe)
    torch.manual_seed(7)
    stock = _stock(case)
    torch.manual_seed(7)
    ours = _ours(case)
    batch = make_microbatches(superposition=False)[0]
    losses = []
    for model in (stock, ours):
        loss = model(batch["tokens"], batch["position_ids"], None, labels=batch["labels"])
        loss.sum().backward()
        losses.append(loss)
    assert torch.equal(losses[0], losses[1])
    stock_params = dict(stock.named_parameters())
    for name, param in ours.named_parameters():
        assert torch.equal(param, stock_params[name]), name
        assert torch.equal(param.grad, stock_params[name].grad), name


@pytest.mark.parametrize("moe", [None, "alltoall"])
def test_state_dict_keys_are_the_stock_keys(megatron_single_process, moe):
    from megatron.core import parallel_state

    case = Case("keys", moe_dispatcher=moe)
    stock, ours = _stock(case), _ours(case)
    assert isinstance(ours, GPTModel) and type(ours) is TSTGPTModel
    assert list(ours.state_dict()) == list(stock.state_dict())
    metadata = {"dp_cp_group": parallel_state.get_data_parallel_group(with_context_parallel=True)}
    assert sorted(ours.sharded_state_dict(metadata=metadata)) == sorted(stock.sharded_state_dict(metadata=metadata))
    # the checkpoint of one loads into the other, strictly
    ours.load_state_dict(stock.state_dict(), strict=True)


def test_superposition_step_equals_manual_composition(megatron_single_process):
    """The model's superposition loss = MCE(output layer(decoder(bag means))) computed by hand, float64."""
    torch.manual_seed(3)
    model = _ours(Case("manual"))
    batch = make_microbatches(superposition=True)[0]
    loss_bl = model(batch["tokens"], None, None, labels=batch[TARGETS_KEY], tst_superposition=True)
    assert loss_bl.shape == (MBS, L)

    decoder_input = superposed_reference(model.embedding.word_embeddings.weight.detach(), batch["tokens"], S)
    hidden = model.decoder(hidden_states=decoder_input.float(), attention_mask=None,
                           rotary_pos_emb=model.rotary_pos_emb(L))
    logits, _ = model.output_layer(hidden)
    expected = mce_reference(logits.detach().double(), batch[TARGETS_KEY].transpose(0, 1), ignore_index=IGNORE)
    torch.testing.assert_close(loss_bl.double(), expected.transpose(0, 1), rtol=1e-5, atol=1e-5)
    # positions without targets (masked labels) contribute nothing
    assert torch.all(loss_bl[batch["loss_mask"] == 0] == 0)


def test_superposition_step_takes_the_bags_positions_from_the_batch(megatron_single_process):
    """Learned absolute positions: the superposition step embeds each bag at the batch's position_ids (what a CP
    rank holds are two chunks of the bags, not positions 0..L/cp-1), through Megatron's forward_step."""
    from megatron_tst.loop.forward import forward_step

    torch.manual_seed(4)
    model = build_model(Case("positions"), position_embedding_type="learned_absolute", max_sequence_length=2 * L)
    batch = make_microbatches(superposition=True)[0]
    default = model(batch["tokens"], None, None, labels=batch[TARGETS_KEY], tst_superposition=True)
    assert torch.equal(forward_step(iter([batch]), model)[0], default)  # position_ids 0..L-1
    shifted = {**batch, "position_ids": batch["position_ids"] + L}
    loss_bl = forward_step(iter([shifted]), model)[0]
    decoder_input = superposed_reference(model.embedding.word_embeddings.weight.detach(), batch["tokens"], S)
    decoder_input = decoder_input + model.embedding.position_embeddings.weight.detach()[L:].double().unsqueeze(1)
    hidden = model.decoder(hidden_states=decoder_input.float(), attention_mask=None)
    logits, _ = model.output_layer(hidden)
    expected = mce_reference(logits.detach().double(), batch[TARGETS_KEY].transpose(0, 1), ignore_index=IGNORE)
    torch.testing.assert_close(loss_bl.double(), expected.transpose(0, 1), rtol=1e-5, atol=1e-5)
    assert not torch.equal(loss_bl, default)


def test_phase_switch_needs_no_rebuild(megatron_single_process):
    torch.manual_seed(5)
    model = _ours(Case("switch"))
    sup, rec = make_microbatches(True)[0], make_microbatches(False)[0]
    first = model(rec["tokens"], rec["position_ids"], None, labels=rec["labels"])
    model(sup["tokens"], None, None, labels=sup[TARGETS_KEY], tst_superposition=True).sum().backward()
    again = model(rec["tokens"], rec["position_ids"], None, labels=rec["labels"])
    assert torch.equal(first, again)  # the superposition call left nothing behind


def test_superposition_step_errors(megatron_single_process):
    baseline = _ours(Case("b"), tst=None)
    sup = make_microbatches(True)[0]
    with pytest.raises(RuntimeError, match="built without TST settings"):
        baseline(sup["tokens"], None, None, labels=sup[TARGETS_KEY], tst_superposition=True)
    model = _ours(Case("e"))
    with pytest.raises(ValueError, match=r"next-bag targets \[b, L, 4\]"):
        model(sup["tokens"], None, None, labels=sup[TARGETS_KEY][..., :2], tst_superposition=True)
    with pytest.raises(ValueError, match="not divisible by the bag size"):
        model(sup["tokens"][:, :-1], None, None, labels=sup[TARGETS_KEY], tst_superposition=True)


# get_batch_on_this_cp_rank slices every tensor of the batch along the sequence: the batch's own position_ids
# (make_superposition_batch) name the bag positions a rank really received.
CP_SIZES = (4, 2)


def cp_slicing_worker(batch, cp_sizes):
    """For each CP size: the trainer's own get_batch on this rank (CP group and rank from parallel_state)."""
    from megatron.core import parallel_state

    from megatron_tst.loop.forward import get_batch
    from megatron_tst.testing.distributed import relayout

    out = {}
    for cp in cp_sizes:
        relayout(Layout(cp=cp))
        local = get_batch(iter([dict(batch)]))
        out[cp] = (parallel_state.get_context_parallel_rank(), parallel_state.get_data_parallel_rank(),
                   {key: value.cpu() for key, value in local.items()})
    return out


@pytest.fixture(scope="module")
def cp_slices():
    """One spawn of 4 ranks for both CP sizes (CP=2 there has 2 data-parallel replicas)."""
    batch = make_microbatches(True)[0]
    assert torch.equal(batch["position_ids"], torch.arange(L).expand(MBS, L))
    world = max(CP_SIZES)
    return batch, run_distributed(cp_slicing_worker, world_size=world, layout=Layout(cp=world), args=(batch, CP_SIZES))


@pytest.mark.parametrize("cp", CP_SIZES)
def test_context_parallel_slicing_keeps_whole_bags_and_their_targets(cp_slices, cp):
    """Megatron's CP split of a superposition batch: each rank gets whole bags with their own targets."""
    batch, results = cp_slices
    tokens_bls = batch["tokens"].view(MBS, L, S)
    chunk = L // (2 * cp)
    seen = []
    for per_cp in results:
        cp_rank, dp_rank, local = per_cp[cp]
        expected_positions = list(range(cp_rank * chunk, (cp_rank + 1) * chunk)) + list(
            range((2 * cp - 1 - cp_rank) * chunk, (2 * cp - cp_rank) * chunk))
        got = local["position_ids"]
        assert torch.equal(got, got[:1].expand_as(got))  # every row the same positions
        assert got[0].tolist() == expected_positions
        assert torch.equal(local["tokens"].view(MBS, -1, S), tokens_bls[:, expected_positions])
        assert torch.equal(local[TARGETS_KEY], batch[TARGETS_KEY][:, expected_positions])
        assert torch.equal(local["loss_mask"], batch["loss_mask"][:, expected_positions])
        if dp_rank == 0:
            seen += got[0].tolist()
    assert sorted(seen) == list(range(L))  # one CP group together holds every position once
