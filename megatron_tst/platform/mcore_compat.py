"""Every difference between the Megatron-Core releases we support, and every bend of Megatron-Core's internals.

Supported: megatron-core 0.17, 0.18 and 0.19 (what NGC containers ship; Python 3.12 there), through the wheel's
`megatron.training` or a Megatron-LM checkout on PYTHONPATH; CI runs the whole suite on 0.17.1 and 0.19.2 (their
cp311 wheels run on this machine's Python 3.11). Each switch below is keyed on what the release has, so 0.18 takes
the matching branch. Everything else in megatron-tst calls Megatron through public APIs, with keywords only.
Bends of Megatron-LM's loop are in `platform/megatron_lm.py`, CPU stand-ins in `platform/cpu.py`.

| what                                        | versions          | call site (below `megatron/`)               | here                    | can go when                          |
|---------------------------------------------|-------------------|---------------------------------------------|-------------------------|--------------------------------------|
| `pretrain()` parses the command line itself | 0.17              | training/training.py `pretrain`,            | `pretrain`,             | 0.17 support ends                    |
| and takes `extra_args_provider`; 0.18 takes | 0.18: model_      | training/arguments.py                       | `initialize`            |                                      |
| a config container built from               | provider 3rd;     | `parse_and_validate_args`,                  |                         |                                      |
| `parse_and_validate_args`' args; 0.19 moves | 0.19: keyword     | training/argument_utils.py                  |                         |                                      |
| `model_provider` to a keyword               |                   | `pretrain_cfg_container_from_args`          |                         |                                      |
| sharded objects (RNG state, common state)   | all               | torch's DefaultLoadPlanner.load_bytes via   | `_SafeLoadPlanner`,     | megatron-core loads sharded objects  |
| unpickled with `weights_only=False`         |                   | core/dist_checkpointing/strategies/torch.py | `install_safe_sharded_  | with `weights_only=True`             |
|                                             |                   | `MCoreLoadPlanner`                          | object_loading`         |                                      |
| torch's `.metadata` read by a plain         | all (torch 2.x)   | torch/distributed/checkpoint/filesystem.py  | `install_safe_metadata_ | torch reads `.metadata` with an      |
| `pickle.load` (torch's reader, which        |                   | `FileSystemReader.read_metadata`            | reading`, `load_        | allow-list                           |
| megatron-core's loaders use)                |                   |                                             | checkpoint_metadata`    |                                      |
| common state in `common.pt` (<= 0.18) or in | 0.19: in shards   | core/dist_checkpointing/serialization.py    | `read_common_state`     | never (reads both layouts)           |
| the shards (`common_state` object, 0.19);   | (0.19 reads both; | `load_common` (called by `load` and         | `install_common_state_  | 0.18 support ends                    |
| Megatron-LM <= 0.18 reads `common.pt` only  | <= 0.18 common.pt)| `load_common_state_dict`)                   | fallback`               |                                      |
| classes of a newer release in a checkpoint  | older reading     | core/safe_globals.py allow-list             | `safe_torch_load`       | never (forward compatibility)        |
| (0.19's enums inside `args`)                | newer             |                                             |                         |                                      |
| distributed optimizer with torch Adam (no   | 0.17-0.19         | core/optimizer/distrib_optimizer.py: assert | `prepare_torch_adam_`,  | fixed upstream (apex/TE Adam, the    |
| apex/TE): fresh-optimizer assert, one `step`|                   | on a fresh optimizer, shared `step` tensor, | `fully_reshardable_`,   | GPU default, never hits them)        |
| for all params, KeyError 'step'             |                   | KeyError in `_set_main_param_and_...`       | `untie_adam_steps`      |                                      |
| `get_batch_on_this_cp_rank` gained a        | 0.18; 0.19        | core/utils.py                               | `batch_on_this_cp_rank` | 0.17 support ends (keep passing the  |
| required `is_hybrid_cp`; without `cp_group` | (world group)     |                                             |                         | CP group)                            |
| 0.19 slices over the *world* group          |                   |                                             |                         |                                      |
| MoE router-loss tracker: a dict in moe_utils| 0.19 moved it     | core/transformer/moe/moe_logging.py         | `reset_moe_metrics_     | 0.17/0.18 support ends               |
| (<= 0.18), `MoEMetricsTracker` (0.19)       |                   |                                             | tracker`                |                                      |
| `LanguageModelEmbedding.forward`, which     | μP scaling from   | core/models/common/embeddings/              | `check_embedding_       | `superposed_embedding` mirrors μP    |
| `superposed_embedding` mirrors; 0.17+ scales| 0.17 (`use_mup`)  | language_model_embedding.py                 | mirrored`               |                                      |
| by μP when `use_mup` is set                 |                   |                                             |                         |                                      |
| GPT layer-spec functions' keywords (0.18    | 0.17-0.19         | core/models/gpt/gpt_layer_specs.py          | `layer_spec_kwargs`     | never (each release's own keywords)  |
| added `use_grouped_gemm_for_dense_mlp`)     |                   |                                             |                         |                                      |

`GPTModel` logs "GPTModel IS DEPRECATED" once per build on 0.19 (core/models/gpt/gpt_model.py); it keeps working
and its checkpoints are Megatron-LM's GPT checkpoints, which is what TST must stay interchangeable with.
"""

