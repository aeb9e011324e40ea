"""Every difference between the Megatron-Core releases we support, and every bend of its internals, in one place.

Supported: megatron-core 0.16.1 (the development pin) and 0.17-0.19 (NGC containers); CI runs the whole test
suite on 0.16.1 and 0.19.2. Each switch below is keyed on the release that introduced the change, so 0.17/0.18
take the matching branch. Everything else in megatron-tst calls Megatron-Core through public APIs, with
keywords only (0.19 inserted positional parameters in the middle of several signatures, e.g.
`parallel_state.initialize_model_parallel`'s `gtp_remat_size`).

| what                                        | versions         | call site (below `megatron/core/`)          | here                    | can go when                          |
|---------------------------------------------|------------------|---------------------------------------------|-------------------------|--------------------------------------|
| common state in `common.pt`; `save`/`load`  | <= 0.18          | dist_checkpointing/serialization.py         | `save_sharded`,         | 0.16-0.18 support ends: call         |
| take a `common_strategy`; 0.19 keeps it in  | 0.19: in shards, | (`save`, `load`, `load_common_state_dict`), | `load_sharded`,         | `dist_checkpointing.save/load`       |
| the shards (`common_state` object) and      | no strategies.   | strategies/common.py                        | `read_common_state`     | directly (keep the safe unpickling)  |
| drops `TorchCommonLoadStrategy`             | base             |                                             |                         |                                      |
| sharded objects (RNG state, common state)   | all              | torch's DefaultLoadPlanner.load_bytes via   | `_SafeLoadPlanner`,     | megatron-core loads sharded objects  |
| unpickled with `weights_only=False`         |                  | strategies/torch.py `MCoreLoadPlanner`      | `safe_sharded_objects`  | with `weights_only=True`             |
| classes of a newer release in a checkpoint  | 0.16 reading     | safe_globals.py allow-list                  | `safe_torch_load`       | never (forward compatibility)        |
| (0.19's enums inside `args`)                | 0.19's           |                                             |                         |                                      |
| distributed optimizer with torch Adam (no   | 0.16.1-0.19.2    | optimizer/distrib_optimizer.py: assert on a | `prepare_torch_adam_`,  | fixed upstream (apex/TE Adam, the    |
| apex/TE): fresh-optimizer assert, one `step`|                  | fresh optimizer, shared `step` tensor,      | `fully_reshardable_`,   | GPU default, never hits them)        |
| for all params, KeyError 'step'             |                  | KeyError in `_set_main_param_and_...`       | `untie_adam_steps`      |                                      |
| torch_dist file writes: 0.16 forks a writer | 0.16.1 (forks);  | dist_checkpointing/strategies/              | `save_sharded`,         | Megatron-Core writes in process when |
| per file (orphaned by kill -9; a dead one   | both (Manager    | filesystem_async.py (`write_preloaded_data_ | `in_process_checkpoint_ | a save is synchronous                |
| hangs the trainer); results via a spawned   | results queue)   | multiproc`, `_get_write_results_queue`)     | writes`                 |                                      |
| Manager queue                               |                  |                                             |                         |                                      |
| MoE balancing-loss gradient divided by      | < 0.19           | transformer/moe/router.py                   | `moe_aux_loss_grad_     | 0.16-0.18 support ends               |
| TP x CP under --calculate-per-token-loss    |                  |                                             | scales_with_tp`         |                                      |
| `NullTokenizer(n)`: n-1 ids + eod (<= 0.17) | 0.18 changed it  | tokenizers/text/libraries/null_tokenizer.py | `null_tokenizer`        | 0.16/0.17 support ends               |
| vs n ids, eod n-1 (>= 0.18)                 |                  |                                             |                         |                                      |
| `get_batch_on_this_cp_rank` gained a        | 0.18; 0.19       | utils.py                                    | `batch_on_this_cp_rank` | 0.16/0.17 support ends (keep passing |
| required `is_hybrid_cp`; without `cp_group` | (world group)    |                                             |                         | the CP group)                        |
| 0.19 slices over the *world* group          |                  |                                             |                         |                                      |
| kernel fusions: compiled softmax extension  | all              | transformer/dot_product_attention.py,       | `kernel_fusion_settings`| never (a property of the machine)    |
| and torch.compile'd bias fusions exist only |                  | fusions/, jit.py                            |                         |                                      |
| where they can run                          |                  |                                             |                         |                                      |
| MoE router-loss tracker: a dict in moe_utils| 0.19 moved it    | transformer/moe/moe_logging.py              | `reset_moe_metrics_     | 0.16-0.18 support ends               |
| (<= 0.18), `MoEMetricsTracker` (0.19)       |                  |                                             | tracker`                |                                      |
| `LanguageModelEmbedding.forward`, which     | μP scaling from  | models/common/embeddings/                   | `check_embedding_       | `superposed_embedding` mirrors μP    |
| `superposed_embedding` mirrors (0.16.1's);  | 0.17 (`use_mup`) | language_model_embedding.py                 | mirrored`               |                                      |
| 0.17+ scales by μP when `use_mup` is set    |                  |                                             |                         |                                      |

Also handled without a switch (both sides accept the same keywords): the GPT layer-spec functions (0.17 dropped
`moe_use_legacy_grouped_gemm`, 0.19 made them wrappers over `get_gpt_layer_*_submodules`; we pass only
`qk_layernorm`/`normalization`), `DistributedDataParallelConfig` (0.19 dropped `preserve_fp32_weights`; never
passed), `init_num_microbatches_calculator` (keywords; the rampup class was renamed in 0.18; no rampup is used).
`GPTModel` logs "GPTModel IS DEPRECATED" once per build on 0.19 (models/gpt/gpt_model.py:118); it keeps working
and its checkpoints are Megatron-LM's GPT checkpoints, which is what TST must stay interchangeable with.
"""

