"""The trainer end to end on real text: Megatron-LM's loop with TST, as users run it.

One TST run through torchrun (2 processes, DP=2, `python -m megatron_tst.pretrain`) on English text as bytes
(`text_corpus`, NullTokenizer --vocab-size 257), logging every 5 steps with a switch at step 7: the phase switch
at the right iteration in Megatron-LM's iteration lines and in --metrics-jsonl (a line at the last superposition
step although it is off the --log-interval grid, a recovery line without "mce loss", intervals of one phase: each
record's loss is the mean of Megatron-LM's per-step losses of its interval in TensorBoard), raw tokens (s*L per
superposition sample) and "phase:" in the iteration lines, validation LM loss in both phases, loss falls, and
TensorBoard events with Megatron-LM's scalars and ours.

In spawned workers (`megatron_tst.pretrain.main` in process, one spawn for all): the same command line without the
--tst-* flags (its LR per iteration is the TST run's: one schedule across the switch), and TST runs with
GPT2BPETokenizer files built offline (data preprocessed by tools/preprocess_data.py), a sample-based schedule
(--train-samples, --lr-*-samples), and a batch-size ramp-up (megatron-core 0.17: --rampup-batch-size; 0.19, where that
flag is deprecated and ignored: --step-batch-size-schedule) with the switch after the batch size changed.
"""

import json
import math
import os
import re
from contextlib import contextmanager

import pytest
from cli import read_jsonl, run_in_workers, run_trainer
from text_corpus import VOCAB_SIZE, build_byte_corpus, docstrings, gpt2_bpe_files, megatron_gpt2_ignores_merge_file

L, G, BAG, TRAIN_ITERS, RATIO = 64, 8, 4, 20, 0.35
SUP_ITERS = 7  # floor(0.35 x 20)
LOG_INTERVAL, EVAL_INTERVAL = 5, 6  # lines at 5, 7 (the switch, off the grid), 10, 15, 20; evaluations at 6, 12, 18

MODEL = ("--num-layers 2 --hidden-size 64 --num-attention-heads 4 --group-query-attention --num-query-groups 2 "
         f"--ffn-hidden-size 128 --seq-length {L} --max-position-embeddings {L} --position-embedding-type rope "
         "--normalization RMSNorm --swiglu --disable-bias-linear --untie-embeddings-and-output-weights "
         "--attention-dropout 0.0 --hidden-dropout 0.0 --init-method-std 0.02").split()
OPTIMIZER = "--lr 3e-3 --min-lr 3e-4 --weight-decay 0.1 --adam-beta2 0.95 --clip-grad 1.0 --seed 1234".split()
TRAINING = (f"--micro-batch-size 2 --global-batch-size {G} --train-iters {TRAIN_ITERS} --lr-warmup-iters 3 "
            "--lr-decay-style cosine --split 95,5,0 --num-workers 0").split()
NULL_TOKENIZER = ["--tokenizer-type", "NullTokenizer", "--vocab-size", str(VOCAB_SIZE)]
TST = ["--tst-bag-size", str(BAG), "--tst-superposition-ratio", str(RATIO)]
LOGGING = f"--log-interval {LOG_INTERVAL} --eval-interval {EVAL_INTERVAL} --eval-iters 2".split()

MEGATRON_SCALARS = {"learning-rate", "batch-size", "lm loss", "mce loss", "grad-norm", "lm loss validation"}
OUR_SCALARS = {"loss", "lr", "grad_norm", "consumed_samples", "megatron_samples", "consumed_tokens", "flops",
               "tokens_per_s", "wall_time_s", "phase_is_superposition", "eval_lm_loss"}


def phase(iteration, sup_iters=SUP_ITERS):
    return "superposition" if iteration <= sup_iters else "recovery"


def raw_tokens(iteration):
    """Raw tokens after `iteration` steps: a superposition sample holds s*L of them, a recovery sample L."""
    sup = min(iteration, SUP_ITERS)
    return (sup * G * BAG + (iteration - sup) * G) * L


@pytest.fixture(scope="module")
def corpus(tmp_path_factory):
    return build_byte_corpus(str(tmp_path_factory.mktemp("corpus")))


