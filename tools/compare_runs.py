"""Compare training runs: equal-loss speedup of TST runs over a baseline, plus loss-curve plots.

    python tools/compare_runs.py BASELINE.jsonl TST.jsonl [MORE ...] --out DIR [--json] [--labels a b c]

Each input is a trainer ``--metrics-jsonl`` file (one JSON object per line) or a TensorBoard event
directory whose scalar tags carry the same names as the jsonl keys (step = iteration; the phase is
the ``phase_is_superposition`` scalar). The first run is the reference (baseline); every other run is
compared against it:

* ``equal_loss_speedup``: the other run ends with validation next-token loss l at iteration N; the
  baseline's eval curve first reaches l at the (linearly interpolated) iteration N_B; speedup = N_B / N.
  ``equal_loss_speedup_flops`` is the same ratio in cumulative model FLOPs. When the baseline never
  gets down to l, the speedup is only known to be at least baseline_final / N: the speedup is null
  and ``equal_loss_speedup_lower_bound`` (``..._flops_lower_bound`` in FLOPs) holds that bound. When l
  is worse than the baseline's first eval point, both are null.
* ``equal_flops_loss_gap``: the baseline's eval loss interpolated at the other run's final FLOPs (or
  at its final iteration when FLOPs are missing; ``equal_flops_basis`` says which) minus the other
  run's final eval loss. Positive means the other run is better. Null when the baseline's eval curve
  does not cover that point.

``--json`` prints one JSON object::

    {"runs": [{"label", "path", "final_iteration", "final_eval_lm_loss", "switch_iteration"}, ...],
     "comparisons": [{"label", "equal_loss_speedup", "equal_loss_speedup_flops",
                      "equal_loss_speedup_lower_bound", "equal_loss_speedup_flops_lower_bound",
                      "equal_flops_loss_gap", "equal_flops_basis"}, ...]}

``final_iteration`` is the iteration of the run's last eval record (the point its final loss belongs
to); ``switch_iteration`` is the first record in the recovery phase after superposition-phase records
(null for a baseline). Without ``--json`` a readable table is printed.

PNG plots written to ``--out``: validation loss against steps, FLOPs, raw tokens and wall time (each
when some run has that data), and training loss against steps (superposition-phase training loss is
the MCE loss, not comparable with the LM loss: it is drawn dotted). A run's phase switch is a dashed
vertical line in the run's colour.

Input handling: records without ``"kind"`` are eval records when they hold ``eval_lm_loss`` and train
records otherwise; a ``{"kind": "run"}`` header may give the run's name (the default label). When a
run was resumed, records repeat: a record whose iteration goes back below one already seen starts
over from that iteration, so the later record for an iteration wins and stale records of the
abandoned attempt beyond the restart point are dropped. Eval records missing ``flops``,
``consumed_tokens`` or ``wall_time_s`` take them from the train record of the same iteration; a key
still missing just disables that axis for that run (noted on stderr). Unreadable lines and
non-finite losses are skipped with a note on stderr.
"""

from __future__ import annotations

import argparse
import json
import math
import os
import sys
from dataclasses import dataclass, field
from typing import Iterable, Optional, Sequence

EVAL_LOSS_KEY = "eval_lm_loss"
TRAIN_LOSS_KEY = "loss"
SUPERPOSITION = "superposition"
RECOVERY = "recovery"
# TensorBoard scalar the trainer's MetricsWriter logs on every train and eval step (1.0: superposition).
PHASE_TAG = "phase_is_superposition"
# Keys an eval record may borrow from the train record logged at the same iteration.
SHARED_AXIS_KEYS = ("flops", "consumed_tokens", "wall_time_s")
# x-axes of the validation-loss plots: record key, axis label, file name stem.
PLOT_AXES = (
    ("iteration", "optimizer steps", "eval_loss_vs_steps"),
    ("flops", "model FLOPs (cumulative)", "eval_loss_vs_flops"),
    ("consumed_tokens", "raw tokens consumed", "eval_loss_vs_tokens"),
    ("wall_time_s", "wall time", "eval_loss_vs_wall_time"),
)

Point = tuple  # (x, loss)


class InputError(Exception):
    """A problem with an input file that the user must fix (reported without a traceback)."""


