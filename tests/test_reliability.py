"""Fail loudly, never silently (issue 13): divergence, data blends and splits, resume mismatches, the LR
schedule's source at a resume, KV groups and vocabulary padding across TP, MoE losses under per-token loss,
the exit clock. Each test runs the production code path (the trainer's building blocks or the trainer itself).
Checkpoint-writer faults: test_checkpoint_writer_faults.py."""

import math
import os

import pytest
import torch
from run_harness import Trainer
from text_corpus import VOCAB_SIZE, build_byte_corpus

from megatron_tst.testing.distributed import Layout, run_distributed

TINY = ("--num-layers 2 --hidden-size 32 --num-attention-heads 4 --seq-length 16 --micro-batch-size 2 "
        "--global-batch-size 2 --attention-dropout 0.0 --hidden-dropout 0.0 --tokenizer-type NullTokenizer "
        "--vocab-size 128 --lr-decay-style constant").split()


def _sequences(n, length=17, seed=0):
    g = torch.Generator().manual_seed(seed)
    return torch.randint(0, 120, (n, length), generator=g).tolist()


def _snapshot(trainer):
    params = [p.detach().clone() for chunk in trainer.model for p in chunk.parameters()]
    state = trainer.optimizer.state_dict()
    return params, repr(trainer.scheduler.state_dict()), trainer.scheduler.num_steps, state


def _same_tensors(a, b):
    return all(torch.equal(torch.nan_to_num(x), torch.nan_to_num(y)) for x, y in zip(a, b))


# ------------------------------------------------------------------------------------------------- divergence


def _diverge(trainer, steps, micro_batches):
    """Train until NonFiniteError (returns (error, the iteration it came at, snapshot before that step))."""
    from megatron_tst.training.step import NonFiniteError

    for iteration in range(1, steps + 1):
        before = _snapshot(trainer)
        try:
            trainer.step(micro_batches(iteration))
        except NonFiniteError as err:
            return err, iteration, before
    return None, None, None


@pytest.mark.parallel
@pytest.mark.parametrize("case", ["fp32", "bf16", "moe", "mce"])
def test_a_non_finite_step_is_never_applied(megatron_single_process, case):
    """The issue's divergence (--lr 1e4 --clip-grad 0): the first step with a NaN/Inf loss or gradient raises
    on the check and leaves weights, optimizer state and LR schedule exactly as they were."""
    from megatron_tst.superposition import make_superposition_batch

    extra = {"fp32": [], "bf16": ["--bf16"], "mce": ["--tst-bag-size", "2", "--tst-superposition-iters", "40"],
             "moe": ["--num-experts", "4", "--moe-router-topk", "2", "--moe-aux-loss-coeff", "1e-2",
                     "--moe-token-dispatcher-type", "alltoall", "--disable-bias-linear"]}[case]
    trainer = Trainer(TINY + ["--lr", "1e4", "--clip-grad", "0", "--train-iters", "50"] + extra,
                      padded_vocab_size=128)

    def micro_batches(iteration):
        if case != "mce":
            return [_sequences(2, seed=iteration)]
        seq = torch.tensor(_sequences(2, length=33, seed=iteration))
        return [make_superposition_batch(seq[:, :-1], seq[:, 1:], torch.ones(2, 32), 2, segment_length=16)]

    if case == "mce":  # superposition micro-batches through the same train_step
        from megatron_tst.training.step import train_step

        trainer.step = lambda batches: train_step(iter(batches), trainer.model, trainer.optimizer,
                                                        trainer.settings, trainer.scheduler)
    err, iteration, before = _diverge(trainer, 50, micro_batches)
    assert err is not None, "the run never diverged: the test lost its premise"
    assert iteration > 1 and ("loss" in str(err) or "gradient" in str(err)), (iteration, str(err))
    if case == "mce":
        assert "mce loss" in str(err) or "gradient" in str(err)
    after = _snapshot(trainer)
    assert _same_tensors(before[0], after[0]), "the non-finite step changed the weights"
    assert before[1] == after[1] and before[2] == after[2], "the non-finite step moved the LR schedule"


