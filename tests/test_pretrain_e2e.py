"""The trainer end to end: torchrun, 2 processes (DP=2), real English text, a baseline and a TST run.

Checks the phase switch, the LR schedule across it, the token-stream invariant against the baseline run's
stream, and that loss falls; plus bad input refused before any heavy work.
"""

import os
from collections import defaultdict

import pytest
from text_corpus import VOCAB_SIZE, build_byte_corpus
from trainer_cli import read_jsonl, run_trainer

L, G, BAG, TRAIN_ITERS, SUP_ITERS = 64, 8, 4, 24, 8

MODEL = ("--num-layers 2 --hidden-size 64 --num-attention-heads 4 --group-query-attention --num-query-groups 2 "
         f"--seq-length {L} --position-embedding-type rope --normalization RMSNorm --swiglu --disable-bias-linear "
         "--untie-embeddings-and-output-weights --attention-dropout 0.0 --hidden-dropout 0.0 --init-method-std 0.02")
TRAINING = (f"--micro-batch-size 2 --global-batch-size {G} --train-iters {TRAIN_ITERS} --lr 3e-3 --min-lr 3e-4 "
            "--lr-warmup-iters 3 --lr-decay-style cosine --weight-decay 0.1 --adam-beta2 0.95 --seed 1234 "
            f"--tokenizer-type NullTokenizer --vocab-size {VOCAB_SIZE} --split 95,5,0 --log-interval 1 "
            "--eval-interval 8 --eval-iters 2 --num-workers 0")
TST = f"--tst-bag-size {BAG} --tst-superposition-iters {SUP_ITERS}"
# The baseline of the comparison: the same data flags (bag size, hence the same stream), no superposition steps.
BASELINE = f"--tst-bag-size {BAG} --tst-superposition-iters 0"


@pytest.fixture(scope="session")
def corpus(tmp_path_factory):
    return build_byte_corpus(str(tmp_path_factory.mktemp("corpus")))


@pytest.fixture(scope="module")
def runs(corpus, tmp_path_factory):
    """A baseline run (0 superposition steps) and a TST run, identical flags otherwise, both recording their
    data streams."""
    out = {}
    for name, extra in (("baseline", BASELINE), ("tst", TST)):
        directory = tmp_path_factory.mktemp(name)
        args = (f"{MODEL} {TRAINING} {extra} --data-path {corpus} --data-cache-path {directory}/cache "
                f"--metrics-jsonl {directory}/metrics.jsonl --record-data-stream {directory}/stream "
                f"--tensorboard-dir {directory}/tb").split()
        result = run_trainer(args)
        assert result.returncode == 0, result.stdout[-3000:] + result.stderr[-5000:]
        out[name] = {"dir": directory, "stdout": result.stdout, "metrics": read_jsonl(directory / "metrics.jsonl")}
    return out


def _train(records):
    return {r["iteration"]: r for r in records if r["kind"] == "train"}


@pytest.mark.e2e
def test_phase_switch_at_the_right_iteration(runs):
    train = _train(runs["tst"]["metrics"])
    assert sorted(train) == list(range(1, TRAIN_ITERS + 1))
    for iteration, record in train.items():
        expected = "superposition" if iteration <= SUP_ITERS else "recovery"
        assert record["phase"] == expected, iteration
        assert record["loss_name"] == ("mce loss" if expected == "superposition" else "lm loss")
    assert all(r["phase"] == "recovery" for r in _train(runs["baseline"]["metrics"]).values())
    assert f"{SUP_ITERS} superposition steps" in runs["tst"]["stdout"]
    assert "phase: superposition" in runs["tst"]["stdout"] and "phase: recovery" in runs["tst"]["stdout"]


@pytest.mark.e2e
def test_one_lr_schedule_continuous_across_the_switch(runs):
    tst, base = _train(runs["tst"]["metrics"]), _train(runs["baseline"]["metrics"])
    for iteration in range(1, TRAIN_ITERS + 1):  # the TST run follows the baseline's schedule step for step
        assert tst[iteration]["lr"] == pytest.approx(base[iteration]["lr"], rel=1e-12), iteration
    lrs = [tst[i]["lr"] for i in range(1, TRAIN_ITERS + 1)]
    jumps = [abs(b - a) for a, b in zip(lrs, lrs[1:])]
    assert abs(lrs[SUP_ITERS] - lrs[SUP_ITERS - 1]) <= max(jumps[:SUP_ITERS - 1] + jumps[SUP_ITERS:]) + 1e-12