def note(message: str) -> None:
    """Print an informational message on stderr."""
    print(f"note: {message}", file=sys.stderr)


# --------------------------------------------------------------------------------------------------
# Pure math on curves: lists of (x, loss) points sorted by x.
# --------------------------------------------------------------------------------------------------


def interpolate_iteration_at_loss(points: Sequence[Point], loss: float) -> Optional[float]:
    """The x at which the curve ``points`` first reaches ``loss``, linearly interpolated.

    Walks the points in order and returns the x of the first point whose loss is <= ``loss``,
    interpolated between it and the previous point (whose loss is above ``loss``). Returns None when
    the curve never gets down to ``loss``, or when its first point is already below ``loss`` (the
    crossing happened before the first point, where the curve is unknown).
    """
    if not points:
        return None
    first_x, first_loss = points[0]
    if first_loss < loss:
        return None
    if first_loss == loss:
        return float(first_x)
    for (x_before, loss_before), (x_after, loss_after) in zip(points, points[1:]):
        if loss_after == loss:
            return float(x_after)
        if loss_after < loss:
            fraction = (loss_before - loss) / (loss_before - loss_after)
            return x_before + fraction * (x_after - x_before)
    return None


def interpolate_loss_at(points: Sequence[Point], x: float) -> Optional[float]:
    """The curve's loss (its y) at ``x``, linearly interpolated; None when ``x`` lies outside the curve."""
    if not points or x < points[0][0] or x > points[-1][0]:
        return None
    for (x_before, loss_before), (x_after, loss_after) in zip(points, points[1:]):
        if x_before <= x <= x_after:
            if x_after == x_before:
                return float(loss_after)
            fraction = (x - x_before) / (x_after - x_before)
            return loss_before + fraction * (loss_after - loss_before)
    return float(points[-1][1])  # a single point, equal to x


@dataclass(frozen=True)
class Speedup:
    """An equal-loss speedup: ``value`` when the baseline reaches the loss, else ``lower_bound``."""

    value: Optional[float]
    lower_bound: Optional[float]


def equal_loss_speedup(baseline_evals: Sequence[Point], run_evals: Sequence[Point]) -> Speedup:
    """Speedup of a run over the baseline at the run's final loss, in the unit of the curves' x.

    Both arguments are (x, eval loss) curves sorted by x (x = iteration, or FLOPs, ...). With the
    run's final point (N, l) and the baseline reaching l at N_B: value = N_B / N. When the baseline
    never reaches l, value is None and lower_bound = baseline's final x / N. When l is worse than the
    baseline's first point (or N <= 0, or a curve is empty), both are None.
    """
    if not baseline_evals or not run_evals:
        return Speedup(None, None)
    run_final_x, run_final_loss = run_evals[-1]
    if run_final_x <= 0:
        return Speedup(None, None)
    baseline_x = interpolate_iteration_at_loss(baseline_evals, run_final_loss)
    if baseline_x is not None:
        return Speedup(baseline_x / run_final_x, None)
    if min(loss for _, loss in baseline_evals) > run_final_loss:
        return Speedup(None, baseline_evals[-1][0] / run_final_x)
    return Speedup(None, None)


def equal_x_loss_gap(baseline_evals: Sequence[Point], run_evals: Sequence[Point]) -> Optional[float]:
    """Baseline loss at the run's final x minus the run's final loss (positive: the run is better).

    None when the baseline curve does not cover the run's final x (or a curve is empty).
    """
    if not baseline_evals or not run_evals:
        return None
    run_final_x, run_final_loss = run_evals[-1]
    baseline_loss = interpolate_loss_at(baseline_evals, run_final_x)
    if baseline_loss is None:
        return None
    return baseline_loss - run_final_loss


# --------------------------------------------------------------------------------------------------
# Reading runs
# --------------------------------------------------------------------------------------------------


@dataclass
class RunLog:
    """One run's records: train and eval records sorted by iteration, one per iteration."""

    path: str
    label: str
    train: list = field(default_factory=list)
    evals: list = field(default_factory=list)
    header: Optional[dict] = None

    def eval_curve(self, x_key: str = "iteration") -> list:
        """(x, eval_lm_loss) points of the eval records that have ``x_key``, sorted by x."""
        return curve_from_records(self.evals, x_key, EVAL_LOSS_KEY)

    def train_curve(self, x_key: str = "iteration") -> list:
        """(x, training loss) points of the train records that have ``x_key``, sorted by x."""
        return curve_from_records(self.train, x_key, TRAIN_LOSS_KEY)


