"""Before any heavy work: does this command line continue the checkpoint it resumes, or would it silently train
something else? Compares the run's arguments with the checkpoint's saved `args` (ours or Megatron-LM's).

Two kinds of flags:
- the sample stream (`STREAM_FLAGS`): which tokens iteration i trains on. Progress is counted in baseline
  samples of one dataset cut one way; another `--seq-length`, blend, split, seed, tokenizer, global batch or
  TST phase plan re-cuts or re-orders it, so a resume would train some tokens twice and skip others. Refused
  (restore the value, or start a new count from the weights with `--finetune`).
- the LR/WD schedule (`SCHEDULE_FLAGS`): Megatron-LM's rule. Without `--override-opt_param-scheduler` or
  `--use-checkpoint-opt_param-scheduler` every schedule value must match the checkpoint's
  (megatron.core.optimizer_param_scheduler.OptimizerParamScheduler._check_and_set asserts it); here that is
  one error naming each flag, both values and the ways forward, instead of the scheduler's AssertionError.

Any checkpoint without saved args (or a flag it does not record) is not compared for that flag.
"""

from __future__ import annotations

import os
from typing import Callable, List, Optional, Tuple

# (flag, value of a namespace, hint) per flag that decides the sample stream.
Extractor = Callable[[object], object]


def _get(name: str, default=None) -> Extractor:
    return lambda ns: getattr(ns, name, default)


def _bag_size(ns) -> int:
    return getattr(ns, "tst_bag_size", None) or 1


def _superposition_steps(ns) -> int:
    return int(getattr(ns, "tst_superposition_steps", 0) or 0) if _bag_size(ns) > 1 else 0


def _superposition_steps_taken(args, ckpt_args) -> bool:
    """Whether either run's plan puts a superposition step before the checkpoint's iteration (only then does the
    bag size decide how many samples the steps up to the checkpoint consumed)."""
    iteration = int(getattr(ckpt_args, "iteration", 0) or 0)
    return min(iteration, _superposition_steps(ckpt_args)) > 0 or min(iteration, _superposition_steps(args)) > 0


def _blend(paths) -> Optional[Tuple]:
    """A --*data-path value as ((basename, weight), ...): moving the files to another directory is no change."""
    if not paths:
        return None
    from megatron.core.datasets.utils import get_blend_from_list

    prefixes, weights = get_blend_from_list(list(paths))
    weights = weights or [1.0] * len(prefixes)
    total = sum(weights)
    return tuple((os.path.basename(p), round(w / total, 9)) for p, w in zip(prefixes, weights))


def _split(ns) -> Optional[Tuple]:
    """--split as normalised fractions (only meaningful with --data-path)."""
    text = getattr(ns, "split", None)
    if not getattr(ns, "data_path", None) or text is None:
        return None
    parts = [float(x) for x in str(text).replace("/", ",").split(",") if x.strip()]
    parts += [0.0] * (3 - len(parts))
    return tuple(round(p / sum(parts), 9) for p in parts)


def _data(flag: str) -> Extractor:
    """The blend of a data flag; "mock data" for a run on Megatron's mock dataset (--mock-data, or Megatron-LM
    without data paths)."""
    def value(ns):
        if getattr(ns, "mock_data", False) or not (getattr(ns, "data_path", None)
                                                   or getattr(ns, "train_data_path", None)):
            return "mock data" if flag == "data_path" else None
        return _blend(getattr(ns, flag, None))
    return value


STREAM_FLAGS: List[Tuple[str, Extractor]] = [
    ("--seq-length", _get("seq_length")),
    ("--global-batch-size", _get("global_batch_size")),
    ("--data-path", _data("data_path")),
    ("--split", _split),
    ("--train-data-path", _data("train_data_path")),
    ("--seed", _get("seed")),
    ("--tokenizer-type", _get("tokenizer_type")),
    ("--vocab-size", lambda ns: getattr(ns, "vocab_size", None) if getattr(ns, "tokenizer_type", None)
     == "NullTokenizer" else None),
    ("--tst-bag-size", _bag_size),
    ("superposition steps", _superposition_steps),
]

# Megatron-LM's flags behind OptimizerParamScheduler's values (what _check_and_set compares, and the WSD and
# warm-up-start values it takes from the command line without comparing).
SCHEDULE_FLAGS = ("lr", "min_lr", "lr_warmup_iters", "lr_warmup_fraction", "lr_warmup_init", "lr_decay_iters",
                  "lr_decay_style", "lr_wsd_decay_iters", "lr_wsd_decay_style", "train_iters",
                  "start_weight_decay", "end_weight_decay", "weight_decay_incr_style")


def _flag(name: str) -> str:
    return "--" + name.replace("_", "-")


def _same(a, b) -> bool:
    if isinstance(a, float) or isinstance(b, float):
        try:
            return abs(float(a) - float(b)) <= 1e-12 * max(abs(float(a)), abs(float(b)), 1e-30)
        except (TypeError, ValueError):
            return False
    return a == b


