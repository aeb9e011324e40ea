"""Shared pieces of the step-throughput benchmarks and the GPU check.

Used by tools/bench_throughput.py (CPU, TP=1/2), tools/bench_gpu.py and tools/gpu_check.py (a GPU, the 600M
shape in bf16). Each times full training steps of three kinds of variant on the same model shape:

    superposition s=k  TSTGPTModel; micro-batches of [mbs, k*L] tokens and [mbs, L, k] next-bag targets
    recovery           TSTGPTModel; stock micro-batches [mbs, L]
    stock              megatron.core.models.gpt.GPTModel (unmodified); the very same micro-batches as recovery

Everything is the trainer's own code: `arguments.parse_args` (a recipe's flags with shape overrides) ->
`build.setup_parallel` -> `build.build_components` (config, layer spec, Float16Module, DDP, optimizer, LR
schedule, schedule hooks), and each step is `step.train_step` (Megatron's `get_forward_backward_func` over all
micro-batches, `finalize_model_grads`, optimizer step, LR step). The stock variant goes through the same
`build_components` with `model_class=GPTModel`, so the model class is the only difference. Every variant has its
own TransformerConfig (the
schedule hooks live there), optimizer and LR schedule, and all start from the same weights (copied from the
first variant before any optimizer exists, then checked parameter by parameter). Data is random token ids,
generated before timing and already on the device.

Timing: `warmup` rounds, then `reps` rounds; a round steps every variant once, the starting variant rotating
from round to round, so machine noise reaches all variants alike. Each step is fenced by a barrier and a
device synchronisation; a step's time is the slowest rank's. Medians are reported, with the interquartile
range relative to the median as the noise figure.
"""

from __future__ import annotations

import argparse
import dataclasses
import gc
import math
import os
import statistics
import time
from typing import Dict, List, Optional, Sequence

import torch

SUPERPOSITION, RECOVERY, STOCK = "superposition", "recovery", "stock"


# ---------------------------------------------------------------------------------------------------- arguments


def trainer_argv(recipe: str, overrides: Dict[str, object], vocab_size: int) -> List[str]:
    """The trainer's flags: recipe `recipe` with `overrides` (flag name without `--` -> value; False or None
    removes a flag, which also switches a recipe switch off), random-token data and a NullTokenizer."""
    from megatron_tst import recipes

    base = recipes.get(recipe)
    settings = dict(base.settings)
    settings.update(overrides)
    flags = dataclasses.replace(base, settings=settings).flags()
    return flags + ["--mock-data", "--tokenizer-type", "NullTokenizer", "--vocab-size", str(vocab_size)]


def trainer_args(recipe: str, overrides: Dict[str, object], vocab_size: int, world_size: int):
    """`arguments.parse_args` of `trainer_argv(...)` (a bad combination exits with the parser's message)."""
    from megatron_tst.training import arguments

    return arguments.parse_args(trainer_argv(recipe, overrides, vocab_size), world_size=world_size)


def vocab_sizes(args):
    """(tokenizer vocabulary, the model's padded vocabulary), as the trainer computes them."""
    from megatron_tst.training.tokenizer import build_tokenizer, vocab_size_with_padding

    vocab = build_tokenizer(args.tokenizer_type, args.tokenizer_model, args.vocab_size).vocab_size
    return vocab, vocab_size_with_padding(vocab, args.make_vocab_size_divisible_by, args.tensor_model_parallel_size)


def reinitialize(args) -> None:
    """(Re-)initialise Megatron's parallel state and micro-batch calculator for `args` through the trainer's
    `build.setup_parallel` (which also starts torch.distributed when it is not running)."""
    from megatron_tst.training.build import setup_parallel

    setup_parallel(args)


def device() -> torch.device:
    return torch.device("cuda", torch.cuda.current_device()) if torch.cuda.is_available() else torch.device("cpu")


def device_name() -> str:
    if torch.cuda.is_available():
        return torch.cuda.get_device_name()
    return f"cpu ({torch.get_num_threads()} threads per process)"