from __future__ import annotations

import argparse
import contextlib
import importlib.util
import inspect
import io
import os
import re
import shutil

import megatron.core
import torch
from megatron.core import dist_checkpointing
from megatron.core.dist_checkpointing.mapping import ShardedObject
from megatron.core.dist_checkpointing.strategies import torch as torch_strategy
from packaging.version import Version

MCORE_VERSION = Version(Version(megatron.core.__version__.split("+")[0]).base_version)
# 0.19 writes the common state inside the shards and has no common strategies.
COMMON_STATE_IN_SHARDS = MCORE_VERSION >= Version("0.19")
COMMON_STATE_FNAME = "common.pt"  # megatron-core <= 0.18 (strategies/common.py)


# --------------------------------------------------------------------------------------------------------------
# safe unpickling of checkpoint objects


class UnknownMegatronObject:
    """Stand-in for a megatron class a checkpoint names but this megatron-core version lacks (e.g. a 0.19 enum)."""

    def __init__(self, *args, **kwargs):
        self.args, self.kwargs = args, kwargs

    def __setstate__(self, state):
        self.state = state

    def __repr__(self):
        return f"UnknownMegatronObject{self.args}"


_UNSUPPORTED_GLOBAL = re.compile(r"GLOBAL ([\w.]+)")


def safe_torch_load(source, map_location="cpu"):
    """`torch.load(weights_only=True)` with megatron-core's allow-list; unknown megatron classes become stand-ins.

    Args:
        source: a path or a binary file object.
    Returns: the unpickled object.
    Raises: `pickle.UnpicklingError` for any global outside the allow-list that is not a `megatron.*` class
        (never executed).
    """
    from megatron.core.safe_globals import register_safe_globals

    register_safe_globals()
    torch.serialization.add_safe_globals([argparse.Namespace, UnknownMegatronObject])
    if hasattr(source, "read"):
        source.seek(0)
        data = source.read()
    else:
        with open(source, "rb") as f:
            data = f.read()
    for _ in range(64):
        try:
            return torch.load(io.BytesIO(data), map_location=map_location, weights_only=True)
        except Exception as err:  # pickle.UnpicklingError with torch's message
            match = _UNSUPPORTED_GLOBAL.search(str(err))
            if not match or not match.group(1).startswith("megatron."):
                raise
            torch.serialization.add_safe_globals([(UnknownMegatronObject, match.group(1))])
    raise RuntimeError("too many unknown classes in a checkpoint object")


