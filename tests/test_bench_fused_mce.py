"""tools/bench_fused_mce.py's GPU script runs (as its tiny CPU smoke run), and its fused and unfused cases compute
the same loss; the trainer's fused and unfused steps train the same (no timing is asserted)."""

import json
import os
import subprocess
import sys

import pytest

pytestmark = pytest.mark.e2e

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def test_gpu_script_smoke_run_on_cpu(tmp_path):
    out = tmp_path / "bench.json"
    proc = subprocess.run([sys.executable, os.path.join(ROOT, "tools", "bench_fused_mce.py"), "--gpu", "--allow-cpu",
                           "--trainer", "--trainer-warmup", "0", "--trainer-steps", "2", "--num-microbatches", "1",
                           "--json", str(out)], capture_output=True, text=True, timeout=900, cwd=ROOT,
                          env={**os.environ, "PYTHONWARNINGS": "ignore"})
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    assert "| V | dtype | s | fused s |" in proc.stdout
    results = json.loads(out.read_text())
    methods = {(r["bag"], r["method"]) for r in results["grid"]}
    assert methods == {(1, "megatron")} | {(bag, m) for bag in (1, 6) for m in ("unfused", "fused", "recompute")}
    loss = {(r["bag"], r["method"]): r["loss_sum"] for r in results["grid"]}
    for bag in (1, 6):
        for method in ("fused", "recompute"):
            assert abs(loss[bag, method] - loss[bag, "unfused"]) < 1e-3 * abs(loss[bag, "unfused"])
    assert abs(loss[1, "megatron"] - loss[1, "unfused"]) < 1e-5 * abs(loss[1, "unfused"])
    assert all(r["peak_mib"] >= 0 for r in results["grid"])  # on CPU in-process: what the process did not hold yet
    trainer = results["trainer"]
    for variant in ("superposition s=6", "recovery", "stock"):
        fused, unfused = trainer["fused"]["variants"][variant], trainer["unfused"]["variants"][variant]
        for a, b in zip(fused["losses"], unfused["losses"]):
            assert abs(a - b) <= 1e-2 * abs(b), (variant, a, b)  # bf16 model


def test_cpu_grid_measures_each_case_in_a_fresh_process(tmp_path, capsys):
    """The CPU grid's path (each case in a fresh `--one` subprocess, its resident-set peak), at a tiny shape."""
    import bench_fused_mce

    out = tmp_path / "grid.json"
    assert bench_fused_mce.main(["--vocab", "4096", "--bags", "3", "--dtypes", "fp32", "--methods", "fused",
                                 "--positions", "256", "--batch", "2", "--hidden", "64", "--json", str(out)]) == 0
    assert "| 4096 | fp32 | 3 |" in capsys.readouterr().out
    (row,) = json.loads(out.read_text())["grid"]
    assert row["method"] == "fused" and row["bag"] == 3 and row["seconds"] > 0
    assert row["peak_mib"] >= 256 * 4096 * 4 / 2**20  # at least one chunk of fp32 logits (4 MiB), held at once
