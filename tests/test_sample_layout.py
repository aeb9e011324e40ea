"""Superposition rows as the paper forms them, and the data-stream invariant, on a corpus whose token ids show
contiguity: every document is a run of consecutive token ids (document d = a_d, a_d + 1, ..., then EOD), and no
id other than EOD occurs twice in the corpus.

* Every superposition row the trainer trains on (recorded by --record-data-stream) is one contiguous run of the
  document stream, broken only at EOD tokens, where one document ends and another begins.
* A whole TST run (superposition, switch, recovery; DP=2; stopped and resumed inside the superposition phase
  and exactly at the switch) trains on no token id twice, and the tokens it trains on, in baseline-sample
  order, are exactly a prefix of the block stream: the windows of s*L tokens of Megatron-Core's own GPTDataset
  (built here, independently of the trainer, with stock Megatron-Core calls), in Megatron's shuffled order.
* The baseline of the comparison (--tst-superposition-ratio 0, same bag size) reads the same stream.
* --seq-length 64 with --tst-bag-size 6 (64 % 6 != 0) is accepted and trains.
* A checkpoint whose stream this run cannot continue exactly (a Megatron-LM checkpoint under the contiguous
  layout, or a contiguous-layout checkpoint under another bag size) is refused with the way forward named.
"""

import json
import os

import numpy as np
import pytest
from trainer_cli import run_trainer

V = 8192  # NullTokenizer --vocab-size 8192: ids 0..8190, EOD = 8191
EOD = V - 1
L, S, G = 64, 6, 4  # positions, bag size (64 % 6 != 0), global batch
SUP_ITERS, TRAIN_ITERS = 3, 7
SEED = 1234

FLAGS = (f"--num-layers 2 --hidden-size 32 --num-attention-heads 4 --seq-length {L} --position-embedding-type rope "
         "--normalization RMSNorm --swiglu --disable-bias-linear --untie-embeddings-and-output-weights "
         "--attention-dropout 0.0 --hidden-dropout 0.0 --micro-batch-size 1 "
         f"--global-batch-size {G} --train-iters {TRAIN_ITERS} --lr 1e-3 --lr-warmup-iters 1 --lr-decay-style cosine "
         f"--seed {SEED} --tokenizer-type NullTokenizer --vocab-size {V} --split 100,0,0 --eval-iters 0 "
         f"--log-interval 1 --num-workers 0 --tst-bag-size {S}").split()


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