class _SafeLoadPlanner(torch_strategy.MCoreLoadPlanner):
    """Megatron's load planner, unpickling sharded objects with `safe_torch_load` instead of weights_only=False."""

    def load_bytes(self, read_item, value):
        obj = safe_torch_load(value)
        if self.flatten_state_dict:
            from torch.distributed.checkpoint._nested_dict import set_element

            set_element(self.original_state_dict, self.mappings[read_item.dest_index.fqn], obj)
        else:
            self.state_dict[read_item.dest_index.fqn] = obj


@contextlib.contextmanager
def safe_sharded_objects():
    """Within: megatron's torch_dist loader uses `_SafeLoadPlanner` (strategies/torch.py looks the planner class
    up at call time, in every supported release)."""
    original = torch_strategy.MCoreLoadPlanner
    torch_strategy.MCoreLoadPlanner = _SafeLoadPlanner
    try:
        yield
    finally:
        torch_strategy.MCoreLoadPlanner = original


def read_common_state(checkpoint_dir: str) -> dict:
    """The non-sharded part of a checkpoint (args, iteration, scheduler, ...) in either layout, unpickled safely.

    Reads `common.pt` (written by megatron-core <= 0.18) or the `common_state` sharded object (0.19), whichever
    the checkpoint has, on any supported release. Cheap; any rank, no process group needed.
    """
    path = os.path.join(checkpoint_dir, COMMON_STATE_FNAME)
    if os.path.exists(path):
        return safe_torch_load(path)
    import torch.distributed.checkpoint as dcp

    key = ShardedObject("common_state", None, (1,), (0,)).unique_key
    holder = {key: io.BytesIO()}
    dcp.load(holder, storage_reader=dcp.FileSystemReader(checkpoint_dir), planner=_SafeLoadPlanner(),
             no_dist=True)
    loaded = holder[key]
    if isinstance(loaded, io.BytesIO):
        loaded = safe_torch_load(loaded)
    return loaded[0] if isinstance(loaded, list) else loaded


# --------------------------------------------------------------------------------------------------------------
# dist_checkpointing save / load


def save_sharded(sharded_state_dict: dict, checkpoint_dir: str, *, content_metadata: dict) -> None:
    """`dist_checkpointing.save` in the torch_dist format, in the layout the running release writes
    (`common.pt` on <= 0.18, the common state inside the shards on 0.19), synchronously, its files written by
    this process (`in_process_checkpoint_writes`). A failed write raises on every rank (Megatron-Core's
    `CheckpointException`, a BaseException, on the coordinator)."""
    strategy = torch_strategy.TorchDistSaveShardedStrategy(backend="torch_dist", version=1)
    with in_process_checkpoint_writes():
        dist_checkpointing.save(sharded_state_dict, checkpoint_dir, sharded_strategy=strategy,
                                validate_access_integrity=True, content_metadata=content_metadata)


# Checkpoint files written by the calling process: no writer process can outlive or hang the trainer.
#
# Megatron-Core's torch_dist save (`TorchDistSaveShardedStrategy.save` = `async_save(...).execute_sync()`) hands
# its write buckets to `FileSystemWriterAsync`, which
# - in 0.16.1 forks one writer process per bucket (`write_preloaded_data_multiproc`) and waits on a
#   `JoinableQueue` for them: a writer that dies (SIGKILL; `_process_memory()` without psutil, outside the
#   writer's try) leaves the trainer waiting forever, and a trainer killed with SIGKILL leaves its forked writers
#   orphaned and blocked (1 kill in 8 in issue 13's trial);
# - in 0.16.1 and 0.19.2 collects results through a `multiprocessing.Manager().Queue()`: a spawned server process
#   per trainer (and tens of seconds of start-up on a busy host); 0.19 writes with threads.
# Megatron-LM saves synchronously unless `--async-save` (ignored here). So the buckets are written one after
# another in the calling thread with Megatron-Core's own `FileSystemWriterAsync.write_preloaded_data`, results
# through a `queue.Queue`; a failing write comes back as the writer's exception, which Megatron-Core's finalisation
# (a gather every rank takes part in) raises on every rank.


