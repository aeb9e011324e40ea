"""`forward_step` for Megatron-LM's loop (`pretrain(..., forward_step_func=forward_step)`), both phases.

The phase travels with the micro-batch: one that holds `tst_targets` is a superposition step
(`megatron_tst.stream.superposition_item`), any other a stock step, exactly as `pretrain_gpt.py` runs it:

    stock:         {"tokens" [b, L], "labels" [b, L], "loss_mask" [b, L], "position_ids" [b, L],
                    "attention_mask" [b, 1, L, L] (when the dataset makes one)}
    superposition: {"tokens" [b, s*L], "tst_targets" [b, L, s], "loss_mask" [b, L], "position_ids" [b, L]}

`get_batch` replaces `pretrain_gpt.py`'s: tensor-parallel rank 0 reads the micro-batch and broadcasts it to its TP
group (Megatron's `get_batch_on_this_tp_rank` knows only stock fields of [b, L]), with a 5-integer header first
(phase, micro-batch size, positions, bag size, attention mask or not) so that the receivers know the shapes;
then Megatron's context-parallel slicing cuts whole bags (every field has the sequence on dim 1). Middle pipeline
stages read nothing. The loss report carries the phase's own loss: "lm loss" (Megatron's name) in stock steps,
"mce loss" in superposition steps; `loss_func` is Megatron-LM's, with its NaN/Inf and spiky-loss checks.
"""

from __future__ import annotations

import contextlib
from functools import partial
from typing import Optional

import torch
from megatron.core import parallel_state
from megatron.core.utils import get_attr_wrapped_model

from megatron_tst.loop import run as tst_run
from megatron_tst.platform.mcore_compat import batch_on_this_cp_rank
from megatron_tst.stream import LM_LOSS, SAMPLE_IDS, Phase
from megatron_tst.superposition import TARGETS_KEY

# define spiky loss as a loss that's 10x the max loss observed (pretrain_gpt.py's SPIKY_LOSS_FACTOR)
SPIKY_LOSS_FACTOR = 10


def is_superposition_batch(batch: Optional[dict]) -> bool:
    return batch is not None and TARGETS_KEY in batch


def _field_specs(superposition: bool, micro_batch: int, seq_length: int, bag_size: int, attention_mask: bool):
    """(name, shape, dtype) of every field of a micro-batch of this kind, in broadcast order."""
    b, length = micro_batch, seq_length
    if superposition:
        return [("tokens", (b, bag_size * length), torch.long), (TARGETS_KEY, (b, length, bag_size), torch.long),
                ("loss_mask", (b, length), torch.float32), ("position_ids", (b, length), torch.long)]
    specs = [("tokens", (b, length), torch.long), ("labels", (b, length), torch.long),
             ("loss_mask", (b, length), torch.float32), ("position_ids", (b, length), torch.long)]
    if attention_mask:
        specs.append(("attention_mask", (b, 1, length, length), torch.bool))
    return specs


def broadcast_batch(batch: Optional[dict]) -> dict:
    """Tensor-parallel rank 0's micro-batch on every rank of its TP group (`batch` is ignored elsewhere).

    A header of 5 integers goes first (superposition or not, micro-batch size b, positions L, bag size s, attention
    mask or not), so that the receivers allocate the fields' shapes; then every field as its own broadcast from
    `get_tensor_model_parallel_src_rank`, as Megatron's `get_batch_on_this_tp_rank` does.
    """
    group = parallel_state.get_tensor_model_parallel_group()
    src = parallel_state.get_tensor_model_parallel_src_rank()
    device = torch.cuda.current_device()
    is_source = parallel_state.get_tensor_model_parallel_rank() == 0
    if is_source:
        superposition = is_superposition_batch(batch)
        b, length = batch["loss_mask"].shape
        bag = batch[TARGETS_KEY].shape[-1] if superposition else 1
        header = torch.tensor([int(superposition), b, length, bag, int(batch.get("attention_mask") is not None)],
                              dtype=torch.long, device=device)
    else:
        header = torch.empty(5, dtype=torch.long, device=device)
    torch.distributed.broadcast(header, src, group=group)
    superposition, micro_batch, length, bag, has_mask = (int(v) for v in header.tolist())
    out = {}
    for name, shape, dtype in _field_specs(bool(superposition), micro_batch, length, bag, bool(has_mask)):
        if is_source:
            tensor = batch[name].to(device=device, dtype=dtype).contiguous()
        else:
            tensor = torch.empty(shape, dtype=dtype, device=device)
        torch.distributed.broadcast(tensor, src, group=group)
        out[name] = tensor
    return out


