"""Megatron's schedule protocol for both phases: `forward_step(data_iterator, model)` and its `loss_func`.

Usable with `megatron.core.pipeline_parallel.get_forward_backward_func()` (and Megatron-LM's `pretrain()`).
The phase travels with the data: a micro-batch holding `tst_targets` (see
`superposition.make_superposition_batch`) is a superposition step, any other is a stock step:

    recovery / baseline: {"tokens" [b, L], "labels" [b, L], "loss_mask" [b, L], "position_ids" [b, L],
                          "attention_mask" (optional)}
    superposition:       {"tokens" [b, s*L], "tst_targets" [b, L, s], "loss_mask" [b, L], "position_ids" [b, L]
                          (the bags' positions; optional without context parallelism)}

Middle pipeline stages need no data in either phase. The loss report carries the phase's own loss:
"lm loss" (Megatron's name) in stock steps, "mce loss" in superposition steps.
"""

from __future__ import annotations

from functools import partial
from typing import Iterator, Optional

import torch
from megatron.core import parallel_state
from megatron.core.utils import get_attr_wrapped_model

from megatron_tst.platform.mcore_compat import batch_on_this_cp_rank
from megatron_tst.superposition import TARGETS_KEY

LM_LOSS = "lm loss"
MCE_LOSS = "mce loss"


def is_superposition_batch(batch: Optional[dict]) -> bool:
    return batch is not None and TARGETS_KEY in batch


def get_batch(data_iterator: Optional[Iterator[dict]], vp_stage: Optional[int] = None) -> Optional[dict]:
    """The next micro-batch on first/last pipeline stages (None elsewhere), on this rank's device, sliced for
    context parallelism."""
    first = parallel_state.is_pipeline_first_stage(ignore_virtual=False, vp_stage=vp_stage)
    last = parallel_state.is_pipeline_last_stage(ignore_virtual=False, vp_stage=vp_stage)
    if not (first or last) or data_iterator is None:
        return None
    device = torch.cuda.current_device() if torch.cuda.is_available() else "cpu"
    batch = {key: value.to(device, non_blocking=True) if torch.is_tensor(value) else value
             for key, value in next(data_iterator).items()}
    return batch_on_this_cp_rank(batch, parallel_state.get_context_parallel_group())


def loss_func(loss_mask: torch.Tensor, output_tensor: torch.Tensor, *, loss_name: str = LM_LOSS):
    """Megatron's 3-tuple loss protocol: (masked loss sum, number of counted positions, report).

    `output_tensor` is the model's per-position loss [b, L] (cross-entropy or MCE); `loss_mask` [b, L].
    """
    losses = output_tensor.view(-1).float()
    mask = loss_mask.view(-1).float()
    loss = torch.sum(losses * mask)
    num_tokens = mask.sum().clone().detach().to(torch.int)
    report = {loss_name: torch.cat([loss.clone().detach().view(1), num_tokens.view(1)])}
    return loss, num_tokens, report


def forward_step(data_iterator, model):
    """One micro-batch through `model` in whichever phase the batch belongs to."""
    vp_stage = get_attr_wrapped_model(model, "vp_stage")
    batch = get_batch(data_iterator, vp_stage)
    if batch is None:  # a middle pipeline stage: hidden states in, hidden states out
        return model(None, None, None), partial(loss_func, None)
    if is_superposition_batch(batch):
        output = model(batch.get("tokens"), batch.get("position_ids"), None, labels=batch[TARGETS_KEY],
                       tst_superposition=True)
        return output, partial(loss_func, batch["loss_mask"], loss_name=MCE_LOSS)
    output = model(batch.get("tokens"), batch.get("position_ids"), batch.get("attention_mask"),
                   labels=batch.get("labels"), loss_mask=batch.get("loss_mask"))
    return output, partial(loss_func, batch["loss_mask"], loss_name=LM_LOSS)
