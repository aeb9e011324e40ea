"""tools/bench_fused_mce.py's GPU script runs (as its tiny CPU smoke run), and its fused and unfused cases compute
the same loss (no timing is asserted); tools/bench_gpu.py's CPU smoke run (the training step through Megatron-LM's loop
with and without the fused output layer + loss) passes its own checks."""

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


def test_gpu_benchmark_smoke_run_on_cpu(tmp_path):
    """bench_gpu.py's variants through Megatron-LM's loop (tiny shape, bf16, one process), here with the fused output
    layer + loss (the layouts test compares it with the unfused one): its checks pass (finite, each variant in its
    phase, recovery = stock step by step)."""
    fusion = ["--", "--cross-entropy-loss-fusion", "--cross-entropy-fusion-impl", "linear"]
    out = tmp_path / "bench.json"
    proc = subprocess.run([sys.executable, os.path.join(ROOT, "tools", "bench_gpu.py"), "--allow-cpu",
                           "--bag-sizes", "4", "--json", str(out), *fusion], capture_output=True, text=True,
                          timeout=900, cwd=ROOT, env={**os.environ, "PYTHONWARNINGS": "ignore",
                                                      "OMP_NUM_THREADS": "1"})
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    assert "bench_gpu: PASSED" in proc.stdout
    summary = json.loads(out.read_text())["summary"]
    assert set(summary["variants"]) == {"superposition s=4", "recovery", "stock"}
    assert summary["dtype"] == "bf16" and summary["variants"]["superposition s=4"]["raw_tokens_per_step"] == \
        4 * summary["variants"]["stock"]["raw_tokens_per_step"]


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
