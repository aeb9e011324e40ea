"""Fail loudly, never silently, through Megatron-LM's loop: what a user gets for bad input or a fault.

Every case is a real run of `megatron_tst.pretrain.main` (in process, `run_pretrain`) on 2 spawned gloo processes
(DP=2), its stdout and stderr captured per rank:

- resume refusals (`megatron_tst.loop.resume`): a command line that would continue a checkpoint with another sample
  stream or LR schedule ends every rank with exit status 2 before the model is built, the message (each flag, both
  values, the way forward) printed once, by rank 0; the schedule's ways out (--override-opt-param-scheduler,
  --use-checkpoint-opt-param-scheduler) continue with the LR they promise;
- data checks (`megatron_tst.loop.data_checks`): .bin/.idx that do not belong together, token ids outside the
  vocabulary, a blend member without documents in a split, validation without a validation split; weighted blends
  build and train;
- divergence with Megatron-LM's --check-for-nan-in-loss-and-grad (on by default) and its rerun state machine
  (--rerun-mode validate_results, its default): what Megatron-LM 0.17 / 0.19 do, recorded, and that the last good
  checkpoint is kept and resumable;
- Megatron-LM's exits: --exit-interval and --exit-duration-in-mins save and end with status 0.
SIGTERM / kill -9: test_resume.py.
"""

import contextlib
import io
import logging
import math
import os
import re

import numpy as np
import pytest
from cli import read_jsonl, run_in_workers, tiny_args
from test_resume import corpus, corpus_vocab_flag  # noqa: F401  (corpus: session fixture)
from text_corpus import build_byte_corpus

from megatron_tst.platform.mcore_compat import MCORE_VERSION

pytestmark = pytest.mark.e2e

VOCAB = corpus_vocab_flag(MCORE_VERSION.minor)
# a TST run on real text: 20 steps, the first 25 % (5) superposition steps, seed 7, linear LR decay after 2 warm-up
RESUMABLE = tiny_args(train_iters=20, bag_size=4, superposition_iters=None)
RESUMABLE = RESUMABLE[:RESUMABLE.index("--tst-superposition-iters")] + ["--tst-superposition-ratio", "0.25"]
for _flag, _value in (("--seed", "7"), ("--lr-warmup-iters", "2"), ("--vocab-size", VOCAB)):
    RESUMABLE[RESUMABLE.index(_flag) + 1] = _value
RESUMABLE.remove("--mock-data")
RESUMABLE += ["--save-interval", "1000"]  # Megatron-LM 0.19 asserts one with --save; the exits below save anyway
BUILDING = "building GPT model"  # what the model provider prints first

STREAM_REFUSALS = {
    "seq_length": (["--seq-length", "64", "--max-position-embeddings", "64"],
                   ["--seq-length: checkpoint 32, this run 64"]),
    "global_batch_size": (["--global-batch-size", "16"], ["--global-batch-size: checkpoint 8, this run 16"]),
    "seed": (["--seed", "8"], ["--seed: checkpoint 7, this run 8"]),
    "split": (["--split", "90,10,0"], ["--split: checkpoint (0.98, 0.02, 0.0), this run (0.9, 0.1, 0.0)"]),
    "data_files": ([], ["--data-path: checkpoint (('stdlib_text', 1.0),), this run (('other_text', 1.0),)"]),
    "bag_size": (["--tst-bag-size", "2"], [
        "consumed 32 samples of contiguous windows of 4 x --seq-length tokens", "but this run would read "
        "contiguous windows of 2 x --seq-length tokens", "Continue with --tst-sample-layout contiguous and "
        "--tst-bag-size 4"]),
    "superposition_phase": (["--tst-superposition-ratio", "0.15"], [
        "the superposition phase (--tst-superposition-ratio/--tst-superposition-iters): checkpoint 5 steps, this run "
        "3"]),
    "train_iters_under_a_ratio": (["--train-iters", "40"], [
        "--train-iters: checkpoint 20, this run 40, and --tst-superposition-ratio 0.25 makes the superposition "
        "phase 5 steps there, 10 here (to change --train-iters keep the phase: --tst-superposition-iters 5 instead "
        "of the ratio)"]),
}
SCHEDULE_REFUSALS = {
    "lr": (["--lr", "2e-3"], ["--lr: checkpoint 0.001, this run 0.002"]),
    "min_lr": (["--min-lr", "0"], ["--min-lr: checkpoint 0.0001, this run 0.0"]),
    "warmup": (["--lr-warmup-iters", "5"], ["--lr-warmup-iters: checkpoint 2, this run 5"]),
    # the same phase (0.125 x 40 = 0.25 x 20 = 5 steps): only the schedule changes
    "train_iters": (["--train-iters", "40", "--tst-superposition-ratio", "0.125"],
                    ["--train-iters: checkpoint 20, this run 40 (the LR decay and weight-decay ramp follow it)"]),
}
WAYS_OUT = {"override": "--override-opt-param-scheduler", "use_checkpoint": "--use-checkpoint-opt-param-scheduler"}