def is_rank0() -> bool:
    return torch.distributed.get_rank() == 0


def shutdown() -> None:
    """Tear down Megatron's parallel state and torch.distributed (end of a script)."""
    from megatron.core import parallel_state

    if parallel_state.model_parallel_is_initialized():
        parallel_state.destroy_model_parallel()
    if torch.distributed.is_initialized():
        torch.distributed.barrier()
        torch.distributed.destroy_process_group()


def quiet_known_warnings() -> None:
    """Hide torch's deprecation notices for the collectives megatron-core 0.16 calls (once per step, noise)."""
    import warnings

    warnings.filterwarnings("ignore", category=FutureWarning, module=r"torch\.distributed")


# ---------------------------------------------------------------------------------------------------- models


def _innermost(module):
    while hasattr(module, "module"):
        module = module.module
    return module


def build_variant(args, kind: str, bag_size: int, padded_vocab: int, before_optimizer=None):
    """(Components, the variant's args) of one variant, through the trainer's `build.build_components`;
    `before_optimizer(model)` as there (e.g. copying the first variant's weights)."""
    from megatron.core.models.gpt import GPTModel

    import megatron_tst.model as model_module
    from megatron_tst.training import build

    vargs = argparse.Namespace(**vars(args))
    if kind == SUPERPOSITION:
        vargs.tst = dataclasses.replace(args.tst, bag_size=bag_size)
    if kind == STOCK:
        # Megatron-Core's GPTModel has no linear loss fusion (only its development branch does): the stock
        # variant stays the stock output layer and loss.
        vargs.cross_entropy_loss_fusion = False
        vargs.tst = None
    # One config per variant: the schedule hooks live on it.
    components = build.build_components(vargs, padded_vocab, before_optimizer=before_optimizer,
                                        model_class=GPTModel if kind == STOCK else model_module.TSTGPTModel)
    expected = GPTModel if kind == STOCK else model_module.TSTGPTModel
    if type(_innermost(components.model[0])) is not expected:
        raise RuntimeError(f"the {kind} variant did not build a {expected.__name__}")
    return components, vargs


@torch.no_grad()
def copy_weights(source, target) -> None:
    """Load the weights of `source` chunks into `target` chunks (same layout; strict) and check equality."""
    for src, dst in zip(source, target):
        dst.module.load_state_dict(src.module.state_dict(), strict=True)
        src_params = dict(_innermost(src).named_parameters())
        for name, param in _innermost(dst).named_parameters():
            if not torch.equal(param, src_params[name]):
                raise RuntimeError(f"weights differ after copying: {name}")


@torch.no_grad()
def snapshot(chunks) -> List[dict]:
    """A copy of every chunk's state dict (tensors cloned), to restore with `restore`."""
    return [{k: (v.detach().clone() if torch.is_tensor(v) else v) for k, v in c.module.state_dict().items()}
            for c in chunks]


@torch.no_grad()
def restore(chunks, states: List[dict]) -> None:
    for chunk, state in zip(chunks, states):
        chunk.module.load_state_dict(state, strict=True)


# ---------------------------------------------------------------------------------------------------- data


def step_microbatches(args, *, kind: str, bag_size: int, vocab_size: int, seed: int, dp_rank: int, dp_size: int,
                      num_microbatches: int) -> List[dict]:
    """This data-parallel rank's micro-batches of one global batch of random tokens, in the trainer's format
    and Megatron-LM's order (micro-batch j of rank r holds rows j*mbs*dp + r*mbs + [0, mbs)).

    The global batch depends only on `seed`, the phase and the shape, so every rank (and every layout) sees
    the same global batch; stock and recovery batches are identical tensors.
    """
    from megatron_tst.superposition import make_stock_batch, make_superposition_batch

    mbs, length = args.micro_batch_size, args.seq_length
    s = bag_size if kind == SUPERPOSITION else 1
    gen = torch.Generator().manual_seed(seed)
    stream = torch.randint(0, vocab_size, (mbs * num_microbatches * dp_size, s * length + 1), generator=gen)
    batches = []
    for j in range(num_microbatches):
        start = j * mbs * dp_size + dp_rank * mbs
        rows = stream[start:start + mbs]
        tokens, labels = rows[:, :-1].contiguous(), rows[:, 1:].contiguous()
        loss_mask = torch.ones(tokens.shape, dtype=torch.float32)
        if kind == SUPERPOSITION:
            batch = make_superposition_batch(tokens, labels, loss_mask, s,  # rows: contiguous windows
                                             ignore_index=args.tst.ignore_index)
        else:
            batch = make_stock_batch(tokens, labels, loss_mask)
        batches.append({k: v.to(device()) for k, v in batch.items()})
    return batches


