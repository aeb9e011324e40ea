"""Every bend of Megatron-LM's training loop (`megatron.training`, shipped in the megatron-core wheels since 0.17).

TST plugs into `megatron.training.training.pretrain` through its extension points (providers, forward step, extra
arguments: `megatron_tst.loop`). What those points cannot reach is bent here, each bend a thin wrapper around
the Megatron-LM function it names, installed once per process by `install()`; CPU-only stand-ins are in
`platform/cpu.py`, release differences in `platform/mcore_compat.py`.

| bend                                  | call site (below `megatron/`)                  | can go when                 |
|---------------------------------------|------------------------------------------------|-----------------------------|
| `typing.override` from                | training/models/gpt.py (0.19): Python 3.11     | Python >= 3.12 only         |
| `typing_extensions` (`prepare_import`)| (this machine, CI) lacks it                    |                             |
| `compile_helpers` skipped when the    | training/initialize.py `_compile_dependencies`;| the wheels ship a Makefile  |
| compiled dataset helpers import       | the wheels ship the compiled helper and no     | (checkouts have one; the    |
|                                       | Makefile: `make` fails, Megatron-LM exits      | skip is harmless there)     |
| `.metadata` unpickled with an         | torch/distributed/checkpoint/filesystem.py     | torch reads it with an      |
| allow-list (`mcore_compat`)           | `FileSystemReader.read_metadata` (pickle.load) | allow-list                  |
| sharded objects unpickled with an     | core/dist_checkpointing/strategies/torch.py    | Megatron-Core loads them    |
| allow-list (`mcore_compat`)           | `MCoreLoadPlanner.load_bytes` (weights_only=   | with `weights_only=True`    |
|                                       | False)                                         |                             |
| `load_checkpoint` under no_grad, with | training/checkpointing.py (the name imported   | fixed upstream (GPUs use    |
| the torch-Adam optimizer fixes        | into training/training.py); `mcore_compat`     | TE/apex Adam)               |
| the iteration line: phase and raw     | training/training.py `training_log` and the    | Megatron-LM has a per-step  |
| tokens; the other phase's loss key    | `print_rank_last` inside it: the loop counts   | logging callback            |
| dropped; a line at the phase switch   | samples x L tokens, prints every loss key ever |                             |
|                                       | seen (`mce loss 0` in recovery), and logs on   |                             |
|                                       | the --log-interval grid only                   |                             |
| the validation losses                 | training/training.py                           | same                        |
|                                       | `evaluate_and_print_results` / `evaluate`      |                             |
| Megatron-LM's secondary parses get    | training/inprocess_restart.py:133,             | they take the caller's      |
| TST's `extra_args_provider`           | ft_integration.py:78 call `parse_args` without | provider                    |
|                                       | it (ignoring unknown flags, not TST's values)  |                             |
| more exit signals for                 | training/global_vars.py `_set_signal_handler`: | Megatron-LM's handler takes |
| --exit-signal-handler: the signals in | Megatron-LM's handler takes one --exit-signal; | several signals             |
| $TST_EXIT_SIGNALS (launch/common.sh:  | a cancelled SLURM job's SIGTERM reaches the    |                             |
| SIGTERM beside SIGUSR1) set its flag  | ranks through torchrun, the preemption warning |                             |
|                                       | SIGUSR1 past it (the launch contract)          |                             |
| `--cross-entropy-fusion-impl linear`  | training/arguments.py (choices from            | a release accepts 'linear'  |
| accepted (Megatron-LM's development   | core/model_parallel_config.py's Literal);      |                             |
| branch's value; `megatron_tst.model`  |                                                |                             |
| implements it)                        |                                                |                             |

Each wrapper binds its arguments by name (`inspect.signature(original).bind`), so a release that adds or reorders
parameters keeps working; the callbacks it calls live in `megatron_tst.loop.logging`.
"""

from __future__ import annotations

import contextlib
import functools
import inspect
import re
from typing import Callable, Optional

_installed = False


def prepare_import() -> None:
    """Before the first `import megatron.training`: `typing.override` on Python < 3.12 (0.19's
    training/models/gpt.py imports it from `typing`)."""
    import typing

    if not hasattr(typing, "override"):
        import typing_extensions

        typing.override = typing_extensions.override