# ------------------------------------------------------------------------------------------------- the worker


class _Records(logging.Handler):
    def __init__(self):
        super().__init__(logging.INFO)
        self.messages = []

    def emit(self, record):
        self.messages.append(record.getMessage())


def _run(argv, before=None):
    """run_pretrain(argv) with this rank's stdout, stderr and log records captured: (status, stderr, stdout, logs)
    (status "raised: <exception>" for an exception Megatron-LM lets through)."""
    from megatron_tst.testing.megatron_lm import run_pretrain

    out, err, records = io.StringIO(), io.StringIO(), _Records()
    logging.getLogger().addHandler(records)
    try:
        with contextlib.redirect_stdout(out), contextlib.redirect_stderr(err):
            if before is not None:
                before()
            try:
                status = run_pretrain(argv)
            except Exception as exc:  # noqa: BLE001  (Megatron-LM's own assertion, recorded as it is)
                import traceback
                status = f"raised: {type(exc).__name__}: {exc}"
                err.write(traceback.format_exc())
    finally:
        logging.getLogger().removeHandler(records)
    return status, err.getvalue(), out.getvalue(), "\n".join(records.messages)


def _summary(result):
    status, stderr, stdout, logs = result
    return {"status": status, "stderr": stderr, "built": BUILDING in stdout, "logs": logs,
            "exiting": [line for line in stdout.splitlines() if "exiting program" in line],
            "warnings": [line for line in stdout.splitlines() if line.startswith("warning: ")],
            "tail": (stdout + stderr)[-3000:]}


def _read(path):
    return open(path).read() if os.path.exists(path) else None


def _tiny_corpus(directory, documents):
    """A Megatron indexed dataset of `documents` documents of 200 byte tokens."""
    from megatron.core.datasets.indexed_dataset import IndexedDatasetBuilder

    prefix = os.path.join(directory, f"tiny{documents}")
    if not os.path.exists(prefix + ".idx"):
        builder = IndexedDatasetBuilder(prefix + ".bin", dtype=np.uint16)
        for d in range(documents):
            builder.add_document(((np.arange(200) + d) % 250).astype(np.uint16), [200])
        builder.finalize(prefix + ".idx")
    return prefix