from __future__ import annotations

import argparse
import contextlib
import inspect
import io
import os
import pickle
import re
import types
from typing import Optional

import megatron.core
import torch
from megatron.core.dist_checkpointing.mapping import ShardedObject
from megatron.core.dist_checkpointing.strategies import torch as torch_strategy
from packaging.version import Version

MCORE_VERSION = Version(Version(megatron.core.__version__.split("+")[0]).base_version)
# 0.19 writes the common state inside the shards and has no common strategies.
COMMON_STATE_IN_SHARDS = MCORE_VERSION >= Version("0.19")
COMMON_STATE_FNAME = "common.pt"  # megatron-core <= 0.18 (strategies/common.py)
OLDEST_SUPPORTED = Version("0.17")


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


class RefusedCheckpointObject(pickle.UnpicklingError):
    """A checkpoint file names a class outside the allow-list: `path` and `name` (module.qualname), nothing run."""

    def __init__(self, path: str, name: str):
        super().__init__(f"{path} names {name}, which a checkpoint never needs: refused without running it "
                         "(a damaged or hostile file; checkpoints are data)")
        self.path, self.name = path, name

    def __reduce__(self):  # torch's checkpoint loader gathers exceptions across ranks as pickles
        return type(self), (self.path, self.name)


_UNSUPPORTED_GLOBAL = re.compile(r"GLOBAL ([\w.]+)")


def safe_torch_load(source, map_location="cpu", *, name: Optional[str] = None):
    """`torch.load(weights_only=True)` with megatron-core's allow-list; unknown megatron classes become stand-ins.

    Args:
        source: a path or a binary file object.
        name: what to call the source in errors (default: the path).
    Returns: the unpickled object.
    Raises: `RefusedCheckpointObject` (a `pickle.UnpicklingError`) naming the source and the global it would have
        had to load, for any global outside the allow-list that is not a `megatron.*` class (never executed);
        `pickle.UnpicklingError` or `EOFError` for a damaged file.
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
    name = name or (source if isinstance(source, (str, os.PathLike)) else "a checkpoint object")
    for _ in range(64):
        try:
            return torch.load(io.BytesIO(data), map_location=map_location, weights_only=True)
        except pickle.UnpicklingError as err:  # torch's message names the refused global
            match = _UNSUPPORTED_GLOBAL.search(str(err))
            if not match:
                raise
            if not match.group(1).startswith("megatron."):
                raise RefusedCheckpointObject(str(name), match.group(1)) from None
            torch.serialization.add_safe_globals([(UnknownMegatronObject, match.group(1))])
    raise RuntimeError("too many unknown classes in a checkpoint object")


class _SafeLoadPlanner(torch_strategy.MCoreLoadPlanner):  # the class, before install_... replaces the name
    """Megatron's load planner, unpickling sharded objects with `safe_torch_load` instead of weights_only=False."""

    def load_bytes(self, read_item, value):
        obj = safe_torch_load(value, name=f"sharded object {read_item.dest_index.fqn!r} of the checkpoint")
        if self.flatten_state_dict:
            from torch.distributed.checkpoint._nested_dict import set_element

            set_element(self.original_state_dict, self.mappings[read_item.dest_index.fqn], obj)
        else:
            self.state_dict[read_item.dest_index.fqn] = obj


