"""Every parallel layout trains what TP=PP=EP=1 trains, through Megatron-LM's own loop, in both phases.

Per model (dense GQA, GQA with one KV group, MoE, tied embeddings): one run at the reference layout (DP=2, the two
gloo workers) takes one superposition step and saves a checkpoint (Megatron-LM's `save_checkpoint`); every layout
then loads it (Megatron-LM's `load_checkpoint` reshards it: TP, SP, PP, interleaved PP, EP, the distributed
optimizer) with a fresh optimizer and trains the same 3 more steps, one superposition then two recovery steps, on the
same data (the sample stream is a function of the sample index, not of the layout). Each run is
`megatron_tst.pretrain.main` in process (`megatron_tst.testing.megatron_lm.run_pretrain`): Megatron-LM's
`pretrain`, our providers and forward step. The first compared step (same weights) agrees to float32 round-off
(loss 1e-5, gradient norm 1e-4); the later ones to 1e-4 / 1e-3: Adam's first updates of a fresh optimizer are
about lr x sign(gradient), which turns round-off in near-zero gradient elements into whole-lr differences.
"""

import pytest
from cli import losses, read_jsonl, run_in_workers, tiny_args

from megatron_tst.platform.mcore_compat import MCORE_VERSION

pytestmark = pytest.mark.parallel

TP2 = ["--tensor-model-parallel-size", "2"]
SP = ["--sequence-parallel"]
PP2 = ["--pipeline-model-parallel-size", "2"]
FUSED = ["--cross-entropy-loss-fusion", "--cross-entropy-fusion-impl", "linear"]
DISTOPT = ["--use-distributed-optimizer"]


def _dense(num_query_groups=2, moe=False, untie=True):
    argv = tiny_args(train_iters=4, superposition_iters=2, moe=moe) + ["--num-layers", "4"]
    argv[argv.index("--num-query-groups") + 1] = str(num_query_groups)
    if not untie:
        argv.remove("--untie-embeddings-and-output-weights")
    return argv


# model -> (its command line, {layout: extra flags}); each model's first layout is the reference
MODELS = {
    "dense": (_dense(), {
        "dp2": [], "tp2": TP2, "tp2_sp": TP2 + SP, "pp2": PP2,
        "pp2_interleaved": PP2 + ["--num-layers-per-virtual-pipeline-stage", "1"],
        "distopt": DISTOPT, "distopt_overlap": DISTOPT + ["--overlap-grad-reduce", "--overlap-param-gather"],
        "fused_tp2_sp": TP2 + SP + FUSED, "fused_pp2": PP2 + FUSED,
    }),
    "one_kv_group": (_dense(num_query_groups=1), {"dp2": [], "tp2": TP2}),
    "moe": (_dense(moe=True), {
        "dp2": [], "ep2_alltoall": ["--expert-model-parallel-size", "2"],
        "ep2_allgather": ["--expert-model-parallel-size", "2", "--moe-token-dispatcher-type", "allgather"],
        "tp2_sp": TP2 + SP, "fused_tp2_sp": TP2 + SP + FUSED,
    }),
    "tied": (_dense(untie=False), {"dp2": [], "pp2": PP2}),
}
# Megatron-LM 0.17.1's interleaved 1F1B at PP=2 on gloo trains otherwise than PP=1 with Megatron-Core's own GPTModel
# too (no TST flags: gradient norms off by 0.4-49 % from the second step, different from run to run; 0.19.2 agrees to
# round-off), so there the case would test Megatron-LM, not TST. (PP=2 with interleaving needs overlapped p2p, and
# both directions then share one rank pair.) Measured on CPU only.
NOT_RUN = {("dense", "pp2_interleaved"): "Megatron-LM 0.17's interleaved schedule at PP=2 on gloo differs from PP=1 "
           "with its own GPTModel (see NOT_RUN)"} if MCORE_VERSION.minor < 18 else {}