def is_finite_number(value) -> bool:
    """True for an int or float that is neither NaN nor infinite (bools excluded)."""
    return isinstance(value, (int, float)) and not isinstance(value, bool) and math.isfinite(value)


def curve_from_records(records: Iterable[dict], x_key: str, loss_key: str) -> list:
    """(x, loss) points from the records holding finite values of both keys, sorted by x."""
    points = [
        (record[x_key], record[loss_key])
        for record in records
        if is_finite_number(record.get(x_key)) and is_finite_number(record.get(loss_key))
    ]
    return sorted(points, key=lambda point: point[0])


def record_kind(record: dict) -> str:
    """The record's kind: its "kind" key, else "eval" when it holds eval_lm_loss, else "train"."""
    kind = record.get("kind")
    if kind is not None:
        return str(kind)
    return "eval" if EVAL_LOSS_KEY in record else "train"


def read_jsonl_records(path: str) -> list:
    """The JSON objects of a jsonl file in file order; unreadable lines are skipped with a note."""
    records = []
    with open(path, encoding="utf-8") as lines:
        for line_number, line in enumerate(lines, start=1):
            if not line.strip():
                continue
            try:
                record = json.loads(line)
            except json.JSONDecodeError as error:
                note(f"{path}:{line_number}: skipping a line that is not JSON ({error.msg})")
                continue
            if not isinstance(record, dict):
                note(f"{path}:{line_number}: skipping a line that is not a JSON object")
                continue
            records.append(record)
    return records


def read_tensorboard_records(directory: str) -> list:
    """Train and eval records rebuilt from a TensorBoard event directory's scalars.

    Scalars logged at one step form one record. A step with an ``eval_lm_loss`` scalar gives an eval
    record holding every ``eval_*`` scalar of that step plus the step's flops, consumed_tokens and
    wall_time_s; a step with a ``loss`` scalar gives a train record holding the other scalars. The
    phase of both comes from the step's ``phase_is_superposition`` scalar (1: superposition, 0:
    recovery), which the trainer logs on every train and eval step. For event files without it, eval
    records are placed by ``eval_mce_loss`` when the run logged it (superposition phase only): those
    with it in the superposition phase, those without in the recovery phase; train records then get
    no phase.
    """
    try:
        from tensorboard.backend.event_processing.event_accumulator import EventAccumulator
    except ImportError as error:
        raise InputError(
            f"{directory} is a directory, which needs the tensorboard package to be read ({error}); "
            "pass the run's --metrics-jsonl file instead"
        ) from None
    accumulator = EventAccumulator(directory, size_guidance={"scalars": 0})
    accumulator.Reload()
    scalars_by_step: dict = {}
    for tag in accumulator.Tags().get("scalars", []):
        for event in accumulator.Scalars(tag):
            scalars_by_step.setdefault(int(event.step), {})[tag] = float(event.value)
    has_mce = any("eval_mce_loss" in scalars for scalars in scalars_by_step.values())
    records = []
    for step in sorted(scalars_by_step):
        scalars = dict(scalars_by_step[step])
        # The trainer logs one phase per step: its train and eval records there share the phase.
        is_superposition = scalars.pop(PHASE_TAG, None)
        phase = None if is_superposition is None else (SUPERPOSITION if is_superposition >= 0.5 else RECOVERY)
        if TRAIN_LOSS_KEY in scalars:
            train = {k: v for k, v in scalars.items() if not k.startswith("eval_")}
            train.update(kind="train", iteration=step)
            if phase is not None:
                train["phase"] = phase
            records.append(train)
        if EVAL_LOSS_KEY in scalars:
            evaluation = {k: v for k, v in scalars.items() if k.startswith("eval_") or k in SHARED_AXIS_KEYS}
            evaluation.update(kind="eval", iteration=step)
            if phase is not None:
                evaluation["phase"] = phase
            elif has_mce:
                evaluation["phase"] = SUPERPOSITION if "eval_mce_loss" in scalars else RECOVERY
            records.append(evaluation)
    return records


