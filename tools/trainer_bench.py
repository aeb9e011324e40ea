"""Timing Megatron-LM's training loop with TST, per phase, next to Megatron-Core's stock model: shared by
tools/bench_throughput.py (CPU, TP=1/2) and tools/bench_gpu.py (a GPU, the 600M shape in bf16).

Variants, each a run of `megatron_tst.pretrain.main` in this process (`megatron_tst.testing.megatron_lm.run_pretrain`:
Megatron-LM's `pretrain`, its data loaders and `train_step`, our providers and forward step), on the same command
line and mock data, from the same initial weights (same seed and model structure):

    superposition s=k  --tst-bag-size k, every timed step a superposition step ([mbs, k*L] tokens, next-bag MCE)
    recovery           --tst-bag-size k --tst-superposition-iters 0 --tst-sample-layout segments: TSTGPTModel on
                       Megatron's stock samples, in stock order
    stock              no --tst-* flags, Megatron-Core's unmodified GPTModel (`loop.providers.stock_model_provider`)

A step's time is Megatron-LM's own "elapsed time per iteration" of that step (`--log-interval 1`, read from
`--metrics-jsonl`: its interval timer, data loading, forward/backward, optimizer; evaluation excluded). Each run
takes `warmup` untimed then `steps` timed iterations; `rounds` rounds run every variant once, the starting variant
rotating, so machine noise reaches all alike; medians over all timed steps, with the interquartile range relative
to the median as the noise figure. FLOPs per step are Megatron-LM's formula (`num_floating_point_operations`):
a superposition step counts as a stock step of the same positions.
"""

from __future__ import annotations

import dataclasses
import math
import os
import statistics
from typing import Dict, List, Optional, Sequence

import torch

SUPERPOSITION, RECOVERY, STOCK = "superposition", "recovery", "stock"
# Dense bf16 peak TFLOP/s per GPU, for MFU (override with --peak-tflops).
PEAK_BF16_TFLOPS = {"H200": 989.0, "H100": 989.0, "H800": 989.0, "A100": 312.0, "B200": 2250.0, "GB200": 2500.0,
                    "L40S": 362.0}


def peak_tflops_of_device_name(name: str) -> Optional[float]:
    """The table's peak for a device name such as "NVIDIA H100 80GB HBM3", or None (longest key first: "B200" is
    also a substring of "GB200")."""
    for key in sorted(PEAK_BF16_TFLOPS, key=len, reverse=True):
        if key in name:
            return PEAK_BF16_TFLOPS[key]
    return None


def device_name() -> str:
    if torch.cuda.is_available():
        return torch.cuda.get_device_name()
    return f"cpu ({torch.get_num_threads()} threads per process)"


@dataclasses.dataclass(frozen=True)
class Variant:
    """One timed configuration: its name, kind and bag size."""

    name: str
    kind: str
    bag_size: int

    def argv(self, common: Sequence[str], warmup: int, steps: int, metrics: str) -> List[str]:
        """The run's command line: `common` plus the variant's flags, `warmup + steps` iterations logged one by one."""
        iterations = warmup + steps
        flags = {SUPERPOSITION: ["--tst-bag-size", str(self.bag_size), "--tst-superposition-iters", str(iterations),
                                 "--train-iters", str(iterations + 1)],  # the recovery phase is required
                 RECOVERY: ["--tst-bag-size", str(self.bag_size), "--tst-superposition-iters", "0",
                            "--tst-sample-layout", "segments", "--train-iters", str(iterations)],
                 STOCK: ["--train-iters", str(iterations)]}[self.kind]
        return list(common) + flags + ["--log-interval", "1", "--eval-iters", "0", "--eval-interval", "1000000",
                                       "--lr-warmup-iters", "0", "--metrics-jsonl", metrics]


def variants(bag_sizes: Sequence[int]) -> List[Variant]:
    """One superposition variant per bag size, then recovery (with the first bag size) and stock."""
    return ([Variant(f"superposition s={s}", SUPERPOSITION, s) for s in bag_sizes]
            + [Variant("recovery", RECOVERY, bag_sizes[0]), Variant("stock", STOCK, 1)])


def _read(path: str) -> List[dict]:
    from megatron_tst.testing.megatron_lm import read_metrics

    return read_metrics(path, kind=None) if os.path.exists(path) else []