# ---------------------------------------------------------------------------------------------------- variants


@dataclasses.dataclass
class Variant:
    name: str
    kind: str
    bag_size: int
    args: argparse.Namespace
    model: list
    batches: List[dict]
    raw_tokens_per_step: int  # whole global batch
    positions_per_step: int
    optimizer: object = None
    scheduler: object = None
    records: List[dict] = dataclasses.field(default_factory=list)

    def step(self) -> dict:
        """One `step.train_step`; its StepResult as a dict (losses, grad_norm, skipped), also in `records`."""
        from megatron_tst.training.step import StepSettings, train_step

        out = dataclasses.asdict(train_step(iter(self.batches), self.model, self.optimizer,
                                            StepSettings.from_args(self.args), self.scheduler))
        self.records.append(out)
        return out


def variant_specs(bag_sizes: Sequence[int]) -> List[tuple]:
    """(name, kind, bag size) of every variant: one superposition variant per bag size, recovery, stock."""
    return ([(f"superposition s={s}", SUPERPOSITION, s) for s in bag_sizes]
            + [("recovery", RECOVERY, 1), ("stock", STOCK, 1)])


def build_variants(args, bag_sizes: Sequence[int], seed: int = 0) -> List[Variant]:
    """All variants, same initial weights, each with its own optimizer and LR schedule."""
    from megatron.core import parallel_state
    from megatron.core.num_microbatches_calculator import get_num_microbatches

    vocab, padded = vocab_sizes(args)
    dp_rank = parallel_state.get_data_parallel_rank()
    dp_size = parallel_state.get_data_parallel_world_size()
    num_microbatches = get_num_microbatches()  # set for args.global_batch_size by `reinitialize`
    variants = []
    for name, kind, s in variant_specs(bag_sizes):
        first = variants[0].model if variants else None
        # the first variant's weights, before this variant's optimizer copies them
        components, vargs = build_variant(args, kind, s, padded,
                                          before_optimizer=(lambda m, first=first: copy_weights(first, m))
                                          if first else None)
        chunks = components.model
        batches = step_microbatches(args, kind=kind, bag_size=s, vocab_size=vocab, seed=seed, dp_rank=dp_rank,
                                    dp_size=dp_size, num_microbatches=num_microbatches)
        positions = args.global_batch_size * args.seq_length
        variants.append(Variant(name, kind, s, vargs, chunks, batches, raw_tokens_per_step=positions * s,
                                positions_per_step=positions, optimizer=components.optimizer,
                                scheduler=components.scheduler))
    return variants


def release(variants: List[Variant]) -> None:
    for v in variants:
        v.model = v.optimizer = v.scheduler = v.batches = None
    gc.collect()
    if torch.cuda.is_available():
        torch.cuda.empty_cache()


def _synchronize() -> None:
    if torch.cuda.is_available():
        torch.cuda.synchronize()


def time_round_robin(variants: List[Variant], warmup: int, reps: int) -> Dict[str, List[float]]:
    """Seconds per timed step of each variant (the slowest rank's), rounds interleaved as described above."""
    times: Dict[str, List[float]] = {v.name: [] for v in variants}
    for rnd in range(warmup + reps):
        first = rnd % len(variants)
        for v in variants[first:] + variants[:first]:
            gc.collect()
            torch.distributed.barrier()
            _synchronize()
            start = time.perf_counter()
            v.step()
            _synchronize()
            elapsed = time.perf_counter() - start
            if rnd >= warmup:
                times[v.name].append(elapsed)
    for name, values in times.items():
        slowest = torch.tensor(values, dtype=torch.float64, device=device())
        torch.distributed.all_reduce(slowest, op=torch.distributed.ReduceOp.MAX)
        times[name] = slowest.tolist()
    return times