def install_safe_sharded_object_loading() -> None:
    """From now on in this process, Megatron's torch_dist loader unpickles sharded objects with `safe_torch_load`
    (strategies/torch.py looks `MCoreLoadPlanner` up at call time in every supported release). Idempotent."""
    torch_strategy.MCoreLoadPlanner = _SafeLoadPlanner


# What torch's distributed-checkpoint `.metadata` pickle holds (torch 2.x, written by megatron-core 0.17-0.19:
# torch/distributed/checkpoint/filesystem.py `FileSystemWriter.finish` pickles a `Metadata`), and nothing else.
_METADATA_CLASSES = {
    "torch.distributed.checkpoint.metadata": {"Metadata", "MetadataIndex", "StorageMeta", "TensorProperties",
                                              "TensorStorageMetadata", "BytesStorageMetadata",
                                              "ChunkStorageMetadata", "_MEM_FORMAT_ENCODING"},
    "torch.distributed.checkpoint.filesystem": {"_StorageInfo"},
    "torch.distributed.checkpoint.planner": {"SavePlan", "WriteItem", "WriteItemType", "TensorWriteData",
                                             "LoadPlan", "ReadItem", "LoadItemType"},
    "torch.serialization": {"_get_layout"},
    "torch": {"Size"},
    "collections": {"OrderedDict"},
    "builtins": {"set", "frozenset", "slice", "complex"},
}


class _MetadataUnpickler(pickle.Unpickler):
    def __init__(self, file, path: str):
        super().__init__(file)
        self.path = path

    def find_class(self, module, name):
        if name in _METADATA_CLASSES.get(module, ()) or (
                module == "torch" and isinstance(getattr(torch, name, None), torch.dtype)):
            return super().find_class(module, name)
        raise RefusedCheckpointObject(self.path, f"{module}.{name}")


def load_checkpoint_metadata(file, path: str = "<.metadata>"):
    """Unpickle torch's distributed-checkpoint metadata (`<checkpoint>/.metadata`) with an allow-list of the
    classes it holds (`_METADATA_CLASSES`, torch dtypes). `file`: a binary file object; `path` names it in errors.
    Raises `RefusedCheckpointObject` for any other global (never executed), `pickle.UnpicklingError` / `EOFError`
    for a damaged file."""
    return _MetadataUnpickler(file, path).load()


class _SafePickle(types.ModuleType):
    """`pickle` as torch's filesystem reader sees it after `install_safe_metadata_reading`: `load` allow-listed."""

    def __getattr__(self, name):
        return getattr(pickle, name)

    @staticmethod
    def load(file, **_):
        return load_checkpoint_metadata(file, getattr(file, "name", "<.metadata>"))


def install_safe_metadata_reading() -> None:
    """From now on in this process, torch's `FileSystemReader.read_metadata` (which Megatron-Core's torch_dist
    loader and Megatron-LM's `load_checkpoint` use for every `.metadata`) unpickles with `load_checkpoint_metadata`
    instead of a plain `pickle.load` (torch/distributed/checkpoint/filesystem.py, torch 2.x: the module's `pickle`
    global, looked up at call time). Writing is unchanged. Idempotent."""
    from torch.distributed.checkpoint import filesystem

    if not isinstance(filesystem.pickle, _SafePickle):
        filesystem.pickle = _SafePickle("pickle")


def install_common_state_fallback() -> None:
    """On releases whose loader reads the common state from `common.pt` only (<= 0.18), read a checkpoint without
    one (written by 0.19: the `common_state` sharded object) with `read_common_state`. Megatron-LM's
    `load_checkpoint` reaches it through `dist_checkpointing.load_common_state_dict` and `dist_checkpointing.load`,
    which both call `serialization.load_common` (a module global, looked up at call time). No-op where the
    release reads both layouts (0.19: `_legacy_common_state_exists`). Idempotent."""
    from megatron.core.dist_checkpointing import serialization

    original = serialization.load_common
    if hasattr(serialization, "_legacy_common_state_exists") or getattr(original, "reads_common_state", False):
        return

    def load_common(checkpoint_dir):
        if os.path.exists(os.path.join(str(checkpoint_dir), COMMON_STATE_FNAME)):
            return original(checkpoint_dir)
        return read_common_state(str(checkpoint_dir))

    load_common.reads_common_state = True
    serialization.load_common = load_common


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
# GPT layer specs


