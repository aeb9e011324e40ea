"""One optimizer step and one evaluation, through Megatron's pipeline schedules (either phase).

The phase is in the data: the same `forward_step` runs superposition and recovery micro-batches. Losses
come back through Megatron's 3-tuple protocol and are reduced as Megatron-LM reduces them: summed over
micro-batches, all-reduced over the data-parallel (+ context-parallel) group, divided by the token count.
"""

from __future__ import annotations

import dataclasses
import math
from typing import Dict, Iterator, List, Optional, Union

import torch
from megatron.core import parallel_state
from megatron.core.num_microbatches_calculator import get_num_microbatches
from megatron.core.pipeline_parallel import get_forward_backward_func

from megatron_tst.forward_step import forward_step

DataIterators = Union[Optional[Iterator[dict]], List[Optional[Iterator[dict]]]]


@dataclasses.dataclass(frozen=True)
class StepSettings:
    """What a step needs to know of the run (Megatron-LM's flag names; `from_args` of a parsed command line).

    seq_length / micro_batch_size: the schedules' p2p shapes (positions per row after superposition: L).
    global_batch_size: samples (rows) per step, the LR schedule's increment. num_experts and the MoE fields:
    which router losses to report. fp16: an overflow is the loss scaler's (skipped step), not an error.
    """

    seq_length: int
    micro_batch_size: int
    global_batch_size: int
    check_for_nan_in_loss_and_grad: bool = True
    fp16: bool = False
    num_experts: Optional[int] = None
    num_layers: int = 0
    moe_layer_freq: object = 1
    moe_router_load_balancing_type: str = "aux_loss"
    moe_z_loss_coeff: Optional[float] = None

    @classmethod
    def from_args(cls, args) -> "StepSettings":
        return cls(**{f.name: getattr(args, f.name) for f in dataclasses.fields(cls) if hasattr(args, f.name)})


@dataclasses.dataclass
class StepResult:
    """One optimizer step: {loss name: global-batch mean} (the phase's loss, "lm loss" or "mce loss", and the
    MoE router losses; {} off the last pipeline stage), the gradient norm (after clipping's measurement, as
    Megatron-LM logs it), and 1 if the optimizer skipped the step (fp16 overflow) else 0."""

    losses: Dict[str, float]
    grad_norm: float
    skipped: int


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


class NonFiniteError(RuntimeError):
    """A step's loss or gradient was NaN/Inf (--check-for-nan-in-loss-and-grad); the step was not applied.

    Raised on every rank together (the finding is all-reduced), so no rank is left waiting in a collective.
    `found` names what was non-finite, e.g. ["lm loss", "gradient"].
    """

    def __init__(self, found: List[str]):
        super().__init__("non-finite " + ", ".join(found))
        self.found = found


# Bits of the all-reduced finding, in the order they are reported.
_NON_FINITE_KINDS = ("loss", "gradient", "weights")


def _grads_are_finite(model) -> bool:
    """Whether every gradient this rank holds (Megatron DDP's grad buffers, dense and expert) is finite.

    Run after finalize_model_grads (the data-parallel reduction): a NaN/Inf on any rank reaches the rank that
    owns the shard, and each rank also checks what it computed itself.
    """
    for chunk in model:
        for buffer in list(getattr(chunk, "buffers", [])) + list(getattr(chunk, "expert_parallel_buffers", [])):
            if not bool(torch.isfinite(buffer.grad_data).all()):
                return False
    return True


def params_are_finite(model) -> bool:
    """Whether every parameter of this rank's model chunks is finite."""
    return all(bool(torch.isfinite(p).all()) for chunk in model for p in chunk.parameters())


def agree_on_non_finite(local: Dict[str, bool]) -> List[str]:
    """All-reduce (MAX over the world) this rank's {kind: non-finite?}; the kinds found on any rank.

    Every rank gets the same answer, so all of them stop together. One collective of a few ints.
    """
    from megatron_tst.parallel import collective_device

    flags = torch.tensor([int(local.get(kind, False)) for kind in _NON_FINITE_KINDS], dtype=torch.int32,
                         device=collective_device())
    torch.distributed.all_reduce(flags, op=torch.distributed.ReduceOp.MAX)
    return [kind for kind, flag in zip(_NON_FINITE_KINDS, flags.tolist()) if flag]