def write_buckets_in_process(transform_list: list, rank: int, write_buckets: list, global_results_queue) -> None:
    """Write each bucket with `FileSystemWriterAsync.write_preloaded_data`, in this thread.

    Puts {bucket index: [WriteResult]} (or the first failing bucket's exception) into `global_results_queue`,
    as `write_preloaded_data_multiproc` (0.16) / `_multithread` (0.19) do. Never raises for a write error.
    """
    import queue

    from megatron.core.dist_checkpointing.strategies.filesystem_async import FileSystemWriterAsync

    results = {}
    for index, bucket in enumerate(write_buckets):
        local_results, count = queue.Queue(), queue.Queue()
        count.put(index)
        try:
            output = FileSystemWriterAsync.write_preloaded_data(
                transform_list, local_proc_idx=index, write_bucket=bucket, results_queue=local_results,
                count_queue=count, use_fsync=True)
            if output is None:  # 0.16.1 reports through the queue only (0.19 also returns it)
                output = local_results.get_nowait()
        except Exception as err:  # raised outside write_preloaded_data's own try (e.g. psutil missing)
            output = (index, err)
        _, value = output
        if isinstance(value, Exception):
            global_results_queue.put(value)
            return
        results[index] = value
    global_results_queue.put(results)


@contextlib.contextmanager
def in_process_checkpoint_writes():
    """Within: Megatron-Core's torch_dist save strategy writes its files in the calling process (see above).

    The strategy looks `FileSystemWriterAsync` up at call time (see below); the results queue is the writer
    module's cached one (`_results_queue`, created on first use unless already set: set it to a `queue.Queue`).
    """
    import queue
    from functools import partial

    from megatron.core.dist_checkpointing.strategies import filesystem_async

    class InProcessFileSystemWriter(filesystem_async.FileSystemWriterAsync):
        def get_save_function_and_args(self):
            function, stage, args = super().get_save_function_and_args()
            if function is None:
                return function, stage, args
            transform_list = [self.transforms] if hasattr(self, "transforms") else []
            return partial(write_buckets_in_process, transform_list), stage, args

    if filesystem_async._results_queue is None:
        filesystem_async._results_queue = queue.Queue()
    # 0.16 names the writer class in strategies/torch.py (imported at module load); 0.19 imports it from
    # filesystem_async at each save (`_import_mcore_async`)
    modules = [m for m in (torch_strategy, filesystem_async) if hasattr(m, "FileSystemWriterAsync")]
    originals = [m.FileSystemWriterAsync for m in modules]
    for module in modules:
        module.FileSystemWriterAsync = InProcessFileSystemWriter
    try:
        yield
    finally:
        for module, original in zip(modules, originals):
            module.FileSystemWriterAsync = original


def load_sharded(sharded_state_dict: dict, checkpoint_dir: str) -> dict:
    """`dist_checkpointing.load` of a checkpoint in either common-state layout, every object unpickled safely.

    Returns the loaded state dict (common state merged in), as `dist_checkpointing.load` does.
    """
    strategy = torch_strategy.TorchDistLoadShardedStrategy()
    with safe_sharded_objects():
        if not COMMON_STATE_IN_SHARDS:
            return dist_checkpointing.load(sharded_state_dict, checkpoint_dir, sharded_strategy=strategy,
                                           common_strategy=_CommonStateLoadStrategy(),
                                           validate_access_integrity=True)
        # 0.19 reads the common state itself (serialization.load_common_state_dict, looked up at call time)
        from megatron.core.dist_checkpointing import serialization

        original = serialization.load_common_state_dict
        serialization.load_common_state_dict = read_common_state
        try:
            return dist_checkpointing.load(sharded_state_dict, checkpoint_dir, sharded_strategy=strategy,
                                           validate_access_integrity=True)
        finally:
            serialization.load_common_state_dict = original


if not COMMON_STATE_IN_SHARDS:
    from megatron.core.dist_checkpointing.strategies.common import TorchCommonLoadStrategy

    class _CommonStateLoadStrategy(TorchCommonLoadStrategy):
        """0.16-0.18's common strategy, reading either layout safely (`read_common_state`)."""

        def load_common(self, checkpoint_dir):
            return read_common_state(str(checkpoint_dir))


# --------------------------------------------------------------------------------------------------------------
# the distributed optimizer with torch's Adam (no apex / Transformer Engine): upstream bugs, 0.16.1 to 0.19.2


