"""What TST adds to Megatron-LM's logs: the phase and raw tokens, `--metrics-jsonl`, and TensorBoard/W&B scalars.

Megatron-LM's iteration line gains " phase: superposition | consumed tokens: N | tokens per second: T |" after its
"consumed samples" field (Megatron counts samples, and a superposition sample holds s*L raw tokens); an interval
never mixes phases (a line is printed at the last superposition step whatever --log-interval says), and a recovery
line shows no "mce loss" (Megatron keeps printing every loss key it has seen). The hooks into Megatron-LM's
`training_log` and `evaluate_and_print_results` are `platform.megatron_lm`'s; this module decides what they add.

`--metrics-jsonl FILE` (written by the last rank, which holds the reduced losses, as Megatron-LM's TensorBoard
writer; appended to on a resume: `tools/compare_runs.py` keeps the latest record per iteration):
    run:   kind="run" (first line of each start): name, args (plain values), tst {bag_size, superposition_steps,
           superposition_samples, weighting, sample_layout} or null, flops_per_sample
    train: kind="train", iteration, phase, loss (the phase's own loss: MCE or LM), loss_name, lr, grad_norm,
           consumed_samples (baseline samples of L tokens), megatron_samples (Megatron's count), consumed_tokens
           (raw tokens), elapsed_ms (per iteration over the interval), tokens_per_s, positions_per_s, wall_time_s
           (since the process started), flops (cumulative model FLOPs), skipped_iterations
    eval:  kind="eval", iteration, phase, eval_lm_loss (Megatron's validation "lm loss": stock samples in both
           phases), consumed_samples, consumed_tokens, flops, wall_time_s; one per iteration (Megatron-LM's extra
           validation after training, at the last iteration again, is printed but not recorded twice)
The same keys go to Megatron's TensorBoard and W&B writers (tags as the keys, step = iteration; the phase as
`phase_is_superposition`), beside Megatron-LM's own scalars.
"""

from __future__ import annotations

import json
import math
import os
import time
from typing import Optional

from megatron_tst.loop.run import TSTRun
from megatron_tst.platform.megatron_lm import LoopCallbacks, insert_fields
from megatron_tst.stream import Phase

_PROCESS_START = time.time()