def _loss(record: dict) -> float:
    losses = record["losses"]
    return next(iter(losses.values())) if losses else float("nan")


def summarize(args, variants: List[Variant], times: Dict[str, List[float]],
              peak_tflops: Optional[float] = None) -> dict:
    """Everything the scripts print: per variant ms/step, raw tokens/s, positions/s, TFLOP/s/GPU, MFU, losses."""
    from megatron.core import parallel_state
    from megatron.core.num_microbatches_calculator import get_num_microbatches

    from megatron_tst.flops import training_flops_per_step
    from megatron_tst.model import transformer_engine_available
    from megatron_tst.training import configs
    from megatron_tst.training.metrics import device_peak_tflops

    vocab, padded = vocab_sizes(args)
    flops = training_flops_per_step(configs.model_shape_from_args(args, padded), args.seq_length,
                                    args.global_batch_size)
    peak = device_peak_tflops(peak_tflops)
    world = torch.distributed.get_world_size()
    out = {
        "device": device_name(), "world_size": world, "threads_per_process": torch.get_num_threads(),
        "transformer_engine": bool(torch.cuda.is_available() and transformer_engine_available()),
        "dtype": "bf16" if args.bf16 else "fp16" if args.fp16 else "fp32",
        "layout": {"tp": args.tensor_model_parallel_size, "cp": args.context_parallel_size,
                   "pp": args.pipeline_model_parallel_size, "dp": parallel_state.get_data_parallel_world_size(),
                   "sequence_parallel": bool(args.sequence_parallel),
                   "distributed_optimizer": bool(args.use_distributed_optimizer)},
        "shape": {"layers": args.num_layers, "hidden": args.hidden_size, "heads": args.num_attention_heads,
                  "query_groups": args.num_query_groups, "ffn": args.ffn_hidden_size, "vocab": vocab,
                  "padded_vocab": padded, "seq_length": args.seq_length, "micro_batch_size": args.micro_batch_size,
                  "global_batch_size": args.global_batch_size, "num_microbatches": get_num_microbatches()},
        "flops_per_step": flops, "peak_tflops_per_gpu": peak, "weights_identical_at_start": True,
        "variants": {},
    }
    for v in variants:
        t = times[v.name]
        med = statistics.median(t)
        q1, _, q3 = statistics.quantiles(t, n=4) if len(t) > 1 else (med, med, med)
        tflops = flops / med / world / 1e12
        out["variants"][v.name] = {
            "kind": v.kind, "bag_size": v.bag_size, "ms_per_step": 1e3 * med, "ms_all": [1e3 * x for x in t],
            "iqr_rel": (q3 - q1) / med, "raw_tokens_per_step": v.raw_tokens_per_step,
            "positions_per_step": v.positions_per_step, "raw_tokens_per_s": v.raw_tokens_per_step / med,
            "positions_per_s": v.positions_per_step / med, "tflops_per_gpu": tflops,
            "mfu": tflops / peak if peak else None,
            "losses": [_loss(r) for r in v.records], "grad_norms": [r["grad_norm"] for r in v.records],
            "skipped": sum(r["skipped"] for r in v.records),
        }
    return out


def measure(args, *, bag_sizes: Sequence[int], warmup: int, reps: int, peak_tflops: Optional[float] = None,
            seed: int = 0) -> dict:
    """Build every variant at the current layout (args.global_batch_size / (micro-batch x DP) micro-batches
    per step), time them, return `summarize`'s dict (on every rank)."""
    variants = build_variants(args, bag_sizes, seed=seed)
    try:
        times = time_round_robin(variants, warmup, reps)
        return summarize(args, variants, times, peak_tflops)
    finally:
        release(variants)


