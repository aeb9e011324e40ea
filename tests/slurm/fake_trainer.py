#!/usr/bin/env python3
"""Stand-in for `python -m megatron_tst.pretrain`, to test the SLURM plumbing (launch/*.sbatch) without a model.

Launched like the real trainer (by torchrun, so it sees RANK / WORLD_SIZE / LOCAL_RANK), it follows the
contract the launch scripts rely on (see launch/common.sh, "Preemption contract"):

* accepts the Megatron-style command line; uses --save, --load, --train-iters, --save-interval,
  --exit-signal-handler, --tst-superposition-ratio, --log-interval and ignores every other flag;
* resumes from `<load>/latest_checkpointed_iteration.txt` (Megatron's tracker file) when it exists;
* runs "iterations" (a sleep of FAKE_TRAINER_ITER_SECONDS, default 0.2) and prints a Megatron-like log line
  per iteration with the TST phase: the first ratio (default 0.3) of --train-iters is "superposition",
  the rest "recovery";
* saves every --save-interval iterations and at the end: each rank writes `<save>/iter_NNNNNNN/rank_RRRRR.txt`,
  then rank 0 writes the tracker file (atomically);
* with --exit-signal-handler, SIGUSR1 or SIGTERM makes every rank stop at the next iteration boundary, save at
  the current iteration, (rank 0) write the file named by $TST_EXIT_MARKER if set, and exit 0. The ranks agree
  on the stop through an all-reduce (MAX) when torch.distributed is available (FAKE_TRAINER_TORCH=auto|1|0,
  gloo), as Megatron's DistributedSignalHandler does; without torch each rank acts on its own signal.

Pure Python otherwise. Exit codes: 0 when training finished or stopped on the exit signal after saving.
"""

from __future__ import annotations

import argparse
import datetime
import os
import signal
import sys
import time

TRACKER = "latest_checkpointed_iteration.txt"


def log(msg: str, all_ranks: bool = False) -> None:
    rank = int(os.environ.get("RANK", "0"))
    if all_ranks or rank == 0:
        stamp = datetime.datetime.now().strftime("%Y-%m-%d %H:%M:%S")
        print(f"[{stamp}] [rank {rank}] {msg}", flush=True)


def parse_args(argv: list[str]) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0], allow_abbrev=False)
    p.add_argument("--save", default=None)
    p.add_argument("--load", default=None)
    p.add_argument("--train-iters", type=int, default=100)
    p.add_argument("--save-interval", type=int, default=None)
    p.add_argument("--exit-signal-handler", action="store_true")
    p.add_argument("--tst-superposition-ratio", type=float, default=0.3)
    p.add_argument("--tst-bag-size", type=int, default=4)
    p.add_argument("--global-batch-size", type=int, default=8)
    p.add_argument("--log-interval", type=int, default=1)
    p.add_argument("--recipe", default=None)
    args, ignored = p.parse_known_args(argv)
    args.ignored = ignored
    return args


class Dist:
    """Optional torch.distributed (gloo) so that ranks agree on stopping and barrier around saves."""

    def __init__(self) -> None:
        self.rank = int(os.environ.get("RANK", "0"))
        self.world = int(os.environ.get("WORLD_SIZE", "1"))
        self.torch = None
        mode = os.environ.get("FAKE_TRAINER_TORCH", "auto")
        if self.world > 1 and mode != "0":
            try:
                import torch
                import torch.distributed as dist
            except ImportError:
                if mode == "1":
                    raise
            else:
                dist.init_process_group("gloo", timeout=datetime.timedelta(seconds=120))
                self.torch, self.dist = torch, dist
        log(f"world size {self.world}, torch.distributed: {'gloo' if self.torch else 'off'}")

    def any(self, flag: bool) -> bool:
        if self.torch is None:
            return flag
        t = self.torch.tensor([1 if flag else 0])
        self.dist.all_reduce(t, op=self.dist.ReduceOp.MAX)
        return bool(t.item())

    def barrier(self) -> None:
        if self.torch is not None:
            self.dist.barrier()

    def close(self) -> None:
        if self.torch is not None:
            self.dist.destroy_process_group()


