"""tools/compare_runs.py: equal-loss speedup math, log reading, and the CLI end to end (synthetic logs)."""

import importlib.util
import json
import os
import subprocess
import sys

import pytest

pytestmark = pytest.mark.unit

REPO_ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
SCRIPT = os.path.join(REPO_ROOT, "tools", "compare_runs.py")
PNG_MAGIC = b"\x89PNG\r\n\x1a\n"
FLOPS_PER_STEP = 6.0e15


def _load_tool():
    spec = importlib.util.spec_from_file_location("compare_runs", SCRIPT)
    module = importlib.util.module_from_spec(spec)
    sys.modules["compare_runs"] = module  # dataclasses look the module up by name
    spec.loader.exec_module(module)
    return module


cr = _load_tool()


def baseline_loss(n):
    """The synthetic baseline: l(n) = 2 + 8 / n."""
    return 2.0 + 8.0 / n


BASELINE_STEPS = list(range(10, 401, 10))


def eval_record(iteration, loss, phase="recovery", flops=True, **extra):
    record = {"kind": "eval", "iteration": iteration, "phase": phase, "eval_lm_loss": loss,
              "consumed_tokens": iteration * 1000, "wall_time_s": iteration * 2.0}
    if flops:
        record["flops"] = iteration * FLOPS_PER_STEP
    record.update(extra)
    return record


def train_record(iteration, loss, phase="recovery", tokens_per_step=1000):
    return {"kind": "train", "iteration": iteration, "phase": phase, "loss": loss, "lr": 1e-3,
            "grad_norm": 1.0, "consumed_samples": iteration * 4, "consumed_tokens": iteration * tokens_per_step,
            "elapsed_ms": 100.0, "wall_time_s": iteration * 2.0 - 0.5, "flops": iteration * FLOPS_PER_STEP}


def baseline_records(flops=True):
    records = [{"kind": "run", "name": "base", "args": {}, "tst": None}]
    for n in BASELINE_STEPS:
        records.append(train_record(n, baseline_loss(n) + 0.05))
        records.append(eval_record(n, baseline_loss(n), flops=flops))
    return records


def tst_records(final_step, final_loss, switch=30, bag=4):
    """A TST run: superposition phase up to ``switch``, eval every 10 steps, ``final_loss`` at the end."""
    records = [{"kind": "run", "name": "tst", "args": {}, "tst": {"bag_size": bag, "superposition_steps": switch}}]
    for n in range(10, final_step + 1, 10):
        phase = "superposition" if n <= switch else "recovery"
        records.append(train_record(n, 9.0 - n / 100, phase=phase))
        loss = final_loss if n == final_step else final_loss + (final_step - n) / 100
        extra = {"eval_mce_loss": loss + 1} if phase == "superposition" else {}
        records.append(eval_record(n, loss, phase=phase, **extra))
    return records


def write_jsonl(path, records):
    with open(path, "w") as out:
        for record in records:
            out.write(json.dumps(record) + "\n")
    return str(path)


def curve(records, x_key="iteration"):
    return cr.curve_from_records([r for r in records if r.get("kind") == "eval"], x_key, "eval_lm_loss")


# ---------------------------------------------------------------- interpolation


def test_interpolate_iteration_at_loss_piecewise_linear():
    points = [(0, 5.0), (10, 4.0), (20, 3.0), (30, 2.5)]
    assert cr.interpolate_iteration_at_loss(points, 4.0) == 10.0
    assert cr.interpolate_iteration_at_loss(points, 3.5) == pytest.approx(15.0)
    assert cr.interpolate_iteration_at_loss(points, 2.75) == pytest.approx(25.0)
    assert cr.interpolate_iteration_at_loss(points, 5.0) == 0.0
    assert cr.interpolate_iteration_at_loss(points, 2.0) is None  # never reached
    assert cr.interpolate_iteration_at_loss(points, 6.0) is None  # before the first point


def test_interpolate_iteration_takes_first_crossing_of_a_noisy_curve():
    points = [(0, 5.0), (10, 3.0), (20, 4.0), (30, 2.0)]
    assert cr.interpolate_iteration_at_loss(points, 3.5) == pytest.approx(7.5)