def drop_superseded_records(records: Sequence[dict]) -> list:
    """Records of a possibly resumed run, keeping only the latest attempt's record per iteration.

    Walking the records in file order, a record at iteration k that is below the highest iteration
    seen so far, or that repeats the iteration of an earlier record of the same kind, marks a restart
    from k: earlier records beyond k are dropped, and so are those at k of the same kind, or of any
    kind when the restarting record is a train record (step k was redone, so an eval after the old
    step k is stale too). So the later record for an iteration wins, and stale records of the
    abandoned attempt past the restart point go too.
    """
    kept: list = []
    kept_keys: set = set()  # (kind, iteration) of the kept records
    highest_iteration = -math.inf
    for record in records:
        kind, iteration = record_kind(record), record["iteration"]
        if iteration < highest_iteration or (kind, iteration) in kept_keys:
            kept = [old for old in kept if not supersedes(kind, iteration, old)]
            kept_keys = {(record_kind(old), old["iteration"]) for old in kept}
            highest_iteration = max((old["iteration"] for old in kept), default=-math.inf)
        kept.append(record)
        kept_keys.add((kind, iteration))
        highest_iteration = max(highest_iteration, iteration)
    return kept


def supersedes(kind: str, iteration: float, old: dict) -> bool:
    """Whether a restart by a ``kind`` record at ``iteration`` makes the earlier record ``old`` stale."""
    if old["iteration"] != iteration:
        return old["iteration"] > iteration
    return kind == "train" or record_kind(old) == kind


def fill_eval_axes_from_train(evals: Sequence[dict], train: Sequence[dict]) -> list:
    """Eval records with missing flops / consumed_tokens / wall_time_s copied from same-iteration train records."""
    train_by_iteration = {record["iteration"]: record for record in train}
    filled = []
    for record in evals:
        partner = train_by_iteration.get(record["iteration"], {})
        borrowed = {
            key: partner[key]
            for key in SHARED_AXIS_KEYS
            if key not in record and is_finite_number(partner.get(key))
        }
        filled.append({**record, **borrowed})
    return filled


def split_records(path: str, records: Sequence[dict]) -> tuple:
    """(header or None, train records, eval records) of a run, resumed attempts resolved, by iteration."""
    header = None
    stepped = []
    for record in records:
        kind = record_kind(record)
        if kind == "run":
            header = record
        elif kind in ("train", "eval"):
            if is_finite_number(record.get("iteration")):
                stepped.append(record)
            else:
                note(f"{path}: skipping a {kind} record without an iteration")
        else:
            note(f"{path}: skipping a record of unknown kind {kind!r}")
    stepped = drop_superseded_records(stepped)
    train = sorted((r for r in stepped if record_kind(r) == "train"), key=lambda r: r["iteration"])
    evals = sorted((r for r in stepped if record_kind(r) == "eval"), key=lambda r: r["iteration"])
    return header, train, fill_eval_axes_from_train(evals, train)


def load_run(path: str, label: Optional[str] = None) -> RunLog:
    """Read a jsonl metrics file or a TensorBoard event directory into a RunLog.

    Raises InputError when the path does not exist or holds no usable eval record.
    """
    if not os.path.exists(path):
        raise InputError(f"{path}: no such file or directory")
    records = read_tensorboard_records(path) if os.path.isdir(path) else read_jsonl_records(path)
    header, train, evals = split_records(path, records)
    run = RunLog(path=path, label=label or "", train=train, evals=evals, header=header)
    if not run.eval_curve():
        raise InputError(f"{path}: no eval records with a finite {EVAL_LOSS_KEY} (nothing to compare)")
    skipped = len(evals) - len(run.eval_curve())
    if skipped:
        note(f"{path}: ignoring {skipped} eval record(s) without a finite {EVAL_LOSS_KEY}")
    return run