def stream_mismatches(args, ckpt_args) -> List[str]:
    """One line per stream flag whose value differs from the checkpoint's (flags it does not record skipped)."""
    lines = []
    # A checkpoint trained on Megatron's mock data has no token stream to repeat or skip: continuing it on real
    # data (the README's "continue from Megatron-LM") starts that data's stream at the checkpoint's sample count.
    mock_before = _data("data_path")(ckpt_args) == "mock data"
    for flag, value_of in STREAM_FLAGS:
        if mock_before and flag in ("--data-path", "--train-data-path", "--split"):
            continue
        ours, theirs = value_of(args), value_of(ckpt_args)
        if flag == "--tst-bag-size" and not _superposition_steps_taken(args, ckpt_args):
            continue  # the bag size shaped no step before the checkpoint (the kind of samples is checked apart)
        if flag in ("--tst-bag-size", "superposition steps") or theirs is not None:
            if not _same(ours, theirs):
                lines.append(_describe_stream(flag, theirs, ours, args, ckpt_args))
    return lines


def _describe_stream(flag: str, theirs, ours, args, ckpt_args) -> str:
    if flag != "superposition steps":
        return f"{flag}: checkpoint {theirs!r}, this run {ours!r}"
    ratio = getattr(args, "tst_superposition_ratio", None)
    if (ratio is not None and getattr(ckpt_args, "tst_superposition_ratio", None) == ratio
            and getattr(ckpt_args, "train_iters", None) != args.train_iters):
        return (f"--train-iters: checkpoint {ckpt_args.train_iters}, this run {args.train_iters}, and "
                f"--tst-superposition-ratio {ratio} makes the superposition phase {theirs} steps there, {ours} "
                f"here (to change --train-iters keep the phase: --tst-superposition-iters {theirs} instead of the "
                "ratio)")
    return (f"the superposition phase (--tst-superposition-ratio/--tst-superposition-iters): checkpoint {theirs} "
            f"steps, this run {ours}")


def schedule_mismatches(args, ckpt_args) -> List[str]:
    """One line per LR/WD schedule flag that differs from the checkpoint's."""
    lines = []
    # Megatron-LM leaves --lr-decay-iters None when not given (its schedule then decays over --train-iters)
    ckpt_decay_iters = getattr(ckpt_args, "lr_decay_iters", None) or getattr(ckpt_args, "train_iters", None)
    decay_follows_train_iters = (ckpt_decay_iters == getattr(ckpt_args, "train_iters", 0)
                                 and args.lr_decay_iters == args.train_iters)
    for name in SCHEDULE_FLAGS:
        if not hasattr(ckpt_args, name):
            continue
        ours, theirs = getattr(args, name), getattr(ckpt_args, name)
        if name == "lr_decay_iters":
            theirs = ckpt_decay_iters
        if name == "lr_decay_iters" and decay_follows_train_iters:
            continue  # its default: reported as --train-iters
        if not _same(ours, theirs):
            note = " (the LR decay and weight-decay ramp follow it)" if name == "train_iters" else ""
            lines.append(f"{_flag(name)}: checkpoint {theirs!r}, this run {ours!r}{note}")
    return lines


def check_resume(args, ckpt_args, directory: str, loads_schedule: bool,
                 checkpoint_stream: Optional[dict] = None) -> None:
    """Raise SystemExit naming every mismatching flag, both values and the ways forward (see module docstring).

    `loads_schedule`: whether the checkpoint's LR schedule is loaded (not with --finetune, nor with
    --no-load-optim unless --use-checkpoint-opt_param-scheduler). `checkpoint_stream`: the `tst` entry's record of
    the samples the checkpoint's run read (`SamplePlan.stream()`; None: Megatron's stock samples).
    """
    if ckpt_args is None:
        return
    from megatron_tst.training import data
    from megatron_tst.training.schedule import SamplePlan

    # First the kind of samples (stock L-samples or s*L windows): its message names the layout flag to continue.
    data.check_stream_continuation(checkpoint_stream, SamplePlan.from_args(args),
                                   int(getattr(ckpt_args, "consumed_train_samples", 0) or 0),
                                   where=f"checkpoint {directory}")
    stream = stream_mismatches(args, ckpt_args)
    if stream:
        raise SystemExit(
            f"error: resuming {directory} with another sample stream: this run would train other tokens than the "
            "checkpoint's run at the same iterations (some twice, some never):\n  " + "\n  ".join(stream)
            + "\nRestore the checkpoint's values to continue it, or start a new run from its weights with "
            "--finetune (iteration, sample count and optimizer state start anew).")
    if not loads_schedule or args.override_opt_param_scheduler or args.use_checkpoint_opt_param_scheduler:
        return
    schedule = schedule_mismatches(args, ckpt_args)
    if schedule:
        raise SystemExit(
            f"error: the LR/weight-decay schedule of this run differs from checkpoint {directory}'s:\n  "
            + "\n  ".join(schedule)
            + "\nEither restore those values, or pass --override-opt_param-scheduler (use this command line's "
            "schedule from the checkpoint's step on), or --use-checkpoint-opt_param-scheduler (keep the "
            "checkpoint's schedule, ignoring these flags).")


def check_schedule_flags(args) -> None:
    """Megatron-LM's rule: the two schedule sources exclude each other. Raises ValueError."""
    if args.override_opt_param_scheduler and args.use_checkpoint_opt_param_scheduler:
        raise ValueError("--override-opt_param-scheduler and --use-checkpoint-opt_param-scheduler exclude each "
                         "other: the first takes the LR schedule from the command line, the second from the "
                         "checkpoint")