def test_interpolate_loss_at():
    points = [(0, 5.0), (10, 4.0), (20, 2.0)]
    assert cr.interpolate_loss_at(points, 15) == pytest.approx(3.0)
    assert cr.interpolate_loss_at(points, 20) == 2.0
    assert cr.interpolate_loss_at(points, 21) is None
    assert cr.interpolate_loss_at(points, -1) is None


# ---------------------------------------------------------------- speedup and gap


def test_equal_loss_speedup_is_two_on_the_known_curve():
    baseline = curve(baseline_records())
    run = curve(tst_records(final_step=100, final_loss=baseline_loss(200)))
    assert cr.equal_loss_speedup(baseline, run) == cr.Speedup(2.0, None)
    flops = cr.equal_loss_speedup(curve(baseline_records(), "flops"),
                                  curve(tst_records(100, baseline_loss(200)), "flops"))
    assert flops.value == pytest.approx(2.0, rel=1e-12)
    assert flops.lower_bound is None


def test_equal_loss_speedup_between_eval_points_interpolates():
    baseline = curve(baseline_records())
    target = (baseline_loss(150) + baseline_loss(160)) / 2  # halfway between the eval points 150 and 160
    speedup = cr.equal_loss_speedup(baseline, [(50, 9.0), (100, target)])
    assert speedup.value == pytest.approx(155 / 100)


def test_worse_run_has_speedup_below_one_and_negative_gap():
    baseline = curve(baseline_records())
    run = curve(tst_records(final_step=400, final_loss=baseline_loss(200)))
    speedup = cr.equal_loss_speedup(baseline, run)
    assert speedup.value == pytest.approx(0.5)
    assert speedup.value < 1
    assert cr.equal_x_loss_gap(baseline, run) == pytest.approx(baseline_loss(400) - baseline_loss(200))
    assert cr.equal_x_loss_gap(baseline, run) < 0


def test_run_better_than_the_baseline_ever_gets_gives_a_lower_bound():
    baseline = curve(baseline_records())
    speedup = cr.equal_loss_speedup(baseline, [(50, 3.0), (100, 1.9)])
    assert speedup.value is None
    assert speedup.lower_bound == pytest.approx(400 / 100)


def test_run_worse_than_the_first_baseline_eval_gives_nothing():
    baseline = curve(baseline_records())
    assert cr.equal_loss_speedup(baseline, [(100, baseline_loss(10) + 1)]) == cr.Speedup(None, None)


def test_equal_flops_loss_gap_on_a_linear_case():
    baseline = [(n * 1e15, 5.0 - 0.005 * n) for n in range(0, 401, 10)]
    assert cr.equal_x_loss_gap(baseline, [(100e15, 4.0), (250e15, 3.5)]) == pytest.approx(3.75 - 3.5)
    assert cr.equal_x_loss_gap(baseline, [(255e15, 3.5)]) == pytest.approx(3.725 - 3.5)
    assert cr.equal_x_loss_gap(baseline, [(401e15, 2.0)]) is None  # beyond the baseline's compute


def test_compare_runs_uses_flops_basis_and_falls_back_to_steps(tmp_path):
    base_path = write_jsonl(tmp_path / "base.jsonl", baseline_records())
    base_noflops = write_jsonl(tmp_path / "base_noflops.jsonl", baseline_records(flops=False))
    # Without flops in the eval records the train records (same iteration) still supply them.
    base_bare = [r for r in baseline_records(flops=False) if r["kind"] != "train"]
    base_bare_path = write_jsonl(tmp_path / "base_bare.jsonl", base_bare)
    run_path = write_jsonl(tmp_path / "tst.jsonl", tst_records(100, baseline_loss(200)))
    run = cr.load_run(run_path, "tst")

    with_flops = cr.compare_runs(cr.load_run(base_path, "base"), run)
    assert with_flops["equal_flops_basis"] == "flops"
    assert with_flops["equal_loss_speedup_flops"] == pytest.approx(2.0)
    assert with_flops["equal_flops_loss_gap"] == pytest.approx(baseline_loss(100) - baseline_loss(200))

    borrowed = cr.compare_runs(cr.load_run(base_noflops, "base"), run)
    assert borrowed["equal_flops_basis"] == "flops"  # flops taken from the train records

    steps = cr.compare_runs(cr.load_run(base_bare_path, "base"), run)
    assert steps["equal_flops_basis"] == "steps"
    assert steps["equal_loss_speedup_flops"] is None
    assert steps["equal_loss_speedup"] == 2.0
    assert steps["equal_flops_loss_gap"] == pytest.approx(baseline_loss(100) - baseline_loss(200))