def reference_dataset(prefix, sequence_length, num_samples, cache):
    """Megatron-Core's GPTDataset of the train split, built with stock calls (as Megatron-LM builds it)."""
    from megatron.core.datasets.blended_megatron_dataset_builder import BlendedMegatronDatasetBuilder
    from megatron.core.datasets.gpt_dataset import GPTDataset, GPTDatasetConfig

    from megatron_tst.training.tokenizer import build_tokenizer

    config = GPTDatasetConfig(random_seed=SEED, sequence_length=sequence_length, blend=([prefix], None),
                              split="100,0,0", path_to_cache=cache, tokenizer=build_tokenizer("NullTokenizer", None, V),
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
    """The token ids of the block stream: Megatron's windows of S*L tokens in its (shuffled) order, concatenated."""
    windows = reference_dataset(corpus[0], S * L, 16, str(tmp_path_factory.mktemp("ref_cache")))
    return np.concatenate([windows[j]["tokens"].numpy() for j in range(len(windows))])


# ---------------------------------------------------------------------------------------------- the trainer


def _records(stream_dir):
    out = []
    for name in sorted(os.listdir(stream_dir)):
        with open(os.path.join(stream_dir, name)) as f:
            out += [json.loads(line) for line in f]
    return out


@pytest.fixture(scope="module")
def runs(corpus, tmp_path_factory):
    """The TST run in three pieces (stopped at iteration 2, inside the superposition phase, and at 3, exactly at
    the switch, each time saved and resumed) and the baseline of the comparison, both recording their streams."""
    prefix = corpus[0]
    out = {}
    tst_dir = tmp_path_factory.mktemp("tst")
    common = FLAGS + ["--data-path", prefix, "--data-cache-path", str(tst_dir / "cache"),
                      "--save", str(tst_dir / "ckpt"), "--load", str(tst_dir / "ckpt"),
                      "--record-data-stream", str(tst_dir / "stream")]
    logs = []
    for stop in (["--exit-interval", "2"], ["--exit-interval", str(SUP_ITERS)], []):
        result = run_trainer(common + ["--tst-superposition-iters", str(SUP_ITERS)] + stop)
        assert result.returncode == 0, result.stdout[-3000:] + result.stderr[-5000:]
        logs.append(result.stdout)
    out["tst"] = {"dir": tst_dir, "logs": logs, "records": _records(tst_dir / "stream")}
    base_dir = tmp_path_factory.mktemp("baseline")
    result = run_trainer(FLAGS + ["--data-path", prefix, "--data-cache-path", str(base_dir / "cache"),
                               "--record-data-stream", str(base_dir / "stream"), "--tst-superposition-ratio", "0"])
    assert result.returncode == 0, result.stdout[-3000:] + result.stderr[-5000:]
    out["baseline"] = {"dir": base_dir, "records": _records(base_dir / "stream")}
    return out


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
def test_the_run_stopped_and_resumed_inside_the_superposition_phase_and_at_the_switch(runs):
    first, second, third = runs["tst"]["logs"]
    assert "training stopped (--exit-interval 2) at iteration 2" in first
    assert "(iteration 2;" in second
    assert f"training stopped (--exit-interval {SUP_ITERS}) at iteration {SUP_ITERS}" in second
    assert f"(iteration {SUP_ITERS};" in third and f"training stopped (done) at iteration {TRAIN_ITERS}" in third
    iterations = sorted({r["iteration"] for r in runs["tst"]["records"]})
    assert iterations == list(range(TRAIN_ITERS))
    phases = {r["iteration"]: r["phase"] for r in runs["tst"]["records"]}
    assert [phases[i] for i in iterations] == ["superposition"] * SUP_ITERS + ["recovery"] * (TRAIN_ITERS - SUP_ITERS)


@pytest.mark.e2e
def test_every_superposition_row_is_one_contiguous_window(runs, corpus):
    _, firsts, lasts = corpus
    rows = [row for r in runs["tst"]["records"] if r["phase"] == "superposition" for row in r["tokens"]]
    assert len(rows) == SUP_ITERS * G and all(len(row) == S * L for row in rows)  # L = 64 bags of 6 tokens
    for row in rows:
        assert contiguity_breaks(row, firsts, lasts) == []
    assert sum(row.count(EOD) for row in rows) > 0  # the windows do span documents


@pytest.mark.e2e
def test_no_token_twice_and_the_trained_tokens_are_a_prefix_of_the_block_stream(runs, block_stream):
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
    tst = _tokens_by_sample(runs["tst"]["records"])
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
    assert "Traceback" not in result.stderr


@pytest.mark.e2e
def test_a_megatron_lm_checkpoint_continues_only_on_its_own_stream(tmp_path):
    """Megatron-LM's checkpoint consumed stock samples: a run with the contiguous layout would read other
    tokens (refused, naming --tst-sample-layout segments), and with segments it continues exactly."""
    from run_harness import fixture, fixture_argv
    from text_corpus import build_byte_corpus

    record, directory = fixture("megatron_lm_gpt_tp1")
    data = build_byte_corpus(str(tmp_path / "data"))
    argv = fixture_argv(record, str(tmp_path / "save")) + [
        "--load", directory, "--data-path", data, "--data-cache-path", str(tmp_path / "cache"), "--exit-interval",
        "31", "--eval-iters", "0", "--num-workers", "0", "--tst-bag-size", "4", "--tst-superposition-ratio", "0"]
    refused = run_trainer(argv, nproc=1)
    assert refused.returncode != 0 and "Traceback" not in refused.stderr
    assert "consumed 120 samples of Megatron's stock samples" in refused.stderr, refused.stderr[-3000:]
    assert "Add --tst-sample-layout segments to continue that stream exactly" in refused.stderr
    continued = run_trainer(argv + ["--tst-sample-layout", "segments"], nproc=1)
    assert continued.returncode == 0, continued.stdout[-2000:] + continued.stderr[-3000:]
    assert "consumed samples:          124" in continued.stdout


# ---------------------------------------------------------------------------------------------- in process


@pytest.mark.unit
def test_contiguity_check_fails_on_segment_rows_and_passes_on_windows(corpus, tmp_path):
    """The check above can fail: rows of the segments layout (s unrelated samples) break it; rows the
    contiguous layout cuts from the same corpus pass it. Both through `micro_batches`, the trainer's path."""
    from megatron_tst.training.data import micro_batches

    prefix, firsts, lasts = corpus
    length = 60  # the segments layout needs L % s == 0
    common = dict(first_sample=0, num_steps=1, bag_size=S, global_batch_size=G, micro_batch_size=G, dp_rank=0,
                  dp_size=1, seq_length=length)
    windows = reference_dataset(prefix, S * length, G, str(tmp_path / "w"))
    samples = reference_dataset(prefix, length, G * S, str(tmp_path / "s"))
    contiguous = next(micro_batches(windows, samples_per_window=S, **common))
    segments = next(micro_batches(samples, samples_per_window=1, **common))
    assert all(contiguity_breaks(row.tolist(), firsts, lasts) == [] for row in contiguous["tokens"])
    assert all(len(contiguity_breaks(row.tolist(), firsts, lasts)) >= S - 1 for row in segments["tokens"])
    # next-bag targets run through a whole contiguous row: only its last bag has fewer than s (one) targets;
    # a row of segments has s such last bags
    real_targets = lambda batch: int((batch["tst_targets"] != -100).sum())
    assert real_targets(contiguous) == G * ((length - 1) * S + 1)
    assert real_targets(segments) == G * S * ((length // S - 1) * S + 1)


@pytest.mark.unit
def test_recovery_reads_the_windows_sample_by_sample(corpus, tmp_path):
    """Baseline sample k of the contiguous layout = tokens [(k % s) L, (k % s + 1) L] of window k // s, which is
    what Megatron's *unshuffled* L-sample index holds there: consecutive samples share their boundary token."""
    from megatron_tst.training.data import micro_batches

    windows = reference_dataset(corpus[0], S * L, 4, str(tmp_path / "w"))
    batch = next(micro_batches(windows, first_sample=3, num_steps=1, bag_size=1, global_batch_size=G * 2,
                               micro_batch_size=G * 2, dp_rank=0, dp_size=1, seq_length=L, samples_per_window=S))
    assert batch["sample_ids"].tolist() == [[k] for k in range(3, 3 + 2 * G)]
    for row, k in enumerate(range(3, 3 + 2 * G)):
        window = windows[k // S]
        piece = slice((k % S) * L, (k % S + 1) * L)
        assert batch["tokens"][row].tolist() == window["tokens"][piece].tolist()
        assert batch["labels"][row].tolist() == window["labels"][piece].tolist()
        assert batch["position_ids"][row].tolist() == list(range(L))
    with pytest.raises(ValueError, match="must start at a window boundary"):
        next(micro_batches(windows, first_sample=3, num_steps=1, bag_size=S, global_batch_size=1,
                           micro_batch_size=1, dp_rank=0, dp_size=1, seq_length=L, samples_per_window=S))
