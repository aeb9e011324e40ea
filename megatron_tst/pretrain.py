"""Pretraining with Token-Superposition Training: `python -m megatron_tst.pretrain [Megatron-LM flags] [--tst-*]`.

parse args -> tokenizer and data checks -> process groups -> model, optimizer, LR schedule -> checkpoint ->
datasets -> train: the superposition phase for the first r of the steps, then the recovery phase, one LR
schedule and one optimizer throughout -> final evaluation and checkpoint. Without `--tst-*` flags this is a
plain Megatron baseline run of the same model.
"""

from __future__ import annotations

import sys
import time
from typing import Optional

import torch
from megatron.core import parallel_state

from megatron_tst.flops import training_flops_per_step
from megatron_tst.training import arguments, checkpointing, configs, data
from megatron_tst.training.build import build_components, setup_parallel
from megatron_tst.training.metrics import Interval, MetricsWriter, device_peak_tflops
from megatron_tst.training.ranks import any_rank, is_last_rank, print_rank_0
from megatron_tst.training.run_state import ExitConditions, TrainState, earliest_start_time, write_exit_marker
from megatron_tst.training.schedule import Phase, SamplePlan
from megatron_tst.training.step import NonFiniteError, StepSettings, evaluate, train_step
from megatron_tst.training.tokenizer import build_tokenizer, vocab_size_with_padding

# Megatron-LM's _TRAIN_START_TIME: --exit-duration-in-mins counts from process start (the earliest rank's),
# set-up (process groups, model build, checkpoint load, dataset indexing) included.
_PROCESS_START_TIME = time.time()


