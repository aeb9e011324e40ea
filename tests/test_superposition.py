"""Bag formation: superposed embeddings against a float64 reference, next-bag targets (TP=1)."""

import pytest
import torch
from reference import superposed_reference

from megatron_tst.superposition import build_bag_targets, check_bag_layout, split_into_bags, superposed_embedding

pytestmark = pytest.mark.unit

V, H = 40, 16


def _embedding(position_embedding_type="rope", dtype=torch.float32, max_len=64):
    from megatron.core.models.common.embeddings.language_model_embedding import LanguageModelEmbedding
    from megatron.core.transformer import TransformerConfig

    config = TransformerConfig(
        num_layers=1, hidden_size=H, num_attention_heads=2, hidden_dropout=0.0, use_cpu_initialization=True,
        params_dtype=dtype, bf16=dtype == torch.bfloat16,
    )
    return LanguageModelEmbedding(config, vocab_size=V, max_sequence_length=max_len,
                                  position_embedding_type=position_embedding_type)


def _tokens(batch, length, seed=0):
    return torch.randint(0, V, (batch, length), generator=torch.Generator().manual_seed(seed))


@pytest.mark.parametrize("bag", [1, 3, 4])
def test_bag_mean_and_weight_gradient_match_float64(megatron_single_process, bag):
    emb = _embedding()
    tokens = _tokens(2, 6 * bag, seed=bag)
    tokens[0, :bag] = 5  # a bag of one repeated token
    out = superposed_embedding(emb, tokens, bag)
    assert out.shape == (6, 2, H) and out.dtype == torch.float32

    weight = emb.word_embeddings.weight.detach().double().requires_grad_(True)
    ref = superposed_reference(weight, tokens, bag)
    torch.testing.assert_close(out.double(), ref, rtol=1e-6, atol=1e-6)

    probe = torch.randn(out.shape, generator=torch.Generator().manual_seed(1), dtype=torch.float64)
    (out.double() * probe).sum().backward()
    (ref * probe).sum().backward()
    torch.testing.assert_close(emb.word_embeddings.weight.grad.double(), weight.grad, rtol=1e-6, atol=1e-6)


def test_bag_of_one_is_the_stock_embedding(megatron_single_process):
    emb = _embedding(position_embedding_type="learned_absolute")
    tokens = _tokens(3, 10)
    positions = torch.arange(10).unsqueeze(0)
    torch.testing.assert_close(superposed_embedding(emb, tokens, 1), emb(tokens, positions), rtol=0, atol=0)


def test_embedding_features_it_does_not_mirror_are_refused(megatron_single_process):
    """megatron-core 0.17+ scales the stock embedding by μP's multiplier when `use_mup` is set; the superposed
    embedding does not mirror that yet, so it refuses instead of training a different model silently."""
    emb = _embedding()
    emb.config.use_mup, emb.config.mup_embedding_mult = True, 2.0  # set as attributes: 0.16.1 has no such fields
    with pytest.raises(ValueError, match="use_mup"):
        superposed_embedding(emb, _tokens(1, 8), 2)


def test_learned_positions_index_bags(megatron_single_process):
    emb = _embedding(position_embedding_type="learned_absolute")
    tokens = _tokens(2, 12)
    out = superposed_embedding(emb, tokens, 4)  # 3 bag positions
    words = superposed_reference(emb.word_embeddings.weight.detach(), tokens, 4)
    positions = emb.position_embeddings.weight.detach()[:3].double().unsqueeze(1)
    torch.testing.assert_close(out.double(), words + positions, rtol=1e-6, atol=1e-6)


def test_bf16_mean_is_accumulated_in_float32(megatron_single_process):
    emb = _embedding(dtype=torch.bfloat16)
    with torch.no_grad():  # values whose bf16 running sum would lose the small addends
        emb.word_embeddings.weight[:20] = 256.0
        emb.word_embeddings.weight[20:] = 1.0
    tokens = torch.tensor([[0] + [20] * 15])  # one bag of 16: (256 + 15) / 16
    out = superposed_embedding(emb, tokens, 16)
    assert out.dtype == torch.bfloat16
    assert torch.all(out.float() == torch.tensor(271.0 / 16).bfloat16().float())


