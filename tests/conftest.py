"""Shared fixtures. Megatron-Core runs for real: gloo process groups, no mocks."""

import os
import sys

import pytest

sys.path.insert(0, os.path.dirname(__file__))  # tests/reference.py and helpers, in spawned workers too


@pytest.fixture(scope="session")
def megatron_single_process():
    """This pytest process as a 1-rank gloo world with Megatron's parallel state (TP=PP=1)."""
    from megatron_tst.testing.distributed import Layout, free_port, init_worker, shutdown_worker

    init_worker(rank=0, world_size=1, port=free_port(), layout=Layout())
    yield
    shutdown_worker()


@pytest.fixture(autouse=True)
def fresh_moe_loss_tracker():
    """megatron-core keeps MoE router losses in a process-global tracker sized for one model's layers (one model
    per process in a training run); tests build many models in one process, so each starts with it empty."""
    from megatron.core.transformer.moe.moe_utils import get_moe_layer_wise_logging_tracker

    get_moe_layer_wise_logging_tracker().clear()
    yield
