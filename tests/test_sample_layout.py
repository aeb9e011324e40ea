"""The sample stream (`megatron_tst.stream`): superposition rows as the paper forms them, phases by sample index, and
the data-stream invariant, on a corpus whose token ids show contiguity: every document is a run of consecutive token
ids (document d = a_d, a_d + 1, ..., then EOD), and no id other than EOD occurs twice in the corpus.

* Every superposition row the trainer trains on (recorded by --record-data-stream) is one contiguous run of the
  document stream, broken only at EOD tokens, where one document ends and another begins.
* A whole TST run through Megatron-LM's loop (superposition, switch, recovery; DP=2; stopped by --exit-interval and
  resumed inside the superposition phase, exactly at the switch and in the middle of a recovery block) trains on no
  token id twice, and the tokens it trains on, in baseline-sample order, are exactly a prefix of the window stream:
  Megatron-Core's own GPTDataset of s*L-token windows (built here independently of the trainer, with stock
  Megatron-Core calls), in its shuffled order; it trains on what an uninterrupted run trains on, step by step.
* Each recovery step's G samples come from G distinct windows (blocks of G windows over s steps, step k of a block
  taking piece k of each); a run ending inside a block reads its cut last block across as many windows as a
  prefix allows.
* The baseline of the comparison (--tst-superposition-ratio 0, same bag size) reads the same stream.
* --seq-length 64 with --tst-bag-size 6 (64 % 6 != 0) is accepted and trains.
* A checkpoint whose stream this run cannot continue exactly is refused with the way forward named.
"""

import json
import os
from argparse import Namespace

import numpy as np
import pytest
import torch
from cli import run_in_workers, run_trainer, worker_tracebacks
from test_checkpoints import VOCAB_FLAG

V = 8192  # NullTokenizer --vocab-size 8192 (ids < 8000 used; EOD below)
EOD = 8191
L, S, G = 64, 6, 4  # positions, bag size (64 % 6 != 0), global batch
SUP_ITERS, TRAIN_ITERS = 3, 13  # recovery: a whole block (s = 6 steps) and a block cut to 4 steps
MID_BLOCK = SUP_ITERS + 3  # a stop in the middle of the first recovery block
SEED = 1234

FLAGS = (f"--num-layers 2 --hidden-size 32 --num-attention-heads 4 --seq-length {L} --max-position-embeddings {L} "
         "--position-embedding-type rope --normalization RMSNorm --swiglu --disable-bias-linear "
         "--untie-embeddings-and-output-weights --attention-dropout 0.0 --hidden-dropout 0.0 --micro-batch-size 1 "
         f"--global-batch-size {G} --train-iters {TRAIN_ITERS} --lr 1e-3 --lr-warmup-iters 1 --lr-decay-style cosine "
         f"--seed {SEED} --tokenizer-type NullTokenizer --vocab-size {V} --split 100,0,0 --eval-iters 0 "
         f"--eval-interval 1000 --log-interval 1 --num-workers 0 --tst-bag-size {S}").split()


# ---------------------------------------------------------------------------------------------- the corpus


def build_run_corpus(directory):
    """Documents of 20..200 consecutive token ids each, then EOD; ids 0..~8000 used once. Returns
    (prefix, {first id of a document}, {last id of a document})."""
    from megatron.core.datasets.indexed_dataset import IndexedDatasetBuilder

    rng = np.random.default_rng(0)
    prefix = os.path.join(directory, "runs_of_ids")
    builder = IndexedDatasetBuilder(prefix + ".bin", dtype=np.uint16)
    firsts, lasts, start = set(), set(), 0
    while True:
        length = int(rng.integers(20, 201))
        if start + length > 8000:
            break
        builder.add_document(np.append(np.arange(start, start + length), EOD).astype(np.uint16), [length + 1])
        firsts.add(start)
        lasts.add(start + length - 1)
        start += length
    builder.finalize(prefix + ".idx")
    return prefix, firsts, lasts