def default_labels(paths: Sequence[str], headers: Sequence[Optional[dict]]) -> list:
    """A label per run: the header's name, else the file's stem; ties broken by the file's stem,
    then its parent folder, then a run number."""
    def stem(path: str) -> str:
        return os.path.splitext(os.path.basename(os.path.normpath(path)))[0]

    def parent_and_stem(path: str) -> str:
        parent = os.path.basename(os.path.dirname(os.path.abspath(os.path.normpath(path))))
        return f"{parent}/{stem(path)}" if parent else stem(path)

    labels = [(header or {}).get("name") or stem(path) for path, header in zip(paths, headers)]
    for tie_breaker in (stem, parent_and_stem):
        labels = [tie_breaker(path) if labels.count(label) > 1 else label for path, label in zip(paths, labels)]
    return [label if labels.count(label) == 1 else f"{label} #{i + 1}" for i, label in enumerate(labels)]


# --------------------------------------------------------------------------------------------------
# Per-run summaries and comparisons
# --------------------------------------------------------------------------------------------------


def switch_iteration(run: RunLog) -> Optional[int]:
    """Iteration of the first recovery-phase record after superposition-phase records; None if none."""
    records = sorted(run.train + run.evals, key=lambda record: record["iteration"])
    seen_superposition = False
    for record in records:
        phase = record.get("phase")
        if phase == SUPERPOSITION:
            seen_superposition = True
        elif phase == RECOVERY and seen_superposition:
            return record["iteration"]
    return None


def summarize_run(run: RunLog) -> dict:
    """The run's entry of the JSON report."""
    final_iteration, final_loss = run.eval_curve()[-1]
    return {
        "label": run.label,
        "path": run.path,
        "final_iteration": final_iteration,
        "final_eval_lm_loss": final_loss,
        "switch_iteration": switch_iteration(run),
    }


def final_eval_has(run: RunLog, key: str) -> bool:
    """True when the run's final eval point (by iteration) carries a finite value of ``key``."""
    final_iteration = run.eval_curve()[-1][0]
    final_record = [r for r in run.evals if r["iteration"] == final_iteration][-1]
    return is_finite_number(final_record.get(key))


def compare_runs(baseline: RunLog, run: RunLog) -> dict:
    """The comparison entry of ``run`` against ``baseline`` (equal-loss speedups, equal-FLOPs gap)."""
    step_speedup = equal_loss_speedup(baseline.eval_curve("iteration"), run.eval_curve("iteration"))
    flops_available = bool(baseline.eval_curve("flops")) and final_eval_has(run, "flops")
    if flops_available:
        flops_speedup = equal_loss_speedup(baseline.eval_curve("flops"), run.eval_curve("flops"))
        gap = equal_x_loss_gap(baseline.eval_curve("flops"), run.eval_curve("flops"))
        basis = "flops"
    else:
        note(f"{run.label} vs {baseline.label}: FLOPs missing (baseline eval curve or final eval); FLOPs speedup "
             "unavailable, equal-compute gap taken at equal steps")
        flops_speedup = Speedup(None, None)
        gap = equal_x_loss_gap(baseline.eval_curve("iteration"), run.eval_curve("iteration"))
        basis = "steps"
    return {
        "label": run.label,
        "equal_loss_speedup": step_speedup.value,
        "equal_loss_speedup_flops": flops_speedup.value,
        "equal_loss_speedup_lower_bound": step_speedup.lower_bound,
        "equal_loss_speedup_flops_lower_bound": flops_speedup.lower_bound,
        "equal_flops_loss_gap": gap,
        "equal_flops_basis": basis,
    }


def build_report(runs: Sequence[RunLog]) -> dict:
    """The full report: a summary per run and a comparison per run after the first."""
    return {
        "runs": [summarize_run(run) for run in runs],
        "comparisons": [compare_runs(runs[0], run) for run in runs[1:]],
    }


# --------------------------------------------------------------------------------------------------
# Text output
# --------------------------------------------------------------------------------------------------


def format_value(value, digits: int = 4) -> str:
    """A table cell: '-' for None, fixed digits for floats, str otherwise."""
    if value is None:
        return "-"
    if isinstance(value, float):
        return f"{value:.{digits}f}"
    return str(value)


def format_table(header: Sequence[str], rows: Sequence[Sequence[str]]) -> str:
    """A left-aligned text table with a rule under the header."""
    widths = [max(len(cell) for cell in column) for column in zip(header, *rows)]
    lines = ["  ".join(cell.ljust(width) for cell, width in zip(line, widths)).rstrip() for line in [header, *rows]]
    lines.insert(1, "  ".join("-" * width for width in widths))
    return "\n".join(lines)