# ---------------------------------------------------------------- reading logs


def test_resumed_run_later_record_wins_and_stale_records_go(tmp_path):
    first_attempt = [train_record(n, 5.0) for n in (10, 20, 30, 40, 50)] + [eval_record(20, 4.0),
                                                                             eval_record(40, 3.9)]
    first_attempt.sort(key=lambda r: (r["iteration"], r["kind"] == "eval"))
    first_attempt.append(eval_record(50, 3.8))
    resumed = [train_record(40, 4.5), eval_record(40, 3.5), train_record(50, 4.4), train_record(60, 4.3),
               eval_record(60, 3.4)]
    run = cr.load_run(write_jsonl(tmp_path / "resumed.jsonl", first_attempt + resumed), "r")
    assert run.eval_curve() == [(20, 4.0), (40, 3.5), (60, 3.4)]  # stale eval at 50 dropped
    assert run.train_curve() == [(10, 5.0), (20, 5.0), (30, 5.0), (40, 4.5), (50, 4.4), (60, 4.3)]


def test_restart_by_a_train_record_drops_the_stale_eval_at_that_step():
    records = [train_record(10, 5.0), train_record(20, 4.0), eval_record(20, 3.0), train_record(30, 3.5),
               train_record(20, 4.2), train_record(30, 3.6)]
    kept = cr.drop_superseded_records(records)
    assert [(r["kind"], r["iteration"], r["loss"]) for r in kept] == [
        ("train", 10, 5.0), ("train", 20, 4.2), ("train", 30, 3.6)]


def test_repeated_iteration_without_going_back_later_wins():
    records = [eval_record(10, 3.0), eval_record(10, 2.5), train_record(10, 4.0)]
    assert [r["eval_lm_loss"] for r in cr.drop_superseded_records(records) if r["kind"] == "eval"] == [2.5]
    assert len(cr.drop_superseded_records(records)) == 2


def test_records_without_kind_are_classified(tmp_path):
    lines = [{"iteration": 10, "loss": 5.0}, {"iteration": 10, "eval_lm_loss": 4.0}]
    path = tmp_path / "nokind.jsonl"
    path.write_text("\n".join(json.dumps(r) for r in lines) + "\n{truncated line\n")
    run = cr.load_run(str(path), "x")
    assert run.eval_curve() == [(10, 4.0)]
    assert run.train_curve() == [(10, 5.0)]
    assert run.eval_curve("flops") == []


def test_switch_iteration(tmp_path):
    tst = cr.load_run(write_jsonl(tmp_path / "tst.jsonl", tst_records(100, 2.5, switch=30)), "tst")
    base = cr.load_run(write_jsonl(tmp_path / "base.jsonl", baseline_records()), "base")
    assert cr.switch_iteration(tst) == 40
    assert cr.switch_iteration(base) is None


@pytest.mark.parametrize("phase_tag", [True, False], ids=["phase-tag", "no-phase-tag"])
def test_tensorboard_directory(tmp_path, phase_tag):
    pytest.importorskip("tensorboard")
    from tensorboard.compat.proto import event_pb2, summary_pb2
    from tensorboard.summary.writer.event_file_writer import EventFileWriter

    writer = EventFileWriter(str(tmp_path / "tb"))
    for n in range(10, 101, 10):
        values = {"loss": 5.0 - n / 100, "eval_lm_loss": baseline_loss(n), "flops": n * FLOPS_PER_STEP}
        if n <= 30:
            values["eval_mce_loss"] = 7.0
        if phase_tag:  # as the trainer's MetricsWriter logs it on every train and eval step
            values["phase_is_superposition"] = float(n <= 30)
        summary = summary_pb2.Summary(value=[summary_pb2.Summary.Value(tag=tag, simple_value=value)
                                             for tag, value in values.items()])
        writer.add_event(event_pb2.Event(step=n, wall_time=1.0e9 + n, summary=summary))
    writer.close()
    run = cr.load_run(str(tmp_path / "tb"), "tb")
    assert [x for x, _ in run.eval_curve()] == list(range(10, 101, 10))
    assert run.eval_curve()[-1][1] == pytest.approx(baseline_loss(100), rel=1e-6)
    assert run.eval_curve("flops")[-1][0] == pytest.approx(100 * FLOPS_PER_STEP, rel=1e-6)
    assert cr.switch_iteration(run) == 40
    train_phases = {record["iteration"]: record.get("phase") for record in run.train}
    if phase_tag:
        assert [n for n, phase in train_phases.items() if phase == "superposition"] == [10, 20, 30]
        assert all(train_phases[n] == "recovery" for n in range(40, 101, 10))
        assert all("phase_is_superposition" not in record for record in run.train + run.evals)
    else:  # without the tag only eval records can be placed (by eval_mce_loss)
        assert set(train_phases.values()) == {None}