@pytest.fixture(scope="module")
def tst_run(corpus, tmp_path_factory):
    """The TST run through torchrun: stdout, --metrics-jsonl records, TensorBoard scalars."""
    directory = tmp_path_factory.mktemp("tst")
    args = MODEL + OPTIMIZER + TRAINING + NULL_TOKENIZER + TST + LOGGING + [
        "--data-path", corpus, "--data-cache-path", str(directory / "cache"),
        "--metrics-jsonl", str(directory / "metrics.jsonl"), "--tensorboard-dir", str(directory / "tb")]
    result = run_trainer(args)
    assert result.returncode == 0, result.stdout[-3000:] + result.stderr[-5000:]
    return {"dir": directory, "stdout": result.stdout, "metrics": read_jsonl(directory / "metrics.jsonl"),
            "tb": tensorboard_scalars(directory / "tb")}


def tensorboard_scalars(directory):
    """{tag: {step: value}} of an event directory (the last event per step)."""
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    events = EventAccumulator(str(directory), size_guidance={"scalars": 0})
    events.Reload()
    return {tag: {e.step: e.value for e in events.Scalars(tag)} for tag in events.Tags()["scalars"]}


def iteration_lines(stdout):
    """{iteration: {field: value}} of Megatron-LM's iteration lines."""
    lines = {}
    for match in re.finditer(r" iteration\s+(\d+)/\s*\d+ \|(.*)", stdout):
        fields = dict(part.split(":", 1) for part in match.group(2).split("|") if ":" in part)
        lines[int(match.group(1))] = {key.strip(): value.strip() for key, value in fields.items()}
    return lines


def train_records(records):
    return {r["iteration"]: r for r in records if r["kind"] == "train"}


# ------------------------------------------------------------------------------------------- the torchrun run


@pytest.mark.e2e
def test_the_switch_in_megatron_lms_iteration_lines(tst_run):
    lines = iteration_lines(tst_run["stdout"])
    assert {5, 7, 10, 15, 20} <= set(lines) <= {1, 5, 7, 10, 15, 20}  # 0.19 also prints its first step
    assert f"TST: bag size {BAG}, {SUP_ITERS} superposition steps" in tst_run["stdout"]
    for iteration, fields in lines.items():
        assert fields["phase"] == phase(iteration), iteration
        assert int(fields["consumed samples"]) == iteration * G  # Megatron-LM's count
        assert int(fields["consumed tokens"]) == raw_tokens(iteration)
        own, other = ("mce loss", "lm loss") if phase(iteration) == "superposition" else ("lm loss", "mce loss")
        assert own in fields and other not in fields, (iteration, fields)


@pytest.mark.e2e
def test_metrics_records_intervals_of_one_phase(tst_run):
    header = tst_run["metrics"][0]
    assert header["kind"] == "run" and header["tst"] == {
        "bag_size": BAG, "superposition_steps": SUP_ITERS, "superposition_samples": SUP_ITERS * G,
        "weighting": "uniform", "sample_layout": "contiguous"}
    train = train_records(tst_run["metrics"])
    assert sorted(train) == [5, 7, 10, 15, 20]
    per_step = {name: tst_run["tb"][name] for name in ("mce loss", "lm loss")}  # Megatron-LM's loss of each step
    lines = iteration_lines(tst_run["stdout"])
    previous = 0
    for iteration, record in sorted(train.items()):
        interval = range(previous + 1, iteration + 1)
        assert {phase(i) for i in interval} == {record["phase"]} == {phase(iteration)}, iteration
        assert record["loss_name"] == ("mce loss" if record["phase"] == "superposition" else "lm loss")
        mean = sum(per_step[record["loss_name"]][i] for i in interval) / len(interval)
        assert record["loss"] == pytest.approx(mean, rel=1e-5), iteration
        assert float(lines[iteration][record["loss_name"]]) == pytest.approx(record["loss"], rel=1e-5)
        assert record["megatron_samples"] == iteration * G
        assert record["consumed_tokens"] == raw_tokens(iteration) == record["consumed_samples"] * L
        assert record["tokens_per_s"] > 0 and record["positions_per_s"] > 0
        previous = iteration
    assert set(per_step["mce loss"]) == set(range(1, SUP_ITERS + 1))
    assert set(per_step["lm loss"]) == set(range(SUP_ITERS + 1, TRAIN_ITERS + 1))


@pytest.mark.e2e
def test_validation_lm_loss_in_both_phases_and_loss_falls(tst_run):
    evals = [r for r in tst_run["metrics"] if r["kind"] == "eval"]
    assert [(r["iteration"], r["phase"]) for r in evals][:3] == [
        (6, "superposition"), (12, "recovery"), (18, "recovery")]
    assert evals[-1]["iteration"] == TRAIN_ITERS  # Megatron-LM's validation after training
    printed = {int(i): float(v) for i, v in re.findall(
        r"validation loss at iteration (\d+) \| lm loss value: (\S+)", tst_run["stdout"])}
    for record in evals[:3]:
        assert record["eval_lm_loss"] == pytest.approx(printed[record["iteration"]], rel=1e-6)
        assert record["consumed_tokens"] == raw_tokens(record["iteration"])
    assert evals[-1]["eval_lm_loss"] < evals[0]["eval_lm_loss"] - 0.3, evals
    train = train_records(tst_run["metrics"])
    assert train[20]["loss"] < train[10]["loss"] and train[7]["loss"] < train[5]["loss"]


