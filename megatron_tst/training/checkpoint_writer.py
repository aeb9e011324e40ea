"""Checkpoint files written by the trainer process itself: no writer process can outlive it or hang it.

Megatron-Core's torch_dist save (`TorchDistSaveShardedStrategy.save` = `async_save(...).execute_sync()`) hands
its write buckets to `FileSystemWriterAsync`, which
- in megatron-core 0.16.1 forks one writer process per bucket (`write_preloaded_data_multiproc`) and waits on a
  `JoinableQueue` for them: a writer that dies (a SIGKILL, `_process_memory()` without psutil) leaves the
  trainer waiting forever, and a trainer killed with SIGKILL leaves its forked writers orphaned and blocked;
- in both 0.16.1 and 0.19.2 collects the results through a `multiprocessing.Manager().Queue()`: a spawned server
  process (and tens of seconds of start-up on a busy host) per trainer.
Megatron-LM saves synchronously unless `--async-save` is given; so does this trainer, and here the buckets are
written one after another in the calling thread with Megatron-Core's own `write_preloaded_data`, results going
through a `queue.Queue`. A failing write (full disk, missing psutil) comes back as Megatron-Core's wrapped worker
exception, which its save finalisation turns into a `CheckpointException` on the coordinator after the gather
every rank takes part in (so no rank is left in a collective).

Megatron-Core-version dependent (the multiprocess writer is 0.16.1's; the results queue is in both): this module
is the one place that bends it, and belongs in `megatron_tst/platform/mcore_compat.py` once that exists.
"""

from __future__ import annotations

import contextlib
import queue
from functools import partial
from typing import List

from megatron.core.dist_checkpointing.strategies import filesystem_async
from megatron.core.dist_checkpointing.strategies import torch as torch_strategy
from megatron.core.dist_checkpointing.strategies.filesystem_async import FileSystemWriterAsync


def write_buckets_in_process(transform_list: List, rank: int, write_buckets: List, global_results_queue) -> None:
    """Write each bucket with Megatron-Core's `FileSystemWriterAsync.write_preloaded_data`, in this thread.

    Puts {bucket index: [WriteResult]} (or the first bucket's exception) into `global_results_queue`, as
    `write_preloaded_data_multiproc` / `_multithread` do. Never raises for a write error.
    """
    results = {}
    for index, bucket in enumerate(write_buckets):
        local_results: queue.Queue = queue.Queue()
        count: queue.Queue = queue.Queue()
        count.put(index)
        try:
            output = FileSystemWriterAsync.write_preloaded_data(
                transform_list, local_proc_idx=index, write_bucket=bucket, results_queue=local_results,
                count_queue=count, use_fsync=True)
            if output is None:  # 0.16.1 (and 0.19.2 given queues) report through the queue
                output = local_results.get_nowait()
        except Exception as err:  # outside write_preloaded_data's own try (e.g. psutil missing)
            output = (index, err)
        _, value = output
        if isinstance(value, Exception):
            global_results_queue.put(value)
            return
        results[index] = value
    global_results_queue.put(results)


class InProcessFileSystemWriter(FileSystemWriterAsync):
    """Megatron-Core's torch_dist file writer, writing in the calling process (see module docstring)."""

    def get_save_function_and_args(self):
        function, stage, args = super().get_save_function_and_args()
        if function is None:
            return function, stage, args
        transform_list = [self.transforms] if hasattr(self, "transforms") else []
        return partial(write_buckets_in_process, transform_list), stage, args


@contextlib.contextmanager
def in_process_checkpoint_writes():
    """Within: Megatron-Core's torch_dist save strategy writes through `InProcessFileSystemWriter`.

    The strategy looks `FileSystemWriterAsync` up in its module at call time; the results queue is the
    writer module's cached one, created on first use unless already set.
    """
    if filesystem_async._results_queue is None:
        filesystem_async._results_queue = queue.Queue()
    original = torch_strategy.FileSystemWriterAsync
    torch_strategy.FileSystemWriterAsync = InProcessFileSystemWriter
    try:
        yield
    finally:
        torch_strategy.FileSystemWriterAsync = original