def reliability_worker(directory, corpus):  # noqa: F811
    import time

    import torch.distributed as dist
    from megatron.training import training

    data = ["--data-path", corpus, "--split", "98,2,0"]
    results = {}
    rank = dist.get_rank()

    # a checkpoint at iteration 4 of the TST run (Megatron-LM's --exit-interval saves and exits 0)
    resumable = os.path.join(directory, "resumable")
    base = RESUMABLE + data + ["--save", resumable, "--load", resumable]
    results["exit_interval"] = _summary(_run(base + ["--exit-interval", "4"]))

    # resume refusals
    other = os.path.join(directory, "other")
    if rank == 0:
        build_byte_corpus(other, name="other_text")
    dist.barrier()
    for name, (flags, _) in STREAM_REFUSALS.items():
        argv = RESUMABLE + (["--data-path", os.path.join(other, "other_text"), "--split", "98,2,0"]
                            if name == "data_files" else data)
        results[name] = _summary(_run(argv + ["--load", resumable] + flags))
    for name, (flags, _) in SCHEDULE_REFUSALS.items():
        results[name] = _summary(_run(base + flags))
    # the ways out: 2 more steps (one logged interval) with the schedule they promise, then --exit-interval
    for name, flags in [(name, ["--lr-warmup-iters", "5", flag]) for name, flag in WAYS_OUT.items()] + [
            ("lr_override", ["--lr", "2e-3", WAYS_OUT["override"]])]:
        metrics = os.path.join(directory, f"{name}.jsonl")
        results[name] = _summary(_run(RESUMABLE + data + flags + [
            "--load", resumable, "--save", os.path.join(directory, name), "--exit-interval", "6",
            "--metrics-jsonl", metrics]))
    results["both_ways"] = _summary(_run(base + ["--lr-warmup-iters", "5"] + list(WAYS_OUT.values())))

    # data checks
    broken = os.path.join(directory, "broken")
    if rank == 0:
        os.makedirs(broken, exist_ok=True)
        with open(corpus + ".bin", "rb") as src, open(os.path.join(broken, "stdlib_text.bin"), "wb") as dst:
            dst.write(src.read()[:-20])  # 10 tokens short of what the .idx describes
        with open(corpus + ".idx", "rb") as src, open(os.path.join(broken, "stdlib_text.idx"), "wb") as dst:
            dst.write(src.read())
        _tiny_corpus(directory, 3)
        _tiny_corpus(directory, 400)
    dist.barrier()
    short = RESUMABLE + ["--save", os.path.join(directory, "scratch"), "--exit-interval", "1"]
    results["bin_idx"] = _summary(_run(short + ["--data-path", os.path.join(broken, "stdlib_text")]))
    small_vocab = list(short)
    small_vocab[small_vocab.index("--vocab-size") + 1] = "200"
    results["token_ids"] = _summary(_run(small_vocab + data))
    tiny3, tiny400 = os.path.join(directory, "tiny3"), os.path.join(directory, "tiny400")
    for name, paths in (("empty_split", [corpus, tiny3]), ("empty_split_weighted", ["0.5", corpus, "0.5", tiny3])):
        results[name] = _summary(_run(short + ["--data-path", *paths, "--split", "90,5,5"]))
    evaluating = short + ["--eval-iters", "1", "--eval-interval", "1"]
    results["no_validation_split"] = _summary(_run(evaluating + ["--data-path", corpus, "--split", "100,0,0"]))
    results["empty_validation_split"] = _summary(_run(evaluating + ["--data-path", tiny3, "--split", "98,2,0"]))
    results["weighted_blend"] = _summary(_run(
        RESUMABLE + ["--data-path", "0.3", corpus, "0.7", tiny400, "--split", "98,2,0", "--exit-interval", "2",
                     "--eval-iters", "1", "--eval-interval", "2", "--metrics-jsonl",
                     os.path.join(directory, "weighted.jsonl")]))

    # degenerate TST settings: they train (one step here), with a warning
    no_steps = [a if a != "0.25" else "0.01" for a in short]
    results["no_superposition_step"] = _summary(_run(no_steps + data))
    long_window = list(short)
    long_window[long_window.index("--tst-bag-size") + 1] = "32"  # 32 x 32 + 1 tokens > tiny3's 3 x 200
    results["window_longer_than_corpus"] = _summary(_run(long_window + ["--data-path", tiny3, "--split", "98,2,0"]))

    # divergence: Adam at --lr 1e4 with weight decay 0.1 multiplies the weights by (1 - 1e3) every step
    diverging = os.path.join(directory, "diverging")
    nan = tiny_args(train_iters=10, bag_size=None) + ["--save", diverging, "--load", diverging, "--save-interval",
                                                      "2", "--metrics-jsonl", os.path.join(directory, "nan.jsonl")]
    for flag, value in (("--lr", "1e4"), ("--clip-grad", "0"), ("--lr-decay-style", "constant")):
        nan[nan.index(flag) + 1] = value
    results["diverged"] = _summary(_run(nan))
    results["diverged_tracker"] = _read(os.path.join(diverging, "latest_checkpointed_iteration.txt"))
    results["diverged_dirs"] = sorted(os.listdir(diverging))
    results["diverged_again"] = _summary(_run(nan))
    sane = list(nan)
    sane[sane.index("--lr") + 1] = "1e-4"
    results["resumed_earlier"] = _summary(_run(sane + ["--ckpt-step", "2", "--no-load-optim",
                                                       "--metrics-jsonl", os.path.join(directory, "sane.jsonl")]))

    # --exit-duration-in-mins: Megatron-LM's clock starts at the program start pretrain_gpt.py registers
    # (`set_startup_timestamps`); here one registered 2 minutes ago
    timed = os.path.join(directory, "timed")
    results["exit_duration"] = _summary(_run(
        tiny_args(train_iters=10) + ["--save", timed, "--save-interval", "1000", "--exit-duration-in-mins", "1",
                                     "--metrics-jsonl",
                                     os.path.join(directory, "timed.jsonl")],
        before=lambda: training.set_startup_timestamps(program_start=time.time() - 120)))
    training.set_startup_timestamps(program_start=time.time())
    results["exit_duration_tracker"] = _read(os.path.join(timed, "latest_checkpointed_iteration.txt"))
    return results