class TSTLogging(LoopCallbacks):
    """The loop callbacks of a TST run (`platform.megatron_lm.install(TSTLogging(args, run))`)."""

    def __init__(self, args, run: TSTRun):
        self.run = run
        self.rank, self.world_size = args.rank, args.world_size
        self.jsonl = None
        self.line_fields = {}  # iteration -> the fields edit_log_line inserts
        self._logged_consumed = None  # Megatron's consumed samples at the previous log line
        self._evaluated = set()  # iterations with an eval record from this process
        if args.metrics_jsonl and self.is_writer:
            os.makedirs(os.path.dirname(os.path.abspath(args.metrics_jsonl)), exist_ok=True)
            self.jsonl = open(args.metrics_jsonl, "a")
            self._write({"kind": "run", "name": getattr(args, "wandb_exp_name", None) or
                         ("tst" if run.tst else "baseline"), "args": _plain(vars(args)), "tst": self._tst_info(),
                         "flops_per_sample": self._flops(1)})

    @property
    def is_writer(self) -> bool:
        """The last rank writes metrics (Megatron-LM's `is_last_rank`)."""
        return self.rank == self.world_size - 1

    def _tst_info(self) -> Optional[dict]:
        run = self.run
        if run.tst is None:
            return None
        return {"bag_size": run.tst.bag_size, "superposition_steps": run.plan.superposition_steps,
                "superposition_samples": run.plan.superposition_samples, "weighting": run.tst.weighting,
                "sample_layout": run.tst.sample_layout}

    # ------------------------------------------------------------------------------------------------ helpers

    def _write(self, record: dict) -> None:
        if self.jsonl is not None:
            self.jsonl.write(json.dumps(record) + "\n")
            self.jsonl.flush()

    @staticmethod
    def _flops(megatron_samples: int) -> Optional[float]:
        """Model FLOPs of `megatron_samples` samples (Megatron-LM's `num_floating_point_operations`: L positions
        each, in both phases; linear in the number of samples)."""
        from megatron.training import get_args
        from megatron.training.training import num_floating_point_operations

        try:
            return float(num_floating_point_operations(get_args(), megatron_samples))
        except Exception:  # an architecture Megatron-LM's formula does not cover
            return None

    def _progress(self, megatron_samples: int) -> dict:
        plan = self.run.plan
        return {"consumed_samples": plan.baseline_samples_before(megatron_samples),
                "megatron_samples": megatron_samples, "consumed_tokens": plan.raw_tokens_before(megatron_samples),
                "flops": self._flops(megatron_samples), "wall_time_s": round(time.time() - _PROCESS_START, 3)}

    def _scalars(self, record: dict, iteration: int) -> None:
        """Our record's numbers on Megatron's TensorBoard and W&B writers (the last rank holds them)."""
        from megatron.training.global_vars import get_tensorboard_writer, get_wandb_writer

        numbers = {key: value for key, value in record.items()
                   if isinstance(value, (int, float)) and not isinstance(value, bool) and key != "iteration"}
        numbers["phase_is_superposition"] = float(record["phase"] == Phase.SUPERPOSITION.value)
        writer, wandb = get_tensorboard_writer(), get_wandb_writer()
        if writer is not None:
            for key, value in numbers.items():
                writer.add_scalar(key, value, iteration)
        if wandb is not None:
            wandb.log(numbers, iteration)

    # ------------------------------------------------------------------------------------------------ callbacks

    def before_training_log(self, *, iteration, loss_dict, total_loss_dict, learning_rate, grad_norm, skipped_iter,
                            interval_seconds, first) -> bool:
        from megatron.training import get_args

        args = get_args()
        plan = self.run.plan
        phase = plan.phase_at(iteration - 1)
        other = Phase.RECOVERY if phase is Phase.SUPERPOSITION else Phase.SUPERPOSITION
        total_loss_dict.pop(other.loss_name, None)  # Megatron-LM prints every key it has seen, 0 when absent
        switch = phase is Phase.SUPERPOSITION and iteration == plan.superposition_steps
        # Megatron's first line of a process does not end its interval: no record of ours either
        logs = (iteration % args.log_interval == 0 and not first) or switch
        consumed = args.consumed_train_samples
        if self._logged_consumed is None:  # the first log of this process: the interval starts at the load
            self._logged_consumed = consumed - _samples_of_interval(total_loss_dict, skipped_iter, args)
        if not logs:
            return switch
        tokens = plan.raw_tokens_before(consumed) - plan.raw_tokens_before(self._logged_consumed)
        positions = (consumed - self._logged_consumed) * plan.seq_length
        seconds = max(interval_seconds, 1e-9)
        self.line_fields[iteration] = (f" phase: {phase.value} | consumed tokens: {plan.raw_tokens_before(consumed):d}"
                                       f" | tokens per second: {tokens / seconds:.1f} |")
        if self.is_writer:
            steps = total_loss_dict.get("advanced iterations", 0) + (0 if skipped_iter else 1)
            loss_sum = total_loss_dict.get(phase.loss_name)
            current = loss_dict.get(phase.loss_name)
            loss = None
            if current is not None or loss_sum is not None:
                loss = float(loss_sum if loss_sum is not None else 0.0) + (
                    0.0 if skipped_iter or current is None else float(current))
                loss = loss / max(steps, 1)
            iterations = steps + total_loss_dict.get("skipped iterations", 0) + (1 if skipped_iter else 0)
            record = {"kind": "train", "iteration": iteration, "phase": phase.value,
                      "loss": loss if loss is not None and math.isfinite(loss) else None,
                      "loss_name": phase.loss_name, "lr": learning_rate,
                      "grad_norm": None if grad_norm is None else float(grad_norm),
                      "elapsed_ms": round(1000.0 * seconds / max(iterations, 1), 3),
                      "tokens_per_s": round(tokens / seconds, 3), "positions_per_s": round(positions / seconds, 3),
                      "skipped_iterations": int(total_loss_dict.get("skipped iterations", 0)) + int(skipped_iter),
                      **self._progress(consumed)}
            self._write(record)
            self._scalars(record, iteration)
        self._logged_consumed = consumed
        return switch

    def edit_log_line(self, line: str, iteration: int) -> str:
        fields = self.line_fields.pop(iteration, None)
        if fields is None:  # Megatron's line of the first iteration (printed, not an interval of ours)
            from megatron.training import get_args

            plan = self.run.plan
            consumed = get_args().consumed_train_samples
            fields = (f" phase: {plan.phase_at(iteration - 1).value} | consumed tokens: "
                      f"{plan.raw_tokens_before(consumed):d} |")
        return insert_fields(line, fields)

    def after_evaluation(self, *, iteration, losses, test) -> None:
        from megatron.training import get_args

        # Megatron-LM validates once more after training, on the next batches of the validation split: the record of
        # an iteration is the in-loop one (every run is compared at the same points on the same batches)
        if test or not self.is_writer or "lm loss" not in losses or iteration in self._evaluated:
            return
        self._evaluated.add(iteration)
        record = {"kind": "eval", "iteration": iteration,
                  "phase": self.run.plan.phase_at(max(iteration - 1, 0)).value,
                  "eval_lm_loss": losses["lm loss"], **self._progress(get_args().consumed_train_samples)}
        self._write(record)
        self._scalars(record, iteration)
        # Megatron-LM flushes its TensorBoard writer at the end of `train()`; the validation after training comes
        # later and its events (Megatron-LM's and ours) would be lost at exit unless flushed here
        from megatron.training.global_vars import get_tensorboard_writer

        if get_tensorboard_writer() is not None:
            get_tensorboard_writer().flush()


def _samples_of_interval(total_loss_dict: dict, skipped_iter: int, args) -> int:
    """Megatron's samples of the steps in the current log interval (this step included)."""
    from megatron.core.num_microbatches_calculator import get_current_global_batch_size

    steps = total_loss_dict.get("advanced iterations", 0) + total_loss_dict.get("skipped iterations", 0) + 1
    return steps * (get_current_global_batch_size() or args.global_batch_size)


def _plain(values: dict) -> dict:
    return {key: value for key, value in values.items() if isinstance(value, (int, float, str, bool, type(None)))}
