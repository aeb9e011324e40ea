"""A tiny dense / MoE TSTGPTModel built directly from a TransformerConfig (no Megatron-LM arguments), and micro-batches
of both phases, for the model-level tests (tests/test_model.py, tests/test_fused_model.py). The trainer-level layout
tests run Megatron-LM's own loop instead (tests/test_layouts.py)."""

from __future__ import annotations

import dataclasses
from typing import Dict, List, Optional

import torch
import torch.nn.functional as F

L, S, V = 16, 4, 128  # positions, bag size, vocabulary
MBS, NUM_MICROBATCHES = 2, 4
IGNORE = -100


@dataclasses.dataclass(frozen=True)
class Case:
    """A model (and the parallel sizes its config names)."""

    name: str
    tp: int = 1
    pp: int = 1
    vpp: Optional[int] = None
    ep: int = 1
    sequence_parallel: bool = False
    moe_dispatcher: Optional[str] = None  # None: dense model
    linear_loss_fusion: bool = False  # --cross-entropy-loss-fusion --cross-entropy-fusion-impl linear
    num_query_groups: int = 2


def transformer_config(case: Case):
    from megatron.core.transformer import TransformerConfig

    from megatron_tst.platform import cpu

    moe = {}
    if case.moe_dispatcher:
        moe = dict(num_moe_experts=4, moe_router_topk=2, moe_ffn_hidden_size=32, moe_aux_loss_coeff=1e-2,
                   moe_router_load_balancing_type="aux_loss", moe_token_dispatcher_type=case.moe_dispatcher,
                   expert_model_parallel_size=case.ep)
    if case.linear_loss_fusion:
        moe.update(cross_entropy_loss_fusion=True, cross_entropy_fusion_impl="linear")
    return TransformerConfig(
        num_layers=4, hidden_size=32, num_attention_heads=4, num_query_groups=case.num_query_groups, ffn_hidden_size=64,
        normalization="RMSNorm", gated_linear_unit=True, activation_func=F.silu, add_bias_linear=False,
        hidden_dropout=0.0, attention_dropout=0.0, init_method_std=0.05,
        tensor_model_parallel_size=case.tp, pipeline_model_parallel_size=case.pp,
        virtual_pipeline_model_parallel_size=case.vpp, sequence_parallel=case.sequence_parallel,
        pipeline_dtype=torch.float32, bias_activation_fusion=False, masked_softmax_fusion=False,
        bias_dropout_fusion=False, apply_rope_fusion=False, persist_layer_norm=False,
        **moe, **cpu.cpu_config_overrides(),
    )


def build_model(case: Case, tst="default", *, model_class=None, untie: bool = True,
                position_embedding_type: str = "rope", max_sequence_length: int = L, config=None, **kwargs):
    """One model chunk of `case` (or of `config`) with the local layer spec: a TSTGPTModel with `tst_config()`
    (tst=None: no TST settings), or the stock `model_class` (e.g. Megatron-Core's GPTModel) from the same spec;
    `kwargs` go to the model's constructor."""
    from megatron.core.models.gpt.gpt_layer_specs import get_gpt_decoder_block_spec, get_gpt_layer_local_spec

    from megatron_tst.model import TSTGPTModel

    config = config or transformer_config(case)
    spec = (get_gpt_decoder_block_spec(config, use_transformer_engine=False, normalization=config.normalization)
            if config.num_moe_experts else get_gpt_layer_local_spec(normalization=config.normalization))
    extra = {} if model_class is not None else {"tst": tst_config() if tst == "default" else tst}
    return (model_class or TSTGPTModel)(
        config=config, transformer_layer_spec=spec, vocab_size=V, max_sequence_length=max_sequence_length,
        position_embedding_type=position_embedding_type, share_embeddings_and_output_weights=not untie, **extra,
        **kwargs)


def tst_config(weighting="uniform", sample_layout="contiguous"):
    from megatron_tst.config import TSTConfig

    return TSTConfig(bag_size=S, superposition_ratio=0.3, weighting=weighting, ignore_index=IGNORE,
                     sample_layout=sample_layout)


def make_microbatches(superposition: bool, seed: int = 0,
                      sample_layout: str = "contiguous") -> List[Dict[str, torch.Tensor]]:
    """NUM_MICROBATCHES micro-batches of MBS rows from a random stream; masks and EODs included.

    A superposition row is one contiguous window of S*L (+1) tokens (the default, the paper's layout: next-bag
    targets run through the whole row), or with sample_layout "segments" S segments of L tokens."""
    from megatron_tst.superposition import make_stock_batch, make_superposition_batch

    g = torch.Generator().manual_seed(seed)
    length = L * S if superposition else L
    batches = []
    for _ in range(NUM_MICROBATCHES):
        stream = torch.randint(0, V, (MBS, length + 1), generator=g)
        tokens, labels = stream[:, :-1], stream[:, 1:]
        loss_mask = (torch.rand(MBS, length, generator=g) > 0.1).float()
        if superposition:
            batches.append(make_superposition_batch(
                tokens, labels, loss_mask, S, segment_length=L if sample_layout == "segments" else None,
                ignore_index=IGNORE))
        else:
            batches.append(make_stock_batch(tokens, labels, loss_mask))
    return batches
