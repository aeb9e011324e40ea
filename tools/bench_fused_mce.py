"""Benchmark: the fused output layer + MCE against the unfused ones, side by side in one run.

    python tools/bench_fused_mce.py                     # CPU grid: V in {32768, 131072}, s in {1, 6, 16}, fp32 + bf16
    python tools/bench_fused_mce.py --vocab 32768 --dtypes fp32 --bags 1 6 --methods fused unfused   # a part
    python tools/bench_fused_mce.py --gpu               # H200: the 600m output layer (h 960, V 128,256, 8 x 2016
                                                        # positions, bf16)
    python tools/bench_fused_mce.py --gpu --allow-cpu   # the GPU script as a tiny CPU smoke run
    # the training step with and without the fusion, through Megatron-LM's loop:
    python tools/bench_gpu.py -- --cross-entropy-loss-fusion --cross-entropy-fusion-impl linear

Each case is one forward + backward of the output layer and the loss, from hidden states [L, b, h] and the output
weight [V, h] (both requiring gradients) to the gradients of both, at L x b = 4096 positions, h = 512 (CPU grid):

    fused     `fused_linear_vocab_parallel_multi_hot_cross_entropy` as the model calls it (chunk_size:
              --chunk-size, default the function's default), targets [L, b, s], with `loss_weights` (the loss is
              summed: weights 1): gradients computed in the forward, three GEMMs of the logits' size
    recompute the same function without `loss_weights`: any incoming gradient; the backward recomputes each
              chunk's logits (four GEMMs)
    unfused   the output layer as Megatron's ColumnParallelLinear computes it (hidden @ weight.T in the inputs'
              dtype) then `vocab_parallel_multi_hot_cross_entropy` as the model calls it (inplace, validate=False)
    megatron  the same output layer then Megatron-Core's `vocab_parallel_cross_entropy` (s = 1; the cost of a
              stock step's loss, the same in every row of one V and dtype)

Peak memory, CPU grid: every case runs in a fresh subprocess (`--one`), which creates its inputs, then resets the
kernel's high-water mark of its resident set (`/proc/self/clear_refs` <- 5) and reads `VmHWM - VmRSS` around the
forward + backward: every byte torch allocates for the case (glibc returns large blocks to the kernel on free, so
the resident set follows torch's live tensors), including the gradients of hidden and weight, nothing the inputs
already held. GPU: `torch.cuda.max_memory_allocated` above what was allocated before the case. Time: wall clock of
that same forward + backward on CPU (one run per case: the CPU GEMMs take seconds to minutes); on GPU the median of
--reps synchronised runs after --warmup. Ratios are fused / unfused. Nothing here is timed in a test.
"""

from __future__ import annotations

import argparse
import gc
import json
import os
import statistics
import subprocess
import sys
import time

import torch

METHODS = ("fused", "recompute", "unfused", "megatron")
GPU_SHAPE = dict(positions=8 * 2016, batch=8, hidden=960, vocab=[128256], dtypes=["bf16"], bags=[1, 6])
TINY = dict(positions=64, batch=2, hidden=32, vocab=[1024], bags=[1, 6])


def _status_kib(field):
    with open("/proc/self/status") as status:
        for line in status:
            if line.startswith(field + ":"):
                return int(line.split()[1])
    raise RuntimeError(f"{field} not in /proc/self/status")


def _init_process_group():
    """A 1-rank world with Megatron's parallel state (Megatron's CE reads its TP group): gloo on CPU, NCCL on GPU."""
    import torch.distributed as dist

    from megatron_tst.parallel import Layout, free_port, initialize_parallel_state
    from megatron_tst.platform import cpu

    cpu.enable()
    if not dist.is_initialized():
        dist.init_process_group(backend="nccl" if torch.cuda.is_available() else "gloo",
                                init_method=f"tcp://127.0.0.1:{free_port()}", rank=0, world_size=1)
    initialize_parallel_state(Layout())


def _inputs(positions, batch, hidden, vocab, bag, dtype, device):
    g = torch.Generator().manual_seed(0)
    length = positions // batch
    hidden_lbh = (torch.randn(length, batch, hidden, generator=g) * 0.5).to(dtype=dtype, device=device)
    weight = (torch.randn(vocab, hidden, generator=g) * 0.05).to(dtype=dtype, device=device)
    targets = torch.randint(0, vocab, (length, batch, bag), generator=g).to(device)
    return hidden_lbh.requires_grad_(True), weight.requires_grad_(True), targets


