"""One optimizer step and one evaluation, through Megatron's pipeline schedules (either phase).

The phase is in the data: the same `forward_step` runs superposition and recovery micro-batches. Losses
come back through Megatron's 3-tuple protocol and are reduced as Megatron-LM reduces them: summed over
micro-batches, all-reduced over the data-parallel (+ context-parallel) group, divided by the token count.
"""

from __future__ import annotations

from typing import Dict, Iterator, List, Optional, Union

import torch
from megatron.core import parallel_state
from megatron.core.num_microbatches_calculator import get_num_microbatches
from megatron.core.pipeline_parallel import get_forward_backward_func

from megatron_tst.forward_step import forward_step

DataIterators = Union[Optional[Iterator[dict]], List[Optional[Iterator[dict]]]]


def _sum_reports(reports: List[Dict[str, torch.Tensor]]) -> Dict[str, torch.Tensor]:
    """{loss name: [loss sum, count]} over this rank's micro-batches (on the device the losses are on)."""
    return {key: torch.vstack([r[key].view(-1).float() for r in reports]).sum(dim=0) for key in reports[0]}


def _global_means(totals: Dict[str, torch.Tensor]) -> Dict[str, float]:
    """All-reduce each [loss sum, count] over data (+ context) parallel ranks; the mean per loss name."""
    group = parallel_state.get_data_parallel_group(with_context_parallel=True)
    means = {}
    for key, pair in totals.items():
        torch.distributed.all_reduce(pair, group=group)
        means[key] = float(pair[0] / pair[1].clamp(min=1))
    return means


def _reduce_losses(reports: List[Dict[str, torch.Tensor]]) -> Dict[str, float]:
    """{loss name: global-batch mean} on the last pipeline stage; {} elsewhere."""
    if not parallel_state.is_pipeline_last_stage(ignore_virtual=True) or not reports:
        return {}
    return _global_means(_sum_reports(reports))


def train_step(data: DataIterators, model, optimizer, scheduler, args) -> dict:
    """Zero grads, forward/backward all micro-batches, optimizer step, LR step. Returns losses and grad norm."""
    for chunk in model:
        chunk.zero_grad_buffer()
    optimizer.zero_grad()
    reports = get_forward_backward_func()(
        forward_step_func=forward_step, data_iterator=data, model=model,
        num_microbatches=get_num_microbatches(), seq_length=args.seq_length,
        micro_batch_size=args.micro_batch_size, forward_only=False,
    )
    update_successful, grad_norm, _ = optimizer.step()
    if update_successful:
        scheduler.step(increment=args.global_batch_size)
    losses = _reduce_losses(reports)
    if args.num_experts:
        losses.update(moe_aux_losses(args))
    return {"losses": losses, "grad_norm": float(grad_norm) if grad_norm is not None else 0.0,
            "skipped": 0 if update_successful else 1}


# The name under which megatron-core's router tracks each balancing loss (transformer/moe/router.py).
_AUX_LOSS_NAMES = {"aux_loss": "load_balancing_loss", "seq_aux_loss": "seq_load_balancing_loss",
                   "global_aux_loss": "global_load_balancing_loss"}


def moe_aux_losses(args) -> Dict[str, float]:
    """This step's router losses per MoE layer, averaged as Megatron-LM logs them ("load_balancing_loss" or its
    seq/global variant, "z_loss"); reads and clears megatron-core's tracker. Every rank calls it (it reduces
    across ranks)."""
    from megatron.core.transformer.moe.moe_utils import track_moe_metrics

    names = []
    if args.moe_router_load_balancing_type in _AUX_LOSS_NAMES:
        names.append(_AUX_LOSS_NAMES[args.moe_router_load_balancing_type])
    if args.moe_z_loss_coeff is not None:  # the router tracks z_loss whenever a coefficient is set
        names.append("z_loss")
    totals: Dict[str, torch.Tensor] = {}
    track_moe_metrics(loss_scale=1.0 / get_num_microbatches(), iteration=0, total_loss_dict=totals,
                      force_initialize=True, track_names=names, num_layers=args.num_layers,
                      moe_layer_freq=args.moe_layer_freq)
    return {name: float(value) for name, value in totals.items()}


@torch.no_grad()
def evaluate(data: DataIterators, num_steps: int, model, args) -> Dict[str, float]:
    """Mean loss over `num_steps` global batches (forward only); `data` streams all of their micro-batches."""
    for chunk in model:
        chunk.eval()
    totals: Dict[str, torch.Tensor] = {}
    for _ in range(num_steps):
        reports = get_forward_backward_func()(
            forward_step_func=forward_step, data_iterator=data, model=model,
            num_microbatches=get_num_microbatches(), seq_length=args.seq_length,
            micro_batch_size=args.micro_batch_size, forward_only=True,
        )
        if parallel_state.is_pipeline_last_stage(ignore_virtual=True):
            for key, pair in _sum_reports(reports).items():  # float64 across steps: many eval batches
                totals[key] = totals.get(key, 0) + pair.double()
    for chunk in model:
        chunk.train()
    return _global_means(totals)
