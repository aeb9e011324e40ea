"""Checkpoints in Megatron-LM's torch_dist layout, interchangeable with Megatron-LM's in both directions.

Layout (what Megatron-LM's `save_checkpoint` writes):
    <save>/latest_checkpointed_iteration.txt            "100"
    <save>/iter_0000100/   megatron.core.dist_checkpointing: .metadata, __<rank>_<k>.distcp, metadata.json and,
                           with megatron-core <= 0.18, common.pt
    state dict: args (argparse.Namespace of plain values, consumed_train_samples included), checkpoint_version 3.0,
                iteration, model (model0, model1, ... with virtual pipelining), optimizer (sharded; the distributed
                optimizer's too), opt_param_scheduler, rng_state (one ShardedObject per PP x TP rank),
                num_floating_point_operations_so_far, content_metadata, and `tst` (ours: bag size, phase plan,
                consumed samples/tokens, wall time; Megatron-LM ignores it).

Each megatron-core version writes its own common-state layout: `common.pt` (<= 0.18) or the `common_state` sharded
object inside the .distcp files (0.19, as Megatron-LM 0.19 writes); both read both. The calls into
`dist_checkpointing` that differ between versions, the safe unpickling and the distributed-optimizer workarounds
are in `megatron_tst/platform/mcore_compat.py`.

Safety: nothing is unpickled with `weights_only=False`. Common state, RNG states and other sharded objects are
loaded with `torch.load(weights_only=True)` and an allow-list (megatron-core's safe globals, argparse.Namespace,
and inert stand-ins for enum classes of newer megatron-core versions, e.g. a 0.19 checkpoint's args).
A save goes to `iter_N.tmp` and is renamed to `iter_N` only when complete; the tracker file is then replaced
atomically, so a crash at any point leaves the previous checkpoint loadable. Its files are written by the trainer
process itself (mcore_compat.save_sharded: no writer process to outlive or hang it); a failed write ends the run on
every rank with the writer's error, and a model with non-finite weights is never saved.
Before a resume, check_load_arguments compares the model arguments, the sample stream and the LR schedule with the
checkpoint's saved args (resume_checks.py).
"""

from __future__ import annotations

import argparse
import os
import random
import shutil
from typing import Optional

import numpy as np
import torch
import torch.distributed as dist
from megatron.core import dist_checkpointing, parallel_state, tensor_parallel
from megatron.core.dist_checkpointing.mapping import ShardedObject
from megatron.core.utils import unwrap_model
from torch.distributed.checkpoint.api import CheckpointException

from megatron_tst.parallel import collective_device
from megatron_tst.platform import mcore_compat
from megatron_tst.platform.mcore_compat import UnknownMegatronObject, read_common_state, safe_torch_load  # noqa: F401
from megatron_tst.training import resume_checks
from megatron_tst.training.ranks import print_rank_0
from megatron_tst.training.run_state import TrainState
from megatron_tst.training.schedule import SamplePlan

TRACKER = "latest_checkpointed_iteration.txt"
CHECKPOINT_VERSION = 3.0
# Model arguments that must match between a checkpoint and the run that loads it (Megatron-LM names).
MODEL_ARGS = ("num_layers", "hidden_size", "num_attention_heads", "num_query_groups", "kv_channels",
              "ffn_hidden_size", "padded_vocab_size", "position_embedding_type", "normalization", "swiglu",
              "untie_embeddings_and_output_weights", "num_experts", "moe_ffn_hidden_size", "qk_layernorm")


# --------------------------------------------------------------------------------------------------------------
# paths


def checkpoint_dir(root: str, iteration: int) -> str:
    return os.path.join(root, f"iter_{iteration:07d}")


def latest_iteration(root: Optional[str]) -> Optional[int]:
    """The iteration named by the tracker file, or None."""
    if not root:
        return None
    path = os.path.join(root, TRACKER)
    if not os.path.isfile(path):
        return None
    text = open(path).read().strip()
    if text == "release":
        raise ValueError(f"{path} names a 'release' checkpoint; converted release checkpoints are not supported")
    return int(text)


def _resolve(args):
    """(directory, iteration, finetune) of the checkpoint this run loads, or None."""
    if args.load:
        iteration = args.ckpt_step if args.ckpt_step is not None else latest_iteration(args.load)
        if iteration is not None:
            return checkpoint_dir(args.load, iteration), iteration, args.finetune
    if args.pretrained_checkpoint:
        iteration = latest_iteration(args.pretrained_checkpoint)
        if iteration is None:
            raise SystemExit(f"--pretrained-checkpoint {args.pretrained_checkpoint}: no {TRACKER}")
        return checkpoint_dir(args.pretrained_checkpoint, iteration), iteration, True
    return None