class Run:
    """Everything a training run holds, built once; `train()` and `evaluate_phase()` use it."""

    def __init__(self, args):
        self.args = args
        self.tokenizer = build_tokenizer(args.tokenizer_type, args.tokenizer_model, args.vocab_size)
        self.padded_vocab_size = vocab_size_with_padding(
            self.tokenizer.vocab_size, args.make_vocab_size_divisible_by, args.tensor_model_parallel_size)
        args.padded_vocab_size = self.padded_vocab_size  # Megatron-LM's name; saved with the args
        args.vocab_size_unpadded = self.tokenizer.vocab_size
        if not args.mock_data:  # cheap checks before any process group, model or dataset exists
            prefixes = [p for flag in ("data_path", "train_data_path", "valid_data_path", "test_data_path")
                        for p in arguments.data_prefixes(getattr(args, flag))]
            try:
                data.validate_data_files(prefixes, self.tokenizer.vocab_size)
                data.check_splits(args, self.tokenizer)
            except ValueError as err:
                raise SystemExit(f"error: {err}") from None
        checkpointing.check_load_arguments(args)

        setup_parallel(args)
        start_time = earliest_start_time(_PROCESS_START_TIME)
        print_rank_0(f"using world size: {args.world_size}, data-parallel size: {args.data_parallel_size}, "
                     f"context-parallel size: {args.context_parallel_size}, tensor-model-parallel size: "
                     f"{args.tensor_model_parallel_size}, pipeline-model-parallel size: "
                     f"{args.pipeline_model_parallel_size}, expert-model-parallel size: "
                     f"{args.expert_model_parallel_size}")
        if args.ignored_flags:
            print_rank_0(f"ignored Megatron-LM flags (they do not change what is trained here): "
                         f"{' '.join(args.ignored_flags)}")
        components = build_components(args, self.padded_vocab_size)
        self.config, self.model = components.config, components.model
        self.optimizer, self.scheduler = components.optimizer, components.scheduler
        self.settings = StepSettings.from_args(args)
        self.state = TrainState()
        if args.load or args.pretrained_checkpoint:
            self.state = checkpointing.load_checkpoint(args, self.model, self.optimizer, self.scheduler)
        self.plan = SamplePlan.from_args(args)
        self.flops_per_step = training_flops_per_step(
            configs.model_shape_from_args(args, self.padded_vocab_size), args.seq_length, args.global_batch_size)
        self.train_ds, self.valid_ds, self.valid_mce_ds = self._build_datasets()
        self.has_validation = any_rank(self.valid_ds is not None)
        self.has_mce_validation = any_rank(self.valid_mce_ds is not None)  # the same on every rank
        if args.eval_iters > 0 and not self.has_validation:
            print_rank_0("the validation split is empty: no evaluation (see --split)")
        self.recorder = (data.StreamRecorder(args.record_data_stream, args.rank)
                         if args.record_data_stream else None)
        self.writer = MetricsWriter(args, self.run_info()) if is_last_rank() else None
        self.exit = ExitConditions(args, start_time)

    def _build_datasets(self):
        """(train, valid, valid for the MCE evaluation), through Megatron-Core's builder.

        The train dataset's samples are the plan's windows (data.py: s*L tokens for the contiguous layout). The
        validation LM loss always reads Megatron's stock L-samples, so that every run (baseline, TST with any
        s or layout) is evaluated on the same samples; the superposition phase's MCE evaluation reads rows as
        the train stream forms them (windows of s*L tokens, or s stock samples for the segments layout).
        """
        args, plan = self.args, self.plan
        is_built_on_rank = lambda: (parallel_state.is_pipeline_first_stage(ignore_virtual=True)
                                    or parallel_state.is_pipeline_last_stage(ignore_virtual=True))
        # Megatron-LM asks every split for a number of samples (a weighted blend needs one); the evaluations
        # read the first eval_iters batches each time; the test split is built but not read.
        eval_rows = max(args.eval_iters * args.global_batch_size, 1)
        window = plan.samples_per_window
        mce_eval_samples = eval_rows * (plan.bag_size if window == 1 else 1)
        train, valid_windows, _ = data.build_datasets(
            args, self.tokenizer,
            [plan.dataset_samples(plan.total_samples()), mce_eval_samples, mce_eval_samples],
            is_built_on_rank=is_built_on_rank, sequence_length=plan.window_length(args.seq_length))
        if window == 1:
            return train, valid_windows, valid_windows
        _, valid, _ = data.build_datasets(args, self.tokenizer, [1, eval_rows, eval_rows],
                                          is_built_on_rank=is_built_on_rank)
        return train, valid, valid_windows

    def run_info(self) -> dict:
        args = self.args
        return {"name": args.wandb_exp_name or ("tst" if args.tst else "baseline"),
                "args": {k: v for k, v in vars(args).items() if isinstance(v, (int, float, str, bool, type(None)))},
                "tst": None if args.tst is None else {"bag_size": args.tst.bag_size,
                                                      "superposition_steps": self.plan.superposition_steps,
                                                      "weighting": args.tst.weighting},
                "padded_vocab_size": self.padded_vocab_size, "flops_per_step": self.flops_per_step}

    # ------------------------------------------------------------------------------------------- data

    def data_iterators(self, dataset, first_sample: int, num_steps: int, phase: Phase = Phase.RECOVERY, *,
                       samples_per_window: int = 1, record: bool = False, first_iteration: int = 0):
        """This rank's micro-batch streams of `phase` rows for Megatron's schedules (`data.stage_iterators`)."""
        args = self.args
        return data.stage_iterators(
            self.model, dataset, first_sample=first_sample, num_steps=num_steps,
            bag_size=self.plan.bag_size_of(phase), global_batch_size=args.global_batch_size,
            micro_batch_size=args.micro_batch_size, seq_length=args.seq_length,
            ignore_index=args.tst.ignore_index if args.tst else data.IGNORE_INDEX, num_workers=args.num_workers,
            samples_per_window=samples_per_window, recorder=self.recorder if record else None,
            first_iteration=first_iteration, phase=phase)

    # ------------------------------------------------------------------------------------------- eval

    def evaluate_phase(self, phase: Phase) -> None:
        """Validation LM loss (the paper's metric) in both phases, and the MCE in the superposition phase."""
        args = self.args
        if args.eval_iters <= 0 or not self.has_validation:
            return
        results = evaluate(self.data_iterators(self.valid_ds, 0, args.eval_iters), args.eval_iters,
                           self.model, self.settings)
        record = {"eval_lm_loss": results.get(Phase.RECOVERY.loss_name)}
        if phase == Phase.SUPERPOSITION and self.has_mce_validation:
            mce = evaluate(self.data_iterators(self.valid_mce_ds, 0, args.eval_iters, Phase.SUPERPOSITION,
                                               samples_per_window=self.plan.samples_per_window),
                           args.eval_iters, self.model, self.settings)
            record["eval_mce_loss"] = mce.get(Phase.SUPERPOSITION.loss_name)
        if self.writer is not None:
            self.writer.eval({"iteration": self.state.iteration, "phase": phase.value, **record,
                              **self.state.progress()})

    # ------------------------------------------------------------------------------------------- train

    def train(self) -> str:
        """Train to --train-iters (or an exit condition). Returns why training stopped."""
        args, state, plan = self.args, self.state, self.plan
        while state.iteration < args.train_iters:
            phase = plan.phase_at(state.iteration)
            if state.consumed_train_samples != plan.samples_before(state.iteration):
                # resume_checks refuses the flags behind this before any heavy work; this is the last guard
                raise SystemExit(f"error: the checkpoint at iteration {state.iteration} consumed "
                                 f"{state.consumed_train_samples} samples, but this run's plan (--global-batch-size, "
                                 f"--train-iters, --tst-*) puts {plan.samples_before(state.iteration)} there: restore "
                                 "the checkpoint run's values, or start a new run from its weights with --finetune")
            segment_end = plan.phase_end(phase)
            if args.exit_interval:
                segment_end = min(segment_end, (state.iteration // args.exit_interval + 1) * args.exit_interval)
            stream = self.data_iterators(self.train_ds, state.consumed_train_samples, segment_end - state.iteration,
                                         phase, samples_per_window=plan.samples_per_window, record=True,
                                         first_iteration=state.iteration)
            stop = self._train_segment(stream, phase, segment_end)
            if stop:
                return stop
        return "done"

    def _train_segment(self, stream, phase: Phase, segment_end: int) -> Optional[str]:
        args, state = self.args, self.state
        interval = Interval()
        while state.iteration < segment_end:
            if torch.cuda.is_available():
                torch.cuda.synchronize()
            start = time.perf_counter()
            try:
                result = train_step(stream, self.model, self.optimizer, self.settings, self.scheduler)
            except NonFiniteError as err:
                raise SystemExit(self._divergence_message(err, phase)) from None
            if torch.cuda.is_available():
                torch.cuda.synchronize()
            seconds = time.perf_counter() - start
            samples = self.plan.samples_per_step(phase)
            state.advance(samples, samples * args.seq_length, self.flops_per_step, seconds)
            interval.add(result, seconds, samples * args.seq_length)
            if state.iteration % args.log_interval == 0 or state.iteration == segment_end:
                self._log(interval, phase)
                interval = Interval()
            if args.eval_interval and state.iteration % args.eval_interval == 0:
                self.evaluate_phase(phase)
            if args.save and args.save_interval and state.iteration % args.save_interval == 0:
                checkpointing.save_checkpoint(args, state, self.model, self.optimizer, self.scheduler)
            reason = self.exit.check(state)
            if reason:
                if args.save:
                    checkpointing.save_checkpoint(args, state, self.model, self.optimizer, self.scheduler)
                return reason
        return None

    def _divergence_message(self, err: NonFiniteError, phase: Phase) -> str:
        """The message every rank exits with (printed once, by the last rank: it holds the losses)."""
        args, state = self.args, self.state
        saved = checkpointing.latest_iteration(args.save) if args.save else None
        message = (f"error: iteration {state.iteration + 1} ({phase.value} phase): {err}; the step was not "
                   "applied and nothing was saved (--check-for-nan-in-loss-and-grad). ")
        if saved is not None:
            message += (f"The latest checkpoint in --save {args.save} is iteration {saved}: resume from it with "
                        "--load (e.g. with a lower --lr or --clip-grad 1.0).")
        else:
            message += "No checkpoint was saved before it (see --save-interval)."
        if not is_last_rank():
            return 1  # exit status only: one copy of the message
        return message

    def _log(self, interval: Interval, phase: Phase) -> None:
        if self.writer is None or interval.steps == 0:
            return
        args, state = self.args, self.state
        self.writer.train({
            "iteration": state.iteration, "phase": phase.value,
            **interval.train_record(loss_name=phase.loss_name, flops_per_step=self.flops_per_step,
                                    world_size=args.world_size, global_batch_size=args.global_batch_size,
                                    seq_length=args.seq_length,
                                    lr=self.scheduler.get_lr(self.optimizer.param_groups[0]),
                                    peak_tflops=device_peak_tflops(args.peak_tflops_per_gpu)),
            **state.progress(),
        })


def main(argv=None) -> int:
    args = arguments.parse_args(argv)
    run = None
    try:
        run = Run(args)
        if args.tst:
            print_rank_0(f"TST: bag size {args.tst.bag_size}, {run.plan.superposition_steps} superposition steps, "
                         f"then {args.train_iters - run.plan.superposition_steps} recovery steps "
                         f"({args.tst.weighting} weighting)")
        last_phase = run.plan.phase_at(run.state.iteration - 1) if run.state.iteration else Phase.RECOVERY
        if args.skip_train:  # Megatron-LM: no training, but the validation evaluation still runs
            reason = "skip-train"
            run.evaluate_phase(last_phase)
        else:
            reason = run.train()
            last_phase = run.plan.phase_at(run.state.iteration - 1) if run.state.iteration else Phase.RECOVERY
        if reason == "done" and not (args.eval_interval and run.state.iteration % args.eval_interval == 0):
            run.evaluate_phase(last_phase)
        if reason == "done" and args.save:
            checkpointing.save_checkpoint(args, run.state, run.model, run.optimizer, run.scheduler)
        if reason == "exit signal":
            write_exit_marker(run.state.iteration)
        print_rank_0(f"training stopped ({reason}) at iteration {run.state.iteration}; "
                     f"consumed {run.state.consumed_train_samples} samples / {run.state.consumed_tokens} tokens"
                     + (f"; checkpoints in {args.save}" if args.save else ""))
        torch.distributed.barrier()
    finally:
        # Also on an error: flush the logs, and leave no process group behind (a hung peer gets an error).
        if run is not None and run.writer is not None:
            run.writer.close()
        if torch.distributed.is_initialized():
            if parallel_state.model_parallel_is_initialized():
                parallel_state.destroy_model_parallel()
            torch.distributed.destroy_process_group()
    return 0


if __name__ == "__main__":
    sys.exit(main())
