"""Training logs: Megatron-LM's iteration line (with the phase), `--metrics-jsonl`, TensorBoard, W&B.

One `MetricsWriter` lives on the rank that holds the reduced losses (the last rank, as in Megatron-LM).
Record keys (jsonl and TensorBoard tags alike):
    train: kind="train", iteration, phase, loss (the phase's own loss: MCE or LM), loss_name, lr, grad_norm,
           consumed_samples (baseline samples), consumed_tokens (raw tokens), elapsed_ms (per iteration over the
           log interval), wall_time_s (since training started), flops (cumulative), tokens_per_s,
           positions_per_s, tflops_per_gpu, mfu (null when the device peak is unknown), skipped_iterations
    eval:  kind="eval", iteration, phase, eval_lm_loss, eval_mce_loss (superposition phase), consumed_samples,
           consumed_tokens, flops, wall_time_s
    run:   kind="run" (first line): name, args, tst
"""

from __future__ import annotations

import datetime
import json
import os
from typing import Optional

import torch

# Dense bf16 peak TFLOP/s per GPU, for the MFU estimate (override with --peak-tflops-per-gpu).
PEAK_BF16_TFLOPS = {"H200": 989.0, "H100": 989.0, "H800": 989.0, "A100": 312.0, "B200": 2250.0, "GB200": 2500.0,
                    "L40S": 362.0}


def device_peak_tflops(override: Optional[float] = None) -> Optional[float]:
    """Peak dense bf16 TFLOP/s of this device, or None when unknown (CPU, unlisted GPU)."""
    if override:
        return override
    if not torch.cuda.is_available():
        return None
    return peak_tflops_of_device_name(torch.cuda.get_device_name())


def peak_tflops_of_device_name(name: str) -> Optional[float]:
    """The table's peak for a device name such as "NVIDIA H100 80GB HBM3", or None."""
    # Longest key first: "B200" is also a substring of "GB200".
    for key in sorted(PEAK_BF16_TFLOPS, key=len, reverse=True):
        if key in name:
            return PEAK_BF16_TFLOPS[key]
    return None


class MetricsWriter:
    """Writes train/eval records to stdout, the jsonl file, TensorBoard and W&B (each when enabled)."""

    def __init__(self, args, run_info: dict):
        self.train_iters = args.train_iters
        self.jsonl = None
        if args.metrics_jsonl:
            os.makedirs(os.path.dirname(os.path.abspath(args.metrics_jsonl)), exist_ok=True)
            self.jsonl = open(args.metrics_jsonl, "a")
            self._write_jsonl({"kind": "run", **run_info})
        self.tensorboard = None
        if args.tensorboard_dir:
            try:
                from torch.utils.tensorboard import SummaryWriter
            except ImportError:
                print("warning: --tensorboard-dir given but tensorboard is not installed; not writing events",
                      flush=True)
            else:
                self.tensorboard = SummaryWriter(log_dir=args.tensorboard_dir, max_queue=1000)
        self.wandb = None
        if args.wandb_project:
            try:
                import wandb
            except ImportError:
                print("warning: --wandb-project given but wandb is not installed", flush=True)
            else:
                self.wandb = wandb.init(project=args.wandb_project, name=args.wandb_exp_name,
                                        entity=args.wandb_entity, dir=args.wandb_save_dir,
                                        config=run_info.get("args"))

    def _write_jsonl(self, record: dict) -> None:
        if self.jsonl is not None:
            self.jsonl.write(json.dumps(record) + "\n")
            self.jsonl.flush()

    def _scalars(self, record: dict) -> None:
        step = record["iteration"]
        numbers = {k: v for k, v in record.items()
                   if isinstance(v, (int, float)) and not isinstance(v, bool) and k != "iteration"}
        if self.tensorboard is not None:
            for key, value in numbers.items():
                self.tensorboard.add_scalar(key, value, step)
            self.tensorboard.add_scalar("phase_is_superposition", float(record["phase"] == "superposition"), step)
            self.tensorboard.flush()
        if self.wandb is not None:
            self.wandb.log({**numbers, "phase": record["phase"]}, step=step)

    def train(self, record: dict) -> None:
        record = {"kind": "train", **record}
        print(format_train_line(record, self.train_iters), flush=True)
        self._write_jsonl(record)
        self._scalars(record)

    def eval(self, record: dict) -> None:
        record = {"kind": "eval", **record}
        losses = " | ".join(f"{k}: {record[k]:.6E}" for k in ("eval_lm_loss", "eval_mce_loss") if k in record)
        print("-" * 100 + f"\n validation at iteration {record['iteration']} ({record['phase']}) | {losses}\n"
              + "-" * 100, flush=True)
        self._write_jsonl(record)
        self._scalars(record)

    def close(self) -> None:
        if self.jsonl is not None:
            self.jsonl.close()
        if self.tensorboard is not None:
            self.tensorboard.close()
        if self.wandb is not None:
            self.wandb.finish()


