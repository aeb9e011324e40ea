"""One training step of a tiny dense / MoE model at any parallel layout, through the trainer's own code.

A `Case` is a command line (`case_argv`): `arguments.parse_args` -> `build.setup_parallel` ->
`build.build_components` (the reference's weights loaded through `global_view` before the optimizer exists) ->
`step.train_step` (Megatron's schedules, `finalize_model_grads`, optimizer step). Used by the layout tests: the
reference runs at TP=PP=EP=DP=1 in the pytest process, the layouts run in spawned gloo workers.
The TransformerConfig helpers below (`transformer_config`, `model_options`, `tst_config`) serve the in-process
model tests (tests/test_model.py, tests/test_fused_model.py), which build the model without a trainer.
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


def case_argv(case: Case) -> List[str]:
    """The trainer's command line of `case`: the shape of `transformer_config`, Adam (lr 1e-2, constant), and
    no gradient clipping unless the case takes an optimizer step (so the gradients read back are the raw ones)."""
    argv = (f"--num-layers 4 --hidden-size 32 --num-attention-heads 4 --group-query-attention "
            f"--num-query-groups {case.num_query_groups} --ffn-hidden-size 64 --normalization RMSNorm --swiglu "
            f"--disable-bias-linear --hidden-dropout 0 --attention-dropout 0 --init-method-std 0.05 "
            f"--position-embedding-type rope --seq-length {L} --max-position-embeddings {L} "
            f"--micro-batch-size {MBS} --global-batch-size {MBS * NUM_MICROBATCHES} --train-iters 10 "
            f"--lr 1e-2 --lr-decay-style constant --weight-decay 0.1 --adam-beta1 0.9 --adam-beta2 0.95 "
            f"--adam-eps 1e-8 --clip-grad {1.0 if case.optimizer_step else 0.0} --seed 1234 "
            f"--mock-data --tokenizer-type NullTokenizer --vocab-size {V} "
            f"--tst-bag-size {S} --tst-superposition-ratio 0.3 --tst-sample-layout {case.sample_layout} "
            f"--tensor-model-parallel-size {case.tp} --pipeline-model-parallel-size {case.pp} "
            f"--expert-model-parallel-size {case.ep} --untie-embeddings-and-output-weights").split()
    if case.vpp:
        argv += ["--num-layers-per-virtual-pipeline-stage", str(4 // (case.pp * case.vpp))]
    if case.sequence_parallel:
        argv.append("--sequence-parallel")
    if case.distributed_optimizer:
        argv.append("--use-distributed-optimizer")
    if case.linear_loss_fusion:
        argv += ["--cross-entropy-loss-fusion", "--cross-entropy-fusion-impl", "linear"]
    if case.moe_dispatcher:
        argv += ("--num-experts 4 --moe-router-topk 2 --moe-ffn-hidden-size 32 --moe-aux-loss-coeff 1e-2 "
                 f"--moe-router-load-balancing-type aux_loss --moe-token-dispatcher-type {case.moe_dispatcher}"
                 ).split()
    return argv


def build_case(case: Case, global_weights=None):
    """(args, build.Components) of `case` on the running world (its layout set up by `build.setup_parallel`),
    with `global_weights` (a `global_view.gather_global` dict) loaded before the optimizer exists."""
    import torch.distributed as dist

    from megatron_tst.testing.global_view import load_global
    from megatron_tst.training import arguments
    from megatron_tst.training.build import build_components, setup_parallel

    args = arguments.parse_args(case_argv(case), world_size=dist.get_world_size())
    setup_parallel(args)
    load = (lambda model: load_global(model, global_weights)) if global_weights is not None else None
    return args, build_components(args, V, before_optimizer=load)


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


def step_case(args, components, batches) -> Optional[float]:
    """One production `step.train_step` on this data-parallel rank's share of `batches` (Megatron-LM's order:
    DP rank r takes the r-th contiguous block); the phase's global-batch loss (last stage) or None."""
    from megatron.core import parallel_state

    from megatron_tst.forward_step import LM_LOSS, MCE_LOSS
    from megatron_tst.training import step

    dp_size = parallel_state.get_data_parallel_world_size()
    dp_rank = parallel_state.get_data_parallel_rank()
    per_rank = len(batches) // dp_size
    mine = batches[dp_rank * per_rank:(dp_rank + 1) * per_rank]
    model = components.model
    data = [iter(mine) for _ in model] if len(model) > 1 else iter(mine)
    result = step.train_step(data, model, components.optimizer, step.StepSettings.from_args(args),
                             components.scheduler)
    losses = [value for name, value in result.losses.items() if name in (LM_LOSS, MCE_LOSS)]
    return losses[0] if losses else None


def run_case(case: Case, global_weights, phases=("superposition", "recovery")) -> dict:
    """Build `case` at the current layout, load `global_weights`, run one step per phase.

    Returns {phase: {"loss": float|None, "grads": {key: tensor}, "weights_after": {...} (optimizer cases)}}.
    """
    from megatron_tst.testing.global_view import gather_global

    out = {}
    for phase in phases:
        args, components = build_case(case, global_weights)
        loss = step_case(args, components,
                          make_microbatches(phase == "superposition", sample_layout=case.sample_layout))
        result = {"loss": loss}
        if case.optimizer_step:
            result["weights_after"] = gather_global(components.model)
        else:  # the raw gradients: no clipping (case_argv); the optimizer step does not touch them
            result["grads"] = gather_global(components.model, lambda p: p.main_grad)
        out[phase] = result
    return out
