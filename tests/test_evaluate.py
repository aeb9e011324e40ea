"""tools/evaluate.py: downstream evaluation through lm-eval's own Megatron-LM backend (`--model megatron_lm`, run on
CPU with megatron_tst.platform.lm_eval's stand-ins) of a tiny TST checkpoint written by our trainer, on the offline
task tools/build_cloze_task.py builds (here from a small corpus in the demo data's layout); and its refusals of bad
input before any process starts."""

import json
import os
import shutil
import subprocess
import sys

import pytest
from cli import ROOT, run_trainer
from text_corpus import docstrings

TOOLS = os.path.join(ROOT, "tools")
L = 64
FLAGS = ("--num-layers 2 --hidden-size 64 --num-attention-heads 4 --ffn-hidden-size 128 "
         f"--seq-length {L} --max-position-embeddings {L} --position-embedding-type rope --normalization RMSNorm "
         "--swiglu --disable-bias-linear --untie-embeddings-and-output-weights --attention-dropout 0.0 "
         "--hidden-dropout 0.0 --micro-batch-size 2 --global-batch-size 4 --train-iters 6 --lr 3e-3 "
         "--lr-warmup-iters 1 --lr-decay-style cosine --seed 1234 --split 949,50,1 --eval-iters 0 "
         "--eval-interval 1000 --num-workers 0 --log-interval 1 --save-interval 6 "
         "--tst-bag-size 4 --tst-superposition-iters 2").split()


def _tool(*args, **kwargs):
    return subprocess.run([sys.executable, *args], capture_output=True, text=True, cwd=ROOT, **kwargs)


@pytest.fixture(scope="module")
def checkpoint(tmp_path_factory):
    """A demo-layout data directory (corpus.jsonl, a byte-level BPE tokenizer directory, the indexed dataset, the
    cloze task) and a TST checkpoint trained on it."""
    sys.path.insert(0, TOOLS)
    try:
        import build_cloze_task
        from build_demo_data import train_tokenizer
    finally:
        sys.path.remove(TOOLS)
    data = tmp_path_factory.mktemp("data")
    with open(data / "corpus.jsonl", "w") as f:
        for i, text in enumerate(docstrings(600)):
            f.write(json.dumps({"text": text, "source": f"doc{i % 7}", "part": i}) + "\n")
    train_tokenizer(str(data / "corpus.jsonl"), 512, str(data / "tokenizer"))
    made = _tool(os.path.join(TOOLS, "preprocess_data.py"), "--input", str(data / "corpus.jsonl"), "--output-prefix",
                 str(data / "demo"), "--tokenizer-type", "HuggingFaceTokenizer", "--tokenizer-model",
                 str(data / "tokenizer"), "--append-eod")
    assert made.returncode == 0, made.stderr[-2000:]
    build_cloze_task.build(str(data), items=12)
    save = tmp_path_factory.mktemp("run") / "checkpoints"
    result = run_trainer(FLAGS + ["--tokenizer-type", "HuggingFaceTokenizer", "--tokenizer-model",
                                  str(data / "tokenizer"), "--data-path", str(data / "demo_text_document"),
                                  "--data-cache-path", str(save.parent / "cache"), "--save", str(save)], nproc=1)
    assert result.returncode == 0, result.stdout[-2000:] + result.stderr[-3000:]
    return {"data": data, "save": save}


@pytest.mark.e2e
def test_evaluate_runs_lm_evals_megatron_backend_side_by_side(checkpoint, tmp_path):
    """One lm-eval process (the expensive part); the side-by-side table of that run's real results JSON with itself
    through the tool's own functions (the same checkpoint twice: equal scores, difference 0)."""
    sys.path.insert(0, TOOLS)
    try:
        import evaluate
    finally:
        sys.path.remove(TOOLS)
    out = tmp_path / "downstream"
    result = _tool(os.path.join(TOOLS, "evaluate.py"), f"tst={checkpoint['save']}", "--tasks", "tst_demo_cloze",
                   "--data-dir", str(checkpoint["data"]), "--limit", "6", "--batch-size", "4", "--out", str(out),
                   timeout=900)
    assert result.returncode == 0, result.stdout[-3000:] + result.stderr[-3000:]
    table = json.loads((tmp_path / "downstream.json").read_text())
    assert table["runs"] == ["tst"] and table["checkpoints"]["tst"]["iteration"] == 6
    assert {(row["task"], row["metric"]) for row in table["rows"]} == {("tst_demo_cloze", "acc"),
                                                                       ("tst_demo_cloze", "acc_norm")}
    for row in table["rows"]:
        score, stderr = row["scores"]["tst"]
        assert abs(score * 6 - round(score * 6)) < 1e-9  # a share of 6 documents
        assert stderr is not None and stderr >= 0
    log = (out / "tst" / "lm_eval.log").read_text()
    assert "--model megatron_lm" in log and "megatron_tst.platform.lm_eval" in log  # lm-eval's own backend
    [results] = list((out / "tst").rglob("results_*.json"))
    scores = evaluate.scores(json.loads(results.read_text()))
    both = evaluate.side_by_side({"tst": scores, "again": scores})
    for row in both["rows"]:
        assert row["scores"]["again"] == row["scores"]["tst"] == table["rows"][both["rows"].index(row)]["scores"]["tst"]
        assert row["differences"]["again"][0] == 0
    assert "| task | metric | tst | again | tst - again |" in evaluate.markdown(both)


@pytest.mark.e2e
def test_evaluate_refuses_bad_checkpoints_before_any_process(checkpoint, tmp_path):
    missing = _tool(os.path.join(TOOLS, "evaluate.py"), f"x={tmp_path / 'nothing'}", "--tasks", "tst_demo_cloze")
    assert missing.returncode == 2 and "no such directory" in missing.stderr
    malformed = _tool(os.path.join(TOOLS, "evaluate.py"), str(checkpoint["save"]), "--tasks", "tst_demo_cloze")
    assert malformed.returncode == 2 and "NAME=DIR" in malformed.stderr
    damaged = tmp_path / "damaged"
    shutil.copytree(checkpoint["save"], damaged)
    shard = next(p for p in (damaged / "iter_0000006").iterdir() if p.suffix == ".distcp")
    shard.write_bytes(shard.read_bytes()[:100])
    result = _tool(os.path.join(TOOLS, "evaluate.py"), f"x={damaged}", "--tasks", "tst_demo_cloze",
                   "--data-dir", str(checkpoint["data"]), "--out", str(tmp_path / "never"))
    assert result.returncode == 2, result.stderr[-2000:]
    assert "cannot be loaded" in result.stderr and shard.name in result.stderr
    assert not (tmp_path / "never").exists()
