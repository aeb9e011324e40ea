"""Before any heavy work: does this command line continue the checkpoint it resumes, or would it silently train
something else? Compares the run's arguments with the checkpoint's saved `args` (Megatron-LM saves its whole
argument namespace, `--tst-*` included), read with the allow-listed unpickler (`mcore_compat.read_common_state`)
before the model is built. Megatron-LM's own `load_checkpoint` compares the model's shape afterwards.

Two kinds of flags:
- the sample stream (`STREAM_FLAGS`): which tokens iteration i trains on. Progress is counted in baseline
  samples of one dataset cut one way; another `--seq-length`, blend, split, seed, tokenizer, global batch or
  TST phase plan re-cuts or re-orders it, so a resume would train some tokens twice and skip others. Refused
  (restore the value, or start a new count from the weights with `--finetune`).
- the LR/WD schedule (`SCHEDULE_FLAGS`): Megatron-LM's rule. Without `--override-opt-param-scheduler` or
  `--use-checkpoint-opt_param-scheduler` every schedule value must match the checkpoint's
  (megatron.core.optimizer_param_scheduler.OptimizerParamScheduler._check_and_set asserts it); here that is
  one error naming each flag, both values and the ways forward, instead of the scheduler's AssertionError.

Any checkpoint without saved args (or a flag it does not record) is not compared for that flag.
"""

from __future__ import annotations

import os
from typing import Callable, List, Optional, Tuple

from megatron_tst.loop.checkpoint_checks import CheckpointToLoad

# (flag, value of a namespace, hint) per flag that decides the sample stream.
Extractor = Callable[[object], object]


def _get(name: str, default=None) -> Extractor:
    return lambda ns: getattr(ns, name, default)


def _bag_size(ns) -> int:
    return getattr(ns, "tst_bag_size", None) or 1


def _superposition_steps(ns) -> int:
    from megatron_tst.config import TSTConfig
    from megatron_tst.stream import superposition_steps

    try:
        return superposition_steps(TSTConfig.from_args(ns), getattr(ns, "train_iters", None) or 0)
    except (ValueError, AttributeError):
        return 0


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


class _NullVocabulary(tuple):
    """(token ids, end-of-document id) of a NullTokenizer run, shown as its --vocab-size with what it means."""

    def __repr__(self):
        return f"{self.flag} ({self[0]} token ids, end-of-document {self[1]})"


def _null_tokenizer_vocabulary(ns) -> Optional[_NullVocabulary]:
    """What `--tokenizer-type NullTokenizer --vocab-size V` gives a run (or the checkpoint's run): megatron-core
    >= 0.18 (whose arguments have --null-tokenizer-eod-id) has V ids, the last the end of document; 0.17 adds the
    end-of-document id V (V + 1 ids). The same flag means another model and mock-data stream on the other side of
    that change; the same vocabulary on both sides is continued."""
    if getattr(ns, "tokenizer_type", None) != "NullTokenizer" or getattr(ns, "vocab_size", None) is None:
        return None
    size = int(ns.vocab_size)
    if hasattr(ns, "null_tokenizer_eod_id"):
        eod = getattr(ns, "null_tokenizer_eod_id", None)
        value = _NullVocabulary((size, size - 1 if eod is None else int(eod)))
    else:
        value = _NullVocabulary((size + 1, size))
    value.flag = size
    return value


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
    ("--vocab-size", _null_tokenizer_vocabulary),
    ("--tst-bag-size", _bag_size),
    ("superposition steps", _superposition_steps),
]

