"""The README's thin-plugin example runs as documented, at TP=1 and TP=2."""

import os
import subprocess
import sys

import pytest

pytestmark = pytest.mark.e2e

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
EXAMPLE = os.path.join(ROOT, "tools", "example_plugin.py")


@pytest.mark.parametrize("launcher", [[sys.executable], [sys.executable, "-m", "torch.distributed.run", "--standalone",
                                                          "--nproc-per-node=2"]], ids=["python", "torchrun-tp2"])
def test_thin_plugin_example_runs_both_phases(launcher):
    extra = ["--tp", "2"] if len(launcher) > 1 else []
    env = {k: v for k, v in os.environ.items() if k not in ("RANK", "WORLD_SIZE", "MASTER_ADDR", "MASTER_PORT")}
    result = subprocess.run(launcher + [EXAMPLE] + extra, capture_output=True, text=True, timeout=300,
                            env={**env, "PYTHONWARNINGS": "ignore", "OMP_NUM_THREADS": "1"})
    assert result.returncode == 0, result.stdout[-2000:] + result.stderr[-3000:]
    assert "superposition: mce loss" in result.stdout and "recovery: lm loss" in result.stdout
