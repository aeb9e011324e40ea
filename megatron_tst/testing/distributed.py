"""Run a function on N gloo processes with a Megatron parallel layout (tests and benchmarks).

    results = run_distributed(check_fn, world_size=2, layout=Layout(tp=2), args=(...))

Each worker is a fresh spawned process: it picks up the port chosen by the parent, initialises
torch.distributed (gloo), applies `megatron_tst.platform.cpu`, initialises `parallel_state` with the layout,
seeds every RNG, runs `fn(*args, **kwargs)`, and sends back its picklable return value. A failure in any
worker is re-raised in the parent with that worker's traceback; every process is torn down either way.

Spawning costs seconds (torch + megatron import), so group several checks into one `fn`.
"""

from __future__ import annotations

import os
import queue
import traceback
from typing import Any, Callable, Optional, Sequence

import torch.multiprocessing as mp

from megatron_tst.parallel import Layout, free_port, initialize_parallel_state  # noqa: F401 (re-exported)


class DistributedFailure(RuntimeError):
    """A worker raised; the message carries its traceback."""


def init_worker(rank: int, world_size: int, port: int, layout: Optional[Layout], seed: int = 1234,
                num_threads: Optional[int] = None) -> None:
    """Initialise torch.distributed (gloo) + megatron parallel state in this process.

    `layout=None`: torch.distributed only, with RANK/WORLD_SIZE/LOCAL_RANK in os.environ, for Megatron-LM's
    `initialize_megatron` (`megatron_tst.testing.megatron_lm.run_pretrain`), which sets up the parallel state itself.
    """
    import torch
    import torch.distributed as dist

    from megatron_tst.platform import cpu

    # Otherwise no RANK/WORLD_SIZE/MASTER_* in os.environ: the process group is set up explicitly, and subprocesses
    # (e.g. a trainer launched by a test) must not mistake this process's group for theirs.
    if layout is None:
        os.environ.update(RANK=str(rank), WORLD_SIZE=str(world_size), LOCAL_RANK=str(rank),
                          MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port), CUDA_DEVICE_MAX_CONNECTIONS="1")
    if num_threads:
        torch.set_num_threads(num_threads)
    cpu.enable()
    # Always gloo, even where CUDA exists: these are CPU test and benchmark helpers, and every rank would share
    # one GPU anyway. GPU runs go through Megatron-LM's `initialize_megatron`, which sets each rank's device.
    dist.init_process_group(
        backend="gloo",
        init_method=f"tcp://127.0.0.1:{port}",
        rank=rank,
        world_size=world_size,
    )
    if layout is not None:
        relayout(layout, seed)


def relayout(layout: Layout, seed: int = 1234) -> None:
    """(Re-)initialise megatron's parallel state with `layout` in this worker, and seed every RNG."""
    import torch
    from megatron.core.tensor_parallel import model_parallel_cuda_manual_seed

    initialize_parallel_state(layout)
    torch.manual_seed(seed)
    model_parallel_cuda_manual_seed(seed)


def shutdown_worker() -> None:
    import torch.distributed as dist
    from megatron.core import parallel_state

    if parallel_state.model_parallel_is_initialized():
        parallel_state.destroy_model_parallel()
    if dist.is_initialized():
        dist.destroy_process_group()


def _worker(rank, world_size, port, layout, seed, fn, args, kwargs, results):
    try:
        init_worker(rank, world_size, port, layout, seed,
                    num_threads=max(1, (os.cpu_count() or 1) // world_size))
        value = fn(*args, **kwargs)
        results.put((rank, True, value))
    except BaseException:  # report everything, including SystemExit from deep inside megatron
        results.put((rank, False, traceback.format_exc()))
    finally:
        try:
            shutdown_worker()
        except Exception:
            pass


def run_distributed(
    fn: Callable[..., Any],
    world_size: int,
    layout: Optional[Layout] = Layout(),
    args: Sequence[Any] = (),
    kwargs: Optional[dict] = None,
    seed: int = 1234,
    timeout_s: float = 600.0,
) -> list:
    """Run `fn(*args, **kwargs)` on `world_size` gloo ranks; return the per-rank results in rank order.

    `fn` must be importable by name (a module-level function) and its return value picklable. `layout=None`:
    torch.distributed only, for Megatron-LM's own initialisation (`init_worker`).
    Raises DistributedFailure with the first failing worker's traceback, or on timeout.
    """
    if layout is not None and world_size % layout.model_parallel_size():
        raise ValueError(f"world size {world_size} is not a multiple of tp*pp*cp of {layout}")
    ctx = mp.get_context("spawn")
    results = ctx.Queue()
    port = free_port()
    procs = [
        ctx.Process(
            target=_worker,
            args=(rank, world_size, port, layout, seed, fn, tuple(args), dict(kwargs or {}), results),
            daemon=False,
        )
        for rank in range(world_size)
    ]
    for proc in procs:
        proc.start()
    outputs: dict[int, Any] = {}
    failure = None
    try:
        while len(outputs) < world_size and failure is None:
            try:
                rank, ok, value = results.get(timeout=timeout_s)
            except queue.Empty:
                failure = f"timed out after {timeout_s:.0f} s waiting for ranks " + str(
                    sorted(set(range(world_size)) - set(outputs)))
                break
            if ok:
                outputs[rank] = value
            else:
                failure = f"rank {rank} failed:\n{value}"
    finally:
        for proc in procs:
            proc.join(timeout=5 if failure is None else 1)
        for proc in procs:
            if proc.is_alive():
                proc.kill()
                proc.join()
    if failure is not None:
        raise DistributedFailure(failure)
    return [outputs[rank] for rank in range(world_size)]