@pytest.mark.parallel
def test_without_the_check_the_step_is_applied(megatron_single_process):
    """--no-check-for-nan-in-loss-and-grad: Megatron-LM's opt-out trains on (the check is what stops it)."""
    trainer = Trainer(TINY + ["--lr", "1e4", "--clip-grad", "0", "--train-iters", "30",
                              "--no-check-for-nan-in-loss-and-grad"], padded_vocab_size=128)
    norms = [trainer.step([_sequences(2, seed=i)])["grad_norm"] for i in range(1, 15)]
    assert any(not math.isfinite(n) for n in norms)


@pytest.mark.e2e
def test_a_model_with_non_finite_weights_is_never_saved(megatron_single_process, tmp_path):
    from megatron_tst.training.run_state import TrainState

    trainer = Trainer(TINY + ["--lr", "1e-3", "--train-iters", "4", "--save", str(tmp_path)],
                      padded_vocab_size=128)
    trainer.save(TrainState(iteration=1, consumed_train_samples=2))
    with torch.no_grad():
        next(trainer.model[0].parameters()).view(-1)[0] = float("inf")
    with pytest.raises(SystemExit, match="non-finite at iteration 2: not saving.*stays iteration 1"):
        trainer.save(TrainState(iteration=2, consumed_train_samples=4))
    assert open(tmp_path / "latest_checkpointed_iteration.txt").read() == "1"
    assert not (tmp_path / "iter_0000002").exists()


def _agreement_and_clock_worker():
    """Rank 1 alone sees a NaN: both ranks get the same finding (no rank left in a collective). And the exit
    clock: the earliest rank's start time."""
    import argparse
    import time

    from megatron_tst.training.run_state import ExitConditions, TrainState, earliest_start_time
    from megatron_tst.training.step import agree_on_non_finite

    rank = torch.distributed.get_rank()
    findings = agree_on_non_finite({"gradient": rank == 1}), agree_on_non_finite({})
    start = earliest_start_time(1000.0 + rank)  # rank 0 started first
    args = argparse.Namespace(exit_signal_handler=False, exit_duration_in_mins=1, exit_interval=None)
    stale = ExitConditions(args, time.time() - 61).check(TrainState(iteration=1))
    fresh = ExitConditions(args, time.time()).check(TrainState(iteration=1))
    return findings, start, stale, fresh


@pytest.fixture(scope="module")
def two_rank_results():
    return run_distributed(_agreement_and_clock_worker, world_size=2, layout=Layout())


@pytest.mark.parallel
def test_all_ranks_agree_on_a_non_finite_finding(two_rank_results):
    assert [r[0] for r in two_rank_results] == [(["gradient"], [])] * 2


@pytest.mark.parallel
def test_exit_duration_counts_from_the_earliest_process_start(two_rank_results):
    """--exit-duration-in-mins: the clock is the earliest rank's start (Megatron-LM's _TRAIN_START_TIME,
    all-reduced MIN); the trainer passes its import time (megatron_tst.pretrain._PROCESS_START_TIME)."""
    assert [r[1] for r in two_rank_results] == [1000.0, 1000.0]
    assert all(r[2] == "--exit-duration-in-mins 1" and r[3] is None for r in two_rank_results)


# ------------------------------------------------------------------------------------------------- resume checks

RESUME = TINY + ["--lr", "1e-3", "--min-lr", "1e-4", "--lr-warmup-iters", "2", "--train-iters", "20",
                 "--tst-bag-size", "2", "--tst-superposition-ratio", "0.25", "--seed", "7"]


@pytest.fixture(scope="module")
def corpus(tmp_path_factory):
    return build_byte_corpus(str(tmp_path_factory.mktemp("corpus")))


@pytest.fixture(scope="module")
def resumable(megatron_single_process, corpus, tmp_path_factory):
    """A checkpoint at iteration 3 of a TST run on --data-path CORPUS --split 98,2,0 (saved args as a data run
    records them), after 3 real steps (so the schedule has moved)."""
    directory = str(tmp_path_factory.mktemp("resumable"))
    trainer = Trainer(RESUME + ["--save", directory], padded_vocab_size=128)
    from megatron_tst.training.run_state import TrainState

    for i in range(3):
        trainer.step([_sequences(2, seed=i)])
    trainer.args.mock_data, trainer.args.data_path, trainer.args.split = False, [corpus], "98,2,0"
    trainer.save(TrainState(iteration=3, consumed_train_samples=12))
    return directory, corpus