# Megatron-LM's flags behind OptimizerParamScheduler's values (what _check_and_set compares, and the WSD and
# warm-up-start values it takes from the command line without comparing).
SCHEDULE_FLAGS = ("lr", "min_lr", "lr_warmup_iters", "lr_warmup_samples", "lr_warmup_fraction", "lr_warmup_init",
                  "lr_decay_iters", "lr_decay_samples", "lr_decay_style", "lr_wsd_decay_iters",
                  "lr_wsd_decay_samples", "lr_wsd_decay_style", "train_iters", "train_samples",
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
    if flag == "--vocab-size" and theirs is not None and ours is not None:
        same = theirs[0] - (0 if hasattr(args, "null_tokenizer_eod_id") else 1)  # this release's flag for it
        if same != ours.flag:
            return (f"{flag}: checkpoint {theirs!r}, this run {ours!r}; --vocab-size {same} gives this "
                    "megatron-core's NullTokenizer the checkpoint's vocabulary")
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


def _schedule_value(ns, name: str):
    """A schedule flag as the scheduler uses it: Megatron-LM decays over --train-iters / --train-samples when
    --lr-decay-iters / --lr-decay-samples is not given (and saves that value in the checkpoint's args)."""
    value = getattr(ns, name, None)
    if value is None and name == "lr_decay_iters":
        return getattr(ns, "train_iters", None)
    if value is None and name == "lr_decay_samples":
        return getattr(ns, "train_samples", None)
    return value


def schedule_mismatches(args, ckpt_args) -> List[str]:
    """One line per LR/WD schedule flag that differs from the checkpoint's."""
    lines = []
    for name in SCHEDULE_FLAGS:
        if not hasattr(ckpt_args, name):
            continue
        ours, theirs = _schedule_value(args, name), _schedule_value(ckpt_args, name)
        if not _same(ours, theirs):
            note = " (the LR decay and weight-decay ramp follow it)" if name in ("train_iters", "train_samples") else ""
            lines.append(f"{_flag(name)}: checkpoint {theirs!r}, this run {ours!r}{note}")
    return lines


def _stream_of(ns) -> dict:
    """What a run's samples are made of (`SamplePlan.stream`), from its arguments (a checkpoint's too)."""
    bag = _bag_size(ns) if getattr(ns, "tst_bag_size", None) is not None else 1
    layout = getattr(ns, "tst_sample_layout", None) or "contiguous"
    window = bag if layout == "contiguous" else 1
    return {"sample_layout": layout if getattr(ns, "tst_bag_size", None) is not None else None,
            "samples_per_window": window}


def check_stream_continuation(checkpoint_stream: dict, stream: dict, consumed_samples: int, where: str) -> None:
    """Refuse (SystemExit) to continue a checkpoint's data stream with a run that reads another kind of samples:
    stock samples of --seq-length vs windows of s x --seq-length. A run that consumed nothing continues anything.
    The way forward is named."""
    saved_window, window = int(checkpoint_stream["samples_per_window"]), int(stream["samples_per_window"])
    if consumed_samples == 0 or saved_window == window:
        return

    def describe(n):
        if n == 1:
            return ("Megatron's stock samples of --seq-length tokens (no TST, --tst-sample-layout segments, or a "
                    "checkpoint written by Megatron-LM)")
        return (f"contiguous windows of {n} x --seq-length tokens (--tst-sample-layout contiguous with "
                f"--tst-bag-size {n})")

    if saved_window == 1:
        forward = "add --tst-sample-layout segments to continue that stream exactly"
    else:
        forward = (f"continue with --tst-sample-layout contiguous and --tst-bag-size {saved_window} (the saving run's "
                   "data flags)")
    raise SystemExit(
        f"error: {where} consumed {consumed_samples} samples of {describe(saved_window)}, but this run would read "
        f"{describe(window)}: the data stream cannot be continued exactly (tokens would be repeated or skipped). "
        f"{forward[0].upper() + forward[1:]}, or start the data over on these weights with --finetune.")


def _cut_block_mismatch(args, ckpt_args, consumed: int) -> Optional[str]:
    """Recovery reads windows in blocks of --global-batch-size windows over --tst-bag-size steps, and the last block
    of a run that ends inside one is cut short (`SamplePlan.baseline_sample`), so the order of its samples depends on
    the run's length. Another --train-iters / --train-samples continues the checkpoint exactly unless it stopped
    past the earlier of the two runs' cut blocks; then this names the problem and the ways forward (else None)."""
    from megatron_tst.config import TSTConfig
    from megatron_tst.stream import SamplePlan

    try:
        ours, theirs = (SamplePlan.from_megatron(ns, TSTConfig.from_args(ns)) for ns in (args, ckpt_args))
    except (ValueError, AttributeError, TypeError):
        return None  # no TST plan on one side: the checks above decide
    if not (ours.tst and theirs.tst) or consumed <= min(ours.cut_block_start, theirs.cut_block_start):
        return None
    if (ours.cut_block_start, ours.total_samples) == (theirs.cut_block_start, theirs.total_samples):
        return None
    length = "--train-samples" if getattr(args, "train_samples", None) else "--train-iters"
    return (f"it stopped after {consumed} samples, inside the last recovery block of a run of "
            f"{theirs.total_samples} samples, which that run cut short (recovery reads windows in blocks of "
            "--global-batch-size windows over --tst-bag-size steps; a run ending inside a block reads a cut block, "
            f"so that every token of a prefix of the stream is trained once); this run of {ours.total_samples} "
            "samples reads those samples in another order (some tokens would be trained twice, others never). Keep "
            f"the checkpoint's {length} to continue it, or start a new count from its weights with --finetune. A run "
            "whose recovery phase is a multiple of --tst-bag-size steps ends on a block boundary and can be extended.")


def check_resume(args, target: Optional[CheckpointToLoad]) -> None:
    """Before the model is built: raise SystemExit naming every flag of this run that would not continue the
    checkpoint it loads (`target`, checked by `checkpoint_checks`), both values and the ways forward (see module
    docstring). Nothing to check without a checkpoint, with --finetune / --pretrained-checkpoint (the data and
    schedule start anew), or when the checkpoint holds no saved arguments."""
    from megatron_tst.platform.mcore_compat import read_common_state

    if target is None or target.finetune:
        return
    directory = target.directory
    ckpt_args = read_common_state(directory).get("args")
    if ckpt_args is None:
        return
    # First the kind of samples (stock L-samples or s*L windows): its message names the layout flag to continue.
    check_stream_continuation(_stream_of(ckpt_args), _stream_of(args),
                              int(getattr(ckpt_args, "consumed_train_samples", 0) or 0),
                              where=f"checkpoint {directory}")
    stream = stream_mismatches(args, ckpt_args)
    if stream:
        raise SystemExit(
            f"error: resuming {directory} with another sample stream: this run would train other tokens than the "
            "checkpoint's run at the same iterations (some twice, some never):\n  " + "\n  ".join(stream)
            + "\nRestore the checkpoint's values to continue it, or start a new run from its weights with "
            "--finetune (iteration, sample count and optimizer state start anew).")
    cut = _cut_block_mismatch(args, ckpt_args, int(getattr(ckpt_args, "consumed_train_samples", 0) or 0))
    if cut:
        raise SystemExit(f"error: resuming {directory}: {cut}")
    loads_schedule = not args.no_load_optim or args.use_checkpoint_opt_param_scheduler
    if not loads_schedule or args.override_opt_param_scheduler or args.use_checkpoint_opt_param_scheduler:
        return
    schedule = schedule_mismatches(args, ckpt_args)
    if schedule:
        raise SystemExit(
            f"error: the LR/weight-decay schedule of this run differs from checkpoint {directory}'s:\n  "
            + "\n  ".join(schedule)
            + "\nEither restore those values, or pass --override-opt-param-scheduler (use this command line's "
            "schedule from the checkpoint's step on), or --use-checkpoint-opt-param-scheduler (keep the "
            "checkpoint's schedule, ignoring these flags)." + _lr_keyed_groups_note(args, ckpt_args))


def _lr_keyed_groups_note(args, ckpt_args) -> str:
    """Another --lr / --min-lr and the checkpoint's optimizer state do not go together in Megatron-LM: its parameter
    groups carry their max_lr / min_lr, which a loaded state restores (megatron-core 0.17: the scheduler then keeps
    the checkpoint's LR, --override-opt-param-scheduler or not), and 0.19 matches the groups by them
    (`optimizer.param_group_identifier_keys`: ValueError "Could not find parameter group" after the model is built).
    The note names --no-load-optim, the way that trains with the command line's LR."""
    if args.no_load_optim:
        return ""
    changed = [name for name in ("lr", "min_lr")
               if not _same(getattr(args, name, None), getattr(ckpt_args, name, None))]
    if not changed:
        return ""
    flags = " / ".join(_flag(name) for name in changed)
    return (f"\nWith the checkpoint's optimizer state neither way gives this run another {flags}: Megatron-Core's "
            "parameter groups carry the checkpoint's (0.17/0.18 keep training with them; 0.19 cannot load them: "
            "'Could not find parameter group'). For another LR add --no-load-optim as well (the weights load; "
            "Adam's moments and the schedule start anew).")
