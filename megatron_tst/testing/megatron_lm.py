"""Megatron-LM's `pretrain` with TST's providers inside an existing process (tests and benchmarks).

    run_distributed(worker, world_size=2, layout=None)   # megatron_tst.testing.distributed: torch.distributed only
    # in `worker`:
    run_pretrain(["--num-layers", "2", ..., "--tst-bag-size", "4", ...])

`run_pretrain` is `megatron_tst.pretrain.main` in this process: the same expansion of --recipe/--config, the same
bends, Megatron-LM's own parsing, validation, model/optimizer/scheduler set-up, checkpoint load and save, data
loaders, train loop and evaluations. torch.distributed may already be initialised (Megatron-LM then keeps it); the
parallel state and Megatron-LM's global state are torn down afterwards, so that the next run (another layout, a
resume) starts clean. An exit Megatron-LM takes with `sys.exit` (--exit-interval, --exit-duration-in-mins, a
signal) returns its status instead of ending the process.
"""

from __future__ import annotations

import json
from typing import List, Optional, Sequence


def run_pretrain(argv: Sequence[str], *, stock_model: bool = False) -> int:
    """Run `megatron_tst.pretrain.main(argv)` in this process; returns the exit status (0 when training ended).
    `stock_model`: Megatron-Core's own GPTModel instead of TST's (`loop.providers.stock_model_provider`)."""
    from megatron_tst import pretrain
    from megatron_tst.loop import providers

    teardown()
    try:
        return pretrain.main(list(argv), model_provider=providers.stock_model_provider if stock_model else None)
    except SystemExit as exit_:
        return 0 if exit_.code is None else exit_.code if isinstance(exit_.code, int) else 1
    finally:
        teardown()


def teardown() -> None:
    """Forget Megatron-LM's and Megatron-Core's process-global state (args, timers, micro-batch calculator, parallel
    state, rerun state machine, MoE trackers, the TST run); torch.distributed stays up."""
    from megatron.core.transformer.moe import moe_utils
    from megatron.training.training import destroy_global_state

    from megatron_tst.loop import run as tst_run
    from megatron_tst.platform.mcore_compat import reset_moe_metrics_tracker

    destroy_global_state()
    reset_moe_metrics_tracker()
    moe_utils.MoEAuxLossAutoScaler.main_loss_backward_scale = None
    tst_run._current = None


def read_metrics(path: str, kind: Optional[str] = "train") -> List[dict]:
    """The records of a --metrics-jsonl file (of one `kind`: "train", "eval", "run"; None: all)."""
    with open(path) as f:
        records = [json.loads(line) for line in f if line.strip()]
    return [r for r in records if kind is None or r.get("kind") == kind]
