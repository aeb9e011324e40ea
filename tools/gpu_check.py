"""GPU check for a lent GPU: the 600M dense shape with Transformer Engine layer specs in bf16, a few full training
steps of each phase next to a stock Megatron-Core GPTModel step, and correctness checks. A few minutes.

    python tools/gpu_check.py                        # 1 GPU (a few minutes, most of it start-up and warmup)
    torchrun --nproc-per-node 2 tools/gpu_check.py   # 2+ GPUs: data-parallel timing + the CP=2 check (needs TE)
    python tools/gpu_check.py --allow-cpu            # no GPU: a tiny CPU smoke run of the same code path

What it does (rank 0 prints; world size from torchrun's environment, else 1):
1. The 600m recipe (32 layers, hidden 960, heads 15/5, ffn 2560, vocab 128,256, seq 2016, micro-batch 8, bf16,
   distributed optimizer) with TE specs when transformer_engine imports (else the local spec, with a warning,
   and micro-batch 2: its unfused attention keeps [b, heads, L, L] probabilities per layer).
   --warmup 5 untimed and --steps 10 timed rounds of: a superposition step (s = 6), a recovery step, a stock
   GPTModel step (see tools/trainer_bench.py: the trainer's build and train_step, identical initial
   weights, interleaved rounds). Prints ms/step, raw tokens/s, positions/s, TFLOP/s/GPU and MFU.
2. Checks: every loss and gradient norm finite (superposition included) and no skipped step; first-step
   losses near ln(vocab) (random tokens, fresh model); recovery's first-step loss equals stock's.
3. With >= 2 processes and Transformer Engine: the same global batch at CP=1 (DP = world) and CP=2
   (DP = world/2), same weights, one step per phase: losses within rel 1e-2 (bf16), gradient norms within
   rel 5e-2. (--cp-size 1 runs the comparison's plumbing without TE, e.g. in a CPU smoke run.)

Exit status: 0 every check passed, 1 a check failed, 2 no GPU (and no --allow-cpu), 3 the run crashed.
"""

from __future__ import annotations

import argparse
import json
import sys

import torch

SCRIPT = "gpu_check"
CP_LOSS_RTOL = 1e-2
CP_GRAD_NORM_RTOL = 5e-2


def context_parallel_check(cli, overrides: dict, vocab: int, world: int) -> tuple:
    """(checks, details): one step per phase at CP=1 and at CP=cli.cp_size on the same global batch."""
    import trainer_bench as bench
    from megatron.core import parallel_state
    from megatron.core.num_microbatches_calculator import get_num_microbatches

    from megatron_tst.training.step import StepSettings, train_step

    cp = cli.cp_size
    mbs = overrides["micro-batch-size"]
    s = cli.bag_sizes[-1]
    # Keyed by the layout's position: with --cp-size 1 both layouts have CP=1 and must not share a key.
    layouts = (1, cp)
    initial, results = None, {}
    for index, layout_cp in enumerate(layouts):
        ov = dict(overrides, **{"context-parallel-size": layout_cp, "global-batch-size": mbs * world,
                                "tst-bag-size": s})
        args = bench.trainer_args(cli.recipe, ov, vocab, world)
        bench.reinitialize(args)
        _, padded = bench.vocab_sizes(args)
        snapshots = []
        components, vargs = bench.build_variant(args, bench.SUPERPOSITION, s, padded,
                                                before_optimizer=lambda m: snapshots.append(bench.snapshot(m)))
        chunks, optimizer, scheduler = components.model, components.optimizer, components.scheduler
        if initial is None:
            initial = snapshots[0]
        dp_rank = parallel_state.get_data_parallel_rank()
        dp_size = parallel_state.get_data_parallel_world_size()
        for phase in (bench.SUPERPOSITION, bench.RECOVERY):
            bench.restore(chunks, initial)  # every step starts from the same weights
            batches = bench.step_microbatches(vargs, kind=phase, bag_size=s, vocab_size=vocab, seed=1,
                                              dp_rank=dp_rank, dp_size=dp_size,
                                              num_microbatches=get_num_microbatches())
            out = train_step(iter(batches), chunks, optimizer, StepSettings.from_args(vargs), scheduler)
            (loss,) = out.losses.values()
            results[(index, phase)] = (loss, out.grad_norm)
        del chunks, optimizer, scheduler, batches, components
        bench.release([])
    checks = []
    for phase in (bench.SUPERPOSITION, bench.RECOVERY):
        (l1, g1), (lc, gcp) = results[(0, phase)], results[(1, phase)]
        rel_loss, rel_grad = abs(lc - l1) / abs(l1), abs(gcp - g1) / max(abs(g1), 1e-30)
        checks.append(bench.Check(f"CP={cp} vs CP=1, {phase} (s={s}) loss, rel <= {CP_LOSS_RTOL:g}",
                                  rel_loss <= CP_LOSS_RTOL, f"{lc:.5f} vs {l1:.5f}, rel {rel_loss:.2e}"))
        checks.append(bench.Check(f"CP={cp} vs CP=1, {phase} (s={s}) gradient norm, rel <= {CP_GRAD_NORM_RTOL:g}",
                                  rel_grad <= CP_GRAD_NORM_RTOL, f"{gcp:.5f} vs {g1:.5f}, rel {rel_grad:.2e}"))
    names = ("cp1", f"cp{cp}" if cp != 1 else "cp1_again")
    details = {f"{names[index]}_{phase}": {"loss": loss, "grad_norm": grad_norm}
               for (index, phase), (loss, grad_norm) in results.items()}
    return checks, details


def run(cli) -> int:
    import trainer_bench as bench

    from megatron_tst.model import transformer_engine_available

    summary, overrides, vocab, world = bench.measure_for_script(cli, SCRIPT)
    rank0 = bench.is_rank0()
    # Same weights, batch and forward: exactly equal on CPU; on GPU allow for kernel choices.
    checks = bench.standard_checks(summary, same_loss_rtol=1e-3 if torch.cuda.is_available() else 1e-6)

    report = {"summary": summary}
    if cli.skip_cp:
        skip = "--skip-cp"
    elif world < 2:
        skip = f"needs >= 2 GPUs (world size {world}); run under torchrun --nproc-per-node 2"
    elif world % cli.cp_size:
        skip = f"world size {world} is not a multiple of CP={cli.cp_size}"
    elif cli.cp_size != 1 and not transformer_engine_available():
        skip = "needs Transformer Engine (megatron-core's local attention refuses CP)"
    else:
        skip = None
        cp_checks, report["context_parallel"] = context_parallel_check(cli, overrides, vocab, world)
        checks += cp_checks
    if rank0:
        print("checks:")
        if skip:
            print(f"  [SKIP] context-parallel check: {skip}")
        ok = bench.print_checks(checks)
        print(f"\n{SCRIPT}: {'PASSED' if ok else 'FAILED'}", flush=True)
        if cli.json:
            report["checks"] = [vars(c) for c in checks]
            with open(cli.json, "w") as f:
                json.dump(report, f, indent=1)
    ok = all(c.ok for c in checks)
    bench.shutdown()
    return 0 if ok else 1


def main(argv=None) -> int:
    import trainer_bench as bench

    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    bench.add_gpu_arguments(parser, warmup=5, steps=10, bag_sizes=[6])
    parser.add_argument("--cp-size", type=int, default=2, help="context-parallel size of the CP check")
    parser.add_argument("--skip-cp", action="store_true", help="no context-parallel check")
    cli = parser.parse_args(argv)
    return bench.run_device_script(run, cli, SCRIPT)


if __name__ == "__main__":
    sys.exit(main())
