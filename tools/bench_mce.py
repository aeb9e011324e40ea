"""Benchmark: the multi-hot cross-entropy against Megatron's cross-entropy, side by side in one run.

    python tools/bench_mce.py [--seq 1024 --batch 4 --vocab 32768 --bags 4 6 16 --dtype fp32 --reps 3]

Times forward+backward and measures peak memory of
    (a)  our MCE as the model's loss path calls it (inplace: the logits buffer becomes the softmax, as
         Megatron's CE does), and (a') the same without reusing the buffer (the function's default);
    (b)  the paper's way: s calls of Megatron's `vocab_parallel_cross_entropy`, averaged (each call needs
         its own copy of the logits, since Megatron's CE overwrites its input);
    (c)  one Megatron cross-entropy (s = 1), the cost of a baseline step's loss.
Gradients are taken with torch.autograd.grad, as a model's output layer would consume them (no
accumulation into a leaf's .grad). Peak memory is the process's peak resident set (Linux VmHWM, reset before each
variant) above what it
held before the logits were created, so it counts the logits, everything the loss keeps for backward,
and the gradient. Prints a table of absolute numbers and ratios to (c). CPU only (gloo, 1 process).
"""

from __future__ import annotations

import argparse
import gc
import statistics
import time

import torch


def _rss_kib(field: str) -> int:
    with open("/proc/self/status") as status:
        for line in status:
            if line.startswith(field + ":"):
                return int(line.split()[1])
    raise RuntimeError(f"{field} not in /proc/self/status")


def _reset_peak() -> None:
    with open("/proc/self/clear_refs", "w") as clear:
        clear.write("5")  # resets VmHWM to the current RSS


def _measure(step, make_logits, reps):
    """Median seconds of fwd+bwd, and peak MiB above the pre-logits baseline (from the first rep)."""
    times, peak_mib = [], None
    for rep in range(reps + 1):  # rep 0 warms up and measures memory
        gc.collect()
        base = _rss_kib("VmRSS")
        _reset_peak()
        logits = make_logits()
        start = time.perf_counter()
        step(logits)
        elapsed = time.perf_counter() - start
        if rep == 0:
            peak_mib = (_rss_kib("VmHWM") - base) / 1024
        else:
            times.append(elapsed)
        del logits
    return statistics.median(times), peak_mib


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--seq", type=int, default=1024, help="L, positions")
    parser.add_argument("--batch", type=int, default=4)
    parser.add_argument("--vocab", type=int, default=32768)
    parser.add_argument("--bags", type=int, nargs="+", default=[4, 6, 16])
    parser.add_argument("--dtype", choices=["fp32", "bf16"], default="fp32")
    parser.add_argument("--reps", type=int, default=3)
    args = parser.parse_args(argv)

    from megatron.core.tensor_parallel import vocab_parallel_cross_entropy

    from megatron_tst.mce import vocab_parallel_multi_hot_cross_entropy as mce
    from megatron_tst.testing.distributed import Layout, free_port, init_worker, shutdown_worker

    init_worker(0, 1, free_port(), Layout())
    dtype = torch.float32 if args.dtype == "fp32" else torch.bfloat16
    shape = (args.seq, args.batch, args.vocab)
    gen = torch.Generator().manual_seed(0)
    source = torch.randn(shape, generator=gen).to(dtype)

    def make_logits():
        return source.clone().requires_grad_(True)

    print(f"# logits [{args.seq}, {args.batch}, {args.vocab}] {args.dtype}, "
          f"{source.numel() * source.element_size() / 2**20:.0f} MiB; threads={torch.get_num_threads()}")
    rows = []
    for bag in args.bags:
        targets = torch.randint(0, args.vocab, (args.seq, args.batch, bag), generator=gen)

        def ours_inplace(logits):
            torch.autograd.grad(mce(logits, targets, inplace=True).sum(), logits)

        def ours(logits):
            torch.autograd.grad(mce(logits, targets).sum(), logits)

        def paper(logits):
            total = sum(vocab_parallel_cross_entropy(logits.clone(), targets[..., j]) for j in range(bag))
            torch.autograd.grad((total / bag).sum(), logits)

        def baseline(logits):
            torch.autograd.grad(vocab_parallel_cross_entropy(logits, targets[..., 0]).sum(), logits)

        results = {name: _measure(fn, make_logits, args.reps)
                   for name, fn in [("c", baseline), ("a", ours_inplace), ("a_prime", ours), ("b", paper)]}
        rows.append((bag, results))

    print()
    print("| s | (a) MCE ms | (a') MCE, no reuse ms | (b) s x CE ms | (c) one CE ms | (a)/(c) time | "
          "(b)/(a) time | (a) MiB | (a') MiB | (b) MiB | (c) MiB | (a)/(c) mem | (a')/(c) mem |")
    print("|---|---|---|---|---|---|---|---|---|---|---|---|---|")
    for bag, r in rows:
        (ta, ma), (tap, map_), (tb, mb), (tc, mc) = r["a"], r["a_prime"], r["b"], r["c"]
        print(f"| {bag} | {ta * 1e3:.0f} | {tap * 1e3:.0f} | {tb * 1e3:.0f} | {tc * 1e3:.0f} | {ta / tc:.2f} | "
              f"{tb / ta:.2f} | {ma:.0f} | {map_:.0f} | {mb:.0f} | {mc:.0f} | {ma / mc:.2f} | {map_ / mc:.2f} |")
    print("\n(the (c) column is the same computation in every row: its spread shows the machine's noise)")
    shutdown_worker()


if __name__ == "__main__":
    main()
