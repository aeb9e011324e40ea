"""TST in the model under TP, TP+SP, PP (1F1B), interleaved PP, DP with the distributed optimizer and EP.

Superposition rows are contiguous windows of s*L tokens (the default layout; one case also the "segments"
layout). Each layout runs on 2 gloo processes with the weights of a TP=PP=EP=DP=1 reference (run in this process)
and the same micro-batches, in both phases: the global-batch loss matches to 1e-5 relative and every
parameter's gradient (after Megatron's reductions) matches; for DP=2 + distributed optimizer one full
Adam step gives the same weights. All layouts share one spawn (parallel state is re-initialised per layout).
Every case runs the trainer's own build (`build.build_components`) and step (`megatron_tst.training.step.train_step`)
from its command line (`parallel_harness.case_argv`).
"""

import traceback

import pytest
from parallel_harness import Case, build_case, run_case

from megatron_tst.testing.distributed import run_distributed

pytestmark = pytest.mark.parallel

CASES = [
    Case("tp2", tp=2),
    Case("tp2_sp", tp=2, sequence_parallel=True),
    Case("tp2_sp_segments", tp=2, sequence_parallel=True, sample_layout="segments"),
    Case("tp2_one_kv_group", tp=2, num_query_groups=1),  # fewer KV groups than TP ranks (KV heads replicated)
    Case("pp2_1f1b", pp=2),
    Case("pp2_interleaved", pp=2, vpp=2),
    Case("dp2_distributed_optimizer", distributed_optimizer=True, optimizer_step=True),
    Case("ep2_alltoall", ep=2, moe_dispatcher="alltoall"),
    Case("ep2_allgather", ep=2, moe_dispatcher="allgather"),
    # the fused output layer + loss against the unfused reference
    Case("tp2_fused_loss", tp=2, linear_loss_fusion=True),
    Case("tp2_sp_fused_loss_moe", tp=2, sequence_parallel=True, moe_dispatcher="alltoall", linear_loss_fusion=True),
    Case("pp2_fused_loss", pp=2, linear_loss_fusion=True),
]
PHASES = ("superposition", "recovery")


def _reference_case(case: Case) -> Case:
    return Case(f"ref_{case.name}", moe_dispatcher=case.moe_dispatcher, optimizer_step=case.optimizer_step,
                sample_layout=case.sample_layout,
                num_query_groups=case.num_query_groups)


def _rel(a, b):
    return float((a - b).norm() / b.norm().clamp_min(1e-12))


def _compare(result, reference):
    """{phase: (loss, reference loss, worst relative tensor error, its key, missing keys)}."""
    summary = {}
    for phase in PHASES:
        got, ref = result[phase], reference[phase]
        field = "weights_after" if "weights_after" in ref else "grads"
        errors = {key: _rel(got[field][key], ref[field][key]) for key in ref[field] if key in got[field]}
        worst = max(errors, key=errors.get)
        missing = sorted(set(ref[field]) ^ set(got[field]))
        summary[phase] = (got["loss"], ref["loss"], errors[worst], worst, missing)
    return summary


def layouts_worker(references):
    out = {}
    for case in CASES:
        try:  # build_case sets up the case's layout (build.setup_parallel)
            out[case.name] = _compare(run_case(case, references[case.name]["weights"]),
                                      references[case.name]["result"])
        except Exception:
            out[case.name] = traceback.format_exc()
    return out


@pytest.fixture(scope="module")
def layout_results(megatron_single_process):
    from megatron_tst.testing.global_view import gather_global

    references = {}
    for case in CASES:
        ref_case = _reference_case(case)
        weights = gather_global(build_case(ref_case)[1].model)
        references[case.name] = {"weights": weights, "result": run_case(ref_case, weights)}
    return run_distributed(layouts_worker, world_size=2, args=(references,))


@pytest.mark.parametrize("case", [c.name for c in CASES])
def test_layout_matches_single_process_reference(layout_results, case):
    for rank, results in enumerate(layout_results):
        result = results[case]
        assert not isinstance(result, str), f"rank {rank}:\n{result}"
        for phase, (loss, ref_loss, worst_err, worst_key, missing) in result.items():
            assert not missing, (phase, missing)
            assert worst_err < 1e-5, (rank, phase, worst_key, worst_err)
            if loss is not None:  # the last pipeline stage reports the loss
                assert abs(loss - ref_loss) <= 1e-5 * abs(ref_loss), (rank, phase, loss, ref_loss)
    assert any(r[case][p][0] is not None for r in layout_results for p in PHASES)
