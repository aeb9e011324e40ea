"""The package's public surface and the single homes of the trainer's building blocks.

`megatron_tst.__all__` resolves and documents itself; the build sequence, the train step, the stock batch and the
superposition step count are each defined once in the repository (tests and tools call these, never copies).
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
    (r"\s*def (build_components|setup_parallel)\(", "megatron_tst/training/build.py"),
    (r"\s*def train_step\(", "megatron_tst/training/step.py"),
    (r"\s*def make_stock_batch\(", "megatron_tst/superposition.py"),
    (r"\s*def superposition_steps\(", "megatron_tst/training/schedule.py"),
    (r"\s*class (Phase|SamplePlan)\b", "megatron_tst/training/schedule.py"),
])
def test_one_definition_each(pattern, home):
    found = _definitions(pattern)
    assert found and set(found) == {home}, found


def test_ruff_check_is_clean():
    """The repository passes `ruff check` with its ruff.toml (ruff is a test dependency: setup.py, install.sh)."""
    result = subprocess.run([sys.executable, "-m", "ruff", "check", "--no-cache", "."], cwd=ROOT,
                            capture_output=True, text=True)
    assert result.returncode == 0, result.stdout[-4000:] + result.stderr[-2000:]
