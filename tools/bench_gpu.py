"""GPU benchmark and check: Megatron-LM's training loop with TST at the 600M shape, Transformer Engine, bf16, with
Megatron-LM's fusions at its defaults; stock step vs superposition step time and memory, MFU, and correctness checks.

    python tools/bench_gpu.py [--bag-sizes 4 6] [--steps 20] [--json out.json]     # 1 GPU
    torchrun --nproc-per-node 2 tools/bench_gpu.py                                 # 2+ GPUs: + the CP=2 check
    python tools/bench_gpu.py --allow-cpu                                          # no GPU: tiny CPU smoke run

The 600m recipe (`--recipe 600m`: 32 layers, hidden 960, heads 15/5, ffn 2560, vocab 128,256 (NullTokenizer, mock
data), seq 2016, bf16) with micro-batch --micro-batch (8) x --num-microbatches (4) per GPU and step, the
distributed optimizer, and whatever else Megatron-LM defaults to on a GPU (TE layer specs, fused kernels). Variants
(tools/trainer_bench.py: Megatron-LM's `pretrain` in this process per run, each step's time Megatron-LM's own
"elapsed time per iteration"): superposition (one per --bag-sizes s; s x the raw tokens per step), recovery
(TSTGPTModel on Megatron's stock samples) and stock (Megatron-Core's unmodified GPTModel on the same samples);
identical initial weights; --warmup untimed then --steps timed iterations per run, --rounds runs per variant,
interleaved; medians. Reported per variant: ms/step, raw tokens/s (all GPUs), positions/s, TFLOP/s/GPU (Megatron-LM's
FLOPs formula; a superposition step counts as a stock step of the same positions), MFU (peak: --peak-tflops or the
known-GPU table, bf16 dense), peak device memory, step time relative to stock, and raw tokens/s / (s x stock's).

Checks: every loss and gradient norm finite, no skipped step; recovery's losses = stock's step by step (same
weights, samples and forward; rel 1e-3 on GPU kernels, 1e-2 with the fused output layer + loss, which computes the
stock loss in another order); with 2+ processes and Transformer Engine, the same runs at
--context-parallel-size 2 (CP=2 vs CP=1 losses within rel 1e-2, gradient norms 5e-2, both phases).
Exit status: 0 every check passed, 1 a check failed, 2 no GPU (and no --allow-cpu), 3 the run crashed.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import tempfile
import traceback

import torch

SCRIPT = "bench_gpu"
CP_LOSS_RTOL, CP_GRAD_NORM_RTOL = 1e-2, 5e-2
TINY_CPU = ["--num-layers", "2", "--hidden-size", "64", "--num-attention-heads", "4", "--num-query-groups", "2",
            "--ffn-hidden-size", "128", "--seq-length", "48", "--max-position-embeddings", "48", "--vocab-size", "512"]


def _launch_environment() -> int:
    """The world size; without torchrun, the environment of a 1-process world (Megatron-LM initialises from it)."""
    if "RANK" not in os.environ:
        from megatron_tst.parallel import free_port

        os.environ.update(RANK="0", WORLD_SIZE="1", LOCAL_RANK="0", MASTER_ADDR="127.0.0.1",
                          MASTER_PORT=str(free_port()))
    os.environ.setdefault("CUDA_DEVICE_MAX_CONNECTIONS", "1")
    return int(os.environ["WORLD_SIZE"])


def common_argv(cli, world: int) -> list:
    micro_batch = cli.micro_batch or (2 if not torch.cuda.is_available() else 8)
    argv = ["--recipe", cli.recipe, "--tokenizer-type", "NullTokenizer", "--vocab-size", str(cli.vocab),
            "--mock-data", "--micro-batch-size", str(micro_batch),
            "--global-batch-size", str(micro_batch * cli.num_microbatches * world), "--num-workers", "2",
            "--use-distributed-optimizer", "--log-throughput"]
    if not torch.cuda.is_available():
        argv += TINY_CPU + ["--num-workers", "0"]
    return argv + list(cli.extra)


def context_parallel_checks(cli, argv: list, directory: str):
    """(checks, details): superposition and recovery runs at CP=1 and CP=2 on the same samples and weights."""
    import trainer_bench as bench

    from megatron_tst.testing.megatron_lm import read_metrics, run_pretrain

    runs = {}
    for cp in (1, 2):
        for variant in (bench.Variant("superposition", bench.SUPERPOSITION, cli.bag_sizes[-1]),
                        bench.Variant("recovery", bench.RECOVERY, cli.bag_sizes[-1])):
            path = os.path.join(directory, f"cp{cp}_{variant.kind}.jsonl")
            status = run_pretrain(variant.argv(argv + ["--context-parallel-size", str(cp)], 0, 2, path))
            if status:
                raise RuntimeError(f"the CP={cp} {variant.kind} run exited with status {status}")
            runs[(cp, variant.kind)] = read_metrics(path) if os.path.exists(path) else []
    checks, details = [], {}
    for kind in (bench.SUPERPOSITION, bench.RECOVERY):
        one, two = runs[(1, kind)], runs[(2, kind)]
        if not one:
            return [], {}  # not the rank that writes metrics
        for field, rtol in (("loss", CP_LOSS_RTOL), ("grad_norm", CP_GRAD_NORM_RTOL)):
            rel = max(abs(a[field] - b[field]) / max(abs(a[field]), 1e-30) for a, b in zip(one, two))
            checks.append(bench.Check(f"CP=2 vs CP=1, {kind}: {field} (rel <= {rtol:g})", rel <= rtol,
                                      f"max rel {rel:.2e}"))
        details[kind] = {"cp1": [(r["loss"], r["grad_norm"]) for r in one],
                         "cp2": [(r["loss"], r["grad_norm"]) for r in two]}
    return checks, details


def run(cli) -> int:
    import warnings

    import trainer_bench as bench

    warnings.filterwarnings("ignore", category=FutureWarning)
    world = _launch_environment()
    argv = common_argv(cli, world)
    with tempfile.TemporaryDirectory() as directory:
        summary = bench.measure(argv, cli.bag_sizes, warmup=cli.warmup, steps=cli.steps, rounds=cli.rounds,
                                directory=directory, peak_tflops=cli.peak_tflops)
        cp_skip = None
        if cli.skip_cp:
            cp_skip = "--skip-cp"
        elif world < 2 or world % 2:
            cp_skip = f"needs an even number >= 2 of processes (world size {world})"
        elif not _transformer_engine():
            cp_skip = "needs Transformer Engine (megatron-core's local attention refuses CP)"
        cp_checks, cp_details = ([], {}) if cp_skip else context_parallel_checks(cli, argv, directory)
    if summary is None:
        return 0  # the ranks that do not write metrics: rank world-1 reports
    # The stock model keeps Megatron's own loss: with the fused output layer + loss the recovery step computes the same
    # loss in another order (bf16 GEMMs, fp32 statistics).
    fused = "--cross-entropy-fusion-impl" in cli.extra and "linear" in cli.extra
    rtol = 1e-2 if fused else 1e-3 if torch.cuda.is_available() else 1e-5
    checks = bench.standard_checks(summary, same_loss_rtol=rtol) + cp_checks
    print(bench.describe(summary))
    print(f"# {cli.warmup} warmup + {cli.steps} timed iterations per run, {cli.rounds} runs per variant; medians\n")
    print(bench.format_table(summary) + "\n")
    print("checks:")
    if cp_skip:
        print(f"  [SKIP] context-parallel check: {cp_skip}")
    ok = bench.print_checks(checks)
    print(f"\n{SCRIPT}: {'PASSED' if ok else 'FAILED'}", flush=True)
    if cli.json:
        with open(cli.json, "w") as f:
            json.dump({"summary": summary, "context_parallel": cp_details, "checks": [vars(c) for c in checks]}, f,
                      indent=1)
    return 0 if ok else 1


def _transformer_engine() -> bool:
    try:
        import transformer_engine.pytorch  # noqa: F401
    except Exception:
        return False
    return True


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--recipe", default="600m", help="the model recipe (megatron_tst.recipes)")
    parser.add_argument("--vocab", type=int, default=128256, help="NullTokenizer ids (the recipe's tokenizer's)")
    parser.add_argument("--bag-sizes", type=int, nargs="+", default=[4, 6], help="s of the superposition variants")
    parser.add_argument("--micro-batch", type=int, help="micro-batch size (default 8; 2 with --allow-cpu)")
    parser.add_argument("--num-microbatches", type=int, default=4, help="micro-batches per step and GPU")
    parser.add_argument("--warmup", type=int, default=5, help="untimed iterations at the start of every run")
    parser.add_argument("--steps", type=int, default=20, help="timed iterations per run")
    parser.add_argument("--rounds", type=int, default=1, help="runs of every variant, interleaved")
    parser.add_argument("--peak-tflops", type=float, help="device peak for MFU (default: known GPUs, bf16 dense)")
    parser.add_argument("--skip-cp", action="store_true", help="no context-parallel check")
    parser.add_argument("--json", help="also write the results to this file (the last rank)")
    parser.add_argument("--allow-cpu", action="store_true",
                        help="without a GPU: a smoke run on CPU with the local spec and a tiny shape")
    parser.add_argument("extra", nargs=argparse.REMAINDER,
                        help="after --: more Megatron-LM flags for every run (e.g. -- --recompute-granularity full)")
    cli = parser.parse_args(argv)
    cli.extra = [a for a in cli.extra if a != "--"]
    if not torch.cuda.is_available():
        if not cli.allow_cpu:
            print(f"{SCRIPT}: error: no CUDA device is available (torch {torch.__version__}). This script is for a "
                  "GPU machine; --allow-cpu runs a tiny CPU smoke version of it.", flush=True)
            return 2
        print(f"{SCRIPT}: no CUDA device: --allow-cpu smoke run (local spec, tiny shape; timings mean nothing)")
        cli.warmup, cli.steps = min(cli.warmup, 1), min(cli.steps, 2)
    try:
        return run(cli)
    except SystemExit:
        raise
    except BaseException:
        traceback.print_exc()
        print(f"{SCRIPT}: CRASHED (see the traceback above)", file=sys.stderr, flush=True)
        return 3


if __name__ == "__main__":
    sys.exit(main())