def read_tracker(directory: str | None) -> int:
    if not directory:
        return 0
    path = os.path.join(directory, TRACKER)
    try:
        with open(path) as f:
            return int(f.read().strip())
    except FileNotFoundError:
        return 0


def save(args: argparse.Namespace, dist: Dist, iteration: int) -> None:
    if not args.save:
        return
    t0 = time.time()
    shard_dir = os.path.join(args.save, f"iter_{iteration:07d}")
    os.makedirs(shard_dir, exist_ok=True)
    with open(os.path.join(shard_dir, f"rank_{dist.rank:05d}.txt"), "w") as f:
        f.write(f"{iteration}\n")
    dist.barrier()
    if dist.rank == 0:
        tmp = os.path.join(args.save, TRACKER + ".tmp")
        with open(tmp, "w") as f:
            f.write(f"{iteration}\n")
        os.replace(tmp, os.path.join(args.save, TRACKER))
    dist.barrier()
    log(f"saved checkpoint at iteration {iteration} to {args.save} ({time.time() - t0:.2f} s)")


def main(argv: list[str]) -> int:
    args = parse_args(argv)
    iter_seconds = float(os.environ.get("FAKE_TRAINER_ITER_SECONDS", "0.2"))
    received: list[int] = []
    if args.exit_signal_handler:
        # Installed explicitly: the launch scripts start torchrun with SIGUSR1 ignored (so that torchrun itself
        # survives it), and an ignored disposition is inherited by the ranks.
        for sig in (signal.SIGUSR1, signal.SIGTERM):
            signal.signal(sig, lambda signum, frame: received.append(signum))

    dist = Dist()
    if args.ignored:
        log(f"ignoring flags: {' '.join(args.ignored)}")
    iteration = read_tracker(args.load)
    if iteration:
        log(f"loading checkpoint from {args.load} at iteration {iteration}")
    else:
        log("no checkpoint found, starting from iteration 0")
    superposition_iters = round(args.tst_superposition_ratio * args.train_iters)
    log(
        f"recipe={args.recipe} train_iters={args.train_iters} superposition iterations 1..{superposition_iters}, "
        f"recovery {superposition_iters + 1}..{args.train_iters}"
    )
    if iteration >= args.train_iters:
        log(f"training already complete at iteration {iteration}")
        dist.close()
        return 0

    last_saved = iteration
    while iteration < args.train_iters:
        t0 = time.time()
        time.sleep(iter_seconds)
        iteration += 1
        phase = "superposition" if iteration <= superposition_iters else "recovery"
        if iteration % args.log_interval == 0:
            loss = 10.0 / (1.0 + 0.05 * iteration)
            log(
                f"iteration {iteration:8d}/{args.train_iters:8d} | consumed samples: "
                f"{iteration * args.global_batch_size:12d} | elapsed time per iteration (ms): "
                f"{(time.time() - t0) * 1000:.1f} | lm loss: {loss:.6E} | tst phase: {phase} |"
            )
        if args.save_interval and iteration % args.save_interval == 0 and iteration < args.train_iters:
            save(args, dist, iteration)
            last_saved = iteration
        if args.exit_signal_handler and dist.any(bool(received)):
            names = ",".join(signal.Signals(s).name for s in received) or "a peer's signal"
            log(f"received {names}: saving at iteration {iteration} and exiting", all_ranks=True)
            if last_saved != iteration:
                save(args, dist, iteration)
            marker = os.environ.get("TST_EXIT_MARKER")
            if marker and dist.rank == 0:
                with open(marker, "w") as f:
                    f.write(f"{iteration}\n")
            log(f"exiting program after receiving the exit signal at iteration {iteration}")
            dist.close()
            return 0

    if last_saved != iteration:
        save(args, dist, iteration)
    log(f"training complete at iteration {iteration}")
    dist.close()
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