def train_step(data: DataIterators, model, optimizer, settings: StepSettings, scheduler=None) -> StepResult:
    """Zero grads, forward/backward all micro-batches, optimizer step, LR step. Returns losses and grad norm.

    With args.check_for_nan_in_loss_and_grad (Megatron-LM's default) the losses (MoE balancing losses
    included) and every gradient are checked before the optimizer applies anything; a non-finite one raises
    NonFiniteError on all ranks and the model, optimizer and schedule stay as they were before the step.
    (Megatron-Core's own DDP check, DistributedDataParallelConfig.check_for_nan_in_grad, raises on the
    rank that sees the NaN only, before the data-parallel collective, so the other ranks would wait.)
    `scheduler` (Megatron's OptimizerParamScheduler) advances by the global batch size; None: no LR schedule.
    """
    for chunk in model:
        chunk.zero_grad_buffer()
    optimizer.zero_grad()
    reports = get_forward_backward_func()(
        forward_step_func=forward_step, data_iterator=data, model=model,
        num_microbatches=get_num_microbatches(), seq_length=settings.seq_length,
        micro_batch_size=settings.micro_batch_size, forward_only=False,
    )
    losses = _reduce_losses(reports)
    if settings.num_experts:
        losses.update(moe_aux_losses(settings))
    if settings.check_for_nan_in_loss_and_grad:
        loss_bad = not all(math.isfinite(v) for v in losses.values())
        # fp16: an overflow in the scaled gradients is the loss scaler's business (it skips the step)
        grad_bad = not settings.fp16 and not _grads_are_finite(model)
        found = agree_on_non_finite({"loss": loss_bad, "gradient": grad_bad})
        if found:
            bad = [f"{name} ({value})" for name, value in losses.items() if not math.isfinite(value)]
            raise NonFiniteError([*(bad or (["loss"] if "loss" in found else [])),
                                  *(["gradient"] if "gradient" in found else [])])
    update_successful, grad_norm, _ = optimizer.step()
    if update_successful and scheduler is not None:
        scheduler.step(increment=settings.global_batch_size)
    return StepResult(losses=losses, grad_norm=float(grad_norm) if grad_norm is not None else 0.0,
                      skipped=0 if update_successful else 1)


# The name under which megatron-core's router tracks each balancing loss (transformer/moe/router.py).
_AUX_LOSS_NAMES = {"aux_loss": "load_balancing_loss", "seq_aux_loss": "seq_load_balancing_loss",
                   "global_aux_loss": "global_load_balancing_loss"}


def moe_aux_losses(settings: StepSettings) -> Dict[str, float]:
    """This step's router losses per MoE layer, averaged as Megatron-LM logs them ("load_balancing_loss" or its
    seq/global variant, "z_loss"); reads and clears megatron-core's tracker. Every rank calls it (it reduces
    across ranks)."""
    from megatron.core.transformer.moe.moe_utils import track_moe_metrics

    names = []
    if settings.moe_router_load_balancing_type in _AUX_LOSS_NAMES:
        names.append(_AUX_LOSS_NAMES[settings.moe_router_load_balancing_type])
    if settings.moe_z_loss_coeff is not None:  # the router tracks z_loss whenever a coefficient is set
        names.append("z_loss")
    totals: Dict[str, torch.Tensor] = {}
    track_moe_metrics(loss_scale=1.0 / get_num_microbatches(), iteration=0, total_loss_dict=totals,
                      force_initialize=True, track_names=names, num_layers=settings.num_layers,
                      moe_layer_freq=settings.moe_layer_freq)
    return {name: float(value) for name, value in totals.items()}


def sync_overlapped_params(model) -> None:
    """Gather the parameters now where --overlap-param-gather left them sharded.

    With it, the distributed optimizer's step updates only this rank's shard of the parameter buffer and leaves
    the all-gather to the next training forward's module pre-hooks; an evaluation or a save before that forward
    would read other ranks' shards one step old. Megatron-LM forces the same sync there (training.py,
    `force_param_sync` before a save, `disable_forward_pre_hook` around evaluation). A no-op without the flag.
    """
    with torch.no_grad():
        for chunk in model:
            if getattr(getattr(chunk, "ddp_config", None), "overlap_param_gather", False):
                chunk.start_param_sync(force_sync=True)


@torch.no_grad()
def evaluate(data: DataIterators, num_steps: int, model, settings: StepSettings) -> Dict[str, float]:
    """Mean loss over `num_steps` global batches (forward only); `data` streams all of their micro-batches."""
    sync_overlapped_params(model)
    for chunk in model:
        chunk.eval()
    totals: Dict[str, torch.Tensor] = {}
    for _ in range(num_steps):
        reports = get_forward_backward_func()(
            forward_step_func=forward_step, data_iterator=data, model=model,
            num_microbatches=get_num_microbatches(), seq_length=settings.seq_length,
            micro_batch_size=settings.micro_batch_size, forward_only=True,
        )
        if parallel_state.is_pipeline_last_stage(ignore_virtual=True):
            for key, pair in _sum_reports(reports).items():  # float64 across steps: many eval batches
                totals[key] = totals.get(key, 0) + pair.double()
    for chunk in model:
        chunk.train()
    return _global_means(totals)