def format_report(report: dict) -> str:
    """The report as readable tables."""
    run_rows = [
        [
            run["label"],
            format_value(run["final_iteration"]),
            format_value(run["final_eval_lm_loss"]),
            format_value(run["switch_iteration"]),
            run["path"],
        ]
        for run in report["runs"]
    ]
    text = format_table(["run", "final iter", "final eval loss", "switch iter", "path"], run_rows)
    if report["comparisons"]:
        baseline = report["runs"][0]["label"]
        comparison_rows = [
            [
                comparison["label"],
                format_speedup(comparison["equal_loss_speedup"], comparison["equal_loss_speedup_lower_bound"]),
                format_speedup(
                    comparison["equal_loss_speedup_flops"], comparison["equal_loss_speedup_flops_lower_bound"]
                ),
                format_value(comparison["equal_flops_loss_gap"]),
                comparison["equal_flops_basis"],
            ]
            for comparison in report["comparisons"]
        ]
        text += f"\n\nagainst baseline {baseline!r} (loss gap > 0: the run is better)\n"
        text += format_table(
            ["run", "speedup (steps)", "speedup (FLOPs)", "loss gap at equal compute", "gap basis"], comparison_rows
        )
    return text


def format_speedup(value: Optional[float], lower_bound: Optional[float]) -> str:
    """'2.000x', '>= 4.000x' for a lower bound, or '-'."""
    if value is not None:
        return f"{value:.3f}x"
    if lower_bound is not None:
        return f">= {lower_bound:.3f}x"
    return "-"


# --------------------------------------------------------------------------------------------------
# Plots
# --------------------------------------------------------------------------------------------------


def wall_time_unit(max_seconds: float) -> tuple:
    """(divisor, unit name) to show wall times up to ``max_seconds`` in readable units."""
    if max_seconds >= 2 * 3600:
        return 3600.0, "h"
    if max_seconds >= 2 * 60:
        return 60.0, "min"
    return 1.0, "s"


def x_at_iteration(run: RunLog, x_key: str, iteration: float) -> Optional[float]:
    """The run's ``x_key`` value at ``iteration``, interpolated from its eval records (the plotted
    curve), else from its train records."""
    if x_key == "iteration":
        return float(iteration)
    for records in (run.evals, run.train):
        iteration_to_x = curve_from_records(records, "iteration", x_key)  # (iteration, x) pairs
        x = interpolate_loss_at(iteration_to_x, iteration)  # a piecewise-linear lookup of x as the y
        if x is not None:
            return x
    return None


def plot_eval_loss(runs: Sequence[RunLog], x_key: str, x_label: str, path: str) -> bool:
    """Validation loss of every run against ``x_key``; False (nothing written) when no run has that axis."""
    import matplotlib.pyplot as plt

    curves = [run.eval_curve(x_key) for run in runs]
    if not any(curves):
        note(f"no run has {x_key} in its eval records; {os.path.basename(path)} not written")
        return False
    for run, curve in zip(runs, curves):
        if not curve:
            note(f"{run.path}: no {x_key} in its eval records; left out of {os.path.basename(path)}")
    divisor = 1.0
    if x_key == "wall_time_s":
        divisor, unit = wall_time_unit(max(x for curve in curves for x, _ in curve))
        x_label = f"{x_label} ({unit})"
    figure, axes = plt.subplots(figsize=(8, 5))
    for index, (run, curve) in enumerate(zip(runs, curves)):
        if not curve:
            continue
        colour = f"C{index % 10}"
        axes.plot([x / divisor for x, _ in curve], [loss for _, loss in curve], color=colour,
                  marker=".", markersize=3, label=run.label)
        mark_switch(axes, run, x_key, divisor, colour)
    axes.set_xlabel(x_label)
    axes.set_ylabel(f"validation next-token loss ({EVAL_LOSS_KEY})")
    axes.set_title(f"Validation loss vs {x_label}")
    finish_plot(figure, axes, path)
    return True


def finish_plot(figure, axes, path: str) -> None:
    """Add grid and legend, save the figure as a PNG and close it."""
    import matplotlib.pyplot as plt

    axes.grid(True, alpha=0.3)
    axes.legend(fontsize="small")
    figure.tight_layout()
    figure.savefig(path, dpi=120)
    plt.close(figure)