@pytest.mark.e2e
def test_tensorboard_holds_megatron_lms_scalars_and_ours(tst_run):
    tb = tst_run["tb"]
    assert MEGATRON_SCALARS | OUR_SCALARS <= set(tb), sorted(tb)
    records = [r for r in tst_run["metrics"] if r["kind"] in ("train", "eval")]
    for record in records:
        step = record["iteration"]
        assert tb["phase_is_superposition"][step] == (record["phase"] == "superposition"), step
        assert tb["consumed_tokens"][step] == pytest.approx(record["consumed_tokens"], rel=1e-6)
    for record in train_records(tst_run["metrics"]).values():
        assert tb["loss"][record["iteration"]] == pytest.approx(record["loss"], rel=1e-6)
    assert set(tb["learning-rate"]) == set(range(1, TRAIN_ITERS + 1))


@pytest.mark.e2e
def test_compare_runs_reads_the_metrics_file_and_the_event_directory(tst_run):
    from compare_runs import load_run, switch_iteration  # tools/compare_runs.py

    from_jsonl = load_run(str(tst_run["dir"] / "metrics.jsonl"))
    from_tb = load_run(str(tst_run["dir"] / "tb"))
    assert from_jsonl.header["tst"]["superposition_steps"] == SUP_ITERS
    for run in (from_jsonl, from_tb):
        assert switch_iteration(run) == 10  # the first recovery record (the switch's line is at 7)
        assert [x for x, _ in run.eval_curve()] == [6, 12, 18, 20]
        assert [r["phase"] for r in run.evals] == ["superposition", "recovery", "recovery", "recovery"]
    for (_, a), (_, b) in zip(from_jsonl.eval_curve(), from_tb.eval_curve()):
        assert a == pytest.approx(b, rel=1e-6)
    assert from_jsonl.eval_curve("consumed_tokens") == [(raw_tokens(i), loss) for i, loss in from_jsonl.eval_curve()]


@pytest.mark.e2e
def test_one_lr_schedule_across_the_switch(tst_run, in_process):
    baseline = tensorboard_scalars(in_process["dir"] / "baseline_tb")["learning-rate"]
    assert in_process["status"]["baseline"] == 0
    lr = tst_run["tb"]["learning-rate"]
    assert sorted(lr) == sorted(baseline) == list(range(1, TRAIN_ITERS + 1))
    assert all(lr[i] == baseline[i] for i in lr), (lr, baseline)  # the very same float32 per iteration
    header = read_jsonl(in_process["dir"] / "baseline.jsonl", "run")[0]
    assert header["tst"] is None


# ------------------------------------------------------------------------------------------- in-process runs


def _gpt2_files(directory):
    """`text_corpus.gpt2_bpe_files` on the docstrings (vocabulary 500), and the text as jsonl for
    tools/preprocess_data.py. Returns the vocabulary size."""
    vocab_size = gpt2_bpe_files(directory, docstrings(), vocab_size=500)[3]
    with open(directory / "text.jsonl", "w") as f:
        for text in docstrings():
            f.write(json.dumps({"text": text}) + "\n")
    return vocab_size


def _step_schedule():
    """megatron-core >= 0.19 ramps the batch size with --step-batch-size-schedule (--rampup-batch-size is ignored)."""
    import inspect

    from megatron.core import num_microbatches_calculator

    return "step_batch_size_schedule" in inspect.signature(
        num_microbatches_calculator.init_num_microbatches_calculator).parameters


RAMP = [4, 4, 4, 4, 8, 8, 8, 8, 8, 8]  # global batch per step: 4 until 16 samples, then 8 (64 samples, 10 steps)
RAMP_SUP = 6  # floor(0.6 x 10)
SAMPLES_G, SAMPLES_TRAIN, SAMPLES_WARMUP = 8, 96, 16


