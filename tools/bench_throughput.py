"""Benchmark (CPU): full training steps of the superposition and recovery phases against a stock Megatron-Core
GPTModel step, side by side in one run, at TP=1 and TP=2.

    python tools/bench_throughput.py [--bag-sizes 6] [--tp 1 2] [--reps 7] [--json out.json]

Per TP size, one set of gloo processes (`run_distributed`, world size = TP, Layout(tp=TP)) builds, from the
600m recipe's Llama-style block and optimizer (RMSNorm, SwiGLU, RoPE, GQA, untied embeddings, no dropout,
AdamW, distributed optimizer, sequence parallelism when TP > 1) at a small shape in fp32:
    (a) superposition step (s = each --bag-sizes): TSTGPTModel, [mbs, s*L] tokens -> next-bag MCE;
        raw tokens per step = s x (c)'s
    (b) recovery step: TSTGPTModel, stock micro-batches
    (c) stock step: an unmodified Megatron-Core GPTModel from the same spec, the same micro-batches as (b)
Each step is the trainer's `train_step` (Megatron's get_forward_backward_func over --num-microbatches
micro-batches, gradient finalisation, optimizer step). Same shapes, optimizer and initial weights; rounds
interleave the variants after warmup; medians (see tools/trainer_bench.py).

Threads: every configuration uses the same cores (--threads, default all): TP=1 is one process with all of
them, TP=2 two processes with half each (torch.set_num_threads in each process).

Targets: (a)/(c) and (b)/(c) step time <= 1.05, tokens/s(a) / (s x tokens/s(c)) >= 0.95. The IQR column is
(c)'s interquartile range over its median: ratios closer to 1 than that are within the machine's noise.
Checks per TP size (bench.standard_checks): losses and gradient norms finite, no skipped step, first-step losses
near ln(vocab), and (b)'s first-step loss equal to (c)'s (rel 1e-5: same weights, batch and forward). Exit
status 1 when a target or a check is missed.
"""

from __future__ import annotations

import argparse
import json
import os
import sys

TIME_TARGET = 1.05
TOKENS_TARGET = 0.95
SAME_LOSS_RTOL = 1e-5  # (b) and (c): the same fp32 forward on the same weights and batch


def overrides_for(cli, tp: int) -> dict:
    mbs = cli.micro_batch
    return {
        "num-layers": cli.layers, "hidden-size": cli.hidden, "num-attention-heads": cli.heads,
        "num-query-groups": cli.groups, "ffn-hidden-size": cli.ffn,  # None: the SwiGLU rule from the hidden size
        "seq-length": cli.seq, "micro-batch-size": mbs, "global-batch-size": mbs * cli.num_microbatches,
        "tensor-model-parallel-size": tp, "pipeline-model-parallel-size": 1,
        "sequence-parallel": cli.sequence_parallel, "bf16": False, "tst-bag-size": cli.bag_sizes[0],
    }


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
            "first_loss_b_c": (rec["losses"][0], stock["losses"][0]),
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
    parser.add_argument("--warmup", type=int, default=2, help="untimed rounds (every variant once)")
    parser.add_argument("--reps", type=int, default=7, help="timed rounds (every variant once); medians")
    parser.add_argument("--threads", type=int, default=os.cpu_count(),
                        help="cores per configuration, split evenly over its TP processes")
    parser.add_argument("--no-sequence-parallel", dest="sequence_parallel", action="store_false",
                        help="TP without sequence parallelism (the recipes use it)")
    parser.add_argument("--json", help="also write the full results (per-step times, losses) to this file")
    cli = parser.parse_args(argv)

    import trainer_bench as bench

    from megatron_tst.testing.distributed import Layout, run_distributed

    results, rows, checks = {}, [], {}
    for tp in cli.tp:
        threads = max(1, cli.threads // tp)
        summary = run_distributed(
            bench.cpu_worker, world_size=tp, layout=Layout(tp=tp), timeout_s=7200,
            args=("600m", overrides_for(cli, tp), cli.vocab, threads,
                  dict(bag_sizes=cli.bag_sizes, warmup=cli.warmup, reps=cli.reps)),
        )[0]
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
