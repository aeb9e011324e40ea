"""Build the run from Megatron-Core parts: the one build sequence of the trainer, the test harnesses and the
benchmarks.

    setup_parallel(args)                  torch.distributed, Megatron's parallel state, micro-batch calculator
    build_components(args, padded_vocab)  seeds -> TransformerConfig -> model chunks (Float16Module, DDP) ->
                                          optimizer + LR schedule -> the schedule hooks; a `Components`

as Megatron-LM's `initialize_megatron` and `setup_model_and_optimizer` do (megatron/training/training.py).
"""

from __future__ import annotations

import dataclasses
import os
import random
from typing import Callable, List, Optional

import numpy as np
import torch
import torch.distributed as dist
from megatron.core import parallel_state, tensor_parallel
from megatron.core.distributed import DistributedDataParallel, finalize_model_grads
from megatron.core.num_microbatches_calculator import (
    destroy_num_microbatches_calculator,
    init_num_microbatches_calculator,
)
from megatron.core.optimizer import get_megatron_optimizer, get_standard_config_overrides
from megatron.core.optimizer_param_scheduler import OptimizerParamScheduler
from megatron.core.transformer.module import Float16Module

from megatron_tst.model import TSTGPTModel, build_gpt_model
from megatron_tst.parallel import Layout, current_layout, free_port, initialize_parallel_state
from megatron_tst.platform import cpu
from megatron_tst.training import configs


def setup_parallel(args) -> None:
    """torch.distributed (torchrun's env:// or a 1-process world) unless it is up, Megatron's parallel state for
    the args' layout, the micro-batch calculator. Idempotent: a second call re-initialises the parallel state
    when the layout differs, and the calculator, for (possibly other) args on the same world. Sets `args.rank`.

    Raises SystemExit when the world size is not the one the args were validated for."""
    on_cpu = cpu.enable()
    if not dist.is_initialized():
        if "RANK" in os.environ:
            if not on_cpu:
                torch.cuda.set_device(int(os.environ.get("LOCAL_RANK", "0")))
            dist.init_process_group(backend="gloo" if on_cpu else "nccl")
        else:
            dist.init_process_group(backend="gloo" if on_cpu else "nccl",
                                    init_method=f"tcp://127.0.0.1:{free_port()}", rank=0, world_size=1)
    if dist.get_world_size() != args.world_size:
        raise SystemExit(f"the arguments were validated for {args.world_size} processes but "
                         f"{dist.get_world_size()} were started")
    args.rank = dist.get_rank()
    layout = Layout.from_args(args)
    if current_layout() != dataclasses.replace(layout, etp=layout.etp or layout.tp):
        initialize_parallel_state(layout)  # else keep the groups (models built on them may still be in use)
    init_microbatch_calculator(args)


@dataclasses.dataclass
class Components:
    """What a training run steps: the TransformerConfig (it carries the schedule hooks), this rank's model
    chunks (DDP-wrapped, one per virtual pipeline stage), Megatron's optimizer and its LR/WD schedule."""

    config: object
    model: List[torch.nn.Module]
    optimizer: object
    scheduler: OptimizerParamScheduler


def build_components(args, padded_vocab_size: int, *, model_class: type = TSTGPTModel,
                     before_optimizer: Optional[Callable[[List[torch.nn.Module]], None]] = None) -> Components:
    """Seed, then build the config, the model chunks, the optimizer and LR schedule, and the schedule hooks.

    `model_class=GPTModel` (with args.tst None) builds Megatron-Core's unmodified model the same way.
    `before_optimizer(model)` runs between the model and the optimizer (e.g. to load weights: a distributed or
    mixed-precision optimizer copies the weights it starts from). Call `setup_parallel(args)` first.
    """
    set_random_seed(args.seed)
    config = configs.transformer_config_from_args(args)
    model = build_model(args, config, configs.model_options_from_args(args, padded_vocab_size), model_class)
    if before_optimizer is not None:
        before_optimizer(model)
    optimizer, scheduler = build_optimizer_and_scheduler(args, model)
    configure_schedule_hooks(args, model, optimizer)
    return Components(config, model, optimizer, scheduler)