def _step(method, hidden, weight, targets, chunk_size):
    """One forward + backward; returns the loss sum (a check that every method computes the same)."""
    from megatron.core.tensor_parallel import vocab_parallel_cross_entropy

    from megatron_tst.mce import fused_linear_vocab_parallel_multi_hot_cross_entropy as fused_mce
    from megatron_tst.mce import vocab_parallel_multi_hot_cross_entropy

    if method == "fused":  # as FusedLossOutputLayer calls it: the weights the loss is reduced with (a sum)
        weights = torch.ones(targets.shape[:2], dtype=hidden.dtype, device=hidden.device)
        loss = fused_mce(hidden, weight, targets, chunk_size=chunk_size, validate=False, loss_weights=weights)
    elif method == "recompute":
        loss = fused_mce(hidden, weight, targets, chunk_size=chunk_size, validate=False)
    else:
        logits = torch.matmul(hidden, weight.t())  # ColumnParallelLinear's output, in the inputs' dtype
        if method == "unfused":
            loss = vocab_parallel_multi_hot_cross_entropy(logits, targets, inplace=True, validate=False)
        else:
            loss = vocab_parallel_cross_entropy(logits, targets[..., 0])
        del logits
    grads = torch.autograd.grad(loss.sum(), (hidden, weight))
    value = float(loss.detach().double().sum())
    del loss, grads
    return value


def run_one(case: dict) -> dict:
    """Run one case in this process; {"seconds", "peak_mib", "loss_sum"}."""
    _init_process_group()
    device = torch.device("cuda" if case["device"] == "cuda" else "cpu")
    dtype = {"fp32": torch.float32, "bf16": torch.bfloat16}[case["dtype"]]
    hidden, weight, targets = _inputs(case["positions"], case["batch"], case["hidden"], case["vocab"], case["bag"],
                                      dtype, device)
    reps, warmup = case.get("reps", 1), case.get("warmup", 0)
    times, peak_mib, value = [], None, None
    for rep in range(warmup + reps):
        gc.collect()
        if device.type == "cuda":
            torch.cuda.synchronize()
            base = torch.cuda.memory_allocated()
            torch.cuda.reset_peak_memory_stats()
        else:
            base = _status_kib("VmRSS") * 1024
            with open("/proc/self/clear_refs", "w") as clear:
                clear.write("5")  # VmHWM := VmRSS
        start = time.perf_counter()
        value = _step(case["method"], hidden, weight, targets, case.get("chunk_size"))
        if device.type == "cuda":
            torch.cuda.synchronize()
        elapsed = time.perf_counter() - start
        peak = (torch.cuda.max_memory_allocated() if device.type == "cuda" else _status_kib("VmHWM") * 1024) - base
        if rep >= warmup:
            times.append(elapsed)
            peak_mib = max(peak_mib or 0.0, peak / 2**20)
    return {"seconds": statistics.median(times), "peak_mib": peak_mib, "loss_sum": value}


def _cases(cli):
    for vocab in cli.vocab:
        for dtype in cli.dtypes:
            if "megatron" in cli.methods:
                yield dict(vocab=vocab, dtype=dtype, bag=1, method="megatron")
            for bag in cli.bags:
                for method in ("unfused", "fused", "recompute"):
                    if method in cli.methods:
                        yield dict(vocab=vocab, dtype=dtype, bag=bag, method=method)


def run_grid(cli) -> list:
    """Every case of the grid: the CPU grid, each case in a fresh subprocess (a clean resident set to measure);
    the --gpu preset, every case in this process (on the GPU; also its --allow-cpu smoke run, so that it runs the
    GPU script's path, and in seconds: its CPU memory column then counts only what the process had not held yet)."""
    rows = []
    common = dict(positions=cli.positions, batch=cli.batch, hidden=cli.hidden, chunk_size=cli.chunk_size,
                  device="cuda" if cli.device == "cuda" else "cpu", reps=cli.reps, warmup=cli.warmup)
    for case in _cases(cli):
        case = {**common, **case}
        if cli.gpu:
            result = run_one(case)
        else:
            proc = subprocess.run([sys.executable, os.path.abspath(__file__), "--one", json.dumps(case)],
                                  capture_output=True, text=True, env={**os.environ, "PYTHONWARNINGS": "ignore"})
            if proc.returncode != 0:
                raise RuntimeError(f"case {case} failed:\n{proc.stderr[-3000:]}")
            result = json.loads(proc.stdout.strip().splitlines()[-1])
        rows.append({**case, **result})
        print(json.dumps(rows[-1]), flush=True)
    return rows