class LoopCallbacks:
    """What TST adds to Megatron-LM's loop; `megatron_tst.loop.logging.TSTLogging` implements it."""

    def before_training_log(self, *, iteration: int, loss_dict: dict, total_loss_dict: dict, learning_rate,
                            grad_norm, skipped_iter: int, interval_seconds: float, first: bool) -> bool:
        """Called before Megatron's `training_log` for step `iteration`; may edit `total_loss_dict` (Megatron's
        interval accumulator). `first`: Megatron-LM (0.19) prints this step's line, the first of the process, without
        ending its interval. Returns True to print the line at this step and end the interval there, although it
        is off the --log-interval grid."""
        return False

    def edit_log_line(self, line: str, iteration: int) -> str:
        """Megatron's iteration line for step `iteration`, before it is printed."""
        return line

    def after_evaluation(self, *, iteration: int, losses: dict, test: bool) -> None:
        """Megatron's validation (or test, `test`) losses {name: float} after step `iteration`."""


_callbacks: LoopCallbacks = LoopCallbacks()


def install(callbacks: Optional[LoopCallbacks] = None, extra_args_provider: Optional[Callable] = None) -> None:
    """Install every bend of this module once per process; `callbacks` (re)places the loop callbacks;
    `extra_args_provider` is what Megatron-LM's secondary parses of the command line get."""
    global _installed, _callbacks
    if callbacks is not None:
        _callbacks = callbacks
    if _installed:
        return
    prepare_import()
    from megatron.training import arguments, training

    from megatron_tst.platform import mcore_compat

    mcore_compat.install_safe_sharded_object_loading()
    mcore_compat.install_safe_metadata_reading()
    mcore_compat.install_common_state_fallback()
    _skip_compiling_shipped_helpers()
    training.load_checkpoint = _wrap(training.load_checkpoint, _load_checkpoint)
    training.training_log = _wrap(training.training_log, _training_log)
    training.evaluate_and_print_results = _wrap(training.evaluate_and_print_results, _evaluate_and_print_results)
    if extra_args_provider is not None:
        arguments.parse_args = _wrap(arguments.parse_args, functools.partial(_parse_args, extra_args_provider))
    from megatron.training import global_vars

    global_vars._set_signal_handler = _wrap(global_vars._set_signal_handler, _set_signal_handler)
    _installed = True


def _wrap(original: Callable, wrapper: Callable) -> Callable:
    @functools.wraps(original)
    def wrapped(*args, **kwargs):
        return wrapper(original, *args, **kwargs)

    wrapped.__wrapped_by_megatron_tst__ = original
    return wrapped


def _bound(original: Callable, args, kwargs) -> dict:
    call = inspect.signature(original).bind(*args, **kwargs)
    call.apply_defaults()
    return call.arguments


# ------------------------------------------------------------------------------------------------------ helpers


def _parse_args(provider, original, *args, **kwargs):
    values = _bound(original, args, kwargs)
    if values.get("extra_args_provider") is None:
        values["extra_args_provider"] = provider
    return original(**values)


EXIT_SIGNALS_ENV = "TST_EXIT_SIGNALS"


def _set_signal_handler(original, *args, **kwargs):
    """Megatron-LM's signal handler for --exit-signal, and the same flag for every signal named in
    $TST_EXIT_SIGNALS (comma-separated, e.g. "SIGTERM"): the run saves and exits after the current step on any of
    them."""
    import os
    import signal

    from megatron.training import global_vars

    result = original(*args, **kwargs)
    handler = global_vars._GLOBAL_SIGNAL_HANDLER
    for name in filter(None, (n.strip() for n in os.environ.get(EXIT_SIGNALS_ENV, "").split(","))):
        sig = getattr(signal.Signals, name.upper(), None)
        if sig is None:
            raise ValueError(f"${EXIT_SIGNALS_ENV} names {name!r}, not a signal (e.g. SIGTERM)")
        if sig != handler.sig:
            signal.signal(sig, lambda signum, frame: setattr(handler, "_signal_received", True))
    return result


def _skip_compiling_shipped_helpers() -> None:
    from megatron.core.datasets import utils

    original = utils.compile_helpers

    def compile_helpers():
        try:
            from megatron.core.datasets import helpers_cpp  # noqa: F401  (the compiled helper the wheel ships)
        except ImportError:
            return original()
        return None

    utils.compile_helpers = compile_helpers


# ------------------------------------------------------------------------------------------------------ loading


