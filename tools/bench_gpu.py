"""Benchmark (GPU): tokens/s and MFU of each phase at the 600M shape with Transformer Engine in bf16, next to a
stock Megatron-Core GPTModel step, side by side in one run.

    python tools/bench_gpu.py [--bag-sizes 4 6] [--steps 20] [--json out.json]   # 1 GPU
    torchrun --nproc-per-node N tools/bench_gpu.py                                # N GPUs, data-parallel
    python tools/bench_gpu.py --allow-cpu                                         # no GPU: tiny CPU smoke run

The 600m recipe (32 layers, hidden 960, heads 15/5, ffn 2560, vocab 128,256, seq 2016, micro-batch 8 x
--num-microbatches 4 per step and GPU, bf16, distributed optimizer), TE layer specs when transformer_engine
imports (else the local spec, with a warning, at micro-batch 2 unless --micro-batch). Variants, each a full training
step of the trainer
(tools/trainer_bench.py): superposition (one per --bag-sizes s; s x the raw tokens per step), recovery
(TSTGPTModel, stock batches) and stock (an unmodified GPTModel on the same batches); identical initial weights;
--warmup untimed then --steps timed rounds, variants interleaved; medians.

Reported per variant: ms/step, raw tokens/s (all GPUs), positions/s, TFLOP/s/GPU (Megatron-LM's FLOPs formula;
a superposition step counts as a stock step of the same positions), MFU (peak from --peak-tflops or the
known-GPU table: H200 989 dense bf16), step time relative to stock, and tokens/s / (s x stock tokens/s), the
share of the ideal s-fold data throughput. Exit status: 0, or 1 when a loss/gradient norm was not finite (or a
step was skipped), 2 no GPU (and no --allow-cpu), 3 crashed.
"""

from __future__ import annotations

import argparse
import json
import sys

SCRIPT = "bench_gpu"


def run(cli) -> int:
    import trainer_bench as bench

    summary = bench.measure_for_script(cli, SCRIPT)[0]
    failed = [c for c in (bench.finite_check(name, r) for name, r in summary["variants"].items()) if not c.ok]
    if bench.is_rank0():
        if failed:
            print(f"{SCRIPT}: a loss or gradient norm was not finite, or a step was skipped:", flush=True)
            bench.print_checks(failed)
        if cli.json:
            with open(cli.json, "w") as f:
                json.dump(summary, f, indent=1)
    bench.shutdown()
    return 1 if failed else 0


def main(argv=None) -> int:
    import trainer_bench as bench

    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    bench.add_gpu_arguments(parser, warmup=5, steps=20, bag_sizes=[6])
    cli = parser.parse_args(argv)
    return bench.run_device_script(run, cli, SCRIPT)


if __name__ == "__main__":
    sys.exit(main())