def _runs(directory, corpus, gpt2):
    """name -> command line of each in-process run."""
    runs = {"baseline": MODEL + OPTIMIZER + TRAINING + NULL_TOKENIZER + LOGGING + [
        "--data-path", corpus, "--tensorboard-dir", f"{directory}/baseline_tb"]}
    short = MODEL + OPTIMIZER + ["--micro-batch-size", "2", "--split", "100,0,0", "--num-workers", "0",
                                 "--log-interval", "1", "--eval-iters", "0", "--eval-interval", "1000"]
    runs["samples"] = short + NULL_TOKENIZER + [
        "--global-batch-size", str(SAMPLES_G), "--train-samples", str(SAMPLES_TRAIN), "--lr-decay-samples",
        str(SAMPLES_TRAIN), "--lr-warmup-samples", str(SAMPLES_WARMUP), "--lr-decay-style", "cosine",
        "--data-path", corpus, "--tst-bag-size", str(BAG), "--tst-superposition-ratio", "0.25"]
    if _step_schedule():
        ramp = ["--step-batch-size-schedule", f"0:4 {16 * L}:8"]  # thresholds in tokens (16 samples)
    else:
        ramp = ["--rampup-batch-size", "4", "4", "16", "--global-batch-size", "8"]
    runs["rampup"] = short + NULL_TOKENIZER + ramp + [
        "--train-samples", str(sum(RAMP)), "--lr-decay-samples", str(sum(RAMP)), "--lr-warmup-samples", "8",
        "--data-path", corpus, "--tst-bag-size", str(BAG), "--tst-superposition-ratio", "0.6",
        "--record-data-stream", f"{directory}/rampup_stream"]
    if gpt2:
        runs["gpt2"] = short + [
            "--global-batch-size", "8", "--train-iters", "10", "--lr-warmup-iters", "2", "--lr-decay-style",
            "cosine", "--tokenizer-type", "GPT2BPETokenizer", "--vocab-file", f"{directory}/gpt2/vocab.json",
            "--merge-file", f"{directory}/gpt2/merges.txt", "--data-path", f"{directory}/gpt2/data_text_document",
            "--tst-bag-size", str(BAG), "--tst-superposition-iters", "4", "--eval-iters", "1", "--eval-interval", "5",
            "--split", "90,10,0"]
    for name, argv in runs.items():
        argv += ["--data-cache-path", f"{directory}/cache_{name}", "--metrics-jsonl", f"{directory}/{name}.jsonl"]
    return runs


def in_process_worker(directory, runs):
    import traceback

    import torch

    from megatron_tst.testing.megatron_lm import run_pretrain

    if "gpt2" in runs and torch.distributed.get_rank() == 0:  # the ported tool, Megatron's GPT2BPETokenizer
        import preprocess_data

        preprocess_data.preprocess(f"{directory}/gpt2/text.jsonl", f"{directory}/gpt2/data", [
            "--tokenizer-type", "GPT2BPETokenizer", "--vocab-file", f"{directory}/gpt2/vocab.json",
            "--merge-file", f"{directory}/gpt2/merges.txt"], append_eod=True)
    torch.distributed.barrier()
    status = {}
    for name, argv in runs.items():
        try:
            status[name] = run_pretrain(argv)
        except Exception:
            status[name] = traceback.format_exc()[-3000:]
    return status


@contextmanager
def _environment(**values):
    """os.environ with `values`, for the spawned workers (they inherit it; the Hugging Face libraries read it
    when imported)."""
    saved = {key: os.environ.get(key) for key in values}
    os.environ.update(values)
    try:
        yield
    finally:
        for key, value in saved.items():
            if value is None:
                os.environ.pop(key, None)
            else:
                os.environ[key] = value


@pytest.fixture(scope="module")
def in_process(corpus, tmp_path_factory):
    directory = tmp_path_factory.mktemp("in_process")
    gpt2 = (not megatron_gpt2_ignores_merge_file())
    vocab = None
    if gpt2:
        (directory / "gpt2").mkdir()
        vocab = _gpt2_files(directory / "gpt2")
    runs = _runs(str(directory), corpus, gpt2)
    with _environment(HF_HOME=str(directory / "gpt2" / "hf"), HF_HUB_OFFLINE="1"):
        status = run_in_workers(in_process_worker, 2, args=(str(directory), runs))[0]
    return {"dir": directory, "status": status, "gpt2_vocab": vocab}