@pytest.fixture(scope="module")
def runs(corpus, tmp_path_factory):  # noqa: F811
    directory = tmp_path_factory.mktemp("reliability")
    return directory, run_in_workers(reliability_worker, 2, args=(str(directory), corpus))


def _refused_once(results, name, expected):
    """Status 2 on every rank before the model is built; the message printed once (rank 0), with `expected`."""
    for rank, result in enumerate(results):
        assert result[name]["status"] == 2, (rank, result[name]["tail"])
        assert not result[name]["built"], (rank, "the model was built")
        assert "Traceback" not in result[name]["stderr"]
    message = results[0][name]["stderr"]
    assert message.count("error:") == 1 and results[1][name]["stderr"].count("error:") == 0, message
    for line in expected:
        assert line in message, message
    return message


# ------------------------------------------------------------------------------------------------- the tests


def test_exit_interval_saves_and_exits_0(runs):
    directory, results = runs
    for result in results:
        assert result["exit_interval"]["status"] == 0, result["exit_interval"]["tail"]
    assert "exiting program at iteration 4" in results[0]["exit_interval"]["exiting"][0]
    assert (directory / "resumable" / "latest_checkpointed_iteration.txt").read_text().strip() == "4"


@pytest.mark.parametrize("name", STREAM_REFUSALS)
def test_a_resume_with_another_sample_stream_is_refused(runs, name):
    message = _refused_once(runs[1], name, STREAM_REFUSALS[name][1])
    assert "--finetune" in message and ("Restore the checkpoint's values" in message or "Continue with" in message)


@pytest.mark.parametrize("name", SCHEDULE_REFUSALS)
def test_a_schedule_change_names_the_flag_both_values_and_the_ways_out(runs, name):
    message = _refused_once(runs[1], name, SCHEDULE_REFUSALS[name][1])
    assert all(flag in message for flag in WAYS_OUT.values()), message


def _linear_lr(iteration, warmup_iters, lr=1e-3, min_lr=1e-4, train_iters=20, batch=8):
    """Megatron-LM's linear decay after a linear warm-up, over samples, after `iteration` steps (float64)."""
    steps, warmup, decay = iteration * batch, warmup_iters * batch, train_iters * batch
    if steps <= warmup:
        return lr * steps / warmup
    return min_lr + (lr - min_lr) * (1 - (steps - warmup) / (decay - warmup))