def init_microbatch_calculator(args) -> None:
    """Megatron's process-global micro-batch calculator for --global-batch-size / --micro-batch-size / DP
    (no batch-size ramp-up); replaces one set before."""
    destroy_num_microbatches_calculator()
    init_num_microbatches_calculator(rank=args.rank, rampup_batch_size=None,
                                     global_batch_size=args.global_batch_size,
                                     micro_batch_size=args.micro_batch_size,
                                     data_parallel_size=args.data_parallel_size)


def set_random_seed(seed: int) -> None:
    """Megatron-LM's seeding: one seed per pipeline stage, per-rank streams through the RNG tracker."""
    seed = seed + 100 * parallel_state.get_pipeline_model_parallel_rank()
    random.seed(seed)
    np.random.seed(seed)
    torch.manual_seed(seed)
    tensor_parallel.model_parallel_cuda_manual_seed(seed)


def build_model(args, config, options, model_class: type = TSTGPTModel) -> List[torch.nn.Module]:
    """This rank's model chunks (one per virtual pipeline stage), wrapped as Megatron-LM wraps them.

    `model_class=GPTModel` (with args.tst None) builds Megatron-Core's unmodified model the same way.
    """
    vpp = args.virtual_pipeline_model_parallel_size
    chunks = []
    for i in range(vpp or 1):
        vp_stage = i if vpp else None
        chunk = build_gpt_model(
            config, options, args.tst,
            pre_process=parallel_state.is_pipeline_first_stage(ignore_virtual=False, vp_stage=vp_stage),
            post_process=parallel_state.is_pipeline_last_stage(ignore_virtual=False, vp_stage=vp_stage),
            vp_stage=vp_stage, seq_length=args.seq_length, model_class=model_class,
        )
        for param in chunk.parameters():
            tensor_parallel.set_defaults_if_not_set_tensor_model_parallel_attributes(param)
        if torch.cuda.is_available():
            chunk.cuda(torch.cuda.current_device())
        if args.bf16 or args.fp16:
            chunk = Float16Module(config, chunk)
        chunks.append(chunk)
    ddp_config = configs.ddp_config_from_args(args)
    return [DistributedDataParallel(config=config, ddp_config=ddp_config, module=chunk,
                                    disable_bucketing=(i > 0)) for i, chunk in enumerate(chunks)]


def build_optimizer_and_scheduler(args, model):
    """Megatron's optimizer (distributed or not) and its LR/WD schedule, in samples as Megatron-LM counts."""
    config = configs.optimizer_config_from_args(args)
    # Megatron-LM's weight-decay skips (biases, norms), passed explicitly: newer megatron-core stops
    # defaulting to them when no overrides are given.
    optimizer = get_megatron_optimizer(config, model, config_overrides=get_standard_config_overrides(config))
    gbs = args.global_batch_size
    decay_steps = args.lr_decay_iters * gbs
    warmup_steps = (args.lr_warmup_fraction * decay_steps if args.lr_warmup_fraction is not None
                    else args.lr_warmup_iters * gbs)
    scheduler = OptimizerParamScheduler(
        optimizer, init_lr=args.lr_warmup_init, max_lr=args.lr, min_lr=args.min_lr,
        lr_warmup_steps=warmup_steps, lr_decay_steps=decay_steps, lr_decay_style=args.lr_decay_style,
        start_wd=args.start_weight_decay, end_wd=args.end_weight_decay, wd_incr_steps=args.train_iters * gbs,
        wd_incr_style=args.weight_decay_incr_style,
        use_checkpoint_opt_param_scheduler=args.use_checkpoint_opt_param_scheduler,
        override_opt_param_scheduler=args.override_opt_param_scheduler,
        wsd_decay_steps=args.lr_wsd_decay_iters * gbs if args.lr_wsd_decay_iters else None,
        lr_wsd_decay_style=args.lr_wsd_decay_style,
    )
    return optimizer, scheduler


def configure_schedule_hooks(args, model, optimizer) -> None:
    """The TransformerConfig callbacks Megatron's pipeline schedules call (as Megatron-LM's train() sets)."""
    config = model[0].config
    config.grad_scale_func = optimizer.scale_loss
    config.finalize_model_grads_func = finalize_model_grads
    if args.overlap_grad_reduce:
        sync = [chunk.no_sync for chunk in model]
        config.no_sync_func = sync[0] if len(sync) == 1 else sync
    # --overlap-param-gather: each module's forward pre-hook waits for its parameters' all-gather (no
    # param_sync_func: Megatron-LM sets it only with --align-param-gather, which this trainer does not take).