def measure(common: Sequence[str], bag_sizes: Sequence[int], *, warmup: int, steps: int, rounds: int,
            directory: str, peak_tflops: Optional[float] = None) -> Optional[dict]:
    """Run every variant `rounds` times (module docstring); the summary on the rank that writes metrics (the last),
    None elsewhere. Raises RuntimeError when a run fails."""
    from megatron_tst.testing.megatron_lm import run_pretrain

    chosen = variants(bag_sizes)
    timed: Dict[str, List[dict]] = {v.name: [] for v in chosen}
    headers: Dict[str, dict] = {}
    peaks: Dict[str, int] = {}
    for round_ in range(rounds):
        order = chosen[round_ % len(chosen):] + chosen[:round_ % len(chosen)]
        for v in order:
            path = os.path.join(directory, f"{v.kind}_{v.bag_size}_{round_}.jsonl")
            if torch.cuda.is_available():
                torch.cuda.reset_peak_memory_stats()
            status = run_pretrain(v.argv(common, warmup, steps, path), stock_model=v.kind == STOCK)
            if status:
                raise RuntimeError(f"the {v.name} run exited with status {status}")
            if torch.cuda.is_available():
                peaks[v.name] = max(peaks.get(v.name, 0), torch.cuda.max_memory_allocated())
            records = _read(path)
            if records and records[0].get("kind") == "run":
                headers[v.name] = records[0]
            timed[v.name] += [r for r in records
                              if r.get("kind") == "train" and warmup < r["iteration"] <= warmup + steps]
    if not headers:
        return None  # not the rank that writes metrics
    return summarize(chosen, timed, headers, peaks, peak_tflops)


def summarize(chosen: List[Variant], timed: Dict[str, List[dict]], headers: Dict[str, dict], peaks: Dict[str, int],
              peak_tflops: Optional[float]) -> dict:
    """Per variant: ms/step (median), raw tokens and positions per step and per second, TFLOP/s/GPU, MFU, peak device
    memory, the losses and gradient norms of the timed steps."""
    any_header = next(iter(headers.values()))
    args = any_header["args"]
    world = int(args["world_size"])
    global_batch = int(args["global_batch_size"])
    seq = int(args["seq_length"])
    peak = peak_tflops or (peak_tflops_of_device_name(device_name()) if torch.cuda.is_available() else None)
    out = {"device": device_name(), "world_size": world, "threads_per_process": torch.get_num_threads(),
           "transformer_impl": args.get("transformer_impl"), "dtype": "bf16" if args.get("bf16") else
           "fp16" if args.get("fp16") else "fp32",
           "layout": {k: args.get(k) for k in ("tensor_model_parallel_size", "pipeline_model_parallel_size",
                                               "context_parallel_size", "data_parallel_size", "sequence_parallel",
                                               "use_distributed_optimizer")},
           "shape": {k: args.get(k) for k in ("num_layers", "hidden_size", "num_attention_heads", "num_query_groups",
                                              "ffn_hidden_size", "padded_vocab_size", "seq_length",
                                              "micro_batch_size", "global_batch_size")},
           "peak_tflops_per_gpu": peak, "variants": {}}
    for v in chosen:
        records = timed[v.name]
        if not records:
            raise RuntimeError(f"no timed step of {v.name}: raise --steps")
        times = [r["elapsed_ms"] / 1e3 for r in records]
        median = statistics.median(times)
        q1, _, q3 = statistics.quantiles(times, n=4) if len(times) > 1 else (median, median, median)
        flops = (headers[v.name].get("flops_per_sample") or 0.0) * global_batch
        tflops = flops / median / world / 1e12 if flops else None
        positions = global_batch * seq
        raw = positions * (v.bag_size if v.kind == SUPERPOSITION else 1)
        out["variants"][v.name] = {
            "kind": v.kind, "bag_size": v.bag_size if v.kind == SUPERPOSITION else 1, "ms_per_step": 1e3 * median,
            "ms_all": [1e3 * t for t in times], "iqr_rel": (q3 - q1) / median, "raw_tokens_per_step": raw,
            "positions_per_step": positions, "raw_tokens_per_s": raw / median, "positions_per_s": positions / median,
            "flops_per_step": flops, "tflops_per_gpu": tflops, "mfu": tflops / peak if tflops and peak else None,
            "peak_memory_gib": peaks[v.name] / 2**30 if v.name in peaks else None,
            "losses": [r["loss"] for r in records], "grad_norms": [r["grad_norm"] for r in records],
            "phases": sorted({r["phase"] for r in records}),
            "skipped": sum(int(r.get("skipped_iterations") or 0) for r in records),
        }
    return out


# ---------------------------------------------------------------------------------------------------- checks


@dataclasses.dataclass
class Check:
    name: str
    ok: bool
    detail: str