def _torch_adam_distributed_optimizers(optimizer):
    from megatron.core.optimizer.distrib_optimizer import HAVE_APEX_OR_TE, DistributedOptimizer

    if HAVE_APEX_OR_TE:
        return []
    return [opt for opt in getattr(optimizer, "chained_optimizers", [optimizer])
            if isinstance(opt, DistributedOptimizer)]


def prepare_torch_adam_distributed_optimizer(optimizer) -> None:
    """`DistributedOptimizer.state_dict()` asserts on a torch Adam without state (distrib_optimizer.py, 0.16.1:642),
    so it cannot describe what to load into a fresh optimizer. Give it state first, as megatron-core does for
    other optimizers (`_init_optimizer_states_with_dummy_values`); everything it sets is overwritten by the load."""
    for opt in _torch_adam_distributed_optimizers(optimizer):
        if len(opt.optimizer.state) == 0:
            with torch.no_grad():  # the main params are views of the model's leaf parameters
                opt._init_optimizer_states_with_dummy_values()


@contextlib.contextmanager
def fully_reshardable_step_fix(optimizer):
    """Loading 'fully_reshardable' state copies every key of a parameter's Adam state from the checkpoint,
    'step' included, but the checkpoint keeps 'step' in the param groups (distrib_optimizer.py, 0.16.1:2100 skips
    it, :940 then raises KeyError). While loading, hand each parameter its current step as the source."""
    patched = _torch_adam_distributed_optimizers(optimizer)
    for opt in patched:
        original = opt._set_main_param_and_optimizer_states

        def set_states(model_param, tensors, opt=opt, original=original):
            if "step" not in tensors:
                group_index, group_order = opt.model_param_group_index_map[model_param]
                main_param = opt.optimizer.param_groups[group_index]["params"][group_order]
                step = opt.optimizer.state[main_param].get("step")
                if step is not None:
                    tensors = {**tensors, "step": step}
            original(model_param, tensors)

        opt._set_main_param_and_optimizer_states = set_states
    try:
        yield
    finally:
        for opt in patched:
            del opt._set_main_param_and_optimizer_states  # back to the class's method


def untie_adam_steps(optimizer) -> None:
    """Give every parameter its own, correct Adam `step` after loading.

    `DistributedOptimizer.load_state_dict` gives all parameters one shared `step` tensor
    (distrib_optimizer.py, 0.16.1:940-947), which torch Adam would advance once per parameter per iteration, and
    the dp_reshardable parameter-state load then overwrites it with the placeholder state's step. The
    checkpoint's step is in the param groups (0.16.1:670): copy it into each parameter's state.
    """
    for opt in _torch_adam_distributed_optimizers(optimizer):
        for group in opt.optimizer.param_groups:
            for param in group["params"]:
                state = opt.optimizer.state.get(param)
                if state is not None and "step" in state:
                    step = group.get("step", state["step"])
                    state["step"] = torch.tensor(float(step), dtype=torch.float32)


# --------------------------------------------------------------------------------------------------------------
# tokenizer, batches, kernels, embedding


def null_tokenizer(cls, vocab_size: int):
    """Megatron-Core's `NullTokenizer` (`cls`) with `vocab_size` ids, the last one the end-of-document id.

    0.18 changed the constructor's meaning (commit c9dfe34, "Enable NullTokenizer for pretraining"): `NullTokenizer(n)`
    has n ids with eod n-1; before, it had n + 1 ids with eod n.
    Raises: RuntimeError if the result does not have that shape (an unknown release).
    """
    if "eod_id" in inspect.signature(cls.__init__).parameters:  # >= 0.18
        backend = cls(vocab_size)
    else:
        backend = cls(vocab_size - 1)
    if backend.vocab_size != vocab_size or backend.eod != vocab_size - 1:
        raise RuntimeError(f"megatron-core {MCORE_VERSION}'s NullTokenizer gave vocab_size={backend.vocab_size}, "
                           f"eod={backend.eod} for --vocab-size {vocab_size}; expected {vocab_size} and {vocab_size - 1}")
    return backend


