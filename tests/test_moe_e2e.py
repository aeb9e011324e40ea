"""MoE end to end: Megatron-LM's Mixtral example at tiny sizes trains through both TST phases, saves and resumes
bitwise, at EP=2 and at TP=2 with sequence parallelism (2 processes each).

The command line is derived from Megatron-LM's `examples/mixtral/train_mixtral_8x7b_distributed.sh` (core_v0.19.0;
core_v0.17.1 has the same flags), flag by flag, with sizes shrunk:

    Mixtral 8x7B                                   here
    --seq-length 4096 --max-position-embeddings    --seq-length 32 --max-position-embeddings 256
      32768 --num-layers 32 --hidden-size 4096       --num-layers 2 --hidden-size 64
    --ffn-hidden-size 14336 (3.5 x hidden)         --ffn-hidden-size 224
    --num-attention-heads 32, 8 query groups       --num-attention-heads 8, 2 query groups
    --num-experts 8 --expert-model-parallel-size 8 --num-experts 8 --expert-model-parallel-size 2 (or TP=2 + SP)
    --pipeline-model-parallel-size 4               1 (2 processes in all)
    --micro-batch-size 1 --global-batch-size 256   --micro-batch-size 1 --global-batch-size 4
    --train-iters 500000 --lr-decay-iters 320000   --train-iters 8 --lr-decay-iters 6
      --lr-warmup-iters 500                          --lr-warmup-iters 1
    --tokenizer-type Llama2Tokenizer, --data-path  NullTokenizer, --mock-data (no tokenizer model offline)
    --eval-iters 10 --eval-interval 1000           --eval-iters 1 --eval-interval 4
    --save-interval 10000                          --save-interval 2

and every other flag as the example has it (RMSNorm, RoPE base 1e6 without learned positions, SwiGLU, untied
embeddings, no bias, init std 0.01, dropout 0, top-2 routing with the aux loss 1e-2, the alltoall dispatcher,
--overlap-grad-reduce --overlap-param-gather with the distributed optimizer, --sequence-parallel, --bf16,
--clip-grad 1.0, weight decay 0.1, cosine decay to --min-lr 1e-5), plus TST: bags of 4 for the first 25 % of the
steps. Left out: --moe-grouped-gemm (needs Transformer Engine or the grouped_gemm CUDA package: not on CPU);
--no-load-optim --no-load-rng (the example loads a converted checkpoint; a resume loads both); --use-mcore-models
(the only models of Megatron-LM 0.17+).

Each layout: one run of 8 steps saving every 2, then the same command resuming from its iteration-2 checkpoint (the
last superposition step) into another directory; the resumed run's records equal the uninterrupted run's bitwise.
"""

import math

import pytest
from cli import read_jsonl, run_in_workers
from test_resume import expected_records, records_of

pytestmark = pytest.mark.e2e

TRAIN_ITERS, RESUME_AT = 8, 2
SUPERPOSITION_ITERS = 2  # 25 % of 8
MIXTRAL_TINY = (
    "--disable-bias-linear --seq-length 32 --max-position-embeddings 256 --num-layers 2 --hidden-size 64 "
    "--ffn-hidden-size 224 --num-attention-heads 8 --init-method-std 0.01 --attention-dropout 0.0 "
    "--hidden-dropout 0.0 --normalization RMSNorm --position-embedding-type rope --swiglu "
    "--untie-embeddings-and-output-weights --group-query-attention --num-query-groups 2 --no-masked-softmax-fusion "
    "--no-position-embedding --rotary-base 1000000 "
    "--num-experts 8 --moe-router-topk 2 --moe-router-load-balancing-type aux_loss --moe-aux-loss-coeff 1e-2 "
    "--moe-token-dispatcher-type alltoall --overlap-param-gather --overlap-grad-reduce "
    "--tokenizer-type NullTokenizer --vocab-size 255 --mock-data --split 99990,8,2 "
    f"--micro-batch-size 1 --global-batch-size 4 --lr 1e-4 --train-iters {TRAIN_ITERS} --lr-decay-iters 6 "
    "--lr-decay-style cosine --min-lr 1.0e-5 --weight-decay 0.1 --lr-warmup-iters 1 --clip-grad 1.0 --bf16 "
    "--use-distributed-optimizer --sequence-parallel "
    "--log-interval 1 --save-interval 2 --eval-interval 4 --eval-iters 1 --num-workers 0 "
    "--tst-bag-size 4 --tst-superposition-ratio 0.25").split()
LAYOUTS = {"ep2": ["--expert-model-parallel-size", "2"], "tp2_sp": ["--tensor-model-parallel-size", "2"]}


def moe_worker(directory):
    from megatron_tst.testing.megatron_lm import run_pretrain

    status = {}
    for name, layout in LAYOUTS.items():
        argv = MIXTRAL_TINY + layout
        status[name] = run_pretrain(argv + ["--save", f"{directory}/{name}", "--metrics-jsonl",
                                            f"{directory}/{name}.jsonl"])
        status[f"{name}_resumed"] = run_pretrain(argv + [
            "--load", f"{directory}/{name}", "--ckpt-step", str(RESUME_AT), "--save", f"{directory}/{name}_resumed",
            "--metrics-jsonl", f"{directory}/{name}_resumed.jsonl"])
    return status


@pytest.fixture(scope="module")
def runs(tmp_path_factory):
    directory = tmp_path_factory.mktemp("moe_e2e")
    return directory, run_in_workers(moe_worker, 2, args=(str(directory),))


@pytest.mark.parametrize("layout", LAYOUTS)
def test_mixtral_tiny_trains_through_both_phases(runs, layout):
    directory, status = runs
    assert [s[layout] for s in status] == [0, 0]
    records = read_jsonl(directory / f"{layout}.jsonl", "train")
    assert [r["iteration"] for r in records] == list(range(2, TRAIN_ITERS + 1))
    assert [r["phase"] for r in records] == ["superposition"] + ["recovery"] * (TRAIN_ITERS - 2)
    assert all(math.isfinite(r["loss"]) and math.isfinite(r["grad_norm"]) for r in records)
    evaluations = read_jsonl(directory / f"{layout}.jsonl", "eval")
    assert [e["iteration"] for e in evaluations] == [4, 8]  # every --eval-interval
    assert all(math.isfinite(e["eval_lm_loss"]) for e in evaluations)
    assert (directory / layout / "latest_checkpointed_iteration.txt").read_text().strip() == str(TRAIN_ITERS)


@pytest.mark.parametrize("layout", LAYOUTS)
def test_mixtral_tiny_resumes_bitwise_across_the_phase_switch(runs, layout):
    directory, status = runs
    assert [s[f"{layout}_resumed"] for s in status] == [0, 0]
    resumed = records_of(directory / f"{layout}_resumed.jsonl")
    expected = expected_records(records_of(directory / f"{layout}.jsonl"), RESUME_AT,
                                superposition_iters=SUPERPOSITION_ITERS)
    assert sorted(resumed) == list(range(RESUME_AT + 2, TRAIN_ITERS + 1))
    for iteration, values in resumed.items():
        assert values == expected[iteration], (iteration, values, expected[iteration])