# ---------------------------------------------------------------- command line


def run_cli(*args):
    return subprocess.run([sys.executable, SCRIPT, *args], capture_output=True, text=True, timeout=120)


def test_cli_json_and_plots(tmp_path):
    base = write_jsonl(tmp_path / "base.jsonl", baseline_records())
    # A train record after the last eval: the final iteration is the final eval's, where its loss belongs.
    tst = write_jsonl(tmp_path / "tst.jsonl", tst_records(100, baseline_loss(200)) + [train_record(105, 3.0)])
    better = write_jsonl(tmp_path / "better.jsonl", tst_records(100, 1.9))
    out = tmp_path / "plots"
    result = run_cli(base, tst, better, "--out", str(out), "--json", "--labels", "B", "T", "X")
    assert result.returncode == 0, result.stderr
    report = json.loads(result.stdout)
    assert [r["label"] for r in report["runs"]] == ["B", "T", "X"]
    assert report["runs"][0] == {"label": "B", "path": base, "final_iteration": 400,
                                 "final_eval_lm_loss": baseline_loss(400), "switch_iteration": None}
    assert report["runs"][1]["switch_iteration"] == 40
    assert report["runs"][1]["final_iteration"] == 100
    tst_comparison, better_comparison = report["comparisons"]
    assert tst_comparison["label"] == "T"
    assert tst_comparison["equal_loss_speedup"] == 2.0
    assert tst_comparison["equal_loss_speedup_flops"] == pytest.approx(2.0)
    assert tst_comparison["equal_loss_speedup_lower_bound"] is None
    assert tst_comparison["equal_flops_basis"] == "flops"
    assert tst_comparison["equal_flops_loss_gap"] > 0
    assert better_comparison["equal_loss_speedup"] is None
    assert better_comparison["equal_loss_speedup_lower_bound"] == pytest.approx(4.0)
    for name in ("eval_loss_vs_steps", "eval_loss_vs_flops", "eval_loss_vs_tokens", "eval_loss_vs_wall_time",
                 "train_loss_vs_steps"):
        with open(out / f"{name}.png", "rb") as png:
            assert png.read(8) == PNG_MAGIC, name


def test_cli_table_without_json(tmp_path):
    base = write_jsonl(tmp_path / "base.jsonl", baseline_records())
    tst = write_jsonl(tmp_path / "tst.jsonl", tst_records(100, baseline_loss(200)))
    result = run_cli(base, tst, "--out", str(tmp_path / "plots"))
    assert result.returncode == 0, result.stderr
    assert "2.000x" in result.stdout
    assert "base" in result.stdout and "tst" in result.stdout  # default labels from the headers


def test_cli_missing_file_exits_2(tmp_path):
    base = write_jsonl(tmp_path / "base.jsonl", baseline_records())
    missing = str(tmp_path / "nope.jsonl")
    result = run_cli(base, missing, "--out", str(tmp_path / "plots"))
    assert result.returncode == 2
    assert missing in result.stderr and "error" in result.stderr
    assert "Traceback" not in result.stderr


def test_cli_file_without_eval_records_exits_2(tmp_path):
    base = write_jsonl(tmp_path / "base.jsonl", baseline_records())
    train_only = write_jsonl(tmp_path / "train_only.jsonl", [train_record(10, 5.0), train_record(20, 4.0)])
    result = run_cli(base, train_only, "--out", str(tmp_path / "plots"))
    assert result.returncode == 2
    assert "no eval records" in result.stderr
    assert "Traceback" not in result.stderr