def _load_checkpoint(original, *args, **kwargs):
    """Megatron-LM's `load_checkpoint` with the torch-Adam distributed-optimizer fixes around it, under
    `torch.no_grad()` (with torch Adam the main parameters are views of the model's leaf parameters, which the
    optimizer-state load copies into in place: distrib_optimizer.py, 0.19.2:1225)."""
    import torch
    from megatron.training import get_args

    from megatron_tst.platform import mcore_compat

    values = _bound(original, args, kwargs)
    optimizer = values.get("optimizer")
    megatron_args = get_args()
    if megatron_args.no_load_optim or megatron_args.finetune:  # Megatron-LM loads no optimizer state
        optimizer = None
    if not _has_checkpoint(megatron_args, values.get("load_arg") or "load"):
        optimizer = None  # nothing to load into it: the dummy Adam step below would change the fresh run's Adam
    with torch.no_grad():
        if optimizer is None:
            return original(*args, **kwargs)
        mcore_compat.prepare_torch_adam_distributed_optimizer(optimizer)
        with mcore_compat.fully_reshardable_step_fix(optimizer):
            result = original(*args, **kwargs)
    mcore_compat.untie_adam_steps(optimizer)
    return result


def _has_checkpoint(megatron_args, load_arg: str) -> bool:
    """Whether `load_checkpoint` finds a checkpoint of its own in --load (or `load_arg`): a tracker file, or
    --ckpt-step (Megatron-LM's `_load_base_checkpoint`); otherwise it starts from scratch or, with
    --pretrained-checkpoint, loads weights only."""
    import os

    from megatron.training.checkpointing import get_checkpoint_tracker_filename

    load_dir = getattr(megatron_args, load_arg, None)
    if not load_dir:
        return False
    return getattr(megatron_args, "ckpt_step", None) is not None or os.path.isfile(
        get_checkpoint_tracker_filename(load_dir))


# ------------------------------------------------------------------------------------------------------ logging


@contextlib.contextmanager
def _attribute(obj, name: str, value):
    original = getattr(obj, name)
    setattr(obj, name, value)
    try:
        yield
    finally:
        setattr(obj, name, original)


def _training_log(original, *args, **kwargs):
    from megatron.training import get_args, get_timers, training

    values = _bound(original, args, kwargs)
    iteration = values["iteration"]
    megatron_args = get_args()
    interval = get_timers()("interval-time", log_level=0)
    force = _callbacks.before_training_log(
        iteration=iteration, loss_dict=values["loss_dict"], total_loss_dict=values["total_loss_dict"],
        learning_rate=values["learning_rate"], grad_norm=values["grad_norm"], skipped_iter=values["skipped_iter"],
        interval_seconds=interval.elapsed(reset=False, barrier=False), first=bool(values.get("is_first_iteration")))
    printer = training.print_rank_last

    def edited_print(message):
        if isinstance(message, str) and f" iteration {iteration:8d}/" in message:
            message = _callbacks.edit_log_line(message, iteration)
        return printer(message)

    off_grid = force and iteration % megatron_args.log_interval != 0
    if force and values.get("is_first_iteration"):  # 0.19 prints its first iteration without ending the interval
        values["is_first_iteration"] = False
    with contextlib.ExitStack() as stack:
        stack.enter_context(_attribute(training, "print_rank_last", edited_print))
        if off_grid:  # training_log prints (and resets its interval) when iteration % log_interval == 0
            stack.enter_context(_attribute(megatron_args, "log_interval", 1))
        return original(**values)


def insert_fields(line: str, fields: str) -> str:
    """`fields` (" name: value |" ...) inserted after the line's "consumed samples" field (appended otherwise)."""
    match = re.search(r"consumed samples:\s*\d+ \|", line)
    if match is None:
        return line + fields
    return line[:match.end()] + fields + line[match.end():]


def _evaluate_and_print_results(original, *args, **kwargs):
    from megatron.training import training

    values = _bound(original, args, kwargs)
    results = []
    evaluate = training.evaluate

    def capturing_evaluate(*eval_args, **eval_kwargs):
        out = evaluate(*eval_args, **eval_kwargs)
        results.append(out[0])
        return out

    with _attribute(training, "evaluate", capturing_evaluate):
        out = original(*args, **kwargs)
    losses = {}
    for total in results:
        for key, value in (total or {}).items():
            losses[key] = float(value.item() if hasattr(value, "item") else value)
    if losses:
        _callbacks.after_evaluation(iteration=values["iteration"], losses=losses,
                                    test="test set" in str(values.get("prefix", "")))
    return out


# ------------------------------------------------------------------------------------------------------ arguments


def accept_linear_loss_fusion(parser) -> None:
    """Let `--cross-entropy-fusion-impl` take 'linear' (Megatron-LM's development branch's value) on releases
    whose choices lack it; `megatron_tst.model` implements it."""
    action = parser._option_string_actions.get("--cross-entropy-fusion-impl")
    if action is not None and action.choices is not None and "linear" not in action.choices:
        action.choices = tuple(action.choices) + ("linear",)