def cpu_worker(recipe: str, overrides: dict, vocab_size: int, threads: Optional[int], measure_kwargs: dict):
    """`run_distributed` entry: the trainer's layout for these flags, then `measure`; rank 0's dict."""
    quiet_known_warnings()
    if threads:
        torch.set_num_threads(threads)
    args = trainer_args(recipe, overrides, vocab_size, torch.distributed.get_world_size())
    reinitialize(args)
    result = measure(args, **measure_kwargs)
    return result if is_rank0() else None


# ---------------------------------------------------------------------------------------------------- checks


@dataclasses.dataclass
class Check:
    name: str
    ok: bool
    detail: str


def standard_checks(summary: dict, same_loss_rtol: float) -> List[Check]:
    """Finite losses and gradient norms in every variant, no skipped steps, first-step losses near ln(V)
    (random tokens, freshly initialised model), and recovery's first-step loss = stock's (same weights, same
    batch, the same forward)."""
    checks = []
    log_v = math.log(summary["shape"]["padded_vocab"])
    variants = summary["variants"]
    for name, r in variants.items():
        checks.append(finite_check(name, r))
        first = r["losses"][0] if r["losses"] else float("nan")
        checks.append(Check(f"{name}: first-step loss within 1 nat of ln(padded vocab) = {log_v:.3f}",
                            abs(first - log_v) <= 1.0, f"{first:.4f}"))
    if RECOVERY in variants and STOCK in variants:
        a, b = variants[RECOVERY]["losses"][0], variants[STOCK]["losses"][0]
        rel = abs(a - b) / max(abs(b), 1e-30)
        checks.append(Check(f"recovery first-step loss = stock's (rel <= {same_loss_rtol:g})",
                            rel <= same_loss_rtol, f"{a:.6f} vs {b:.6f}, rel {rel:.2e}"))
    return checks


def finite_check(name: str, variant: dict) -> Check:
    """Every loss and gradient norm of the variant (`summarize`'s entry `name`) finite, no skipped step."""
    finite = all(math.isfinite(x) for x in variant["losses"] + variant["grad_norms"])
    return Check(f"{name}: losses and gradient norms finite, no skipped step",
                 finite and variant["skipped"] == 0 and bool(variant["losses"]),
                 f"losses {_fmt(variant['losses'])}, grad norms {_fmt(variant['grad_norms'])}, "
                 f"skipped {variant['skipped']}")


def _fmt(values: Sequence[float], limit: int = 4) -> str:
    shown = ", ".join(f"{x:.4g}" for x in values[:limit])
    return f"[{shown}{', ...' if len(values) > limit else ''}]"


def print_checks(checks: List[Check]) -> bool:
    for c in checks:
        print(f"  [{'PASS' if c.ok else 'FAIL'}] {c.name}: {c.detail}", flush=True)
    return all(c.ok for c in checks)


# ---------------------------------------------------------------------------------------------------- GPU scripts


TINY_CPU_SHAPE = {"layers": 2, "hidden": 64, "heads": 4, "groups": 2, "ffn": 128, "seq": 48, "vocab": 512,
                  "micro_batch": 2, "num_microbatches": 2, "warmup": 1, "steps": 2}
_SHAPE_FLAGS = ("layers", "hidden", "heads", "groups", "ffn", "seq", "vocab", "micro_batch")