@pytest.mark.parallel
def test_gpt2_bpe_tokenizer_run(in_process):
    if not (not megatron_gpt2_ignores_merge_file()):
        pytest.skip("megatron-core 0.17's GPT2BPETokenizer ignores --merge-file (passes it as merge_files=): it "
                    "cannot load locally built vocab/merges files offline; tests/test_data_tools.py checks the "
                    "tool's message")
    assert in_process["status"]["gpt2"] == 0, in_process["status"]["gpt2"]
    records = read_jsonl(in_process["dir"] / "gpt2.jsonl")
    vocab = in_process["gpt2_vocab"]
    assert records[0]["args"]["padded_vocab_size"] == -(-vocab // 128) * 128  # Megatron's tokenizer, the files'
    train = train_records(records)
    assert [train[i]["phase"] for i in sorted(train)] == [phase(i, 4) for i in sorted(train)]
    assert sorted(train)[-1] == 10 and {r["phase"] for r in records if r["kind"] == "eval"} == {
        "recovery"} and len([r for r in records if r["kind"] == "eval"]) >= 2
    evals = [r["eval_lm_loss"] for r in records if r["kind"] == "eval"]
    assert evals[-1] < evals[0]


@pytest.mark.parallel
def test_sample_based_schedule_run(in_process):
    assert in_process["status"]["samples"] == 0, in_process["status"]["samples"]
    records = read_jsonl(in_process["dir"] / "samples.jsonl")
    iters = SAMPLES_TRAIN // SAMPLES_G
    sup = math.floor(0.25 * iters)
    assert records[0]["tst"]["superposition_steps"] == sup == 3
    train = train_records(records)
    assert sorted(train)[-1] == iters and len(train) >= iters - 1  # 0.19 keeps no record of the first step
    for i, record in train.items():
        assert record["phase"] == phase(i, sup)
        assert record["megatron_samples"] == i * SAMPLES_G
        assert record["consumed_samples"] == (min(i, sup) * BAG + i - min(i, sup)) * SAMPLES_G
        # Megatron-LM's sample-based cosine schedule in float64, at the samples consumed after step i
        n = i * SAMPLES_G
        if n <= SAMPLES_WARMUP:
            lr = 3e-3 * n / SAMPLES_WARMUP
        else:
            ratio = (n - SAMPLES_WARMUP) / (SAMPLES_TRAIN - SAMPLES_WARMUP)
            lr = 3e-4 + (3e-3 - 3e-4) * 0.5 * (math.cos(math.pi * ratio) + 1.0)
        assert record["lr"] == pytest.approx(lr, rel=1e-9, abs=1e-15), i


@pytest.mark.parallel
def test_batch_size_rampup_run_switches_on_a_step_boundary(in_process):
    assert in_process["status"]["rampup"] == 0, in_process["status"]["rampup"]
    records = read_jsonl(in_process["dir"] / "rampup.jsonl")
    taken = [sum(RAMP[:i]) for i in range(len(RAMP) + 1)]  # Megatron's samples after i steps
    assert records[0]["tst"]["superposition_steps"] == RAMP_SUP
    assert records[0]["tst"]["superposition_samples"] == taken[RAMP_SUP] == 32  # 4 x 4 + 2 x 8, not 6 x 8
    train = train_records(records)
    assert sorted(train)[-1] == len(RAMP)
    for i, record in train.items():
        sup = min(taken[i], taken[RAMP_SUP])
        assert (record["phase"], record["megatron_samples"]) == (phase(i, RAMP_SUP), taken[i]), i
        assert record["consumed_tokens"] == (sup * BAG + taken[i] - sup) * L
    # every step reads whole samples of one phase: superposition rows up to the switch (consecutive windows), then
    # recovery samples (pieces of G = 8 distinct windows per step, blocks of 8 windows over 4 steps); over the run the
    # baseline samples read are 0, 1, ..., none skipped or repeated
    steps = {}
    for name in os.listdir(in_process["dir"] / "rampup_stream"):
        for micro_batch in read_jsonl(in_process["dir"] / "rampup_stream" / name):
            step = steps.setdefault(micro_batch["iteration"], {"rows": 0, "phases": set(), "ids": []})
            step["rows"] += len(micro_batch["sample_ids"])
            step["phases"].add(micro_batch["superposition"])
            step["ids"] += [i for ids in micro_batch["sample_ids"] for i in ids]
    assert sorted(steps) == list(range(len(RAMP)))
    for k, step in steps.items():  # k: steps completed before this one
        assert step["rows"] == RAMP[k] and step["phases"] == {k < RAMP_SUP}, k
        if k < RAMP_SUP:
            first = taken[k] * BAG
            assert sorted(step["ids"]) == list(range(first, taken[k + 1] * BAG)), k
        else:
            assert len({i // BAG for i in step["ids"]}) == RAMP[k], k
    every = sorted(i for step in steps.values() for i in step["ids"])
    assert every == list(range(taken[RAMP_SUP] * BAG + taken[-1] - taken[RAMP_SUP]))