@pytest.mark.parametrize("way, warmup", [("override", 5), ("use_checkpoint", 2)])
def test_the_ways_out_continue_with_the_schedule_they_name(runs, way, warmup):
    """--lr-warmup-iters 5 at the resume (iteration 4) of the run with 2: --override-opt-param-scheduler takes the
    command line's schedule from the checkpoint's step on, --use-checkpoint-opt-param-scheduler keeps the
    checkpoint's (Megatron-LM's OptimizerParamScheduler): the LR of iteration 6 tells which."""
    directory, results = runs
    assert [r[way]["status"] for r in results] == [0, 0], results[0][way]["tail"]
    record = read_jsonl(directory / f"{way}.jsonl", "train")[-1]
    assert record["iteration"] == 6
    assert record["lr"] == pytest.approx(_linear_lr(6, warmup), rel=1e-12)


def test_another_lr_with_the_override_is_megatron_lms_business(runs):
    """--lr 2e-3 --override-opt-param-scheduler at the resume of the --lr 1e-3 run, loading the optimizer state:
    Megatron-Core's parameter groups carry max_lr / min_lr. 0.17 restores them and trains on with the checkpoint's
    LR (silently: the override does not reach them); 0.19 matches groups by them and raises a ValueError after the
    model is built. Our refusal of another --lr says so and names --no-load-optim."""
    directory, results = runs
    assert "--no-load-optim as well" in results[0]["lr"]["stderr"]
    if MCORE_VERSION.minor >= 19:
        for result in results:
            assert result["lr_override"]["status"].startswith(
                "raised: ValueError: Could not find parameter group with key"), result["lr_override"]["tail"]
    else:
        assert [r["lr_override"]["status"] for r in results] == [0, 0], results[0]["lr_override"]["tail"]
        record = read_jsonl(directory / "lr_override.jsonl", "train")[-1]
        assert record["iteration"] == 6 and record["lr"] == pytest.approx(_linear_lr(6, 2, lr=1e-3), rel=1e-12)


def test_both_schedule_sources_are_refused_by_megatron_lm(runs):
    """Megatron-LM's OptimizerParamScheduler asserts (after the model is built): recorded as it is."""
    for result in runs[1]:
        assert result["both_ways"]["status"] == "raised: AssertionError: both override and use-checkpoint are set."


def test_a_bin_that_does_not_belong_to_its_idx_is_named(runs):
    _refused_once(runs[1], "bin_idx", ["stdlib_text.bin holds", "tokens but", "stdlib_text.idx describes",
                                       "the .bin and .idx do not belong together"])


def test_token_ids_outside_the_vocabulary_are_named(runs):
    vocabulary = 200 if MCORE_VERSION.minor >= 18 else 201  # NullTokenizer: 0.17 adds the end-of-document id
    _refused_once(runs[1], "token_ids", [f"stdlib_text.bin holds token id 256, outside the model's vocabulary of "
                                         f"{vocabulary}"])


@pytest.mark.parametrize("name", ["empty_split", "empty_split_weighted"])
def test_a_blend_member_with_an_empty_split_is_named(runs, name):
    _refused_once(runs[1], name, ["--data-path member(s)", "tiny3 hold no document in the validation split of "
                                  "--split 90,5,5", "--valid-data-path"])


@pytest.mark.parametrize("name, split", [("no_validation_split", "100,0,0"), ("empty_validation_split", "98,2,0")])
def test_validation_without_a_validation_split_is_refused(runs, name, split):
    """--eval-iters > 0 with a validation split that gets no document: Megatron-LM would build no validation
    dataset and end in a TypeError at the first --eval-interval, after training up to it."""
    _refused_once(runs[1], name, [f"--split {split} leaves the validation split without documents, but --eval-iters "
                                  "1 asks for validation", "--eval-iters 0"])


