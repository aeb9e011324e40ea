"""A checkpoint written on one megatron-core release resumes on the other, bitwise.

The suite runs under megatron-core 0.16.1 and 0.19.2 (tools/test.sh); this test writes with the release it runs
under and resumes with the other one, so the two passes cover both directions. 0.16.1 writes `common.pt`, 0.19.2
keeps the common state inside the shards: each reads the other's layout. DP=2 with the distributed optimizer
(torch Adam, the path with megatron-core's workarounds) and dropout on, resumed inside the superposition phase so
the resumed run crosses the switch; its per-iteration losses and grad norms equal the uninterrupted run's exactly.
"""

import json
import os
import sys

import pytest
from trainer_cli import run_trainer

from megatron_tst.platform.mcore_compat import MCORE_VERSION

pytestmark = pytest.mark.e2e

TRAIN_ITERS, SUP_ITERS, RESUME_AT = 6, 3, 2
FLAGS = ("--num-layers 2 --hidden-size 64 --num-attention-heads 4 --seq-length 32 --position-embedding-type rope "
         "--normalization RMSNorm --swiglu --disable-bias-linear --untie-embeddings-and-output-weights "
         "--hidden-dropout 0.1 --attention-dropout 0.1 --micro-batch-size 2 --global-batch-size 8 "
         f"--train-iters {TRAIN_ITERS} --lr 3e-3 --lr-warmup-iters 2 --lr-decay-style cosine "
         "--tokenizer-type NullTokenizer --vocab-size 256 --mock-data --log-interval 1 --eval-iters 0 "
         f"--tst-bag-size 2 --tst-superposition-iters {SUP_ITERS} --use-distributed-optimizer").split()


def _other_python():
    """The interpreter of the other tested release (tools/test.sh exports both)."""
    name = "MEGATRON_TST_PYTHON_0_19" if MCORE_VERSION.minor < 19 else "MEGATRON_TST_PYTHON_0_16"
    path = os.environ.get(name)
    if not path or not os.path.exists(path):
        pytest.skip(f"${name} is not set: run the suite through tools/test.sh (it installs and exports both venvs)")
    return path


def _train(python, workdir, name, extra):
    metrics = workdir / f"{name}.jsonl"
    result = run_trainer([*FLAGS, "--metrics-jsonl", str(metrics), *extra], nproc=2, timeout=300, python=python)
    assert result.returncode == 0, result.stdout[-3000:] + result.stderr[-3000:]
    return {r["iteration"]: (r["loss"], r["grad_norm"]) for r in map(json.loads, open(metrics))
            if r.get("kind") == "train"}


def test_checkpoint_resumes_bitwise_on_the_other_release(tmp_path):
    other = _other_python()
    ckpt = tmp_path / "ckpt"
    reference = _train(sys.executable, tmp_path, "reference",
                       ["--save", str(ckpt), "--save-interval", str(RESUME_AT)])
    assert (ckpt / f"iter_{RESUME_AT:07d}").is_dir()
    # the layout of the writing release: common.pt up to 0.18, inside the shards from 0.19
    assert (ckpt / f"iter_{RESUME_AT:07d}" / "common.pt").exists() == (MCORE_VERSION.minor < 19)
    resumed = _train(other, tmp_path, "resumed",
                     ["--load", str(ckpt), "--ckpt-step", str(RESUME_AT), "--save", str(tmp_path / "ckpt2")])
    assert sorted(resumed) == list(range(RESUME_AT + 1, TRAIN_ITERS + 1))
    for iteration, values in resumed.items():
        assert values == reference[iteration], (iteration, values, reference[iteration])
