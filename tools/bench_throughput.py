"""Benchmark (CPU): Megatron-LM's training loop with TST, superposition and recovery steps against Megatron-Core's stock
GPTModel step, side by side in one run, at TP=1 and TP=2.

    python tools/bench_throughput.py [--bag-sizes 6] [--tp 1 2] [--rounds 3] [--steps 4] [--json out.json]

Per TP size, one set of gloo processes (world size = TP) runs Megatron-LM's `pretrain` in process for each variant
(tools/trainer_bench.py) on a 600m-recipe-style block at a small shape in fp32 (RMSNorm, SwiGLU, RoPE, GQA, untied
embeddings, no dropout, AdamW, distributed optimizer, sequence parallelism when TP > 1, mock data):
    (a) superposition step (s = each --bag-sizes): TSTGPTModel, [mbs, s*L] tokens -> next-bag MCE;
        raw tokens per step = s x (c)'s
    (b) recovery step: TSTGPTModel, stock micro-batches
    (c) stock step: Megatron-Core's unmodified GPTModel from the same flags
A step's time is Megatron-LM's "elapsed time per iteration" of the step. Same shapes, optimizer and initial
weights; rounds interleave the variants after warmup; medians.

Threads: every configuration uses the same cores (--threads, default all): TP=1 is one process with all of them,
TP=2 two processes with half each (torch.set_num_threads in each process).

Targets: (a)/(c) and (b)/(c) step time <= 1.05, tokens/s(a) / (s x tokens/s(c)) >= 0.95. The IQR column is (c)'s
interquartile range over its median: ratios closer to 1 than that are within the machine's noise. Checks per TP
size (trainer_bench.standard_checks): losses and gradient norms finite, no skipped step, each variant's steps in its
phase, and (b)'s losses equal to (c)'s step by step (rel 1e-5: same weights, samples and forward). Exit status 1
when a target or a check is missed.
"""

from __future__ import annotations

import argparse
import json
import os
import sys

import torch

TIME_TARGET = 1.05
TOKENS_TARGET = 0.95
SAME_LOSS_RTOL = 1e-5  # (b) and (c): the same fp32 forward on the same weights and batch


def common_argv(cli, tp: int) -> list:
    """The Megatron-LM command line every variant shares at this TP size (the variant adds its --tst-* flags)."""
    argv = (f"--num-layers {cli.layers} --hidden-size {cli.hidden} --num-attention-heads {cli.heads} "
            f"--group-query-attention --num-query-groups {cli.groups} --seq-length {cli.seq} "
            f"--max-position-embeddings {cli.seq} --position-embedding-type rope --normalization RMSNorm --swiglu "
            "--disable-bias-linear --untie-embeddings-and-output-weights --attention-dropout 0 --hidden-dropout 0 "
            f"--micro-batch-size {cli.micro_batch} --global-batch-size {cli.micro_batch * cli.num_microbatches} "
            "--lr 1e-4 --lr-decay-style constant --weight-decay 0.1 --adam-beta2 0.95 --clip-grad 1.0 --seed 1234 "
            f"--use-distributed-optimizer --tensor-model-parallel-size {tp} --tokenizer-type NullTokenizer "
            f"--vocab-size {cli.vocab} --mock-data --num-workers 0").split()
    if cli.ffn:
        argv += ["--ffn-hidden-size", str(cli.ffn)]
    if tp > 1 and cli.sequence_parallel:
        argv.append("--sequence-parallel")
    return argv


def worker(argv, bag_sizes, warmup, steps, rounds, threads, directory):
    """`run_distributed` entry (torch.distributed only): the variants on this world; the summary or None."""
    import warnings

    import trainer_bench as bench

    warnings.filterwarnings("ignore")
    torch.set_num_threads(threads)
    return bench.measure(argv, bag_sizes, warmup=warmup, steps=steps, rounds=rounds, directory=directory)


def rows_for(tp: int, summary: dict) -> list:
    v = summary["variants"]
    rec, stock = v["recovery"], v["stock"]
    rows = []
    for sup in v.values():
        if sup["kind"] != "superposition":
            continue
        s = sup["bag_size"]
        rows.append({
            "tp": tp, "threads": summary["threads_per_process"], "s": s,
            "ms_a": sup["ms_per_step"], "ms_b": rec["ms_per_step"], "ms_c": stock["ms_per_step"],
            "time_a_c": sup["ms_per_step"] / stock["ms_per_step"],
            "time_b_c": rec["ms_per_step"] / stock["ms_per_step"],
            "tok_a": sup["raw_tokens_per_s"], "tok_b": rec["raw_tokens_per_s"], "tok_c": stock["raw_tokens_per_s"],
            "tokens_ratio": sup["raw_tokens_per_s"] / (s * stock["raw_tokens_per_s"]),
            "pos_a": sup["positions_per_s"], "pos_b": rec["positions_per_s"], "pos_c": stock["positions_per_s"],
            "iqr_c": stock["iqr_rel"],
        })
    return rows