@pytest.mark.e2e
def test_consumed_samples_and_tokens(runs):
    train = _train(runs["tst"]["metrics"])
    for iteration, record in train.items():
        sup = min(iteration, SUP_ITERS)
        samples = sup * G * BAG + (iteration - sup) * G
        assert record["consumed_samples"] == samples
        assert record["consumed_tokens"] == samples * L
        assert record["positions_per_s"] > 0 and record["tokens_per_s"] > 0


def _stream(directory):
    """{iteration: [sample ids]} and {sample id: tokens} from every rank's recording."""
    by_iteration, tokens_of = defaultdict(list), {}
    for name in os.listdir(directory / "stream"):
        for record in read_jsonl(directory / "stream" / name):
            for ids, tokens in zip(record["sample_ids"], record["tokens"]):
                by_iteration[record["iteration"]] += ids
                for k, sample in enumerate(ids):
                    chunk = tokens[k * L:(k + 1) * L]
                    assert tokens_of.setdefault(sample, chunk) == chunk
    return by_iteration, tokens_of


@pytest.mark.e2e
def test_token_stream_is_the_baseline_stream_with_nothing_repeated_or_skipped(runs):
    tst_steps, tst_tokens = _stream(runs["tst"]["dir"])
    base_steps, base_tokens = _stream(runs["baseline"]["dir"])
    consumed = [s for i in sorted(tst_steps) for s in sorted(tst_steps[i])]
    total = SUP_ITERS * G * BAG + (TRAIN_ITERS - SUP_ITERS) * G
    assert consumed == list(range(total))  # in order, once each, across the switch
    assert sorted(s for ids in base_steps.values() for s in ids) == list(range(TRAIN_ITERS * G))
    shared = set(base_tokens) & set(tst_tokens)
    assert len(shared) == TRAIN_ITERS * G
    assert all(tst_tokens[s] == base_tokens[s] for s in shared)  # the same tokens for the same sample
    # the first recovery step reads exactly the samples after the last superposition step
    assert sorted(tst_steps[SUP_ITERS]) == list(range(SUP_ITERS * G * BAG, SUP_ITERS * G * BAG + G))


@pytest.mark.e2e
def test_loss_falls_on_real_text(runs):
    for name in ("baseline", "tst"):
        evals = [r for r in runs[name]["metrics"] if r["kind"] == "eval"]
        assert len(evals) >= 2 and all(r["eval_lm_loss"] is not None for r in evals)
        assert evals[-1]["eval_lm_loss"] < evals[0]["eval_lm_loss"] - 0.3, evals
        train = _train(runs[name]["metrics"])
        assert train[TRAIN_ITERS]["loss"] < train[SUP_ITERS + 1]["loss"]
    tst_evals = [r for r in runs["tst"]["metrics"] if r["kind"] == "eval"]
    assert any("eval_mce_loss" in r for r in tst_evals if r["phase"] == "superposition")
    assert all("eval_mce_loss" not in r for r in tst_evals if r["phase"] == "recovery")


@pytest.mark.parallel
def test_tst_and_baseline_flags_build_identical_models(megatron_single_process, corpus):
    import torch

    from megatron_tst.training import arguments
    from megatron_tst.training.build import build_components, setup_parallel

    states = []
    for extra in ("", TST):
        args = arguments.parse_args(f"{MODEL} {TRAINING} {extra} --data-path {corpus}".split(), world_size=1)
        setup_parallel(args)
        model = build_components(args, 384).model
        states.append({k: v.clone() if torch.is_tensor(v) else v for k, v in model[0].module.state_dict().items()})
    assert list(states[0]) == list(states[1])
    assert all(torch.equal(a, states[1][k]) if torch.is_tensor(a) else a == states[1][k] for k, a in states[0].items())


@pytest.mark.e2e
def test_tensorboard_events_carry_the_phase_and_losses(runs):
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    events = EventAccumulator(str(runs["tst"]["dir"] / "tb"))
    events.Reload()
    tags = set(events.Tags()["scalars"])
    assert {"loss", "lr", "grad_norm", "eval_lm_loss", "eval_mce_loss", "phase_is_superposition"} <= tags
    phase = {e.step: e.value for e in events.Scalars("phase_is_superposition")}
    assert all(phase[i] == (1.0 if i <= SUP_ITERS else 0.0) for i in range(1, TRAIN_ITERS + 1))
