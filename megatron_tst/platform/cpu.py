"""Megatron-Core on CPU with the gloo backend: every patch it needs, in one place.

megatron-core assumes CUDA in many places. The tests and the CPU demo run it on CPU, several processes on
one machine, so this module bends exactly those places and nothing else. Call `enable()` once per process,
before building models; it returns False and changes nothing when CUDA is available, so code that calls it
unconditionally stays correct on GPUs.

Every patch names the megatron-core 0.16.1 call sites it covers (paths below `megatron/core/`). What was
measured to need each one is in `shared/MCORE_ON_CPU.md`.

| patch                              | covers                                                                |
|------------------------------------|-----------------------------------------------------------------------|
| `torch.cuda.current_device` -> cpu | ~175 `device=torch.cuda.current_device()` sites (first: utils.py:631  |
|                                    | GlobalMemoryBuffer; moe/router.py, tensor_parallel/mappings.py,       |
|                                    | p2p_communication.py, param_and_grad_buffer.py, state_dict_saver.py)  |
| `_CudaToCpuMode`                   | literal `device="cuda"` factories, `.cuda()`, `.to("cuda")`           |
|                                    | (schedules.py:596/2138, optimizer.py:481/485/907, clip_grads.py:103,  |
|                                    | utils.py:1207, transformer/utils.py:35, moe_utils.py:998), and the    |
|                                    | `Tensor.type() == 'torch.cuda.FloatTensor'` checks (clip_grads.py:167,|
|                                    | distrib_optimizer.py:431)                                             |
| device RNG = CPU default generator | tensor_parallel/random.py:235 (`add`), :248 (`fork`), :55/:72         |
|                                    | (`_get/_set_cuda_rng_state`, also activation recompute); a GPU        |
|                                    | checkpoint's 16-byte CUDA states are not loaded into it (warned once) |
| inert streams/events, no-op sync   | moe/token_dispatcher.py:445/871, p2p_communication.py:398,            |
|                                    | dist_checkpointing/strategies/filesystem_async.py:230                 |
| `moe_utils.te_general_gemm = None` | moe/moe_utils.py:1192 (NameError without Transformer Engine)          |
| split sizes as numpy on CPU too    | moe/token_dispatcher.py:879-887 (`maybe_move_tensor_to_cpu` converts  |
|                                    | the all-to-all split sizes only for CUDA tensors; all_to_all_single   |
|                                    | then rejects tensor split sizes, mappings.py:447)                     |
| torch norms accept sequence par.   | transformer/torch_norm.py:32 (the local spec's norm without apex)     |

Megatron-LM's loop (`megatron/training/`, `install_loop_stand_ins`; 0.17-0.19 line numbers of 0.19.2):

| stand-in                           | covers                                                                |
|------------------------------------|-----------------------------------------------------------------------|
| `initialize_megatron(allow_no_     | training/initialize.py:64 asserts CUDA (`pretrain` does not pass      |
| cuda=True)`, `device_count() = 1`  | allow_no_cuda); :270/:447 set up the model-parallel groups and the RNG|
| while it runs                      | tracker only when a CUDA device exists                                |
| `get_device_arch_version() = 9`    | training/arguments.py:1413 (TP or CP > 1): the CUDA_DEVICE_MAX_       |
|                                    | CONNECTIONS rule of Hopper and older GPUs                             |
| the JIT warm-up keeps the CPU RNG  | training/initialize.py:497 `_warmup_jit_function` draws `torch.rand`  |
| state (`torch.random.fork_rng`)    | tensors of ffn/TP elements "on CUDA", here from the CPU generator     |
|                                    | that also initialises the weights (--use-cpu-initialization): the     |
|                                    | initial weights would depend on TP (on GPUs it draws from the CUDA    |
|                                    | generator, apart from the initialisation streams)                     |
| the data loaders draw their seed   | torch's DataLoader seeds its iterator from the default CPU generator, |
| from their own generator           | which here is also the "CUDA" generator of dropout: building the      |
|                                    | loaders after a checkpoint load (training.py, `build_train_valid_     |
|                                    | test_data_iterators`) would shift dropout's stream at a resume        |
| `get_device_capability() = (9, 0)` | training/arguments.py:1339 (--moe-grouped-gemm), only while           |
|                                    | tools/plan.py validates a GPU command line                            |
|                                    | (`device_capability_stand_in`)                                        |
| CPU defaults of Megatron-LM flags  | `cpu_argument_defaults`: what cannot run here is off by default       |
|                                    | (fused kernels, persistent layer norm, Transformer Engine, NCCL),     |
|                                    | CPU initialisation on; a flag given on the command line still wins    |

Not patches but settings the caller must choose on CPU (see `cpu_config_overrides`): `batch_p2p_comm=False`
(gloo's batch_isend_irecv mispairs the interleaved schedule's exchanges: measured wrong activations for
micro-batches 3-4 of 4 at PP=2, VPP=2), which also avoids the `torch.cuda.synchronize` after batched p2p
(p2p_communication.py:398), and `use_cpu_initialization=True`.
"""