class _Tokenizer:
    """What GPTDataset asks of a tokenizer: the end-of-document and pad ids, and an identifier for its cache."""

    eod, pad, vocab_size = EOD, -1, V
    unique_identifiers = {"class": "RunsOfIds", "vocab_size": V}


def reference_dataset(prefix, sequence_length, num_samples, cache):
    """Megatron-Core's GPTDataset of the train split, built with stock calls (as Megatron-LM builds it)."""
    from megatron.core.datasets.blended_megatron_dataset_builder import BlendedMegatronDatasetBuilder
    from megatron.core.datasets.gpt_dataset import GPTDataset, GPTDatasetConfig

    config = GPTDatasetConfig(random_seed=SEED, sequence_length=sequence_length, blend=([prefix], None),
                              split="100,0,0", path_to_cache=cache, tokenizer=_Tokenizer(),
                              reset_position_ids=False, reset_attention_mask=False, eod_mask_loss=False,
                              create_attention_mask=False)
    train, _, _ = BlendedMegatronDatasetBuilder(GPTDataset, [num_samples, None, None], lambda: True, config).build()
    return train


def contiguity_breaks(row, firsts, lasts):
    """Places in a row of token ids where it is not one run of the document stream: consecutive ids must be
    x, x + 1, except at an EOD, which must follow a document's last id and precede a document's first id."""
    breaks = []
    for i, (x, y) in enumerate(zip(row, row[1:])):
        if y == EOD:
            ok = x in lasts
        elif x == EOD:
            ok = y in firsts
        else:
            ok = y == x + 1
        if not ok:
            breaks.append((i, x, y))
    return breaks


@pytest.fixture(scope="module")
def corpus(tmp_path_factory):
    return build_run_corpus(str(tmp_path_factory.mktemp("corpus")))


@pytest.fixture(scope="module")
def block_stream(corpus, tmp_path_factory):
    """The token ids of the window stream: Megatron's windows of S*L tokens in its (shuffled) order, concatenated."""
    windows = reference_dataset(corpus[0], S * L, 20, str(tmp_path_factory.mktemp("ref_cache")))
    return np.concatenate([windows[j]["tokens"].numpy() for j in range(len(windows))])


# ---------------------------------------------------------------------------------------------- the trainer


def _records(stream_dir):
    out = []
    for name in sorted(os.listdir(stream_dir)):
        with open(os.path.join(stream_dir, name)) as f:
            out += [json.loads(line) for line in f]
    return out


def stream_worker(prefix, tst_dir, whole_dir, base_dir):
    """The TST run in four pieces (stopped at iteration 2, inside the superposition phase, at 3, exactly at the
    switch, and at 6, in the middle of a recovery block; each time saved and resumed), the same run uninterrupted,
    and the baseline of the comparison, all recording their streams."""
    from megatron_tst.testing.megatron_lm import run_pretrain

    data = FLAGS + ["--data-path", prefix, "--tst-superposition-iters", str(SUP_ITERS)]
    common = data + ["--data-cache-path", f"{tst_dir}/cache", "--save", f"{tst_dir}/ckpt", "--load",
                     f"{tst_dir}/ckpt", "--save-interval", "1000", "--record-data-stream", f"{tst_dir}/stream"]
    stops = (["--exit-interval", "2"], ["--exit-interval", str(SUP_ITERS)], ["--exit-interval", str(MID_BLOCK)], [])
    codes = [run_pretrain(common + stop) for stop in stops]
    codes.append(run_pretrain(data + ["--data-cache-path", f"{whole_dir}/cache",
                                      "--record-data-stream", f"{whole_dir}/stream"]))
    codes.append(run_pretrain(FLAGS + ["--data-path", prefix, "--data-cache-path", f"{base_dir}/cache",
                                       "--record-data-stream", f"{base_dir}/stream",
                                       "--tst-superposition-ratio", "0"]))
    return codes


@pytest.fixture(scope="module")
def runs(corpus, tmp_path_factory):
    dirs = {name: tmp_path_factory.mktemp(name) for name in ("tst", "uninterrupted", "baseline")}
    codes = run_in_workers(stream_worker, 2, args=(corpus[0], *(str(d) for d in dirs.values())))[0]
    assert codes == [0] * 6
    return {name: {"dir": d, "records": _records(d / "stream")} for name, d in dirs.items()}