def _resume_error(directory, corpus, changes, keep=()):
    """The SystemExit message check_load_arguments gives this run (None if it accepts it)."""
    from megatron_tst.training import arguments, checkpointing
    from megatron_tst.training.tokenizer import vocab_size_with_padding

    argv = RESUME + ["--load", directory, "--data-path", corpus, "--split", "98,2,0"] + list(changes)
    args = arguments.parse_args(argv)
    args.padded_vocab_size = vocab_size_with_padding(128, args.make_vocab_size_divisible_by,
                                                     args.tensor_model_parallel_size)
    args.vocab_size_unpadded = 128
    try:
        checkpointing.check_load_arguments(args)
    except SystemExit as err:
        return str(err)
    return None


@pytest.mark.e2e
def test_the_same_command_line_resumes(resumable):
    assert _resume_error(*resumable, []) is None


@pytest.mark.e2e
@pytest.mark.parametrize("changes, expected", [
    (["--seq-length", "32", "--max-position-embeddings", "32"], "--seq-length: checkpoint 16, this run 32"),
    (["--global-batch-size", "4"], "--global-batch-size: checkpoint 2, this run 4"),
    (["--seed", "8"], "--seed: checkpoint 7, this run 8"),
    (["--split", "90,10,0"], "--split"),
    # windows of 2 L-samples read as windows of 4: the layout check names the bag size to continue with
    (["--tst-bag-size", "4", "--seq-length", "16"],
     "Continue with --tst-sample-layout contiguous and --tst-bag-size 2"),
    (["--tokenizer-type", "NullTokenizer", "--vocab-size", "120"], "--vocab-size: checkpoint 128, this run 120"),
    # a ratio-based phase plan: the superposition phase follows --train-iters, blame that flag
    (["--train-iters", "40"], "--train-iters: checkpoint 20, this run 40, and --tst-superposition-ratio 0.25"),
])
def test_a_resume_that_changes_the_sample_stream_is_refused(resumable, changes, expected):
    message = _resume_error(*resumable, changes)
    assert message is not None and expected in message, message
    # the ways forward: the checkpoint's values (named), or --finetune
    assert "--finetune" in message and ("Restore the checkpoint's values" in message or "Continue with" in message)


@pytest.mark.e2e
def test_a_resume_on_other_data_is_refused(resumable, tmp_path):
    other = build_byte_corpus(str(tmp_path), name="other_text")
    directory, corpus = resumable
    message = _resume_error(directory, other, [])
    assert message is not None and "--data-path: checkpoint" in message and "other_text" in message


@pytest.mark.e2e
@pytest.mark.parametrize("changes, expected", [
    (["--lr", "2e-3"], ["--lr: checkpoint 0.001, this run 0.002"]),
    (["--min-lr", "0"], ["--min-lr: checkpoint 0.0001, this run 0.0"]),
    (["--lr-warmup-iters", "5"], ["--lr-warmup-iters: checkpoint 2, this run 5"]),
    # the same phase plan (0.125 x 40 = 0.25 x 20 = 5 superposition steps): only the schedule differs
    (["--train-iters", "40", "--tst-superposition-ratio", "0.125"],
     ["--train-iters: checkpoint 20, this run 40 (the LR decay"]),
])
def test_a_schedule_change_names_the_flag_both_values_and_the_ways_forward(resumable, changes, expected):
    message = _resume_error(*resumable, changes)
    assert message is not None, changes
    for line in expected:
        assert line in message, message
    assert "--override-opt_param-scheduler" in message and "--use-checkpoint-opt_param-scheduler" in message
    for flag in ("--override-opt_param-scheduler", "--use-checkpoint-opt_param-scheduler"):
        assert _resume_error(*resumable, changes + [flag]) is None


@pytest.mark.e2e
def test_the_two_schedule_sources_exclude_each_other(resumable):
    with pytest.raises(SystemExit):
        _resume_error(*resumable, ["--override-opt_param-scheduler", "--use-checkpoint-opt_param-scheduler"])


# ------------------------------------------------------------------------------------ the schedule at a resume