from __future__ import annotations

import contextlib
import logging
import threading

import torch
from torch.overrides import TorchFunctionMode

_enabled = False
_lock = threading.Lock()
_mode: TorchFunctionMode | None = None


def cuda_available() -> bool:
    """True when a CUDA device is usable; then nothing here is applied."""
    return torch.cuda.is_available()


def enable() -> bool:
    """Apply every CPU patch once in this process. Returns True if patches are active.

    Idempotent; a no-op (returns False) when CUDA is available. The device-mapping mode is
    thread-local: call `enable()` again from any new thread that runs megatron-core code.
    """
    global _enabled
    if cuda_available():
        return False
    with _lock:
        if not _enabled:
            _patch_device_queries()
            _patch_streams_and_sync()
            _patch_rng()
            _patch_moe_without_te()
            _patch_torch_norm_sequence_parallel()
            _enabled = True
        _enter_device_mode()
    return True


def cpu_config_overrides() -> dict:
    """TransformerConfig fields to set when running on CPU (empty on GPU).

    `batch_p2p_comm=False`: with gloo, `batch_isend_irecv` mispairs the interleaved pipeline schedule's
    sends and receives (wrong activations, measured); the unbatched path also skips batched p2p's
    `torch.cuda.synchronize` (p2p_communication.py:398). `use_cpu_initialization` makes weights independent
    of the parallel layout.
    """
    if cuda_available():
        return {}
    return {"batch_p2p_comm": False, "use_cpu_initialization": True}


# --------------------------------------------------------------------------------------------------
# torch.cuda device queries


def _patch_device_queries() -> None:
    # ~175 sites allocate with `device=torch.cuda.current_device()`; the first one hit is the
    # GlobalMemoryBuffer on every attention forward (utils.py:631).
    torch.cuda.current_device = lambda: torch.device("cpu")
    torch.cuda.set_device = lambda device: None


def _is_cuda_device(device) -> bool:
    if isinstance(device, torch.device):
        return device.type == "cuda"
    if isinstance(device, str):
        return device.startswith("cuda")
    # A bare int device index can only mean a CUDA device.
    return isinstance(device, int) and not isinstance(device, bool)


_CUDA_TYPE_NAMES = {
    "torch.FloatTensor": "torch.cuda.FloatTensor",
    "torch.HalfTensor": "torch.cuda.HalfTensor",
    "torch.BFloat16Tensor": "torch.cuda.BFloat16Tensor",
}


class _CudaToCpuMode(TorchFunctionMode):
    """Maps CUDA devices to CPU in every torch call, and answers `Tensor.type()` as CUDA would.

    Covers the literal `device="cuda"` sites, `.cuda()`, `.to("cuda")` / `.to(0)`, and the type-name
    checks in clip_grads.py:167 and distrib_optimizer.py:431 (they compare `t.type()` with
    'torch.cuda.FloatTensor' and only use it as a dtype check).
    """

    def __torch_function__(self, func, types, args=(), kwargs=None):
        kwargs = kwargs or {}
        device = kwargs.get("device")
        if device is not None and _is_cuda_device(device):
            kwargs["device"] = "cpu"
        if func is torch.Tensor.cuda:
            return args[0]
        if func is torch.Tensor.to and len(args) > 1 and _is_cuda_device(args[1]):
            args = (args[0], "cpu") + tuple(args[2:])
        if func is torch.Tensor.type and len(args) == 1 and not kwargs:
            name = func(*args)
            return _CUDA_TYPE_NAMES.get(name, name)
        return func(*args, **kwargs)


def _enter_device_mode() -> None:
    global _mode
    # The mode stack is thread-local: enter once per thread.
    if getattr(_thread_state, "entered", False):
        return
    _mode = _CudaToCpuMode()
    _mode.__enter__()
    _thread_state.entered = True


_thread_state = threading.local()


# --------------------------------------------------------------------------------------------------
# streams, events, synchronisation


class _InertStream:
    """Stand-in for torch.cuda.Stream: CPU work is already ordered."""

    def __init__(self, *args, **kwargs):
        pass

    def wait_stream(self, stream):
        pass

    def wait_event(self, event):
        pass

    def record_event(self, event=None):
        return event or _InertEvent()

    def synchronize(self):
        pass

    def query(self):
        return True


class _InertEvent:
    """Stand-in for torch.cuda.Event."""

    def __init__(self, *args, **kwargs):
        pass

    def record(self, stream=None):
        pass

    def wait(self, stream=None):
        pass

    def synchronize(self):
        pass

    def query(self):
        return True

    def elapsed_time(self, other):
        return 0.0