@pytest.mark.parametrize("name, words", [
    ("no_superposition_step", "--tst-superposition-ratio 0.01 of this run's 20 steps is less than one step"),
    ("window_longer_than_corpus", "a superposition window of --tst-bag-size 32 x --seq-length 32 (+1) = 1,025 "
                                  "tokens is longer than the whole train split (600 tokens)")])
def test_degenerate_tst_settings_warn_once_and_train(runs, name, words):
    results = runs[1]
    assert [r[name]["status"] for r in results] == [0, 0], results[0][name]["tail"]
    assert len(results[0][name]["warnings"]) == 1 and words in results[0][name]["warnings"][0], results[0][name]
    assert results[1][name]["warnings"] == []


def test_weighted_blends_build_and_train(runs):
    directory, results = runs
    assert [r["weighted_blend"]["status"] for r in results] == [0, 0], results[0]["weighted_blend"]["tail"]
    (evaluation,) = read_jsonl(directory / "weighted.jsonl", "eval")
    assert evaluation["iteration"] == 2 and math.isfinite(evaluation["eval_lm_loss"])


def test_a_nan_stops_every_rank_with_megatron_lms_rerun_state_machine(runs):
    """--lr 1e4 --clip-grad 0: the gradients become NaN. Megatron-LM (0.17 and 0.19, --check-for-nan-in-loss-and-
    grad with --rerun-mode validate_results, both defaults) logs the finding on every rank, reruns the step in
    place, finds it reproducible, saves a checkpoint of the last completed iteration (the failed step is not
    applied) and every rank exits with status 16 (EXIT_CODE_RESUME_TO_DISAMBIGUATE: resume elsewhere to tell a
    faulty GPU from a real divergence)."""
    directory, results = runs
    assert [r["diverged"]["status"] for r in results] == [16, 16], results[0]["diverged"]["tail"]
    logs = results[0]["diverged"]["logs"]
    assert "Unexpected result nan on rank 0 at iteration #" in logs and "(message='found NaN in " in logs, logs
    assert "First rerun: unexpected result is reproducible within the tolerance (nan = nan)" in logs
    assert "Saving a checkpoint and exiting now" in logs
    completed = read_jsonl(directory / "nan.jsonl", "train")[-1]["iteration"]  # the failed step logs nothing
    assert int(results[0]["diverged_tracker"] or 0) == completed >= 3
    assert max(int(d[5:]) for d in results[0]["diverged_dirs"] if d.startswith("iter_")) == completed


def test_resuming_the_diverged_checkpoint_reruns_the_step_and_exits_17(runs):
    """The same command again: Megatron-LM restores its rerun state from the checkpoint, reruns the failed step
    and, the result being reproducible, every rank exits with status 17 (EXIT_CODE_FAILED_ON_RESULT_VALIDATION),
    writing nothing."""
    results = runs[1]
    assert [r["diverged_again"]["status"] for r in results] == [17, 17], results[0]["diverged_again"]["logs"]
    logs = results[0]["diverged_again"]["logs"]
    assert "Getting RerunStateMachine state from checkpoint. Will rerun step." in logs
    assert "Exiting now. A checkpoint at the last iteration already exists if further examination is needed" in logs


def test_an_earlier_checkpoint_resumes_with_a_sane_lr(runs):
    """The earlier checkpoints stay: --ckpt-step 2 with a sane --lr trains on (--no-load-optim: Megatron-Core 0.19
    loads no optimizer state under another LR, and the weights are what was diverging)."""
    directory, results = runs
    assert [r["resumed_earlier"]["status"] for r in results] == [0, 0], results[0]["resumed_earlier"]["tail"]
    records = read_jsonl(directory / "sane.jsonl", "train")
    assert records[-1]["iteration"] == 10 and all(math.isfinite(r["loss"]) for r in records)