@pytest.fixture(scope="module")
def scheduled(megatron_single_process, tmp_path_factory):
    """A checkpoint 3 steps into a run with --lr 1e-3, 2 warm-up steps, constant decay."""
    from megatron_tst.training.run_state import TrainState

    directory = str(tmp_path_factory.mktemp("scheduled"))
    trainer = Trainer(RESUME + ["--save", directory], padded_vocab_size=128)
    for i in range(3):
        trainer.step([_sequences(2, seed=i)])
    trainer.save(TrainState(iteration=3, consumed_train_samples=12))
    return directory


def _lrs(trainer):
    return {group["lr"] for group in trainer.optimizer.param_groups}


@pytest.mark.e2e
@pytest.mark.parametrize("flags, lr", [
    # the command line's schedule from the checkpoint's step on: the new --lr is the one used
    (["--lr", "2e-3", "--override-opt_param-scheduler"], 2e-3),
    # the checkpoint's schedule, also without its optimizer state: past warm-up at 1e-3, not restarting it
    (["--lr", "2e-3", "--use-checkpoint-opt_param-scheduler", "--no-load-optim"], 1e-3),
    (["--lr", "2e-3", "--use-checkpoint-opt_param-scheduler"], 1e-3),
    # Megatron-LM: --no-load-optim alone does not load the schedule, warm-up starts again (from 0)
    (["--no-load-optim"], 0.0),
])
def test_where_the_schedule_comes_from_at_a_resume(scheduled, flags, lr):
    trainer = Trainer(RESUME + ["--load", scheduled] + flags, padded_vocab_size=128)
    state = trainer.load()
    assert state.iteration == 3
    assert _lrs(trainer) == {lr}, (flags, _lrs(trainer))
    if lr:  # past warm-up with a constant schedule: the next step keeps it
        trainer.step([_sequences(2, seed=9)])
        assert _lrs(trainer) == {lr}


# ------------------------------------------------------------------------------------------------- data


def _tiny_corpus(directory, documents):
    """A Megatron indexed dataset of `documents` short documents."""
    import numpy as np
    from megatron.core.datasets.indexed_dataset import IndexedDatasetBuilder

    prefix = os.path.join(directory, f"tiny{documents}")
    builder = IndexedDatasetBuilder(prefix + ".bin", dtype=np.uint16)
    for d in range(documents):
        builder.add_document(np.arange(200, dtype=np.uint16) % 250 + d, [200])
    builder.finalize(prefix + ".idx")
    return prefix


def _data_args(argv):
    from megatron_tst.training import arguments

    return arguments.parse_args(TINY + ["--lr", "1e-3", "--train-iters", "4", "--eval-iters", "1",
                                        "--vocab-size", str(VOCAB_SIZE)] + argv)


def _build(args):
    from megatron_tst.training import data
    from megatron_tst.training.tokenizer import build_tokenizer

    tokenizer = build_tokenizer(args.tokenizer_type, args.tokenizer_model, args.vocab_size)
    data.check_splits(args, tokenizer)
    samples = args.eval_iters * args.global_batch_size
    return data.build_datasets(args, tokenizer, [args.train_iters * args.global_batch_size, samples, samples],
                               lambda: True)


@pytest.mark.unit
def test_weighted_blends_and_weighted_per_split_paths_build(megatron_single_process, corpus, tmp_path):
    """`--data-path 0.3 A 0.7 B --split 98,2,0` and a weighted --test-data-path, through Megatron-Core's builder
    with Megatron-LM's sample counts (formerly `size_is_none => weights_are_none`)."""
    other = _tiny_corpus(str(tmp_path), 400)
    cache = ["--data-cache-path", str(tmp_path / "cache")]
    train, valid, test = _build(_data_args(["--data-path", "0.3", corpus, "0.7", other, "--split", "98,2,0"] + cache))
    assert len(train) >= 8 and len(valid) >= 2 and test is None
    train, valid, test = _build(_data_args(["--train-data-path", "0.5", corpus, "0.5", other,
                                            "--valid-data-path", corpus, "--test-data-path", "0.2", corpus,
                                            "0.8", other] + cache))
    assert len(train) >= 8 and len(valid) >= 2 and len(test) >= 2


