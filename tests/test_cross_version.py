"""A checkpoint written on one megatron-core release resumes bitwise on the other (0.17.1 <-> 0.19.2).

The suite runs under both releases (tools/test.sh); here the release the suite runs under writes (test_resume.py's
uninterrupted reference run: DP=2, the distributed optimizer with torch Adam, dropout 0.1, TST, real text, a
checkpoint every 2 steps) and the other release's trainer (`torchrun ... -m megatron_tst.pretrain` with the other
venv's python) resumes from its iteration-4 checkpoint (--ckpt-step 4, inside the 5-step superposition phase) to
the end, across the phase switch. 0.17 writes the common state to `common.pt`, 0.19 inside the shards: each reads
the other's. The same vocabulary on both sides is `--vocab-size 257` on 0.19 and `256` on 0.17 (0.17's NullTokenizer
adds the end-of-document id; the flag value that fits is what the resume check names otherwise).
"""

import os

import pytest
from cli import run_trainer
from test_resume import (  # noqa: F401  (corpus, reference: session fixtures shared with test_resume.py)
    SUPERPOSITION_ITERS,
    TRAIN_ITERS,
    checkpoint_tensors,
    corpus,
    expected_records,
    records_of,
    reference,
    resume_flags,
)

from megatron_tst.platform.mcore_compat import MCORE_VERSION

pytestmark = pytest.mark.e2e

RESUME_AT = 4


def _other_release():
    """(the other tested release's minor version, its python), or a skip naming the variable."""
    minor, name = (17, "MEGATRON_TST_PYTHON_0_17") if MCORE_VERSION.minor >= 19 else (19, "MEGATRON_TST_PYTHON_0_19")
    path = os.environ.get(name)
    if not path or not os.path.exists(path):
        pytest.skip(f"${name} is not set: run the suite through tools/test.sh (it installs and exports both venvs)")
    return minor, path


@pytest.fixture(scope="module")
def resumed(corpus, reference, tmp_path_factory):  # noqa: F811
    minor, python = _other_release()
    directory = tmp_path_factory.mktemp("cross_version")
    argv = resume_flags(corpus, mcore_minor=minor) + [
        "--load", str(reference / "ckpt"), "--ckpt-step", str(RESUME_AT), "--save", str(directory / "ckpt"),
        "--metrics-jsonl", str(directory / "run.jsonl")]
    result = run_trainer(argv, nproc=2, python=python)
    return directory, result


def test_the_writing_release_has_its_own_layout(reference):  # noqa: F811
    written = reference / "ckpt" / f"iter_{RESUME_AT:07d}"
    assert (written / "common.pt").exists() == (MCORE_VERSION.minor < 19)


def test_the_other_release_resumes_bitwise_across_the_phase_switch(resumed, reference):  # noqa: F811
    directory, result = resumed
    assert result.returncode == 0, result.stdout[-3000:] + result.stderr[-3000:]
    assert f"at iteration {RESUME_AT}" in result.stdout
    ours = records_of(directory / "run.jsonl")
    expected = expected_records(records_of(reference / "run.jsonl"), RESUME_AT)
    # its first line, the last superposition step, is a record of its own (a log interval never mixes phases)
    assert sorted(ours) == list(range(RESUME_AT + 1, TRAIN_ITERS + 1)) and RESUME_AT + 1 == SUPERPOSITION_ITERS
    for iteration, values in ours.items():
        assert values == expected[iteration], (iteration, values, expected[iteration])
    final = f"iter_{TRAIN_ITERS:07d}"
    theirs, ours = checkpoint_tensors(reference / "ckpt" / final), checkpoint_tensors(directory / "ckpt" / final)
    assert sorted(theirs) == sorted(ours)
    assert [key for key in ours if not ours[key].equal(theirs[key])] == []