def test_exit_duration_counts_from_the_registered_program_start_saves_and_exits_0(runs):
    directory, results = runs
    assert [r["exit_duration"]["status"] for r in results] == [0, 0], results[0]["exit_duration"]["tail"]
    # counted from the start registered 2 minutes before the run (from the run's own start: < 1 minute)
    minutes = float(re.search(r"exiting program after ([0-9.]+) minutes", results[0]["exit_duration"]["exiting"][0])[1])
    assert 2.0 <= minutes < 3.0
    assert (results[0]["exit_duration_tracker"] or "").strip() == "1"  # checked (all-reduce MAX) after the first step


# ------------------------------------------------------------------------------------------ a failed save


def save_failure_worker(directory, failing_rank):
    """A TST run saving every 2 steps whose checkpoint write at iteration 4 fails on `failing_rank` alone: that
    rank's file-size limit (RLIMIT_FSIZE) is set to 1 kB around Megatron-LM's `save_checkpoint` (the writes get
    EFBIG, as on a full quota), the other rank writes normally. Returns (status or exception, seconds)."""
    import resource
    import signal
    import time

    import torch.distributed as dist
    from megatron.training import training

    from megatron_tst.testing.megatron_lm import run_pretrain

    original, rank = training.save_checkpoint, dist.get_rank()

    def save_checkpoint(iteration, *args, **kwargs):
        limited = rank == failing_rank and iteration == 4
        if limited:
            signal.signal(signal.SIGXFSZ, signal.SIG_IGN)
            resource.setrlimit(resource.RLIMIT_FSIZE, (1000, resource.RLIM_INFINITY))
        try:
            return original(iteration, *args, **kwargs)
        finally:
            if limited:
                resource.setrlimit(resource.RLIMIT_FSIZE, (resource.RLIM_INFINITY, resource.RLIM_INFINITY))

    training.save_checkpoint = save_checkpoint
    start = time.time()
    try:
        status = run_pretrain(tiny_args(train_iters=6) + ["--save", directory, "--save-interval", "2",
                                                          "--distributed-timeout-minutes", "10"])
    except BaseException as exc:  # noqa: BLE001  (what Megatron-LM raises, recorded as it is)
        status = f"raised: {type(exc).__name__}: {exc}"
    finally:
        training.save_checkpoint = original
    return status, time.time() - start


@pytest.fixture(scope="module")
def failed_saves(tmp_path_factory):
    """{failing rank: (its --save directory, per-rank results)}; each case a fresh pair of gloo workers (a rank
    that ends with an exception ends its process group)."""
    out = {}
    for failing_rank in (0, 1):
        directory = tmp_path_factory.mktemp(f"failed_save_{failing_rank}")
        out[failing_rank] = directory, run_in_workers(save_failure_worker, 2, args=(str(directory), failing_rank),
                                                      timeout_s=300)
    return out


@pytest.mark.parametrize("failing_rank", [0, 1])
def test_a_save_failing_on_one_rank_ends_every_rank_and_keeps_the_last_checkpoint(failed_saves, failing_rank):
    """No rank waits for the process group's timeout (10 minutes here; the workers' harness fails the test after
    5): the shards are written through torch's distributed checkpoint, which gathers every rank's write result, so a
    shard write failing on rank 1 raises a CheckpointException on both ranks at once, rank 0's naming the failure
    (Megatron-Core's writer: "Worker failure: ... <class 'OSError'>", the EFBIG in its log). Rank 0 also writes
    the common files alone: its failure there ends it with that OSError, and its peer's next collective with the
    connection it lost (gloo; under torchrun, as the launch scripts run it, the agent ends the other ranks when one
    fails, whatever the backend). The tracker keeps naming the last complete checkpoint, which the checkpoint
    checks find intact."""
    from megatron_tst.loop.checkpoint_checks import checkpoint_problem

    directory, results = failed_saves[failing_rank]
    assert all(str(status).startswith("raised: ") for status, _ in results), results
    assert "OSError" in str(results[0][0]), results  # rank 1's EFBIG reaches rank 0 as Megatron-Core words it
    assert (directory / "latest_checkpointed_iteration.txt").read_text().strip() == "2"
    assert checkpoint_problem(str(directory / "iter_0000002")) is None