@pytest.mark.unit
@pytest.mark.parametrize("weighted", [False, True])
def test_a_member_with_an_empty_split_is_named(megatron_single_process, corpus, tmp_path, weighted):
    """`--data-path A TINY --split 90,5,5`: TINY (3 documents) has none in the validation split."""
    tiny = _tiny_corpus(str(tmp_path), 3)
    paths = ["0.5", corpus, "0.5", tiny] if weighted else [corpus, tiny]
    with pytest.raises(ValueError, match=r"member\(s\) .*tiny3 hold no document in the validation split of "
                                         r"--split 90,5,5.*--valid-data-path"):
        _build(_data_args(["--data-path", *paths, "--split", "90,5,5", "--data-cache-path", str(tmp_path)]))


@pytest.mark.unit
def test_a_split_empty_for_every_member_is_skipped(megatron_single_process, tmp_path):
    tiny = _tiny_corpus(str(tmp_path), 3)
    train, valid, test = _build(_data_args(["--data-path", tiny, "--split", "90,5,5",
                                            "--data-cache-path", str(tmp_path)]))
    assert len(train) > 0 and valid is None


# ------------------------------------------------------------------------------ layouts, vocabulary, MoE losses


@pytest.mark.unit
def test_fewer_kv_groups_than_tp_ranks_are_accepted_as_megatron_core_accepts_them():
    from megatron_tst.training import arguments, configs

    base = TINY + ["--lr", "1e-3", "--train-iters", "2", "--mock-data", "--group-query-attention"]
    args = arguments.parse_args(base + ["--num-query-groups", "1", "--tensor-model-parallel-size", "2"],
                                world_size=2)
    assert args.num_query_groups == 1
    configs.transformer_config_from_args(args)  # Megatron-Core's own check accepts it too
    with pytest.raises(SystemExit):  # 3 groups at TP=2: neither divides the other
        arguments.parse_args(TINY[:4] + ["--num-attention-heads", "6", "--hidden-size", "48"] + TINY[6:]
                             + ["--lr", "1e-3", "--train-iters", "2", "--mock-data", "--group-query-attention",
                                "--num-query-groups", "3", "--tensor-model-parallel-size", "2"], world_size=2)


@pytest.mark.unit
@pytest.mark.parametrize("name", ["270m", "600m", "3b", "10b-a1b"])
def test_recipes_pad_the_vocabulary_alike_at_every_tp_they_allow(name):
    from megatron_tst import recipes
    from megatron_tst.training.tokenizer import vocab_size_with_padding

    recipe = recipes.get(name)
    divisor = recipe.settings["make-vocab-size-divisible-by"]
    sizes = recipes.tensor_parallel_sizes(recipe.settings)
    padded = {vocab_size_with_padding(recipe.vocab_size, divisor, tp) for tp in sizes}
    assert len(padded) == 1 and len(sizes) >= 2, (name, sizes, padded)
    if name in ("3b", "10b-a1b"):
        assert 8 in sizes  # 4 KV groups at TP=8: KV heads replicated, as Megatron-Core allows


@pytest.mark.unit
@pytest.mark.parametrize("name", ["3b", "10b-a1b"])
def test_the_planner_accepts_tp_8_with_4_kv_groups(capsys, name):
    import importlib.util

    path = os.path.join(os.path.dirname(os.path.dirname(os.path.abspath(__file__))), "tools", "plan.py")
    spec = importlib.util.spec_from_file_location("plan_tool", path)
    plan = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(plan)
    experts = ["--expert-tensor-parallel-size", "1"] if name == "10b-a1b" else []  # EP 8 x expert-TP 1 = 8 GPUs
    assert plan.main(["--recipe", name, "--tensor-model-parallel-size", "8"] + experts) == 0, capsys.readouterr().err


@pytest.mark.e2e
def test_a_vocabulary_padding_mismatch_names_the_flag(scheduled):
    from megatron_tst.training import arguments, checkpointing

    args = arguments.parse_args(RESUME + ["--load", scheduled, "--mock-data", "--make-vocab-size-divisible-by", "96"])
    args.padded_vocab_size, args.vocab_size_unpadded = 192, 128
    with pytest.raises(SystemExit, match=r"--padded-vocab-size: checkpoint 128, this run 192(.|\n)*"
                                         r"--make-vocab-size-divisible-by 128 to pad like the checkpoint"):
        checkpointing.check_load_arguments(args)