def format_train_line(r: dict, train_iters: int) -> str:
    """Megatron-LM's iteration line, with the phase, raw tokens, throughput and MFU added."""
    mfu = "n/a" if r.get("mfu") is None else f"{100 * r['mfu']:.1f}%"
    return (
        f" [{datetime.datetime.now().strftime('%Y-%m-%d %H:%M:%S')}]"
        f" iteration {r['iteration']:8d}/{train_iters:8d} | phase: {r['phase']} |"
        f" consumed samples: {r['consumed_samples']:12d} | consumed tokens: {r['consumed_tokens']:14d} |"
        f" elapsed time per iteration (ms): {r['elapsed_ms']:.1f} | learning rate: {r['lr']:.6E} |"
        f" global batch size: {r['global_batch_size']:5d} | {r['loss_name']}: {r['loss']:.6E} |"
        f" grad norm: {r['grad_norm']:.3f} | tokens per second: {r['tokens_per_s']:.1f} |"
        f" positions per second: {r['positions_per_s']:.1f} | TFLOP/s/GPU: {r['tflops_per_gpu']:.3f} |"
        f" MFU: {mfu} | number of skipped iterations: {r['skipped_iterations']:3d} |"
        + "".join(f" {name}: {r[name]:.6E} |" for name in MOE_LOSS_NAMES if r.get(name) is not None)
    )


# The MoE router losses as the metrics file names them (megatron-core's tracker names), in console order.
MOE_LOSS_NAMES = ("load_balancing_loss", "seq_load_balancing_loss", "global_load_balancing_loss", "z_loss")


class Interval:
    """Sums over the steps since the last log line (`add` a `step.StepResult` per step), and the train record
    of Megatron-LM's iteration line from them (`train_record`)."""

    def __init__(self):
        self.steps, self.seconds, self.tokens, self.grad_norm, self.skipped = 0, 0.0, 0, 0.0, 0
        self.loss_sums = {}

    def add(self, result, seconds: float, tokens: int) -> None:
        """One step: its StepResult, wall seconds and raw tokens."""
        self.steps += 1
        self.seconds += seconds
        self.tokens += tokens
        self.grad_norm += result.grad_norm
        self.skipped += result.skipped
        for key, value in result.losses.items():
            self.loss_sums[key] = self.loss_sums.get(key, 0.0) + value

    def mean(self, key: str) -> float:
        return self.loss_sums.get(key, float("nan")) / max(self.steps, 1)

    def means(self) -> dict:
        return {key: total / self.steps for key, total in self.loss_sums.items()}

    def train_record(self, *, loss_name: str, flops_per_step: float, world_size: int, global_batch_size: int,
                     seq_length: int, lr: float, peak_tflops: Optional[float]) -> dict:
        """The train record's timing and loss fields (module docstring): per-step means over the interval;
        `elapsed_ms` per iteration, `tflops_per_gpu` = model FLOPs per step / seconds / world size / 1e12,
        `mfu` its fraction of `peak_tflops` (None when unknown). Other losses (MoE router losses) by name."""
        elapsed = self.seconds / self.steps
        tflops = flops_per_step / elapsed / world_size / 1e12
        return {
            "loss_name": loss_name, "loss": self.mean(loss_name), "lr": lr, "grad_norm": self.grad_norm / self.steps,
            "global_batch_size": global_batch_size, "elapsed_ms": 1e3 * elapsed,
            "tokens_per_s": self.tokens / self.seconds, "positions_per_s": global_batch_size * seq_length / elapsed,
            "tflops_per_gpu": tflops, "mfu": tflops / peak_tflops if peak_tflops else None,
            "skipped_iterations": self.skipped,
            **{k.replace(" ", "_"): v for k, v in self.means().items() if k != loss_name},
        }