def finite_check(name: str, variant: dict) -> Check:
    """Every loss and gradient norm of the variant (`summarize`'s entry `name`) finite, no skipped step, and the
    timed steps in the variant's phase."""
    values = [x for x in variant["losses"] + variant["grad_norms"] if x is not None]
    finite = bool(variant["losses"]) and all(math.isfinite(x) for x in values) and len(values) == \
        len(variant["losses"]) + len(variant["grad_norms"])
    phase = [SUPERPOSITION] if variant["kind"] == SUPERPOSITION else [RECOVERY]
    return Check(f"{name}: losses and gradient norms finite, no skipped step, {phase[0]} steps",
                 finite and variant["skipped"] == 0 and variant["phases"] == phase,
                 f"losses {_fmt(variant['losses'])}, grad norms {_fmt(variant['grad_norms'])}, "
                 f"skipped {variant['skipped']}, phases {variant['phases']}")


def standard_checks(summary: dict, same_loss_rtol: float) -> List[Check]:
    """`finite_check` of every variant, and recovery's losses = stock's: the same weights, Megatron's stock samples
    in the same order and the same forward (the recovery variant reads them through --tst-sample-layout segments)."""
    checks = [finite_check(name, r) for name, r in summary["variants"].items()]
    variants_ = summary["variants"]
    if RECOVERY in variants_ and STOCK in variants_:
        a, b = variants_[RECOVERY]["losses"], variants_[STOCK]["losses"]
        rel = max(abs(x - y) / max(abs(y), 1e-30) for x, y in zip(a, b))
        checks.append(Check(f"recovery's losses = stock's, step by step (rel <= {same_loss_rtol:g})",
                            rel <= same_loss_rtol, f"{_fmt(a)} vs {_fmt(b)}, max rel {rel:.2e}"))
    return checks


def _fmt(values: Sequence[float], limit: int = 4) -> str:
    shown = ", ".join("None" if x is None else f"{x:.4g}" for x in values[:limit])
    return f"[{shown}{', ...' if len(values) > limit else ''}]"


def print_checks(checks: List[Check]) -> bool:
    for c in checks:
        print(f"  [{'PASS' if c.ok else 'FAIL'}] {c.name}: {c.detail}", flush=True)
    return all(c.ok for c in checks)


# ---------------------------------------------------------------------------------------------------- reports


def format_table(summary: dict) -> str:
    """One row per variant: ms/step, raw tokens/s, positions/s, TFLOP/s/GPU, MFU, peak memory, time ratio to stock,
    raw tokens/s over s x stock's, and the IQR noise figure."""
    stock = summary["variants"].get(STOCK)
    lines = ["| variant | ms/step | raw tokens/s | positions/s | TFLOP/s/GPU | MFU | peak GiB | time / stock | "
             "tokens/s / (s x stock) | IQR |", "|---|---|---|---|---|---|---|---|---|---|"]
    for name, r in summary["variants"].items():
        mfu = "n/a" if r["mfu"] is None else f"{100 * r['mfu']:.1f}%"
        tflops = "n/a" if r["tflops_per_gpu"] is None else f"{r['tflops_per_gpu']:.2f}"
        memory = "n/a" if r["peak_memory_gib"] is None else f"{r['peak_memory_gib']:.1f}"
        ratio = r["ms_per_step"] / stock["ms_per_step"] if stock else float("nan")
        eff = r["raw_tokens_per_s"] / (r["bag_size"] * stock["raw_tokens_per_s"]) if stock else float("nan")
        lines.append(f"| {name} | {r['ms_per_step']:.1f} | {r['raw_tokens_per_s']:,.0f} | {r['positions_per_s']:,.0f} "
                     f"| {tflops} | {mfu} | {memory} | {ratio:.3f} | {eff:.3f} | {100 * r['iqr_rel']:.1f}% |")
    return "\n".join(lines)


def describe(summary: dict) -> str:
    s, lay = summary["shape"], summary["layout"]
    return (f"# {summary['device']}, world {summary['world_size']} (TP {lay['tensor_model_parallel_size']}, "
            f"PP {lay['pipeline_model_parallel_size']}, CP {lay['context_parallel_size']}, "
            f"DP {lay['data_parallel_size']}{', SP' if lay['sequence_parallel'] else ''}"
            f"{', distributed optimizer' if lay['use_distributed_optimizer'] else ''}), {summary['dtype']}, "
            f"{summary['transformer_impl']} layers; {s['num_layers']} layers, hidden {s['hidden_size']}, heads "
            f"{s['num_attention_heads']}/{s['num_query_groups']}, ffn {s['ffn_hidden_size']}, padded vocab "
            f"{s['padded_vocab_size']}, {s['seq_length']} positions, micro-batch {s['micro_batch_size']}, global "
            f"batch {s['global_batch_size']}; threads per process {summary['threads_per_process']}")