def batch_on_this_cp_rank(batch: dict, cp_group) -> dict:
    """Megatron's `get_batch_on_this_cp_rank` (utils.py): the micro-batch's sequence slices of this CP rank.

    0.18 added a required `is_hybrid_cp` argument (hybrid CP is not used here: False), and from 0.19 a missing
    `cp_group` means the *world* group (`torch.distributed.get_world_size(None)`), which would slice every batch
    across data-parallel ranks: the CP group is always passed.
    """
    from megatron.core.utils import get_batch_on_this_cp_rank

    if "is_hybrid_cp" in inspect.signature(get_batch_on_this_cp_rank).parameters:
        return get_batch_on_this_cp_rank(batch, is_hybrid_cp=False, cp_group=cp_group)
    return get_batch_on_this_cp_rank(batch, cp_group=cp_group)


def kernel_fusion_settings(*, swiglu: bool, add_bias_linear: bool) -> dict:
    """TransformerConfig fusion fields: each fused kernel where it can run, else the unfused path.

    Megatron-LM's fusion flags are accepted and ignored; this decides instead. The fused softmax is a compiled
    CUDA extension (without it Megatron's local attention fails importing it); the bias fusions are
    torch.compile'd (megatron.core.jit), whose Triton launcher needs CUDA and a C compiler.
    """
    on_gpu = torch.cuda.is_available()
    compiler = bool(shutil.which("cc") or shutil.which("gcc"))
    return dict(
        masked_softmax_fusion=on_gpu and importlib.util.find_spec("scaled_masked_softmax_cuda") is not None,
        bias_activation_fusion=on_gpu and compiler and (swiglu or add_bias_linear),
        bias_dropout_fusion=on_gpu and compiler, apply_rope_fusion=False, persist_layer_norm=False,
        gradient_accumulation_fusion=False,
    )


def check_embedding_mirrored(embedding) -> None:
    """Refuse embedding features that `superposition.superposed_embedding` does not mirror.

    `superposed_embedding` repeats `LanguageModelEmbedding.forward` (megatron-core 0.16.1) with bag means in place
    of token embeddings: word lookup, position embeddings, fp32 residual, sequence-parallel scatter, dropout.
    0.17 added μP input scaling (`config.use_mup` with `mup_embedding_mult`); it is not mirrored yet.

    Raises: ValueError naming the setting.
    """
    config = embedding.config
    if getattr(config, "use_mup", False) and getattr(config, "mup_embedding_mult", 1.0) != 1.0:
        raise ValueError("TransformerConfig.use_mup (μP embedding scaling, megatron-core >= 0.17) is not supported "
                         "with token superposition yet: train without --use-mup, or with --tst-* flags removed")
    if getattr(embedding, "tokentype_embeddings", None) is not None:
        raise ValueError("token-type embeddings are not supported with token superposition")


def reset_moe_metrics_tracker() -> None:
    """Forget megatron-core's process-global MoE router-loss tracker (its per-layer buffers are sized by the first
    model that records into it; a process that builds another model needs a fresh one).

    0.19 moved it to `transformer/moe/moe_logging.py` (`MoEMetricsTracker`, whose `clear()` only zeroes the
    buffers); before, a dict from `moe_utils.get_moe_layer_wise_logging_tracker()`.
    """
    try:
        from megatron.core.transformer.moe.moe_logging import destroy_moe_metrics_tracker
    except ImportError:  # <= 0.18
        from megatron.core.transformer.moe.moe_utils import get_moe_layer_wise_logging_tracker

        get_moe_layer_wise_logging_tracker().clear()
        return
    destroy_moe_metrics_tracker()


# --------------------------------------------------------------------------------------------------------------
# MoE balancing losses under --calculate-per-token-loss


def moe_aux_loss_grad_scales_with_tp() -> bool:
    """Whether this release divides the MoE balancing-loss (and z-loss) gradient by TP x CP under
    --calculate-per-token-loss: before 0.19 the router scales it by its local token count only, while
    finalize_model_grads divides by the global count, which counts each sequence shard TP x CP times
    (transformer/moe/router.py `attach_and_log_load_balancing_loss`, `apply_z_loss`; 0.19 multiplies by
    `tp_cp_group.size()`). The trainer refuses the combination where it does (arguments.py)."""
    return MCORE_VERSION < Version("0.19")