def print_table(rows: list) -> None:
    print("| TP | threads/proc | s | (a) superposition ms | (b) recovery ms | (c) stock ms | (a)/(c) time | "
          "(b)/(c) time | tok/s (a) | tok/s (b) | tok/s (c) | tok/s(a) / (s x tok/s(c)) | pos/s (a) | "
          "pos/s (b) | pos/s (c) | (c) IQR |")
    print("|---|---|---|---|---|---|---|---|---|---|---|---|---|---|---|---|")
    for r in rows:
        print(f"| {r['tp']} | {r['threads']} | {r['s']} | {r['ms_a']:.0f} | {r['ms_b']:.0f} | {r['ms_c']:.0f} | "
              f"{r['time_a_c']:.3f} | {r['time_b_c']:.3f} | {r['tok_a']:,.0f} | {r['tok_b']:,.0f} | "
              f"{r['tok_c']:,.0f} | {r['tokens_ratio']:.3f} | {r['pos_a']:,.0f} | {r['pos_b']:,.0f} | "
              f"{r['pos_c']:,.0f} | {100 * r['iqr_c']:.1f}% |")


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--layers", type=int, default=4)
    parser.add_argument("--hidden", type=int, default=256)
    parser.add_argument("--heads", type=int, default=4)
    parser.add_argument("--groups", type=int, default=2, help="query groups (GQA)")
    parser.add_argument("--ffn", type=int, help="default: Megatron's SwiGLU rule from --hidden (640 for 256)")
    parser.add_argument("--vocab", type=int, default=32768)
    parser.add_argument("--seq", type=int, default=240, help="L positions; divisible by every s (and TP)")
    parser.add_argument("--micro-batch", type=int, default=4)
    parser.add_argument("--num-microbatches", type=int, default=4, help="micro-batches per step")
    parser.add_argument("--bag-sizes", type=int, nargs="+", default=[6], choices=[4, 6], help="s of (a)")
    parser.add_argument("--tp", type=int, nargs="+", default=[1, 2])
    parser.add_argument("--warmup", type=int, default=2, help="untimed steps at the start of every run")
    parser.add_argument("--steps", type=int, default=4, help="timed steps per run")
    parser.add_argument("--rounds", type=int, default=3, help="runs of every variant, interleaved; medians")
    parser.add_argument("--threads", type=int, default=os.cpu_count(),
                        help="cores per configuration, split evenly over its TP processes")
    parser.add_argument("--no-sequence-parallel", dest="sequence_parallel", action="store_false",
                        help="TP without sequence parallelism (the recipes use it)")
    parser.add_argument("--json", help="also write the full results (per-step times, losses) to this file")
    cli = parser.parse_args(argv)

    import tempfile

    import trainer_bench as bench

    from megatron_tst.testing.distributed import run_distributed

    os.environ.setdefault("CUDA_DEVICE_MAX_CONNECTIONS", "1")  # Megatron-LM requires it with TP > 1
    results, rows, checks = {}, [], {}
    for tp in cli.tp:
        threads = max(1, cli.threads // tp)
        with tempfile.TemporaryDirectory() as directory:
            per_rank = run_distributed(worker, world_size=tp, layout=None, timeout_s=7200,
                                       args=(common_argv(cli, tp), cli.bag_sizes, cli.warmup, cli.steps, cli.rounds,
                                             threads, directory))
        summary = next(r for r in per_rank if r is not None)
        results[f"tp{tp}"] = summary
        print(bench.describe(summary), flush=True)
        rows += rows_for(tp, summary)
        checks[tp] = bench.standard_checks(summary, same_loss_rtol=SAME_LOSS_RTOL)

    print()
    print_table(rows)
    print(f"\ntargets: (a)/(c) and (b)/(c) time <= {TIME_TARGET}, tok/s(a) / (s x tok/s(c)) >= {TOKENS_TARGET}; "
          "(c) IQR = the stock step's spread (noise)")
    ok = True
    for r in rows:
        verdicts = [r["time_a_c"] <= TIME_TARGET, r["time_b_c"] <= TIME_TARGET, r["tokens_ratio"] >= TOKENS_TARGET]
        ok &= all(verdicts)
        print(f"TP={r['tp']} s={r['s']}: (a)/(c) {'ok' if verdicts[0] else 'MISSED'}, (b)/(c) "
              f"{'ok' if verdicts[1] else 'MISSED'}, tokens {'ok' if verdicts[2] else 'MISSED'}")
    for tp, tp_checks in checks.items():
        print(f"checks at TP={tp}:")
        ok &= bench.print_checks(tp_checks)
    if cli.json:
        with open(cli.json, "w") as f:
            json.dump({"rows": rows, "runs": results}, f, indent=1)
    return 0 if ok else 1


if __name__ == "__main__":
    sys.exit(main())