CASES = [pytest.param(model, layout, id=f"{model}-{layout}",
                      marks=[pytest.mark.skip(reason=NOT_RUN[model, layout])] if (model, layout) in NOT_RUN else [])
         for model, (_, layouts) in MODELS.items() for layout in list(layouts)[1:]]


# Recovery is Megatron's stock step: Megatron-Core's own GPTModel through Megatron-LM's loop, our model without
# --tst-* flags, and a TST run's recovery phase on the same samples (--tst-sample-layout segments with no superposition
# step reads Megatron's stock samples in order) train bit for bit alike.
STOCK_RUNS = {"stock_gptmodel": [], "ours_without_tst": [],
              "ours_recovery": ["--tst-bag-size", "4", "--tst-superposition-iters", "0", "--tst-sample-layout",
                                "segments"]}


def layouts_worker(directory):
    from megatron_tst.testing.megatron_lm import run_pretrain

    status = {}
    for name, flags in STOCK_RUNS.items():
        status[name] = run_pretrain(tiny_args(bag_size=None, train_iters=4) + flags
                                    + ["--metrics-jsonl", f"{directory}/{name}.jsonl"],
                                    stock_model=name == "stock_gptmodel")
    for model, (argv, layouts) in MODELS.items():
        checkpoint = f"{directory}/{model}"
        status[model] = run_pretrain(argv + ["--save", checkpoint, "--save-interval", "1", "--exit-interval", "1"])
        for layout, flags in layouts.items():
            if (model, layout) in NOT_RUN:
                continue
            status[f"{model}/{layout}"] = run_pretrain(
                argv + flags + ["--load", checkpoint, "--no-load-optim", "--no-load-rng",
                                "--metrics-jsonl", f"{directory}/{model}_{layout}.jsonl"])
    return status


@pytest.fixture(scope="module")
def runs(tmp_path_factory):
    directory = tmp_path_factory.mktemp("layouts")
    status = run_in_workers(layouts_worker, 2, args=(str(directory),))[0]
    assert all(code == 0 for code in status.values()), status
    return directory


def _rel(a, b):
    return abs(a - b) / max(abs(b), 1e-30)


@pytest.mark.parametrize("model,layout", CASES)
def test_layout_trains_what_the_reference_trains(runs, model, layout):
    reference = losses(runs / f"{model}_dp2.jsonl")
    ours = losses(runs / f"{model}_{layout}.jsonl")
    assert sorted(ours) == sorted(reference) == [2, 3, 4]
    for iteration, (loss, grad_norm) in reference.items():
        loss_tolerance, norm_tolerance = (1e-5, 1e-4) if iteration == 2 else (1e-4, 1e-3)
        assert _rel(ours[iteration][0], loss) < loss_tolerance, (iteration, ours[iteration], loss)
        assert _rel(ours[iteration][1], grad_norm) < norm_tolerance, (iteration, ours[iteration], grad_norm)
    if layout == "distopt_overlap":  # --overlap-param-gather waits for the gathered weights: the very same steps
        assert ours == losses(runs / f"{model}_distopt.jsonl")


def test_recovery_is_megatron_stock_model_and_step_bit_for_bit(runs):
    stock = losses(runs / "stock_gptmodel.jsonl")
    assert len(stock) >= 3
    assert losses(runs / "ours_without_tst.jsonl") == stock
    assert losses(runs / "ours_recovery.jsonl") == stock
    records = read_jsonl(runs / "ours_recovery.jsonl", "train")
    assert {r["phase"] for r in records} == {"recovery"} and {r["loss_name"] for r in records} == {"lm loss"}


def test_the_compared_steps_cover_both_phases(runs):
    records = read_jsonl(runs / "dense_dp2.jsonl", "train")
    assert [(r["iteration"], r["phase"], r["loss_name"]) for r in records] == [
        (2, "superposition", "mce loss"), (3, "recovery", "lm loss"), (4, "recovery", "lm loss")]