def add_gpu_arguments(parser: argparse.ArgumentParser, *, warmup: int, steps: int, bag_sizes: Sequence[int]) -> None:
    """The command line shared by tools/bench_gpu.py and tools/gpu_check.py."""
    counts = {"warmup": warmup, "steps": steps, "num_microbatches": 4}
    parser.set_defaults(gpu_defaults=counts)
    cpu = "; the tiny shape's with --allow-cpu on CPU"
    parser.add_argument("--recipe", default="600m", help="the model recipe whose shape and settings are used")
    parser.add_argument("--bag-sizes", type=int, nargs="+", default=list(bag_sizes),
                        help="s of the superposition variants")
    parser.add_argument("--num-microbatches", type=int, help=f"micro-batches per step and GPU (default 4{cpu})")
    parser.add_argument("--warmup", type=int, help=f"untimed rounds, every variant once (default {warmup}{cpu})")
    parser.add_argument("--steps", type=int, help=f"timed rounds, every variant once (default {steps}{cpu})")
    parser.add_argument("--peak-tflops", type=float, help="device peak for MFU (default: known GPUs, bf16 dense)")
    parser.add_argument("--json", help="also write the results to this file (rank 0)")
    parser.add_argument("--allow-cpu", action="store_true",
                        help=f"without a GPU: a smoke run on CPU with the local spec and, unless given, the tiny "
                             f"shape {TINY_CPU_SHAPE}")
    shape = parser.add_argument_group("shape overrides (default: the recipe's)")
    for flag in _SHAPE_FLAGS:
        shape.add_argument("--" + flag.replace("_", "-"), type=int)


def gpu_overrides(cli, world_size: int) -> tuple:
    """(recipe overrides, tokenizer vocabulary) for the GPU scripts: TP=1, CP=1, data-parallel over the world.
    Fills the counts and, on CPU (--allow-cpu), the tiny shape into `cli` where not given."""
    from megatron_tst import recipes

    recipe = recipes.get(cli.recipe)
    preset = TINY_CPU_SHAPE if not torch.cuda.is_available() else {}
    for key, default in cli.gpu_defaults.items():
        if getattr(cli, key) is None:
            setattr(cli, key, preset.get(key, default))
    for key in _SHAPE_FLAGS:
        if getattr(cli, key) is None:
            setattr(cli, key, preset.get(key))
    mbs = cli.micro_batch or (LOCAL_SPEC_GPU_MICRO_BATCH if _gpu_without_te() else recipe.settings["micro-batch-size"])
    overrides = {
        "num-layers": cli.layers, "hidden-size": cli.hidden, "num-attention-heads": cli.heads,
        "num-query-groups": cli.groups, "ffn-hidden-size": cli.ffn, "seq-length": cli.seq,
        "micro-batch-size": mbs, "global-batch-size": mbs * cli.num_microbatches * world_size,
        "tensor-model-parallel-size": 1, "pipeline-model-parallel-size": 1, "context-parallel-size": 1,
        "tst-bag-size": cli.bag_sizes[0],
        "lr-warmup-iters": 0,  # every step at the peak LR, as the superposition phase runs (after 2,000 steps)
    }
    overrides = {k: v for k, v in overrides.items() if v is not None}
    if cli.hidden is not None and cli.ffn is None:
        overrides["ffn-hidden-size"] = None  # derived from the hidden size (SwiGLU rule), not the recipe's
    return overrides, cli.vocab or recipe.vocab_size


def measure_for_script(cli, script: str) -> tuple:
    """The GPU scripts' common run: the layout of `gpu_overrides` over torchrun's world, `measure`, and on
    rank 0 the description and table. Returns (summary, overrides, vocabulary, world size)."""
    quiet_known_warnings()
    warn_without_te(script)
    world = world_size_from_env()
    overrides, vocab = gpu_overrides(cli, world)
    args = trainer_args(cli.recipe, overrides, vocab, world)
    reinitialize(args)
    summary = measure(args, bag_sizes=cli.bag_sizes, warmup=cli.warmup, reps=cli.steps,
                      peak_tflops=cli.peak_tflops)
    if is_rank0():
        print(describe(summary))
        print(f"# {cli.warmup} warmup + {cli.steps} timed rounds; medians\n")
        print(format_gpu_table(summary) + "\n", flush=True)
    return summary, overrides, vocab, world


def run_device_script(run, cli, script: str) -> int:
    """Exit status of a GPU script: `require_device`'s refusal, else `run(cli)`, 3 (with the traceback) if it
    crashed."""
    import sys
    import traceback

    status = require_device(cli, script)
    if status is not None:
        return status
    try:
        return run(cli)
    except SystemExit:
        raise
    except BaseException:
        traceback.print_exc()
        print(f"{script}: CRASHED (see the traceback above)", file=sys.stderr, flush=True)
        return 3