def get_batch(data_iterator, vp_stage: Optional[int] = None, *, record: bool = False) -> Optional[dict]:
    """This rank's slice of the next micro-batch on first/last pipeline stages (None on middle stages).

    `record`: a training step's micro-batch, written to `--record-data-stream` (by TP/CP rank 0 of the first stage).
    """
    first = parallel_state.is_pipeline_first_stage(ignore_virtual=False, vp_stage=vp_stage)
    last = parallel_state.is_pipeline_last_stage(ignore_virtual=False, vp_stage=vp_stage)
    if not (first or last):
        return None
    batch = None
    if parallel_state.get_tensor_model_parallel_rank() == 0:
        batch = dict(next(data_iterator))
        sample_ids = batch.pop(SAMPLE_IDS, None)
        if record and sample_ids is not None and first and parallel_state.get_context_parallel_rank() == 0:
            tst_run.current().record_micro_batch(batch, sample_ids)
    if parallel_state.get_tensor_model_parallel_world_size() > 1:
        batch = broadcast_batch(batch)
    else:
        device = torch.cuda.current_device()
        batch = {key: value.to(device, non_blocking=True) for key, value in batch.items() if value is not None}
    return batch_on_this_cp_rank(batch, parallel_state.get_context_parallel_group())


def loss_func(loss_mask: torch.Tensor, output_tensor: torch.Tensor, *, loss_name: str = LM_LOSS):
    """Megatron's 3-tuple loss protocol: (masked loss sum, number of counted positions, report).

    `output_tensor` is the model's per-position loss [b, L] (cross-entropy, or the MCE in a superposition step);
    `loss_mask` [b, L]. As `pretrain_gpt.py`'s `loss_func`, the local loss is checked for NaN/Inf
    (`--check-for-nan-in-loss-and-grad`) and spikes (`--check-for-spiky-loss`) by Megatron's rerun state machine.
    """
    from megatron.core.rerun_state_machine import get_rerun_state_machine
    from megatron.training import get_args

    losses = output_tensor.view(-1).float()
    mask = loss_mask.view(-1).float()
    loss = torch.sum(losses * mask)
    num_tokens = mask.sum().clone().detach().to(torch.int)
    report = {loss_name: torch.cat([loss.clone().detach().view(1), num_tokens.view(1)])}

    args = get_args()
    machine = get_rerun_state_machine()
    if args.check_for_nan_in_loss_and_grad:
        for reject, what in ((torch.isnan, "NaN"), (torch.isinf, "Inf")):
            machine.validate_result(result=loss, rejection_func=reject,
                                    message=f"found {what} in local forward loss calculation ({loss_name})",
                                    tolerance=0.0, fatal=True)
    if getattr(args, "check_for_spiky_loss", False):
        machine.validate_result(
            result=loss,
            rejection_func=partial(machine.is_unexpectedly_large, threshold=SPIKY_LOSS_FACTOR, context="loss"),
            message="Spiky loss", tolerance=0.0, fatal=False)
    return loss, num_tokens, report


@contextlib.contextmanager
def _timer(name: str):
    """Megatron-LM's timer `name` (log level 2, as pretrain_gpt.py's "batch-generator") around the block, when
    Megatron-LM's timers exist (not in model tests that call forward_step directly)."""
    from megatron.training import global_vars

    timers = global_vars._GLOBAL_TIMERS
    if timers is None:
        yield
        return
    timers(name, log_level=2).start()
    try:
        yield
    finally:
        timers(name).stop()


def forward_step(data_iterator, model, return_schedule_plan: bool = False):
    """One micro-batch through `model` in whichever phase the batch belongs to (Megatron's forward_step_func).

    Raises:
        ValueError: `return_schedule_plan` (`--overlap-moe-expert-parallel-comm`) for a superposition batch.
    """
    with _timer("batch-generator"):
        vp_stage = get_attr_wrapped_model(model, "vp_stage")
        batch = get_batch(data_iterator, vp_stage, record=model.training)
    if batch is None:  # a middle pipeline stage: hidden states in, hidden states out
        return model(None, None, None), partial(loss_func, None)
    if is_superposition_batch(batch):
        if return_schedule_plan:
            raise ValueError("--overlap-moe-expert-parallel-comm cannot run superposition steps")
        output = model(batch.get("tokens"), batch.get("position_ids"), None, labels=batch[TARGETS_KEY],
                       tst_superposition=True)
        return output, partial(loss_func, batch["loss_mask"], loss_name=Phase.SUPERPOSITION.loss_name)
    tokens, positions, mask = batch.get("tokens"), batch.get("position_ids"), batch.get("attention_mask")
    if return_schedule_plan:
        plan = model.build_schedule_plan(tokens, positions, mask, labels=batch["labels"],
                                         loss_mask=batch["loss_mask"])
        return plan, partial(loss_func, batch["loss_mask"], loss_name=LM_LOSS)
    output = model(tokens, positions, mask, labels=batch["labels"], loss_mask=batch["loss_mask"])
    return output, partial(loss_func, batch["loss_mask"], loss_name=LM_LOSS)