def check_load_arguments(args) -> None:
    """Before any heavy work: the checkpoint to load exists, is complete, and fits the model arguments."""
    if not (args.load or args.pretrained_checkpoint):
        return
    target = _resolve(args)
    if target is None:
        if args.exit_on_missing_checkpoint:
            raise SystemExit(f"--exit-on-missing-checkpoint: no checkpoint in --load {args.load}")
        print_rank_0(f"no checkpoint found in --load {args.load}: starting from scratch")
        return
    directory, iteration, finetune = target
    if not os.path.isfile(os.path.join(directory, "metadata.json")):
        raise SystemExit(f"checkpoint {directory} (iteration {iteration}) is missing or incomplete")
    common = read_common_state(directory)
    ckpt_args = common.get("args")
    if ckpt_args is None:
        return
    mismatches = []
    for name in MODEL_ARGS:
        ours, theirs = _model_arg(args, name), _model_arg(ckpt_args, name)
        if theirs is not None and ours != theirs:
            mismatches.append(f"--{name.replace('_', '-')}: checkpoint {theirs!r}, this run {ours!r}")
    if mismatches:
        raise SystemExit(f"checkpoint {directory} does not match the model arguments:\n  " + "\n  ".join(mismatches)
                         + _vocab_hint(args, ckpt_args))
    if not finetune:
        tst = common.get("tst") or {}
        stream = ({"sample_layout": tst.get("sample_layout"), "samples_per_window": tst["samples_per_window"]}
                  if "samples_per_window" in tst else None)
        resume_checks.check_resume(args, ckpt_args, directory, loads_schedule=_loads_schedule(args, finetune),
                                   checkpoint_stream=stream)


def _loads_schedule(args, finetune: bool) -> bool:
    """Megatron-LM loads the checkpoint's LR schedule unless --finetune or --no-load-optim; with
    --use-checkpoint-opt_param-scheduler also under --no-load-optim (the schedule is the checkpoint's)."""
    return not finetune and (not args.no_load_optim or args.use_checkpoint_opt_param_scheduler)