def require_device(cli, script: str) -> Optional[int]:
    """None when the run may go ahead; else an exit status after a clear message."""
    if torch.cuda.is_available():
        return None
    if cli.allow_cpu:
        from megatron_tst.training.ranks import print_rank_0

        print_rank_0(f"{script}: no CUDA device: --allow-cpu smoke run on CPU with the local layer spec and a tiny "
                     "shape (timings mean nothing)")
        return None
    print(f"{script}: error: no CUDA device is available (torch {torch.__version__}, "
          f"cuda {torch.version.cuda}). This script is for a GPU machine; --allow-cpu runs a tiny CPU smoke "
          "version of it.", flush=True)
    return 2


# Megatron-Core's local attention keeps [b, heads, L, L] probabilities (fp32 softmax output and its bf16 copy)
# per layer for the backward: about 3 GB per layer at the 600M shape with micro-batch 8, too much for 32 layers.
LOCAL_SPEC_GPU_MICRO_BATCH = 2


def _gpu_without_te() -> bool:
    from megatron_tst.model import transformer_engine_available

    return torch.cuda.is_available() and not transformer_engine_available()


def warn_without_te(script: str) -> None:
    if _gpu_without_te():
        from megatron_tst.training.ranks import print_rank_0

        print_rank_0(f"{script}: warning: transformer_engine does not import: using Megatron-Core's local layer "
                     f"spec (unfused attention: slower than a TE run, micro-batch {LOCAL_SPEC_GPU_MICRO_BATCH} "
                     "unless --micro-batch is given; no context-parallel check)")


def world_size_from_env() -> int:
    return int(os.environ.get("WORLD_SIZE", "1"))


def format_gpu_table(summary: dict) -> str:
    """One row per variant: ms/step, raw tokens/s, positions/s, TFLOP/s/GPU, MFU, time ratio to stock."""
    stock = summary["variants"].get(STOCK)
    lines = ["| variant | ms/step | raw tokens/s | positions/s | TFLOP/s/GPU | MFU | time / stock | "
             "tokens/s / (s x stock) | IQR |", "|---|---|---|---|---|---|---|---|---|"]
    for name, r in summary["variants"].items():
        mfu = "n/a" if r["mfu"] is None else f"{100 * r['mfu']:.1f}%"
        ratio = r["ms_per_step"] / stock["ms_per_step"] if stock else float("nan")
        eff = r["raw_tokens_per_s"] / (r["bag_size"] * stock["raw_tokens_per_s"]) if stock else float("nan")
        lines.append(f"| {name} | {r['ms_per_step']:.1f} | {r['raw_tokens_per_s']:,.0f} | "
                     f"{r['positions_per_s']:,.0f} | {r['tflops_per_gpu']:.1f} | {mfu} | {ratio:.3f} | "
                     f"{eff:.3f} | {100 * r['iqr_rel']:.1f}% |")
    return "\n".join(lines)


def describe(summary: dict) -> str:
    s, lay = summary["shape"], summary["layout"]
    return (f"# {summary['device']}, world {summary['world_size']} (TP {lay['tp']}, CP {lay['cp']}, DP {lay['dp']}"
            f"{', SP' if lay['sequence_parallel'] else ''}"
            f"{', dist. optimizer' if lay['distributed_optimizer'] else ''})"
            f", {summary['dtype']}, {'Transformer Engine' if summary['transformer_engine'] else 'local'} spec; "
            f"{s['layers']} layers, hidden {s['hidden']}, heads {s['heads']}/{s['query_groups']}, ffn {s['ffn']}, "
            f"vocab {s['vocab']} (padded {s['padded_vocab']}), seq {s['seq_length']} positions, micro-batch "
            f"{s['micro_batch_size']} x {s['num_microbatches']} per step and rank (global batch "
            f"{s['global_batch_size']}); {summary['flops_per_step'] / 1e9:,.1f} GFLOP per step; threads per "
            f"process {summary['threads_per_process']}")
