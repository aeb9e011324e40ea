"""Pretraining with Token-Superposition Training through Megatron-LM's own loop: a drop-in for `pretrain_gpt.py`.

    torchrun ... -m megatron_tst.pretrain [any pretrain_gpt.py flags] --tst-bag-size 4 --tst-superposition-ratio 0.3

Megatron-LM's `megatron.training.training.pretrain` runs the job (parsing and validation, process groups,
model, optimizer, schedules, checkpoints, logging, exits) with TST's pieces (`megatron_tst.loop`): the model
provider (Megatron-Core's GPTModel with the superposed embedding and the MCE), the dataset provider (the sample
stream: superposition windows for the first samples, then recovery samples), `forward_step`, the `--tst-*` flags.
Once Megatron-LM has validated the command line and before any model or dataset exists, TST checks what it
cannot do, the data files and a resume's sample stream. Without `--tst-*` flags this is a plain Megatron-LM
pretraining run of the same model.
"""

from __future__ import annotations

import os
import sys
import time
from typing import Optional, Sequence

_PROGRAM_START_TIME = time.time()  # before the heavy imports, as pretrain_gpt.py: --exit-duration-in-mins counts

from megatron_tst.platform import cpu, megatron_lm  # noqa: E402

# Megatron-LM's defaults for pretrain_gpt.py
ARGS_DEFAULTS = {"tokenizer_type": "GPT2BPETokenizer"}
EXIT_MARKER_ENV = "TST_EXIT_MARKER"


def _fail(args, message: str) -> None:
    """End every rank with `message`, printed once (rank 0)."""
    if getattr(args, "rank", 0) == 0:
        print(f"error: {message}", file=sys.stderr, flush=True)
    raise SystemExit(2)


def start_run(args):
    """Everything TST does once Megatron-LM has validated `args`, before heavy work: refusals, the run's plan,
    the checkpoint to load (whole, only data), the data files, a resume's sample stream, the log callbacks.
    Returns the `TSTRun`; ends every rank with the reason (exit status 2) on bad input."""
    from megatron.training import get_tokenizer, print_rank_0

    from megatron_tst.loop import arguments, checkpoint_checks, data_checks, resume
    from megatron_tst.loop import run as tst_run
    from megatron_tst.loop.logging import TSTLogging

    try:
        arguments.check_arguments(args)
        run = tst_run.start(args)
    except ValueError as err:
        _fail(args, str(err))
    _lock_save_directory(args)
    try:
        checkpoint = checkpoint_checks.checkpoint_to_load(args)
        if checkpoint is not None:
            checkpoint_checks.check_checkpoint(checkpoint)
        data_checks.check_data(args, get_tokenizer().vocab_size)
    except ValueError as err:
        _fail(args, str(err))
    try:
        resume.check_resume(args, checkpoint)
    except SystemExit as refusal:  # its message: printed once, every rank ends with status 2, as above
        if not isinstance(refusal.code, str):
            raise
        _fail(args, refusal.code.removeprefix("error: "))
    megatron_lm.install(TSTLogging(args, run))
    if run.tst is not None:
        plan = run.plan
        print_rank_0(f"TST: bag size {run.tst.bag_size}, {plan.superposition_steps} superposition steps "
                     f"({plan.superposition_samples} samples of {plan.bag_size} x {plan.seq_length} tokens), then "
                     f"recovery ({run.tst.weighting} weighting, {_recovery_order(plan)})")
        for warning in tst_run.degenerate_settings(run, args, data_checks.train_split_tokens(args)):
            print_rank_0(f"warning: {warning}")
    return run


def _recovery_order(plan) -> str:
    if plan.sample_layout != "contiguous":
        return "segments: stock samples in order"
    return (f"contiguous windows read in blocks of {plan.block_windows} windows over {plan.bag_size} steps, "
            "one piece of each window per step")


def _lock_save_directory(args) -> None:
    """Global rank 0 takes `--save`'s lock (`loop.save_lock`) before any checkpoint is read or written. Another
    live trainer there ends this run (status 2): on megatron-core 0.17, whose process groups exist by now, every
    rank learns rank 0's verdict; on 0.18+ no group exists yet, rank 0 ends and torchrun ends the others."""
    from megatron.training import print_rank_0

    from megatron_tst.loop import save_lock

    refusal = None
    if args.save and getattr(args, "rank", 0) == 0:
        try:
            warning = save_lock.acquire(args.save)
            if warning:
                print_rank_0(f"warning: {warning}")
        except save_lock.SaveDirectoryInUse as err:
            refusal = str(err)
    import torch

    if torch.distributed.is_available() and torch.distributed.is_initialized():
        verdict = [refusal]
        torch.distributed.broadcast_object_list(verdict, src=0)
        refusal = verdict[0]
    if refusal:
        _fail(args, refusal)


def prepare(argv: Optional[Sequence[str]] = None) -> None:
    """Set `sys.argv` to the expanded command line (`--recipe`/`--config`, `loop.argv`) and install the platform
    bends (`platform.megatron_lm`, and on CPU `platform.cpu`)."""
    from megatron_tst.loop import arguments
    from megatron_tst.loop.argv import expand

    argv = list(sys.argv[1:] if argv is None else argv)
    sys.argv = [sys.argv[0]] + expand(argv)
    megatron_lm.install(extra_args_provider=arguments.add_arguments)
    cpu.install_loop_stand_ins()


def main(argv: Optional[Sequence[str]] = None, *, model_provider=None) -> int:
    """Run Megatron-LM's `pretrain` with TST's providers on `argv` (default: the command line). `model_provider`
    replaces TST's (tests and benchmarks: `loop.providers.stock_model_provider`, Megatron-Core's own GPTModel)."""
    prepare(argv)
    from megatron_tst.loop import arguments, providers
    from megatron_tst.loop.forward import forward_step
    from megatron_tst.platform import mcore_compat

    try:
        mcore_compat.pretrain(train_valid_test_dataset_provider=providers.train_valid_test_datasets_provider,
                              model_provider=model_provider or providers.model_provider,
                              forward_step_func=forward_step,
                              extra_args_provider=arguments.add_arguments, args_defaults=ARGS_DEFAULTS,
                              on_validated=start_run, get_embedding_ranks=providers.get_embedding_ranks)
    except SystemExit as exit_:
        _write_exit_marker()
        raise exit_
    _write_exit_marker()
    return 0


def _write_exit_marker() -> None:
    """After an exit on --exit-signal-handler's signal (Megatron-LM saved a checkpoint, then `sys.exit`), global
    rank 0 writes the file `$TST_EXIT_MARKER` names: the launch scripts' requeue contract (launch/common.sh)."""
    path = os.environ.get(EXIT_MARKER_ENV)
    if not path or "megatron.training.global_vars" not in sys.modules:
        return
    from megatron.training import global_vars

    args = global_vars._GLOBAL_ARGS
    handler = global_vars._GLOBAL_SIGNAL_HANDLER
    if args is None or handler is None or not getattr(handler, "_signal_received", False) or args.rank != 0:
        return
    with open(path, "w") as f:
        f.write(f"{args.curr_iteration + 1}\n")  # the iteration it stopped after (the checkpoint's)


if __name__ == "__main__":
    from megatron.training.training import set_startup_timestamps

    set_startup_timestamps(program_start=_PROGRAM_START_TIME, main_entry=time.time())
    sys.exit(main())