def _tokens_by_sample(records):
    """{baseline sample id: its L input token ids}, asserting that no sample is trained twice."""
    by_sample = {}
    for record in records:
        for ids, tokens in zip(record["sample_ids"], record["tokens"]):
            assert len(tokens) == len(ids) * L
            for k, sample in enumerate(ids):
                assert sample not in by_sample, f"baseline sample {sample} trained twice"
                by_sample[sample] = tokens[k * L:(k + 1) * L]
    return by_sample


@pytest.mark.e2e
def test_the_run_resumed_inside_the_superposition_phase_and_at_the_switch_trains_each_step_once(runs):
    records = runs["tst"]["records"]
    iterations = sorted({r["iteration"] for r in records})
    assert iterations == list(range(TRAIN_ITERS))
    # each step's G samples once: 2 ranks x G/2 micro-batches of one row
    assert all(sum(len(r["sample_ids"]) for r in records if r["iteration"] == i) == G for i in iterations)
    phases = {r["iteration"]: (r["phase"], r["superposition"]) for r in records}
    assert [phases[i] for i in iterations] == ([("superposition", True)] * SUP_ITERS
                                               + [("recovery", False)] * (TRAIN_ITERS - SUP_ITERS))


def _by_step(records):
    """{iteration: [(sample ids, tokens) of each of its micro-batches, every rank's]} of a run."""
    steps = {}
    for record in records:
        steps.setdefault(record["iteration"], []).append((record["sample_ids"], record["tokens"]))
    return steps


@pytest.mark.e2e
def test_a_run_resumed_in_the_middle_of_a_recovery_block_trains_what_an_uninterrupted_run_trains(runs):
    resumed, whole = _by_step(runs["tst"]["records"]), _by_step(runs["uninterrupted"]["records"])
    assert sorted(resumed) == sorted(whole) == list(range(TRAIN_ITERS))
    for iteration in whole:
        assert sorted(resumed[iteration]) == sorted(whole[iteration]), f"iteration {iteration}"


def _windows_of_steps(records):
    """{iteration: [(window, piece) of each of its samples]} of the recovery steps (baseline id b: piece b % s of
    window b // s)."""
    steps = {}
    for record in records:
        if record["phase"] == "recovery":
            steps.setdefault(record["iteration"], []).extend(divmod(b, S) for ids in record["sample_ids"] for b in ids)
    return steps


