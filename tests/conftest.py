"""Shared fixtures. Megatron-Core runs for real: gloo process groups, no mocks."""

import os

import pytest

# Subprocesses (the trainer, tools/ scripts) import megatron_tst from this checkout too, not from the checkout the
# venv's editable install points at (another checkout or git worktree sharing the venv).
_ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
os.environ["PYTHONPATH"] = os.pathsep.join(
    [_ROOT] + [p for p in os.environ.get("PYTHONPATH", "").split(os.pathsep) if p])

# pytest.ini's markers; each test carries exactly one (module-level `pytestmark` or one decorator per test)
KINDS = ("unit", "parallel", "e2e", "slurm")


def pytest_collection_modifyitems(items):
    wrong = []
    for item in items:
        kinds = sorted({m.name for m in item.iter_markers() if m.name in KINDS})
        if len(kinds) != 1:
            wrong.append(f"{item.nodeid}: {', '.join(kinds) or 'no kind'}")
    if wrong:
        raise pytest.UsageError(f"tests need exactly one of the marks {', '.join(KINDS)}:\n  " + "\n  ".join(wrong))


@pytest.fixture(scope="session")
def megatron_single_process():
    """This pytest process as a 1-rank gloo world with Megatron's parallel state (TP=PP=1)."""
    from megatron_tst.testing.distributed import Layout, free_port, init_worker, shutdown_worker

    init_worker(rank=0, world_size=1, port=free_port(), layout=Layout())
    yield
    shutdown_worker()


@pytest.fixture(autouse=True)
def fresh_megatron_globals():
    """Each test starts without the process-global Megatron state an earlier in-process test may have left.

    megatron-core keeps, per process (one model per process in a training run): the MoE router-loss tracker
    (sized for one model's layers), the MoE aux-loss backward scale (a tensor whose shape its first setter
    fixes; a later `set_loss_scale` copies into it), and the micro-batch calculator. Parallel state is
    owned by the `megatron_single_process` fixture, which re-initialises it.
    """
    from megatron.core.num_microbatches_calculator import destroy_num_microbatches_calculator
    from megatron.core.transformer.moe import moe_utils

    from megatron_tst.platform.mcore_compat import reset_moe_metrics_tracker

    def reset():
        reset_moe_metrics_tracker()
        moe_utils.MoEAuxLossAutoScaler.main_loss_backward_scale = None
        destroy_num_microbatches_calculator()

    reset()
    yield
    reset()
