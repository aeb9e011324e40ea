"""The package's public surface, the single homes of TST's building blocks, and that Megatron-LM's loop does the
training: no training loop, train step, checkpoint save/load or argument parser of our own is left.

`megatron_tst.__all__` resolves and documents itself; the model provider, the forward step, the batches, the phase
plan and the superposition step count are each defined once in the repository (tests and tools call these, never
copies).
"""

import os
import re
import subprocess
import sys

import pytest

pytestmark = pytest.mark.unit

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def test_the_plugin_api_resolves_and_is_documented():
    import megatron_tst

    assert megatron_tst.__all__ == sorted(megatron_tst.__all__)
    for name in megatron_tst.__all__:
        value = getattr(megatron_tst, name)
        if callable(value):
            assert (value.__doc__ or "").strip(), f"megatron_tst.{name} has no docstring"
    with pytest.raises(AttributeError):
        megatron_tst.not_an_api_name  # noqa: B018 (the attribute access is the test)


def _definitions(pattern):
    found = []
    for top in ("megatron_tst", "tests", "tools", "launch"):
        for directory, _, files in os.walk(os.path.join(ROOT, top)):
            for name in files:
                if name.endswith(".py"):
                    path = os.path.join(directory, name)
                    with open(path) as f:
                        found += [os.path.relpath(path, ROOT) for line in f if re.match(pattern, line)]
    return found


@pytest.mark.parametrize("pattern,home", [
    (r"\s*def model_provider\(", "megatron_tst/loop/providers.py"),
    (r"\s*def (forward_step|get_batch|loss_func)\(", "megatron_tst/loop/forward.py"),
    (r"\s*def (make_stock_batch|make_superposition_batch)\(", "megatron_tst/superposition.py"),
    (r"\s*def superposition_steps\(", "megatron_tst/stream.py"),
    (r"\s*class (Phase|SamplePlan|TSTTrainDataset)\b", "megatron_tst/stream.py"),
])
def test_one_definition_each(pattern, home):
    found = _definitions(pattern)
    assert found and set(found) == {home}, found


@pytest.mark.parametrize("pattern", [
    r"\s*def (train_step|train|evaluate|save_checkpoint|load_checkpoint|training_log)\(",
    r".*ArgumentParser\(.*description=.Megatron",
    r"\s*class \w*(Trainer|TrainState|MetricsWriter)\b",
])
def test_megatron_lm_runs_the_loop_not_us(pattern):
    """Megatron-LM's `pretrain` trains, evaluates, saves, loads, parses and logs: nothing in the package does it
    again (the bends in megatron_tst/platform wrap Megatron-LM's functions, they define none of these)."""
    assert [path for path in _definitions(pattern) if path.startswith("megatron_tst/")] == []


def test_ruff_check_is_clean():
    """The repository passes `ruff check` with its ruff.toml (ruff is a test dependency: setup.py, install.sh)."""
    result = subprocess.run([sys.executable, "-m", "ruff", "check", "--no-cache", "."], cwd=ROOT,
                            capture_output=True, text=True)
    assert result.returncode == 0, result.stdout[-4000:] + result.stderr[-2000:]
