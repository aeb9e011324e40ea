"""The trainer with `--cross-entropy-loss-fusion --cross-entropy-fusion-impl linear` equals the same run without
it, step for step, through both phases, at TP=2 + sequence parallelism and at PP=2 (torchrun, 2 gloo processes,
float32, mock data). Also: the flags without `linear` stay ignored, as before."""

import pytest
from trainer_cli import read_jsonl, run_trainer, tiny_llama_tst_args

pytestmark = pytest.mark.e2e

ITERS, SUP = 6, 3
BASE = tiny_llama_tst_args(train_iters=ITERS, superposition_iters=SUP)
LAYOUTS = {"tp2_sp": "--tensor-model-parallel-size 2 --sequence-parallel",
           "pp2": "--pipeline-model-parallel-size 2"}
FUSION = "--cross-entropy-loss-fusion --cross-entropy-fusion-impl linear"


@pytest.fixture(scope="module")
def runs(tmp_path_factory):
    out = {}
    for layout, flags in LAYOUTS.items():
        for name, extra in (("unfused", "--cross-entropy-loss-fusion"), ("fused", FUSION)):
            directory = tmp_path_factory.mktemp(f"{layout}_{name}")
            args = f"{BASE} {flags} {extra} --metrics-jsonl {directory}/metrics.jsonl".split()
            result = run_trainer(args)
            assert result.returncode == 0, result.stdout[-3000:] + result.stderr[-5000:]
            out[layout, name] = (result.stdout, read_jsonl(directory / "metrics.jsonl"))
    return out


def _by_step(records, kind):
    return {(r["iteration"], r["phase"]): r for r in records if r["kind"] == kind}


@pytest.mark.parametrize("layout", sorted(LAYOUTS))
def test_fused_run_equals_unfused_run_step_for_step(runs, layout):
    unfused, fused = runs[layout, "unfused"][1], runs[layout, "fused"][1]
    train_u, train_f = _by_step(unfused, "train"), _by_step(fused, "train")
    assert sorted(train_f) == sorted(train_u) and len(train_f) == ITERS
    assert {phase for _, phase in train_f} == {"superposition", "recovery"}
    for step, record in train_u.items():
        assert train_f[step]["loss"] == pytest.approx(record["loss"], rel=1e-5), step
        assert train_f[step]["grad_norm"] == pytest.approx(record["grad_norm"], rel=1e-4), step
    evals_u, evals_f = _by_step(unfused, "eval"), _by_step(fused, "eval")
    assert sorted(evals_f) == sorted(evals_u) and len(evals_f) == 2
    for step, record in evals_u.items():
        for key in ("eval_lm_loss", "eval_mce_loss"):
            if key in record:
                assert evals_f[step][key] == pytest.approx(record[key], rel=1e-5), (step, key)


def test_fusion_flags_without_linear_are_reported_ignored(runs):
    unfused_stdout, fused_stdout = runs["pp2", "unfused"][0], runs["pp2", "fused"][0]
    ignored = [line for line in unfused_stdout.splitlines() if line.startswith("ignored Megatron-LM flags")]
    assert ignored and "--cross-entropy-loss-fusion" in ignored[0]
    assert not any("--cross-entropy-loss-fusion" in line for line in fused_stdout.splitlines()
                   if line.startswith("ignored Megatron-LM flags"))