def test_bad_layouts_are_clear_errors(megatron_single_process):
    emb = _embedding()
    with pytest.raises(ValueError, match="not divisible by the bag size 4"):
        superposed_embedding(emb, _tokens(2, 10), 4)
    with pytest.raises(ValueError, match="bag size must be >= 1"):
        split_into_bags(_tokens(2, 10), 0)
    with pytest.raises(ValueError, match="tokens must be"):
        split_into_bags(torch.zeros(10, dtype=torch.long), 2)
    with pytest.raises(ValueError, match="divisible by the TP size"):
        check_bag_layout(6, 4, tensor_parallel_size=4, sequence_parallel=True)
    with pytest.raises(ValueError, match="divisible by 4"):
        check_bag_layout(6, 4, context_parallel_size=2)
    check_bag_layout(8, 4, tensor_parallel_size=4, sequence_parallel=True, context_parallel_size=2)


# ---------------------------------------------------------------------------------------------- targets


def _stream(batch, length, seed=0):
    """A raw stream [b, length + 1] of distinct tokens (so a token names its position); Megatron's sample
    fields are tokens = x[:, :-1], labels = x[:, 1:]."""
    perm = torch.randperm(9000, generator=torch.Generator().manual_seed(seed))
    return 1000 + perm[:batch * (length + 1)].view(batch, length + 1)


@pytest.mark.parametrize("bag", [1, 2, 4, 6])
def test_targets_are_the_next_bag_and_never_the_own_bag(bag):
    stream = _stream(2, 5 * bag)
    tokens, labels = stream[:, :-1], stream[:, 1:]
    targets, valid = build_bag_targets(labels, torch.ones_like(labels), bag)
    assert targets.shape == valid.shape == (2, 5, bag)
    bags = split_into_bags(tokens, bag)
    for b in range(2):
        for i in range(5):
            for j in range(bag):
                pos = (i + 1) * bag + j  # stream position of target j
                if pos <= 5 * bag:  # the stream holds one token past the sample
                    assert valid[b, i, j] and targets[b, i, j] == stream[b, pos]
                else:
                    assert not valid[b, i, j] and targets[b, i, j] == -100
            # the builder's targets of bag i never contain one of bag i's own (distinct) tokens
            assert set(targets[b, i][valid[b, i]].tolist()).isdisjoint(bags[b, i].tolist())
    # the last position has exactly one real target: the token after the sample
    assert valid[:, -1].sum(-1).tolist() == [1, 1]
    assert torch.equal(targets[:, -1, 0], stream[:, -1])
    assert torch.equal(split_into_bags(tokens, bag), tokens.view(2, 5, bag))


def test_targets_do_not_cross_segments_and_respect_the_loss_mask():
    bag, seg = 2, 6  # a row of 3 baseline samples of 6 tokens each
    samples = [_stream(1, seg, seed=s) for s in range(3)]
    labels = torch.cat([x[:, 1:] for x in samples], dim=1)
    loss_mask = torch.ones_like(labels)
    loss_mask[0, 8] = 0  # one masked label (e.g. an end-of-document token)
    targets, valid = build_bag_targets(labels, loss_mask, bag, segment_length=seg, ignore_index=-1)
    assert targets.shape == (1, 9, 2)
    for i in range(9):
        segment, local = divmod(i, seg // bag)
        for j in range(bag):
            label_index = local * bag + bag - 1 + j  # inside this sample
            expected_valid = label_index < seg and not (segment == 1 and label_index == 2)
            assert bool(valid[0, i, j]) == expected_valid, (i, j)
            if expected_valid:
                assert targets[0, i, j] == samples[segment][0, 1 + label_index]
            else:
                assert targets[0, i, j] == -1


def test_target_builder_errors():
    labels = torch.zeros(2, 12, dtype=torch.long)
    with pytest.raises(ValueError, match="not divisible by the bag size 5"):
        build_bag_targets(labels, None, 5)
    with pytest.raises(ValueError, match="bags must not straddle samples"):
        build_bag_targets(labels, None, 4, segment_length=6)
    with pytest.raises(ValueError, match="loss_mask shape"):
        build_bag_targets(labels, torch.ones(2, 11), 4)
