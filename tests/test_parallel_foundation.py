"""TP=2 (2 gloo processes) against TP=1 in the same processes: MCE and superposed embeddings.

Each rank also builds the TP=1 version (a 1-rank process group), on the same full weights and inputs,
so every comparison is TP=2 vs TP=1 of the same numbers. All checks share one spawn.
"""

import pytest
import torch

from megatron_tst.testing.distributed import Layout, run_distributed

pytestmark = pytest.mark.parallel

L, B, V, H = 8, 2, 64, 16
WEIGHTINGS = ("uniform", "power", "exp", "first")


def _own_group():
    import torch.distributed as dist

    groups = [dist.new_group([r]) for r in range(dist.get_world_size())]  # collective: all ranks
    return groups[dist.get_rank()]


def _rel(a, b):
    return float((a.double() - b.double()).norm() / b.double().norm().clamp_min(1e-30))


def _mce_checks(solo):
    import torch.distributed as dist
    from megatron.core import parallel_state
    from reference import random_targets

    from megatron_tst.mce import vocab_parallel_multi_hot_cross_entropy as mce

    rank = dist.get_rank()
    tp_group = parallel_state.get_tensor_model_parallel_group()
    shard = slice(rank * V // 2, (rank + 1) * V // 2)
    out = {}
    for dtype in (torch.float32, torch.bfloat16):
        for weighting in WEIGHTINGS:
            g = torch.Generator().manual_seed(11)
            full = (torch.randn(L, B, V, generator=g) * 3).to(dtype)
            targets = random_targets(L, B, 6, V, seed=12)
            grad_out = torch.rand(L, B, generator=g)
            tp2_in = full[..., shard].clone().requires_grad_(True)
            tp1_in = full.clone().requires_grad_(True)
            loss_tp2 = mce(tp2_in, targets, weighting=weighting, tp_group=tp_group)
            loss_tp1 = mce(tp1_in, targets, weighting=weighting, tp_group=solo)
            (loss_tp2 * grad_out).sum().backward()
            (loss_tp1 * grad_out).sum().backward()
            out[f"mce_loss_{dtype}_{weighting}"] = _rel(loss_tp2, loss_tp1)
            out[f"mce_grad_{dtype}_{weighting}"] = _rel(tp2_in.grad, tp1_in.grad[..., shard])
    # Logits whose shard width disagrees with the TP group: both ranks raise.
    try:
        mce(torch.zeros(L, B, V // 2 + rank), torch.zeros(L, B, 2, dtype=torch.long), tp_group=tp_group)
        out["shard_error"] = None
    except ValueError as err:
        out["shard_error"] = str(err)
    return out


def _embedding(sequence_parallel, tp_group, tp_size):
    from megatron.core.models.common.embeddings.language_model_embedding import LanguageModelEmbedding
    from megatron.core.transformer import TransformerConfig

    config = TransformerConfig(num_layers=1, hidden_size=H, num_attention_heads=2, hidden_dropout=0.0,
                               use_cpu_initialization=True, tensor_model_parallel_size=tp_size,
                               sequence_parallel=sequence_parallel)
    return LanguageModelEmbedding(config, vocab_size=V, max_sequence_length=64,
                                  position_embedding_type="rope", tp_group=tp_group)


def _embedding_checks(solo):
    import torch.distributed as dist
    from megatron.core import parallel_state
    from megatron.core.tensor_parallel import gather_from_sequence_parallel_region

    from megatron_tst.superposition import superposed_embedding

    rank = dist.get_rank()
    tp_group = parallel_state.get_tensor_model_parallel_group()
    g = torch.Generator().manual_seed(21)
    weight = torch.randn(V, H, generator=g)
    out = {}
    for bag in (1, 4):
        tokens = torch.randint(0, V, (B, L * bag), generator=g)
        probe = torch.randn(L, B, H, generator=g)
        ref_emb = _embedding(False, solo, 1)
        with torch.no_grad():
            ref_emb.word_embeddings.weight.copy_(weight)
        ref = superposed_embedding(ref_emb, tokens, bag)
        (ref * probe).sum().backward()
        for sp in (False, True):
            emb = _embedding(sp, tp_group, 2)
            with torch.no_grad():
                emb.word_embeddings.weight.copy_(weight[rank * V // 2:(rank + 1) * V // 2])
            got = superposed_embedding(emb, tokens, bag)
            local_probe = probe.chunk(2, dim=0)[rank] if sp else probe
            (got * local_probe).sum().backward()
            if sp:
                out[f"emb_sp_local_shape_{bag}"] = tuple(got.shape)
                got = gather_from_sequence_parallel_region(got.detach(), tensor_parallel_output_grad=False)
            out[f"emb_out_sp{sp}_bag{bag}"] = _rel(got, ref)
            ref_grad = ref_emb.word_embeddings.weight.grad[rank * V // 2:(rank + 1) * V // 2]
            out[f"emb_grad_sp{sp}_bag{bag}"] = _rel(emb.word_embeddings.weight.grad, ref_grad)
            if bag == 1:  # a bag of one is the stock embedding, bit for bit
                stock = emb(tokens, torch.arange(L).unsqueeze(0))
                mine = superposed_embedding(emb, tokens, 1)
                out[f"emb_stock_equal_sp{sp}"] = bool(torch.equal(stock, mine))
    # Under sequence parallelism L must split over the TP ranks.
    try:
        superposed_embedding(_embedding(True, tp_group, 2), torch.zeros(B, 3 * 4, dtype=torch.long), 4)
        out["sp_error"] = None
    except ValueError as err:
        out["sp_error"] = str(err)
    return out


def foundation_checks():
    solo = _own_group()
    return {**_mce_checks(solo), **_embedding_checks(solo)}


@pytest.fixture(scope="module")
def tp2_results():
    return run_distributed(foundation_checks, world_size=2, layout=Layout(tp=2))


def test_mce_tp2_equals_tp1(tp2_results):
    for result in tp2_results:
        for key, err in result.items():
            if key.startswith("mce_"):
                tol = 1e-5 if "float32" in key else 1e-2
                assert err < tol, (key, err)


def test_mce_refuses_logits_not_sharded_as_the_group_says(tp2_results):
    for result in tp2_results:
        assert "not vocab-sharded as the TP group says" in result["shard_error"]


@pytest.mark.parametrize("sp", [False, True])
def test_superposed_embedding_tp2_equals_tp1(tp2_results, sp):
    for result in tp2_results:
        for bag in (1, 4):
            assert result[f"emb_out_sp{sp}_bag{bag}"] < 1e-6
            assert result[f"emb_grad_sp{sp}_bag{bag}"] < 1e-6
        assert result[f"emb_stock_equal_sp{sp}"]
    assert tp2_results[0]["emb_sp_local_shape_4"] == (L // 2, B, H)


def test_sequence_parallel_needs_positions_divisible_by_tp(tp2_results):
    for result in tp2_results:
        assert "divisible by the TP size" in result["sp_error"]