@pytest.mark.unit
def test_moe_balancing_losses_under_per_token_loss_at_tp_2_are_refused_where_megatron_core_scales_them(capsys):
    from megatron_tst.training import arguments

    argv = TINY + ["--lr", "1e-3", "--train-iters", "2", "--mock-data", "--num-experts", "4", "--sequence-parallel",
                   "--moe-aux-loss-coeff", "1e-2", "--calculate-per-token-loss", "--tensor-model-parallel-size", "2"]
    from megatron_tst.platform import mcore_compat

    if mcore_compat.moe_aux_loss_grad_scales_with_tp():
        with pytest.raises(SystemExit):
            arguments.parse_args(argv, world_size=2)
        assert "--calculate-per-token-loss with MoE balancing losses" in capsys.readouterr().err
    else:
        assert arguments.parse_args(argv, world_size=2).calculate_per_token_loss
    assert arguments.parse_args(argv[:-2], world_size=1).calculate_per_token_loss  # TP=1: no scaling issue


@pytest.mark.unit
def test_the_console_line_shows_the_moe_balancing_losses():
    from megatron_tst.training.metrics import format_train_line

    record = dict(iteration=3, phase="recovery", consumed_samples=6, consumed_tokens=96, elapsed_ms=1.0, lr=1e-3,
                  global_batch_size=2, loss_name="lm loss", loss=4.0, grad_norm=1.0, tokens_per_s=1.0,
                  positions_per_s=1.0, tflops_per_gpu=0.0, mfu=None, skipped_iterations=0,
                  load_balancing_loss=1.25, z_loss=0.5)
    line = format_train_line(record, 10)
    assert "load_balancing_loss: 1.250000E+00 |" in line and "z_loss: 5.000000E-01 |" in line


# ------------------------------------------------------------------------------------- divergence, end to end


@pytest.mark.e2e
def test_divergence_stops_every_rank_keeps_the_last_good_checkpoint_and_resumes_from_it(corpus, tmp_path):
    """The issue's run (--lr 1e4 --clip-grad 0 --lr-decay-style constant, 2 ranks): non-zero exit naming the
    iteration, the phase and what was non-finite; the tracker names the last good checkpoint; a --load from the
    same directory (with a sane --lr, taken with --override-opt_param-scheduler) resumes from it."""
    from trainer_cli import run_trainer

    save = str(tmp_path / "ckpt")
    base = ("--num-layers 2 --hidden-size 32 --num-attention-heads 4 --seq-length 32 --micro-batch-size 2 "
            "--global-batch-size 4 --clip-grad 0 --lr-decay-style constant --train-iters 12 --save-interval 2 "
            f"--tokenizer-type NullTokenizer --vocab-size {VOCAB_SIZE} --data-path {corpus} --split 98,2,0 "
            f"--log-interval 1 --eval-iters 0 --num-workers 0 --data-cache-path {tmp_path}/cache "
            f"--save {save} --load {save}").split()
    diverged = run_trainer(base + ["--lr", "1e4"])
    out = diverged.stdout + diverged.stderr
    assert diverged.returncode != 0, out[-3000:]
    import re

    match = re.search(r"error: iteration (\d+) \(recovery phase\): non-finite (.*?); the step was not applied", out)
    assert match, out[-3000:]
    failed_at = int(match.group(1))
    good = int(open(os.path.join(save, "latest_checkpointed_iteration.txt")).read())
    assert good == 2 * ((failed_at - 1) // 2) and good >= 2, (failed_at, good)
    assert f"latest checkpoint in --save {save} is iteration {good}" in out
    assert not os.path.exists(os.path.join(save, f"iter_{failed_at:07d}"))

    resumed = run_trainer(base + ["--lr", "1e-4", "--override-opt_param-scheduler"])
    out = resumed.stdout + resumed.stderr
    assert resumed.returncode == 0, out[-3000:]
    assert f"iter_{good:07d} (iteration {good}" in out
    assert "training stopped (done) at iteration 12" in out
