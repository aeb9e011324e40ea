"""One training step of a tiny dense / MoE model at any parallel layout, built from Megatron-Core parts.

Used by the model tests: the reference runs at TP=PP=EP=DP=1 in the pytest process, the layouts run in
spawned gloo workers, with the reference's weights loaded through `global_view`.
"""

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
    """A model and a parallel layout to run one step with."""

    name: str
    tp: int = 1
    pp: int = 1
    vpp: Optional[int] = None
    ep: int = 1
    sequence_parallel: bool = False
    moe_dispatcher: Optional[str] = None  # None: dense model
    distributed_optimizer: bool = False
    optimizer_step: bool = False
    sample_layout: str = "contiguous"  # superposition rows: one window of S*L tokens, or S segments of L
    linear_loss_fusion: bool = False  # --cross-entropy-loss-fusion --cross-entropy-fusion-impl linear
    num_query_groups: int = 2  # < tp: Megatron-Core replicates each KV head over tp // num_query_groups ranks


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


def model_options(untie=True):
    from megatron_tst.model import GPTModelOptions

    return GPTModelOptions(vocab_size=V, max_sequence_length=L, untie_embeddings_and_output_weights=untie)


def tst_config(weighting="uniform", sample_layout="contiguous"):
    from megatron_tst.config import TSTConfig

    return TSTConfig(bag_size=S, superposition_ratio=0.3, weighting=weighting, ignore_index=IGNORE,
                     sample_layout=sample_layout)


def build_chunks(case: Case, tst=None) -> List[torch.nn.Module]:
    """Model chunks for this rank, as Megatron-LM's get_model builds them (one per virtual stage)."""
    from megatron.core import parallel_state

    from megatron_tst.model import build_gpt_model

    config = transformer_config(case)
    tst = tst or tst_config(sample_layout=case.sample_layout)
    chunks = []
    for vp_stage in range(case.vpp or 1):
        vp = vp_stage if case.vpp else None
        chunks.append(build_gpt_model(
            config, model_options(), tst,
            pre_process=parallel_state.is_pipeline_first_stage(ignore_virtual=False, vp_stage=vp),
            post_process=parallel_state.is_pipeline_last_stage(ignore_virtual=False, vp_stage=vp),
            vp_stage=vp, seq_length=L,
        ))
    return chunks


def wrap_ddp(chunks, case: Case):
    from megatron.core.distributed import DistributedDataParallel, DistributedDataParallelConfig

    ddp_config = DistributedDataParallelConfig(grad_reduce_in_fp32=True, overlap_grad_reduce=False,
                                               use_distributed_optimizer=case.distributed_optimizer)
    return [DistributedDataParallel(chunk.config, ddp_config, chunk, disable_bucketing=(i > 0))
            for i, chunk in enumerate(chunks)]


def make_microbatches(superposition: bool, seed: int = 0,
                      sample_layout: str = "contiguous") -> List[Dict[str, torch.Tensor]]:
    """NUM_MICROBATCHES micro-batches of MBS rows from a random stream; masks and EODs included.

    A superposition row is one contiguous window of S*L (+1) tokens (the default, the paper's layout: next-bag
    targets run through the whole row), or with sample_layout "segments" S segments of L tokens."""
    from megatron_tst.superposition import make_superposition_batch

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
            batches.append({"tokens": tokens, "labels": labels, "loss_mask": loss_mask,
                            "position_ids": torch.arange(L).expand(MBS, L).contiguous()})
    return batches


def make_optimizer(chunks, case: Case):
    from megatron.core.optimizer import OptimizerConfig, get_megatron_optimizer

    config = OptimizerConfig(optimizer="adam", lr=1e-2, weight_decay=0.1, adam_beta1=0.9, adam_beta2=0.95,
                             adam_eps=1e-8, clip_grad=1.0, use_distributed_optimizer=case.distributed_optimizer)
    return get_megatron_optimizer(config, chunks)


def train_step(chunks, batches, case: Case, optimizer=None, forward_only=False) -> Optional[float]:
    """Forward/backward over this rank's micro-batches; returns the global-batch loss (last stage) or None."""
    from megatron.core import parallel_state
    from megatron.core.distributed import finalize_model_grads
    from megatron.core.pipeline_parallel import get_forward_backward_func

    from megatron_tst.forward_step import forward_step

    dp_size = parallel_state.get_data_parallel_world_size()
    dp_rank = parallel_state.get_data_parallel_rank()
    per_rank = len(batches) // dp_size
    mine = batches[dp_rank * per_rank:(dp_rank + 1) * per_rank]
    for chunk in chunks:
        chunk.zero_grad_buffer()
    if optimizer is not None:
        optimizer.zero_grad()
    data = [iter(mine) for _ in chunks] if len(chunks) > 1 else iter(mine)
    reports = get_forward_backward_func()(
        forward_step_func=forward_step, data_iterator=data, model=chunks if len(chunks) > 1 else chunks[0],
        num_microbatches=per_rank, seq_length=L, micro_batch_size=MBS, forward_only=forward_only,
    )
    if not forward_only:
        finalize_model_grads(chunks)
        if optimizer is not None:
            optimizer.step()
    if not parallel_state.is_pipeline_last_stage(ignore_virtual=True):
        return None
    totals = torch.zeros(2, dtype=torch.float64)
    for report in reports:
        (value,) = report.values()
        totals += value.double()
    torch.distributed.all_reduce(totals, group=parallel_state.get_data_parallel_group())
    return float(totals[0] / totals[1])


def run_case(case: Case, global_weights, phases=("superposition", "recovery")) -> dict:
    """Build `case` at the current layout, load `global_weights`, run one step per phase.

    Returns {phase: {"loss": float|None, "grads": {key: tensor}, "weights_after": {...} (optimizer cases)}}.
    """
    from megatron_tst.testing.global_view import gather_global, load_global

    out = {}
    for phase in phases:
        chunks = wrap_ddp(build_chunks(case), case)
        load_global(chunks, global_weights)
        optimizer = make_optimizer(chunks, case) if case.optimizer_step else None
        loss = train_step(chunks, make_microbatches(phase == "superposition", sample_layout=case.sample_layout),
                          case, optimizer)
        result = {"loss": loss}
        if case.optimizer_step:
            result["weights_after"] = gather_global(chunks)
        else:
            result["grads"] = gather_global(chunks, lambda p: p.main_grad)
        out[phase] = result
    return out