def format_table(rows: list) -> str:
    """One line per (V, dtype, s): times (s) and peak memory (MiB) of the four methods, fused / unfused ratios
    (and recompute / unfused)."""
    by = {(r["vocab"], r["dtype"], r["bag"], r["method"]): r for r in rows}
    lines = ["| V | dtype | s | fused s | recompute s | unfused s | Megatron CE s | fused / unfused time | "
             "recompute / unfused time | fused MiB | recompute MiB | unfused MiB | Megatron CE MiB | "
             "fused / unfused memory |", "|" + "---|" * 14]

    def cell(row, key, fmt):
        return format(row[key], fmt) if row else ""

    def ratio(a, b, key, fmt):
        return format(a[key] / b[key], fmt) if a and b and b[key] else ""  # 0 MiB: a CPU smoke run in-process

    for (vocab, dtype, bag, method), fused in by.items():
        if method != "fused":
            continue
        unfused, megatron = by.get((vocab, dtype, bag, "unfused")), by.get((vocab, dtype, 1, "megatron"))
        recompute = by.get((vocab, dtype, bag, "recompute"))
        lines.append(f"| {vocab} | {dtype} | {bag} | {cell(fused, 'seconds', '.2f')} | "
                     f"{cell(recompute, 'seconds', '.2f')} | {cell(unfused, 'seconds', '.2f')} | "
                     f"{cell(megatron, 'seconds', '.2f')} | {ratio(fused, unfused, 'seconds', '.2f')} | "
                     f"{ratio(recompute, unfused, 'seconds', '.2f')} | {cell(fused, 'peak_mib', '.0f')} | "
                     f"{cell(recompute, 'peak_mib', '.0f')} | {cell(unfused, 'peak_mib', '.0f')} | "
                     f"{cell(megatron, 'peak_mib', '.0f')} | {ratio(fused, unfused, 'peak_mib', '.3f')} |")
    return "\n".join(lines)


def check_same_loss(rows: list, rtol: float) -> list:
    """(case, fused or recompute, unfused) where a fused loss sum differs from the unfused one by more than rtol
    (all compute the same loss)."""
    by = {(r["vocab"], r["dtype"], r["bag"], r["method"]): r["loss_sum"] for r in rows}
    return [(key, value, by[key[:3] + ("unfused",)]) for key, value in by.items()
            if key[3] in ("fused", "recompute") and key[:3] + ("unfused",) in by
            and abs(value - by[key[:3] + ("unfused",)]) > rtol * abs(value)]


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--one", help=argparse.SUPPRESS)  # internal: run one case (JSON) and print its result
    parser.add_argument("--vocab", type=int, nargs="+", default=[32768, 131072])
    parser.add_argument("--bags", type=int, nargs="+", default=[1, 6, 16])
    parser.add_argument("--dtypes", nargs="+", choices=["fp32", "bf16"], default=["fp32", "bf16"])
    parser.add_argument("--methods", nargs="+", choices=METHODS, default=list(METHODS),
                        help="a part of the comparison (e.g. without the unfused bf16 cases, slow on CPUs)")
    parser.add_argument("--positions", type=int, default=4096, help="L x b")
    parser.add_argument("--batch", type=int, default=4, help="b")
    parser.add_argument("--hidden", type=int, default=512, help="h")
    parser.add_argument("--chunk-size", type=int, help="positions per chunk (default: the function's default)")
    parser.add_argument("--reps", type=int, help="timed runs per case (default 1 on CPU, 10 on GPU)")
    parser.add_argument("--warmup", type=int, help="untimed runs per case first (default 0 on CPU, 3 on GPU)")
    parser.add_argument("--gpu", action="store_true", help="the H200 preset: the 600m output layer in bf16")
    parser.add_argument("--allow-cpu", action="store_true", help="with --gpu and no GPU: a tiny CPU smoke run")
    parser.add_argument("--json", help="also write all results to this file")
    cli = parser.parse_args(argv)
    if cli.one:
        print(json.dumps(run_one(json.loads(cli.one))), flush=True)
        return 0
    cli.device = "cpu"
    if cli.gpu:
        if torch.cuda.is_available():
            cli.device = "cuda"
            for key, value in GPU_SHAPE.items():
                setattr(cli, key, value)
        elif cli.allow_cpu:
            print("bench_fused_mce: no CUDA device: --allow-cpu smoke run at a tiny shape (numbers mean nothing)")
            for key, value in {**GPU_SHAPE, **TINY}.items():
                setattr(cli, key, value)
        else:
            print("bench_fused_mce: error: --gpu needs a CUDA device (--allow-cpu: a tiny CPU smoke run)")
            return 2
    cli.reps = cli.reps or (10 if cli.device == "cuda" else 1)
    cli.warmup = cli.warmup if cli.warmup is not None else (3 if cli.device == "cuda" else 0)
    print(f"# {torch.cuda.get_device_name() if cli.device == 'cuda' else 'cpu'}: L x b = {cli.positions} positions "
          f"(b = {cli.batch}), h = {cli.hidden}, torch threads {torch.get_num_threads()}, chunk_size "
          f"{cli.chunk_size or 'default'}; {cli.warmup} warmup + {cli.reps} timed run(s) per case", flush=True)
    if cli.gpu:
        _init_process_group()
    rows = run_grid(cli)
    print("\n" + format_table(rows) + "\n", flush=True)
    different = check_same_loss(rows, rtol=1e-3)
    for case, fused, unfused in different:
        print(f"bench_fused_mce: fused and unfused losses differ at {case}: {fused} vs {unfused}")
    results = {"grid": rows}
    if cli.json:
        with open(cli.json, "w") as f:
            json.dump(results, f, indent=1, default=str)
    return 1 if different else 0


if __name__ == "__main__":
    sys.exit(main())