def _vocab_hint(args, ckpt_args) -> str:
    """For a padded-vocabulary mismatch: the flag behind it, and a value that pads like the checkpoint."""
    theirs, ours = getattr(ckpt_args, "padded_vocab_size", None), getattr(args, "padded_vocab_size", None)
    if theirs is None or theirs == ours:
        return ""
    from megatron_tst.training.tokenizer import vocab_size_with_padding

    tp = args.tensor_model_parallel_size
    vocab = getattr(args, "vocab_size_unpadded", None)
    fits = [d for d in range(1, theirs // tp + 1)
            if vocab is not None and theirs % (d * tp) == 0
            and vocab_size_with_padding(vocab, d, tp) == theirs]
    hint = (f"\nThe vocabulary is padded to a multiple of --make-vocab-size-divisible-by x TP (checkpoint "
            f"{getattr(ckpt_args, 'make_vocab_size_divisible_by', '?')} x "
            f"{getattr(ckpt_args, 'tensor_model_parallel_size', '?')} -> {theirs}, this run "
            f"{args.make_vocab_size_divisible_by} x {tp} -> {ours})")
    if fits:
        hint += f": pass --make-vocab-size-divisible-by {max(fits)} to pad like the checkpoint at TP={tp}"
    elif vocab is not None:
        hint += f": no --make-vocab-size-divisible-by pads {vocab} ids to {theirs} at TP={tp}"
    return hint


def _model_arg(namespace, name):
    value = getattr(namespace, name, None)
    if name == "num_query_groups" and not getattr(namespace, "group_query_attention", False):
        return getattr(namespace, "num_attention_heads", None)
    if name == "moe_ffn_hidden_size" and getattr(namespace, "num_experts", None) is None:
        return None
    if name == "moe_ffn_hidden_size" and value is None:
        return getattr(namespace, "ffn_hidden_size", None)
    return value


# --------------------------------------------------------------------------------------------------------------
# state dict


def _sharded_metadata(args) -> dict:
    """What Megatron-LM records as content metadata, and passes to sharded_state_dict()."""
    metadata = {"singleton_local_shards": False, "chained_optim_avoid_prefix": True}
    if args.use_distributed_optimizer:
        metadata["distrib_optim_sharding_type"] = (
            "fully_reshardable" if args.dist_ckpt_optim_fully_reshardable else "dp_reshardable")
    return metadata


def _rng_state_object() -> ShardedObject:
    state = {
        "random_rng_state": random.getstate(),
        "np_rng_state": np.random.get_state(),
        "torch_rng_state": torch.get_rng_state(),
        "cuda_rng_state": torch.cuda.get_rng_state(),
        "rng_tracker_states": tensor_parallel.get_cuda_rng_tracker().get_states(),
    }
    return ShardedObject(
        "rng_state", [state],
        (parallel_state.get_pipeline_model_parallel_world_size(),
         parallel_state.get_tensor_model_parallel_world_size()),
        (parallel_state.get_pipeline_model_parallel_rank(), parallel_state.get_tensor_model_parallel_rank()),
        replica_id=parallel_state.get_data_parallel_rank(with_context_parallel=True),
    )


_PLAIN = (int, float, str, bool, type(None), torch.dtype)


def _saved_args(args, state: TrainState, padded_vocab_size: int) -> argparse.Namespace:
    """The args Namespace Megatron-LM expects: plain values only, with its derived fields.

    Megatron-LM's `load_args_from_checkpoint` (megatron/training/checkpointing.py, --use-checkpoint-args; also what
    lm-eval-harness's Megatron backend and Megatron-Bridge's Megatron-LM loader read) rebuilds the model from these
    fields under Megatron-LM's own names and meanings, and its `check_checkpoint_args` compares
    `add_position_embedding` with the loading run's. So the fields our parser names differently are saved under
    Megatron-LM's name too (`add_bias_linear`, `layernorm_epsilon`), the legacy flags keep the value Megatron-LM's
    parser gives them (`add_position_embedding` True unless --no-position-embedding, `use_rotary_position_embeddings`
    False unless that deprecated flag: the position embedding is `position_embedding_type`), and the model fields of
    features this trainer refuses carry Megatron-LM's defaults.
    """
    saved = {}
    for key, value in vars(args).items():
        if key in ("rank", "local_rank"):
            continue
        if isinstance(value, _PLAIN) or (isinstance(value, (list, tuple))
                                         and all(isinstance(v, _PLAIN) for v in value)):
            saved[key] = value
    moe = args.num_experts is not None
    saved.update(
        consumed_train_samples=state.consumed_train_samples, skipped_train_samples=0, consumed_valid_samples=0,
        padded_vocab_size=padded_vocab_size, add_position_embedding=True, use_rotary_position_embeddings=False,
        rotary_interleaved=False, apply_layernorm_1p=False, apply_query_key_layer_scaling=False,
        add_bias_linear=not args.disable_bias_linear, layernorm_epsilon=args.norm_epsilon, squared_relu=False,
        spec=None, mtp_num_layers=None, mtp_hybrid_override_pattern=None, mtp_use_repeated_layer=False,
        moe_ffn_hidden_size=(args.moe_ffn_hidden_size or args.ffn_hidden_size) if moe else None,
        moe_single_grouped_weight=False, moe_single_grouped_bias=False, moe_latent_size=None,
        ckpt_format="torch_dist", use_dist_ckpt=True,
        data_parallel_size=args.data_parallel_size, world_size=args.world_size, iteration=state.iteration,
    )
    return argparse.Namespace(**saved)


def _model_key(i: int, model) -> str:
    return "model" if len(model) == 1 else f"model{i}"


def _state_dict(args, state, model, optimizer, scheduler, padded_vocab_size, *, for_loading=False,
                load_optimizer=True, load_rng=True) -> dict:
    metadata = {**_sharded_metadata(args),
                "dp_cp_group": parallel_state.get_data_parallel_group(with_context_parallel=True)}
    sd = {}
    for i, chunk in enumerate(model):
        sd[_model_key(i, model)] = unwrap_model(chunk).sharded_state_dict(metadata=metadata)
    include_optimizer = load_optimizer if for_loading else not args.no_save_optim
    if include_optimizer:
        sd["optimizer"] = optimizer.sharded_state_dict(sd, is_loading=for_loading, metadata=metadata)
    if load_rng and (for_loading or not args.no_save_rng):
        sd["rng_state"] = _rng_state_object()
    if not for_loading:
        sd.update(
            args=_saved_args(args, state, padded_vocab_size), checkpoint_version=CHECKPOINT_VERSION,
            iteration=state.iteration, opt_param_scheduler=scheduler.state_dict(),
            num_floating_point_operations_so_far=state.num_floating_point_operations_so_far,
            tst=_tst_state(args, state),
        )
    return sd


def _tst_state(args, state: TrainState) -> dict:
    """Ours, for people and tools inspecting a checkpoint; a load reads back consumed tokens, wall time and the
    data stream (version 2: `sample_layout`, `samples_per_window`; version 1 had no sample layouts)."""
    tst = getattr(args, "tst", None)
    plan = SamplePlan.from_args(args)
    return {
        "version": 2, **plan.stream(), "bag_size": plan.bag_size, "superposition_steps": plan.superposition_steps,
        "weighting": tst.weighting if tst else None, "train_iters": args.train_iters,
        "phase_of_next_step": plan.phase_at(state.iteration).value,
        "consumed_train_samples": state.consumed_train_samples, "consumed_tokens": state.consumed_tokens,
        "wall_time_s": state.wall_time_s, "seq_length": args.seq_length,
    }


# --------------------------------------------------------------------------------------------------------------
# save


def save_checkpoint(args, state: TrainState, model, optimizer, scheduler) -> None:
    """Save at `state.iteration` to --save; complete or not at all (see module docstring)."""
    if state.saved_iteration == state.iteration:
        return  # this exact state is in --save already (an interval save, then the final one; or just loaded)
    root = args.save
    from megatron_tst.training.step import sync_overlapped_params

    sync_overlapped_params(model)  # --overlap-param-gather: the whole model, not one step-old shards
    _refuse_non_finite_weights(args, state, model)
    final = checkpoint_dir(root, state.iteration)
    partial = final + ".tmp"
    rank = dist.get_rank()
    if rank == 0:
        os.makedirs(root, exist_ok=True)
        shutil.rmtree(partial, ignore_errors=True)  # leftovers of a crashed save
        os.makedirs(partial)
    dist.barrier()
    padded_vocab_size = unwrap_model(model[0]).vocab_size
    wall_time = torch.tensor([state.wall_time_s], dtype=torch.float64, device=collective_device())
    dist.broadcast(wall_time, src=0)  # one value in the (replicated) common state
    state.wall_time_s = float(wall_time)
    sd = _state_dict(args, state, model, optimizer, scheduler, padded_vocab_size)
    error = None
    try:
        mcore_compat.save_sharded(sd, partial, content_metadata=_sharded_metadata(args))
    except (Exception, CheckpointException) as err:  # a failed write (full disk, ...): Megatron-Core raises it
        error = err  # on every rank (CheckpointException on the coordinator, which is a BaseException)
    _stop_on_failed_save(error, partial, root)
    dist.barrier()
    if rank == 0:
        # An older iter_N (a leftover, or another lineage's after a --ckpt-step rollback) is moved aside by a
        # rename, not deleted first: the window without any iter_N stays two renames long.
        replaced = final + ".old"
        shutil.rmtree(replaced, ignore_errors=True)
        if os.path.isdir(final):
            os.replace(final, replaced)
        os.replace(partial, final)
        tracker_tmp = os.path.join(root, TRACKER + ".tmp")
        with open(tracker_tmp, "w") as f:
            f.write(str(state.iteration))
            f.flush()
            os.fsync(f.fileno())
        os.replace(tracker_tmp, os.path.join(root, TRACKER))
        shutil.rmtree(replaced, ignore_errors=True)
    dist.barrier()
    state.saved_iteration = state.iteration
    if rank == 0:
        print(f"saved checkpoint at iteration {state.iteration} to {final}", flush=True)


def _stop_on_failed_save(error: Optional[BaseException], partial: str, root: str) -> None:
    """All ranks agree whether the save failed; if it did, every rank exits non-zero with the writer's error,
    the unfinished `iter_N.tmp` is removed and the tracker still names the last complete checkpoint."""
    failed = torch.tensor([int(error is not None)], dtype=torch.int32, device=collective_device())
    dist.all_reduce(failed, op=dist.ReduceOp.MAX)
    if not failed.item():
        return
    if dist.get_rank() == 0:
        shutil.rmtree(partial, ignore_errors=True)
    latest = latest_iteration(root)
    raise SystemExit(f"error: saving checkpoint {partial[:-len('.tmp')]} failed"
                     + (f": {type(error).__name__}: {error}" if error is not None else " on another rank")
                     + f"; the latest checkpoint in --save {root} stays "
                     + (f"iteration {latest}" if latest is not None else "absent (none complete)"))


def _refuse_non_finite_weights(args, state: TrainState, model) -> None:
    """Never save a model holding NaN/Inf (--check-for-nan-in-loss-and-grad): every rank stops, the latest
    checkpoint stays the last good one. A step with finite gradients can still overflow the weights."""
    if not getattr(args, "check_for_nan_in_loss_and_grad", True):
        return
    from megatron_tst.training.step import agree_on_non_finite, params_are_finite

    if agree_on_non_finite({"weights": not params_are_finite(model)}):
        latest = latest_iteration(args.save)
        raise SystemExit(f"error: the model's weights are non-finite at iteration {state.iteration}: not saving "
                         f"(--check-for-nan-in-loss-and-grad); the latest checkpoint in --save {args.save} stays "
                         f"{'iteration ' + str(latest) if latest is not None else 'absent'}")


# --------------------------------------------------------------------------------------------------------------
# load


def load_checkpoint(args, model, optimizer, scheduler) -> TrainState:
    """Load what --load / --pretrained-checkpoint names (Megatron-LM semantics); returns the run state."""
    target = _resolve(args)
    if target is None:
        return TrainState()
    directory, iteration, finetune = target
    common = read_common_state(directory)
    ckpt_args = common.get("args") or argparse.Namespace()
    metadata = dist_checkpointing.load_content_metadata(preloaded_state_dict=common) or {}
    same_layout = (getattr(ckpt_args, "tensor_model_parallel_size", 1) == args.tensor_model_parallel_size
                   and getattr(ckpt_args, "pipeline_model_parallel_size", 1) == args.pipeline_model_parallel_size)
    load_optimizer = not (finetune or args.no_load_optim or getattr(ckpt_args, "no_save_optim", False))
    load_rng = (same_layout and not (finetune or args.no_load_rng or getattr(ckpt_args, "no_save_rng", False))
                and _has_rng_state(directory))
    sharding = metadata.get("distrib_optim_sharding_type")
    if load_optimizer:
        _check_optimizer_format(directory, sharding, args, same_layout)
    # Describe the optimizer state as the checkpoint stores it (its sharding type, not this run's flag).
    load_args = argparse.Namespace(**{**vars(args),
                                      "dist_ckpt_optim_fully_reshardable": sharding == "fully_reshardable"})
    if load_optimizer:
        mcore_compat.prepare_torch_adam_distributed_optimizer(optimizer)
    sd = _state_dict(load_args, None, model, optimizer, scheduler, None, for_loading=True,
                     load_optimizer=load_optimizer, load_rng=load_rng)
    loaded = mcore_compat.load_sharded(sd, directory)
    for i, chunk in enumerate(model):
        unwrap_model(chunk).load_state_dict(loaded[_model_key(i, model)], strict=True)
    if not load_optimizer and optimizer is not None and (args.bf16 or args.fp16):
        # The fp32 main weights were copied from the model when the optimizer was built, before this load: refresh
        # them, or the first step writes "initial weights + update" back (Megatron-LM's load_checkpoint does this).
        optimizer.reload_model_params()
    if load_optimizer:
        command_line_lrs = [(g.get("max_lr"), g.get("min_lr")) for g in optimizer.param_groups]
        saved_schedule = common.get("opt_param_scheduler") or {}
        if saved_schedule.get("max_lr", saved_schedule.get("start_lr")) is not None:
            # Megatron-Core 0.19 matches saved and current param groups by a key holding their max/min LR
            # (optimizer.py): describe them as saved; an --override-opt_param-scheduler LR is put back below.
            for group in optimizer.param_groups:
                group["max_lr"] = saved_schedule.get("max_lr", saved_schedule.get("start_lr"))
                group["min_lr"] = saved_schedule.get("min_lr", group.get("min_lr"))
        # no_grad: with fp32 params the main params are views of the model's leaf parameters and
        # the dp_reshardable loader copies into them in place (its fully_reshardable twin is no_grad already).
        with mcore_compat.fully_reshardable_step_fix(optimizer), torch.no_grad():
            optimizer.load_state_dict(loaded["optimizer"])
        mcore_compat.untie_adam_steps(optimizer)
        if args.override_opt_param_scheduler:  # the loaded param groups carry the checkpoint's max/min LR
            for group, (max_lr, min_lr) in zip(optimizer.param_groups, command_line_lrs):
                group["max_lr"], group["min_lr"] = max_lr, min_lr
    if _loads_schedule(args, finetune) and common.get("opt_param_scheduler") is not None:
        _load_schedule(args, scheduler, optimizer, common["opt_param_scheduler"], directory)
    if load_rng:
        _restore_rng(loaded["rng_state"])
    elif dist.get_rank() == 0 and not finetune:
        print(f"RNG state of {directory} not loaded (different TP/PP layout, --no-load-rng, or none saved)",
              flush=True)
    if finetune:
        state = TrainState()
    else:
        tst = loaded.get("tst") or {}
        samples = int(getattr(ckpt_args, "consumed_train_samples", 0))
        state = TrainState(
            iteration=int(loaded.get("iteration", iteration)), consumed_train_samples=samples,
            consumed_tokens=int(tst.get("consumed_tokens",
                                        samples * getattr(ckpt_args, "seq_length", args.seq_length))),
            num_floating_point_operations_so_far=float(loaded.get("num_floating_point_operations_so_far", 0.0)),
            wall_time_s=float(tst.get("wall_time_s", 0.0)),
        )
        if args.save and os.path.realpath(directory) == os.path.realpath(checkpoint_dir(args.save, iteration)):
            state.saved_iteration = state.iteration
    if dist.get_rank() == 0:
        print(f"loaded checkpoint {directory} (iteration {iteration}"
              f"{', weights only' if finetune else ''}; consumed samples {state.consumed_train_samples})", flush=True)
    return state


def _load_schedule(args, scheduler, optimizer, state: dict, directory: str) -> None:
    """The checkpoint's LR/WD schedule position, with Megatron-LM's --override-opt_param-scheduler /
    --use-checkpoint-opt_param-scheduler meaning (check_load_arguments has compared the values already)."""
    try:
        scheduler.load_state_dict(state)
    except AssertionError as err:  # a mismatch the argument comparison could not see (no saved args)
        raise SystemExit(f"error: the LR schedule of checkpoint {directory} differs from this run's ({err}): pass "
                         "--override-opt_param-scheduler (this command line's schedule) or "
                         "--use-checkpoint-opt_param-scheduler (the checkpoint's)") from None
    if args.use_checkpoint_opt_param_scheduler:
        # The param groups' max/min LR win over the scheduler's (OptimizerParamScheduler.get_lr): give them
        # the checkpoint's, also when the optimizer state (and its groups) was not loaded.
        for group in optimizer.param_groups:
            group["max_lr"], group["min_lr"] = scheduler.max_lr, scheduler.min_lr
        scheduler.step(increment=0)


def _check_optimizer_format(directory, sharding, args, same_layout) -> None:
    """Refuse, before loading, optimizer state this run cannot read (as Megatron-LM does)."""
    hint = "load the weights only with --no-load-optim, or match the saving run's optimizer flags"
    if args.use_distributed_optimizer != (sharding is not None):
        saved = f"the distributed optimizer ({sharding})" if sharding else "the non-distributed optimizer"
        raise SystemExit(f"checkpoint {directory} holds the state of {saved}, this run uses the "
                         f"{'distributed' if args.use_distributed_optimizer else 'non-distributed'} optimizer: {hint}")
    if sharding is not None and sharding not in ("fully_reshardable", "dp_reshardable"):
        raise SystemExit(f"checkpoint {directory}: distributed-optimizer sharding type {sharding!r} is not "
                         f"supported here: {hint}")
    if sharding == "dp_reshardable" and not same_layout:
        raise SystemExit(f"checkpoint {directory}: 'dp_reshardable' optimizer state loads only at the same TP/PP "
                         "(save with --dist-ckpt-optim-fully-reshardable to reshard it): " + hint)


def _has_rng_state(directory: str) -> bool:
    from torch.distributed.checkpoint import FileSystemReader

    keys = FileSystemReader(directory).read_metadata().state_dict_metadata
    return any(k.startswith("rng_state/") for k in keys)


def _restore_rng(rng_list) -> None:
    state = rng_list[0] if isinstance(rng_list, list) else rng_list
    random.setstate(state["random_rng_state"])
    np.random.set_state(state["np_rng_state"])
    torch.set_rng_state(state["torch_rng_state"])
    device_state = state["cuda_rng_state"]
    tracker_states = state.get("rng_tracker_states") or {}
    if torch.cuda.is_available() or device_state.numel() == torch.get_rng_state().numel():
        torch.cuda.set_rng_state(device_state)
        tensor_parallel.get_cuda_rng_tracker().set_states(tracker_states)
    elif dist.get_rank() == 0:
        print("the checkpoint's CUDA RNG states do not apply on CPU: kept this run's device RNG streams", flush=True)