_DEFAULT_STREAM = _InertStream()


def _patch_streams_and_sync() -> None:
    # MoE alltoall dispatcher creates and waits on a D2H stream (token_dispatcher.py:445/871);
    # batched p2p and the async checkpoint writer synchronise (p2p_communication.py:398,
    # filesystem_async.py:230).
    torch.cuda.Stream = _InertStream
    torch.cuda.Event = _InertEvent
    torch.cuda.current_stream = lambda device=None: _DEFAULT_STREAM
    torch.cuda.default_stream = lambda device=None: _DEFAULT_STREAM
    torch.cuda.stream = lambda stream=None: contextlib.nullcontext()
    torch.cuda.synchronize = lambda device=None: None


# --------------------------------------------------------------------------------------------------
# RNG: the "device generator" of megatron's RNG tracker is the CPU default generator


_warned = set()


def _warn_once(message: str) -> None:
    if message not in _warned:
        _warned.add(message)
        logging.getLogger(__name__).warning(message)


def _patch_rng() -> None:
    """Point megatron's CUDA RNG plumbing at the CPU default generator.

    With this, the stock `CudaRNGStatesTracker` keeps one CPU generator state per stream
    ('model-parallel-rng' differs per TP rank, 'data-parallel-rng', 'expert-parallel-rng'),
    forks swap them in, and activation recompute restores them (random.py:55/72/235/248).
    Dropout on CPU draws from the CPU default generator, so the streams mean the same as on GPU.
    """
    from megatron.core.tensor_parallel import random as mcore_random

    def get_state(device="cuda", clone=False, graph_safe=False):
        return torch.get_rng_state()

    def set_cpu_state(new_state):
        # A GPU checkpoint's CUDA (Philox) states are 16 bytes, not the CPU generator's: keep the CPU stream.
        if new_state.numel() != torch.get_rng_state().numel():
            _warn_once("a checkpoint's CUDA RNG states (written on a GPU) cannot drive the CPU generator: the CPU "
                       "run keeps its own dropout stream")
            return
        torch.set_rng_state(new_state)

    def set_state(new_state, device=-1, graph_safe=False):
        set_cpu_state(new_state)

    torch.cuda.get_rng_state = lambda device="cuda": torch.get_rng_state()
    torch.cuda.random.get_rng_state = torch.cuda.get_rng_state
    torch.cuda.set_rng_state = lambda new_state, device="cuda": set_cpu_state(new_state)
    torch.cuda.manual_seed = lambda seed: torch.default_generator.manual_seed(int(seed))
    mcore_random._get_cuda_rng_state = get_state
    mcore_random._set_cuda_rng_state = set_state

    # fork() warns when the CPU generator moved inside a "GPU" RNG context; here the device
    # generator *is* the CPU generator, so that warning fires on every dropout and means nothing.
    class _DropForkWarning(logging.Filter):
        def filter(self, record):
            return "CPU RNG state changed within GPU RNG context" not in record.getMessage()

    logging.getLogger(mcore_random.__name__).addFilter(_DropForkWarning())


# --------------------------------------------------------------------------------------------------
# MoE without Transformer Engine


def _patch_moe_without_te() -> None:
    from megatron.core.transformer.moe import moe_utils, token_dispatcher

    # moe_utils.py:1192 reads `te_general_gemm`, which is only defined when TE imports.
    if not hasattr(moe_utils, "te_general_gemm"):
        moe_utils.te_general_gemm = None

    # The alltoall dispatcher turns its split sizes into numpy arrays with this helper, which only does so
    # for CUDA tensors; on CPU they would stay tensors, which all_to_all_single refuses.
    original = moe_utils.maybe_move_tensor_to_cpu

    def maybe_move_tensor_to_cpu(tensor, as_numpy=False, record_stream=False):
        if as_numpy and torch.is_tensor(tensor) and not tensor.is_cuda:
            return tensor.numpy()
        return original(tensor, as_numpy=as_numpy, record_stream=record_stream)

    token_dispatcher.maybe_move_tensor_to_cpu = maybe_move_tensor_to_cpu


# --------------------------------------------------------------------------------------------------
# sequence parallelism with torch norms (the local spec's norm when apex is absent)