@pytest.mark.e2e
@pytest.mark.parametrize("run", ["tst", "baseline"])
def test_each_recovery_step_reads_g_distinct_windows_in_blocks(runs, run):
    steps = _windows_of_steps(runs[run]["records"])
    first = min(steps)  # the first recovery step: a block of G windows over s steps starts there
    whole_blocks = (TRAIN_ITERS - first) // S
    for iteration, pieces in sorted(steps.items()):
        windows = [w for w, _ in pieces]
        block, k = divmod(iteration - first, S)
        if block < whole_blocks:  # step k of a block: piece k of each of the block's G windows
            assert len(set(windows)) == G, (iteration, pieces)
            assert {p for _, p in pieces} == {k}
            block_windows = {w for i, ps in steps.items() if (i - first) // S == block for w, _ in ps}
            assert len(block_windows) == G
    # the cut last block: its 4 steps x G samples are 2 whole windows and 4 pieces of one more (TST; the baseline's
    # 4 samples are 4 pieces of one window), read piece by piece across them
    cut_steps = [ps for i, ps in sorted(steps.items()) if (i - first) // S == whole_blocks]
    cut = [p for ps in cut_steps for p in ps]
    assert len(cut) == len(set(cut)) == (TRAIN_ITERS - first - whole_blocks * S) * G
    assert len({w for w, _ in cut}) == -(-len(cut) // S)
    for before, after in zip(cut_steps, cut_steps[1:]):  # piece by piece: no step reads a lower piece than before
        assert max(p for _, p in before) <= min(p for _, p in after)


@pytest.mark.e2e
def test_every_superposition_row_is_one_contiguous_window(runs, corpus):
    _, firsts, lasts = corpus
    rows = [row for r in runs["tst"]["records"] if r["phase"] == "superposition" for row in r["tokens"]]
    assert len(rows) == SUP_ITERS * G and all(len(row) == S * L for row in rows)  # L = 64 bags of 6 tokens
    for row in rows:
        assert contiguity_breaks(row, firsts, lasts) == []
    assert sum(row.count(EOD) for row in rows) > 0  # the windows do span documents


@pytest.mark.e2e
def test_no_token_twice_and_the_trained_tokens_are_a_prefix_of_the_window_stream(runs, block_stream):
    by_sample = _tokens_by_sample(runs["tst"]["records"])
    total = SUP_ITERS * G * S + (TRAIN_ITERS - SUP_ITERS) * G
    assert sorted(by_sample) == list(range(total))  # nothing skipped, nothing twice, across stops and the switch
    trained = np.concatenate([by_sample[k] for k in range(total)])
    ids = trained[trained != EOD]
    assert len(np.unique(ids)) == len(ids)  # no token id trained twice
    assert np.array_equal(trained, block_stream[:total * L])  # the stream's prefix, in order


@pytest.mark.e2e
def test_the_baseline_of_the_comparison_reads_the_same_stream(runs, block_stream):
    base = _tokens_by_sample(runs["baseline"]["records"])
    tst = _tokens_by_sample(runs["uninterrupted"]["records"])
    assert sorted(base) == list(range(TRAIN_ITERS * G))
    assert all(base[k] == tst[k] for k in base)
    trained = np.concatenate([base[k] for k in range(TRAIN_ITERS * G)])
    assert np.array_equal(trained, block_stream[:TRAIN_ITERS * G * L])
    assert all(r["phase"] == "recovery" for r in runs["baseline"]["records"])


@pytest.mark.e2e
def test_a_checkpoint_of_another_stream_is_refused_with_the_way_forward(runs, corpus):
    # The TST run's checkpoint (contiguous windows of 6 x 64 tokens) loaded with bags of 4: windows of 4 x 64
    tst_dir = runs["tst"]["dir"]
    result = run_trainer(FLAGS + ["--data-path", corpus[0], "--data-cache-path", str(tst_dir / "cache"),
                                  "--load", str(tst_dir / "ckpt"), "--tst-superposition-iters", str(SUP_ITERS),
                                  "--tst-bag-size", "4"], nproc=1)
    assert result.returncode != 0
    assert "the data stream cannot be continued exactly" in result.stderr, result.stderr[-3000:]
    assert "--tst-sample-layout contiguous and --tst-bag-size 6" in result.stderr
    assert worker_tracebacks(result.stderr) == []


@pytest.mark.e2e
def test_a_megatron_lm_checkpoint_continues_only_on_its_own_stream(tmp_path):
    """Megatron-LM's checkpoint consumed stock samples: a run with the contiguous layout would read other
    tokens (refused, naming --tst-sample-layout segments), and with segments it continues exactly."""
    from text_corpus import build_byte_corpus

    root = os.path.join(os.path.dirname(__file__), "fixtures", "megatron_lm")
    with open(os.path.join(root, "megatron_lm_gpt_tp1.json")) as f:
        record = json.load(f)
    data = build_byte_corpus(str(tmp_path / "data"))
    argv = record["megatron_cli_args_str"].replace("<checkpoint_dir>", str(tmp_path / "save")).split() + [
        "--load", os.path.join(root, "megatron_lm_gpt_tp1"), "--data-path", data,
        "--data-cache-path", str(tmp_path / "cache"), "--exit-interval", "31", "--eval-iters", "0",
        "--eval-interval", "1000", "--num-workers", "0", "--tst-bag-size", "4", "--tst-superposition-ratio", "0"]
    argv[argv.index("--vocab-size") + 1] = VOCAB_FLAG  # the checkpoint's 1024 token ids on this release
    refused = run_trainer(argv, nproc=1)
    assert refused.returncode != 0 and worker_tracebacks(refused.stderr) == []
    assert "consumed 120 samples of Megatron's stock samples" in refused.stderr, refused.stderr[-3000:]
    assert "Add --tst-sample-layout segments to continue that stream exactly" in refused.stderr
    continued = run_trainer(argv + ["--tst-sample-layout", "segments"], nproc=1)
    assert continued.returncode == 0, continued.stdout[-2000:] + continued.stderr[-3000:]
    assert "consumed samples:          124" in continued.stdout


# ---------------------------------------------------------------------------------------------- in process


def _plan(total, *, bag=S, steps=SUP_ITERS, layout="contiguous", seq_length=L):
    from megatron_tst.stream import SamplePlan

    return SamplePlan(seq_length=seq_length, total_samples=total, tst=True, bag_size=bag, superposition_steps=steps,
                      superposition_samples=steps * G, sample_layout=layout, block_windows=G)


def _collate(dataset, indices):
    return torch.utils.data.default_collate([dataset[i] for i in indices])


@pytest.mark.unit
def test_contiguity_check_fails_on_segment_rows_and_passes_on_windows(corpus, tmp_path):
    """The check above can fail: rows of the segments layout (s unrelated samples) break it; rows the contiguous
    layout cuts from the same corpus pass it. Both through `TSTTrainDataset`, the trainer's path."""
    from megatron_tst.stream import TSTTrainDataset

    prefix, firsts, lasts = corpus
    length = 60  # the segments layout needs L % s == 0
    windows = TSTTrainDataset(reference_dataset(prefix, S * length, 2 * G, str(tmp_path / "w")),
                              _plan(2 * G, seq_length=length))
    segments = TSTTrainDataset(reference_dataset(prefix, length, 2 * G * S, str(tmp_path / "s")),
                               _plan(2 * G, seq_length=length, layout="segments"))
    contiguous, segmented = _collate(windows, range(G)), _collate(segments, range(G))
    assert all(contiguity_breaks(row.tolist(), firsts, lasts) == [] for row in contiguous["tokens"])
    assert all(len(contiguity_breaks(row.tolist(), firsts, lasts)) >= S - 1 for row in segmented["tokens"])
    # next-bag targets run through a whole contiguous row: only its last bag has fewer than s (one) targets;
    # a row of segments has s such last bags
    real_targets = lambda batch: int((batch["tst_targets"] != -100).sum())
    assert real_targets(contiguous) == G * ((length - 1) * S + 1)
    assert real_targets(segmented) == G * S * ((length // S - 1) * S + 1)
    assert contiguous["sample_ids"].tolist() == [list(range(i * S, i * S + S)) for i in range(G)]


def _blocks_by_construction(first_window, recovery_samples, bag, g):
    """The (window, piece) of each recovery sample, built literally: blocks of g windows, each read piece by piece
    (piece 0 of every window of the block, then piece 1, ...); the last block holds the windows and pieces that the
    remaining samples cover, read the same way. An independent reference for `SamplePlan.baseline_sample`."""
    order, window = [], first_window
    while len(order) < recovery_samples:
        left = recovery_samples - len(order)
        if left >= g * bag:
            pieces = {window + j: bag for j in range(g)}
        else:  # the cut block: whole windows, then what is left of one more
            pieces = {window + j: bag for j in range(left // bag)}
            if left % bag:
                pieces[window + left // bag] = left % bag
        for piece in range(bag):
            order += [(w, piece) for w, n in pieces.items() if piece < n]
        window += len(pieces)
    return order


@pytest.mark.unit
@pytest.mark.parametrize("bag,g,sup_samples,total", [(6, 4, 12, 12 + 3 * 4), (6, 4, 12, 12 + 10 * 4), (4, 4, 0, 40),
                                                      (6, 1, 12, 30), (4, 16, 48, 48 + 105 * 16), (2, 3, 6, 7)])
def test_recovery_blocks_match_their_construction(bag, g, sup_samples, total):
    """Recovery sample i reads the (window, piece) of the literal block construction; any G consecutive samples
    outside the cut last block come from G distinct windows; all are read once, a prefix of the stream."""
    from megatron_tst.stream import SamplePlan

    plan = SamplePlan(seq_length=L, total_samples=total, tst=True, bag_size=bag, superposition_steps=1,
                      superposition_samples=sup_samples, block_windows=g)
    got = [divmod(plan.baseline_sample(i), bag) for i in range(sup_samples, total)]
    assert got == _blocks_by_construction(sup_samples, total - sup_samples, bag, g)
    assert sorted(w * bag + p for w, p in got) == list(range(sup_samples * bag, sup_samples * bag + len(got)))
    for start in range(sup_samples, plan.cut_block_start - g + 1):
        assert len({plan.baseline_sample(i) // bag for i in range(start, start + g)}) == g
    assert plan.baseline_sample(total) == sup_samples * bag + total - sup_samples  # Megatron's one extra sample


@pytest.mark.unit
def test_recovery_items_are_the_pieces_of_megatron_windows(corpus, tmp_path):
    """Recovery sample i is tokens [p L, (p + 1) L] of window w, (w, p) = divmod(baseline_sample(i), s): what
    Megatron's *unshuffled* L-sample index holds there (consecutive samples share their boundary token)."""
    from megatron_tst.stream import TSTTrainDataset

    sup_samples = SUP_ITERS * G
    total = sup_samples + 3 * G
    raw = reference_dataset(corpus[0], S * L, sup_samples + 3 * G // S + 1, str(tmp_path / "w"))
    dataset = TSTTrainDataset(raw, _plan(total))
    assert len(dataset) == total + 1  # one past the run (Megatron's sampler: consumed < length, also at the end)
    order = _blocks_by_construction(sup_samples, total - sup_samples, S, G) + [divmod(sup_samples * S + 3 * G, S)]
    for i, (w, p) in zip(range(sup_samples, total + 1), order):
        item = dataset[i]
        piece = slice(p * L, (p + 1) * L)
        assert item["sample_ids"].tolist() == [w * S + p]
        assert item["tokens"].tolist() == raw[w]["tokens"][piece].tolist()
        assert item["labels"].tolist() == raw[w]["labels"][piece].tolist()
        assert item["position_ids"].tolist() == list(range(L))
        assert "tst_targets" not in item
    with pytest.raises(ValueError, match="holds .* samples of 384 tokens, the run reads"):
        TSTTrainDataset(raw, _plan(total + 100 * S))


@pytest.mark.unit
def test_the_plan_counts_samples_and_tokens_by_phase():
    plan = _plan(10 * G, steps=3)
    assert [plan.phase_of_sample(i).value for i in (0, 3 * G - 1, 3 * G)] == ["superposition"] * 2 + ["recovery"]
    assert [plan.phase_at(i).value for i in (2, 3)] == ["superposition", "recovery"]
    assert plan.baseline_samples_before(3 * G + 5) == 3 * G * S + 5
    assert plan.raw_tokens_before(3 * G + 5) == (3 * G * S + 5) * L
    # windows: superposition rows, then s recovery samples per window, up to one sample past the run
    assert plan.source_samples_needed() == 3 * G + -(-(7 * G + 1) // S)
    assert _plan(10 * G, layout="segments").source_samples_needed() == 3 * G * S + 7 * G + 1


def _megatron_args(**changes):
    values = dict(train_iters=10, train_samples=None, global_batch_size=G, seq_length=L, tst_bag_size=S,
                  tst_superposition_ratio=0.3, tst_superposition_iters=None, tst_weighting=None,
                  tst_sample_layout=None, micro_batch_size=1)
    values.update(changes)
    return Namespace(**values)


@pytest.mark.unit
def test_the_plan_of_megatron_args_with_and_without_a_batch_size_ramp():
    """The superposition phase is floor(r x train iterations) steps; the samples they take follow Megatron's own
    micro-batch calculator, so that under a batch-size ramp-up the switch falls on a step boundary."""
    import inspect

    from megatron.core import num_microbatches_calculator as calculator

    from megatron_tst.config import TSTConfig
    from megatron_tst.stream import SamplePlan

    def plan_with(**ramp):
        calculator.destroy_num_microbatches_calculator()
        calculator.init_num_microbatches_calculator(rank=0, global_batch_size=16, micro_batch_size=1,
                                                    data_parallel_size=1, decrease_batch_size_if_needed=False,
                                                    **ramp)
        args = _megatron_args(global_batch_size=16)
        try:
            return SamplePlan.from_megatron(args, TSTConfig.from_args(args))
        finally:
            calculator.destroy_num_microbatches_calculator()

    constant = plan_with(rampup_batch_size=None)
    assert (constant.superposition_steps, constant.superposition_samples, constant.total_samples) == (3, 48, 160)
    parameters = inspect.signature(calculator.init_num_microbatches_calculator).parameters
    if "step_batch_size_schedule" in parameters:  # 0.19: thresholds in samples
        ramp = plan_with(step_batch_size_schedule="0:4 8:8 24:16")
        total = 4 + 4 + 8 + 8 + 6 * 16  # batches of 4 below 8 samples, 8 below 24, then 16
    else:  # 0.17: start 4, +4 every 8 samples until 16 (over 24 samples)
        ramp = plan_with(rampup_batch_size=[4, 4, 24])
        total = 4 + 4 + 8 + 12 + 6 * 16
    # the first 3 steps take 4 + 4 + 8 samples; the run as many samples as its 10 steps take, not 10 x 16
    assert (ramp.superposition_steps, ramp.superposition_samples, ramp.total_samples) == (3, 16, total)
    assert constant.block_windows == ramp.block_windows == 16  # recovery blocks: the largest step's windows


@pytest.mark.unit
def test_no_recovery_phase_is_refused():
    from megatron_tst.config import TSTConfig
    from megatron_tst.stream import superposition_steps

    with pytest.raises(ValueError, match="leave no recovery phase"):
        superposition_steps(TSTConfig(bag_size=4, superposition_iters=10), 10)
    assert superposition_steps(TSTConfig(bag_size=4, superposition_ratio=0.3), 10) == 3
    assert superposition_steps(None, 10) == 0


@pytest.mark.unit
def test_another_run_length_continues_a_checkpoint_unless_it_stopped_in_a_cut_block():
    """A checkpoint that stopped inside its run's cut last recovery block cannot be continued by a run of another
    length (it reads those samples in another order); before that block, or after a run that ended on a block
    boundary, it can."""
    from megatron.core import num_microbatches_calculator as calculator

    from megatron_tst.loop.resume import _cut_block_mismatch

    calculator.destroy_num_microbatches_calculator()
    calculator.init_num_microbatches_calculator(rank=0, global_batch_size=G, micro_batch_size=1, data_parallel_size=1,
                                                decrease_batch_size_if_needed=False, rampup_batch_size=None)
    try:
        run = lambda iters: _megatron_args(train_iters=iters, tst_superposition_ratio=None, tst_superposition_iters=3)
        # 13 steps: 3 superposition, a whole block of S = 6 recovery steps (samples 12..35), a block cut to 4 steps
        message = _cut_block_mismatch(run(19), run(13), consumed=(SUP_ITERS + 8) * G)
        assert message and "inside the last recovery block of a run of 52 samples" in message
        assert "Keep the checkpoint's --train-iters" in message and "--finetune" in message
        assert _cut_block_mismatch(run(19), run(13), consumed=(SUP_ITERS + S) * G) is None  # before the cut block
        assert _cut_block_mismatch(run(13), run(13), consumed=(SUP_ITERS + 8) * G) is None  # the same run
        assert _cut_block_mismatch(run(21), run(15), consumed=15 * G) is None  # 15 steps end on a block boundary
        plain = _megatron_args(tst_bag_size=None, tst_superposition_ratio=None)  # no TST before
        assert _cut_block_mismatch(run(19), plain, consumed=48) is None
    finally:
        calculator.destroy_num_microbatches_calculator()