def mark_switch(axes, run: RunLog, x_key: str, divisor: float, colour: str) -> None:
    """Draw the run's phase switch as a dashed vertical line in its colour (no-op for a baseline)."""
    switch = switch_iteration(run)
    if switch is None:
        return
    switch_x = x_at_iteration(run, x_key, switch)
    if switch_x is not None:
        axes.axvline(switch_x / divisor, color=colour, linestyle="--", linewidth=1, alpha=0.8,
                     label=f"{run.label}: phase switch (iter {switch})")


def plot_train_loss(runs: Sequence[RunLog], path: str) -> bool:
    """Training loss of every run against steps; superposition-phase (MCE) loss dotted. False if none."""
    import matplotlib.pyplot as plt

    if not any(run.train_curve() for run in runs):
        note(f"no run has train records with a {TRAIN_LOSS_KEY!r}; {os.path.basename(path)} not written")
        return False
    figure, axes = plt.subplots(figsize=(8, 5))
    for index, run in enumerate(runs):
        colour = f"C{index % 10}"
        superposition = [r for r in run.train if r.get("phase") == SUPERPOSITION]
        next_token = [r for r in run.train if r.get("phase") != SUPERPOSITION]
        for records, style, label in (
            (superposition, ":", f"{run.label} (superposition phase: MCE loss)"),
            (next_token, "-", run.label),
        ):
            curve = curve_from_records(records, "iteration", TRAIN_LOSS_KEY)
            if curve:
                axes.plot([x for x, _ in curve], [loss for _, loss in curve], color=colour, linestyle=style,
                          linewidth=1.2, label=label)
        mark_switch(axes, run, "iteration", 1.0, colour)
    axes.set_xlabel("optimizer steps")
    axes.set_ylabel("training loss")
    axes.set_title("Training loss (superposition-phase MCE is not comparable with next-token loss)")
    finish_plot(figure, axes, path)
    return True


def write_plots(runs: Sequence[RunLog], out_dir: str) -> list:
    """Write every plot the data allow into ``out_dir`` (created); the written paths."""
    import matplotlib

    matplotlib.use("Agg")
    os.makedirs(out_dir, exist_ok=True)
    written = []
    for x_key, x_label, stem in PLOT_AXES:
        path = os.path.join(out_dir, stem + ".png")
        if plot_eval_loss(runs, x_key, x_label, path):
            written.append(path)
    train_path = os.path.join(out_dir, "train_loss_vs_steps.png")
    if plot_train_loss(runs, train_path):
        written.append(train_path)
    return written


# --------------------------------------------------------------------------------------------------
# Command line
# --------------------------------------------------------------------------------------------------


def build_parser() -> argparse.ArgumentParser:
    """The command-line parser."""
    parser = argparse.ArgumentParser(
        description="Compare runs against the first (baseline): equal-loss speedup, equal-FLOPs loss gap, plots.",
    )
    parser.add_argument("runs", nargs="+", metavar="RUN",
                        help="metrics jsonl files or TensorBoard event directories; the first is the baseline")
    parser.add_argument("--out", required=True, help="directory for the PNG plots (created)")
    parser.add_argument("--json", action="store_true", help="print the report as one JSON object")
    parser.add_argument("--labels", nargs="+", help="one label per run (default: header name or file name)")
    return parser


def main(argv: Optional[Sequence[str]] = None) -> int:
    """Entry point: read the runs, print the report, write the plots."""
    parser = build_parser()
    args = parser.parse_args(argv)
    if args.labels is not None and len(args.labels) != len(args.runs):
        parser.error(f"--labels got {len(args.labels)} label(s) for {len(args.runs)} run(s)")
    try:
        runs = [load_run(path) for path in args.runs]
    except (InputError, OSError, UnicodeDecodeError) as error:
        parser.error(str(error))
    labels = args.labels or default_labels(args.runs, [run.header for run in runs])
    for run, label in zip(runs, labels):
        run.label = label
    report = build_report(runs)
    if args.json:
        print(json.dumps(report, indent=2))
    else:
        print(format_report(report))
    for path in write_plots(runs, args.out):
        print(f"wrote {path}", file=sys.stderr)
    return 0


if __name__ == "__main__":
    sys.exit(main())