def _patch_torch_norm_sequence_parallel() -> None:
    """Let `WrappedTorchNorm` run under sequence parallelism (torch_norm.py:32 refuses it).

    Under SP each TP rank normalises its own slice of positions, so the norm weights get partial
    gradients; tagging them `sequence_parallel = True` makes `finalize_model_grads` all-reduce those
    over the TP group, exactly as Megatron does for its fused norms.
    """
    from megatron.core.transformer import torch_norm

    original_new = torch_norm.WrappedTorchNorm.__new__

    def new(cls, config, hidden_size, eps=1e-5, persist_layer_norm=False,
            zero_centered_gamma=False, normalization="LayerNorm"):
        if not config.sequence_parallel or config.normalization not in ("LayerNorm", "RMSNorm"):
            return original_new(cls, config, hidden_size, eps, persist_layer_norm,
                                zero_centered_gamma, normalization)
        if config.layernorm_zero_centered_gamma or config.persist_layer_norm:
            raise ValueError("zero-centred gamma / persist_layer_norm need Transformer Engine or apex")
        norm_cls = torch.nn.LayerNorm if config.normalization == "LayerNorm" else torch.nn.RMSNorm
        norm = norm_cls(normalized_shape=hidden_size, eps=eps)
        for param in norm.parameters():
            param.sequence_parallel = True
        return norm

    torch_norm.WrappedTorchNorm.__new__ = new


# --------------------------------------------------------------------------------------------------
# Megatron-LM's loop on CPU

# Megatron-LM flag defaults on a machine without CUDA (argparse dests; a flag on the command line still wins):
# the fused kernels and persistent layer norm need CUDA (torch_norm.py asserts on persist_layer_norm), Transformer
# Engine and NCCL are absent, and CPU initialisation makes the weights independent of the parallel layout.
CPU_ARGUMENT_DEFAULTS = {
    "transformer_impl": "local", "distributed_backend": "gloo", "use_cpu_initialization": True,
    "no_persist_layer_norm": True, "gradient_accumulation_fusion": False, "masked_softmax_fusion": False,
    "bias_gelu_fusion": False, "bias_swiglu_fusion": False, "bias_dropout_fusion": False,
    "apply_rope_fusion": False, "gradient_reduce_div_fusion": False,
}


def cpu_argument_defaults(parser) -> None:
    """On a machine without CUDA, set `CPU_ARGUMENT_DEFAULTS` as the defaults of Megatron-LM's parser (those of
    its dests this release has). No-op with CUDA."""
    if cuda_available():
        return
    dests = {action.dest for action in parser._actions}
    parser.set_defaults(**{dest: value for dest, value in CPU_ARGUMENT_DEFAULTS.items() if dest in dests})


def install_loop_stand_ins() -> bool:
    """Apply `enable()` and the stand-ins Megatron-LM's loop needs on CPU (module docstring), once per process.
    Returns False and changes nothing when CUDA is available."""
    if not enable():
        return False
    global _loop_installed
    with _lock:
        if _loop_installed:
            return True
        from megatron.training import arguments, initialize, training

        wrapped = _initialize_without_cuda(initialize.initialize_megatron)
        initialize.initialize_megatron = wrapped
        training.initialize_megatron = wrapped
        arguments.get_device_arch_version = lambda: 9  # Hopper: the rules of the GPUs our users run
        initialize._warmup_jit_function = _keeping_cpu_rng(initialize._warmup_jit_function)
        training.build_pretraining_data_loader = _own_seed_generator(training.build_pretraining_data_loader)
        _loop_installed = True
    return True


_loop_installed = False


def _initialize_without_cuda(original):
    import functools

    @functools.wraps(original)
    def initialize_megatron(*args, **kwargs):
        kwargs["allow_no_cuda"] = True
        count = torch.cuda.device_count
        torch.cuda.device_count = lambda: 1
        try:
            return original(*args, **kwargs)
        finally:
            torch.cuda.device_count = count

    return initialize_megatron


def _keeping_cpu_rng(original):
    import functools

    @functools.wraps(original)
    def keeping(*args, **kwargs):
        with torch.random.fork_rng(devices=[]):
            return original(*args, **kwargs)

    return keeping


def _own_seed_generator(original):
    import functools

    @functools.wraps(original)
    def build_pretraining_data_loader(dataset, consumed_samples):
        loader = original(dataset, consumed_samples)
        if isinstance(loader, torch.utils.data.DataLoader) and loader.generator is None:
            loader.generator = torch.Generator().manual_seed(int(consumed_samples))
        return loader

    return build_pretraining_data_loader


@contextlib.contextmanager
def device_capability_stand_in():
    """Within, on a machine without CUDA: `torch.cuda.get_device_capability()` answers Hopper's (9, 0), the GPUs a
    plan is for, as `install_loop_stand_ins` answers `get_device_arch_version` (Megatron-LM's `validate_args` asks it
    for --moe-grouped-gemm: training/arguments.py, 0.17.1:1144, 0.19.2:1339). For tools/plan.py, which validates
    GPU command lines; not for training (grouped GEMMs need a GPU). Nothing changes on a machine with CUDA."""
    if torch.cuda.is_available():
        yield
        return
    original = torch.cuda.get_device_capability
    torch.cuda.get_device_capability = lambda device=None: (9, 0)
    try:
        yield
    finally:
        torch.cuda.get_device_capability = original