def layer_spec_kwargs(function, **candidates) -> dict:
    """The keywords of `candidates` that this release's layer-spec `function` takes (gpt_layer_specs.py: 0.18 added
    `use_grouped_gemm_for_dense_mlp`, 0.19 `use_te_op_fuser`); each release's `gpt_builders.py` passes exactly
    the ones its functions have."""
    accepted = inspect.signature(function).parameters
    return {name: value for name, value in candidates.items() if name in accepted}


# --------------------------------------------------------------------------------------------------------------
# Megatron-LM's entry: parse + validate, initialize, pretrain


def _pretrain_takes_config() -> bool:
    from megatron.training import training

    return "cfg_container" in inspect.signature(training.pretrain).parameters


@contextlib.contextmanager
def _after_initialize(callback):
    """Within: Megatron-LM's `initialize_megatron` (as `pretrain` calls it) runs `callback(args)` when it returns."""
    from megatron.training import get_args, training

    original = training.initialize_megatron

    def initialize_megatron(*args, **kwargs):
        result = original(*args, **kwargs)
        callback(get_args())
        return result

    training.initialize_megatron = initialize_megatron
    try:
        yield
    finally:
        training.initialize_megatron = original


def initialize(*, extra_args_provider, args_defaults: dict, on_validated, get_embedding_ranks=None) -> None:
    """What `pretrain` does before it builds the model, without training: Megatron-LM's parsing and validation of
    `sys.argv` with `extra_args_provider`, `on_validated(args)`, `initialize_megatron` (process groups, seeds), in
    the order `pretrain` has them on this release. For tests and tools that drive Megatron-LM's building blocks
    (`setup_model_and_optimizer`, `train_step`) themselves."""
    from megatron.training import get_args
    from megatron.training import initialize as megatron_initialize

    if _pretrain_takes_config():
        from megatron.training.arguments import parse_and_validate_args

        on_validated(parse_and_validate_args(extra_args_provider=extra_args_provider, args_defaults=args_defaults))
        megatron_initialize.initialize_megatron(get_embedding_ranks=get_embedding_ranks)
    else:
        megatron_initialize.initialize_megatron(extra_args_provider=extra_args_provider, args_defaults=args_defaults,
                                                get_embedding_ranks=get_embedding_ranks)
        on_validated(get_args())
    if "tp_size" in inspect.signature(megatron_initialize.set_jit_fusion_options).parameters:  # 0.18+
        megatron_initialize.set_jit_fusion_options(tp_size=get_args().tensor_model_parallel_size)
    else:
        megatron_initialize.set_jit_fusion_options()


def pretrain(*, train_valid_test_dataset_provider, model_provider, forward_step_func, extra_args_provider,
             args_defaults: dict, on_validated, get_embedding_ranks=None) -> None:
    """Megatron-LM's `pretrain` with our providers, as each release's `pretrain_gpt.py` calls it; `on_validated(args)`
    runs once the command line is parsed and validated, before the model is built (0.18+: before the process
    groups start; 0.17: right after `initialize_megatron`). In-process restart wraps it as pretrain_gpt.py does."""
    from megatron.core.enums import ModelType
    from megatron.training import inprocess_restart, training

    common = dict(train_valid_test_dataset_provider=train_valid_test_dataset_provider, model_provider=model_provider,
                  model_type=ModelType.encoder_or_decoder, forward_step_func=forward_step_func,
                  get_embedding_ranks=get_embedding_ranks)
    if _pretrain_takes_config():
        import warnings

        from megatron.training.argument_utils import pretrain_cfg_container_from_args
        from megatron.training.arguments import parse_and_validate_args

        args = parse_and_validate_args(extra_args_provider=extra_args_provider, args_defaults=args_defaults)
        on_validated(args)
        with warnings.catch_warnings():  # "use a ModelConfig instead of a model provider": the provider is ours
            warnings.simplefilter("ignore")
            config = pretrain_cfg_container_from_args(args)
        run, store = inprocess_restart.maybe_wrap_for_inprocess_restart(training.pretrain)
        run(cfg_container=config, store=store, **common)
        return
    run, store = inprocess_restart.maybe_wrap_for_inprocess_restart(training.pretrain)
    with _after_initialize(on_validated):
        run(extra_args_provider=extra_args_provider, args_defaults=args_defaults, store=store, **common)
