"""--overlap-param-gather (distributed optimizer, DP=2, many small buckets): the run equals the same run without
it, step for step through both phases, its evaluations too, and it saves the same checkpoint. With the overlap the
optimizer step updates only each rank's shard and the next forward's module pre-hooks gather the rest: the
superposed embedding (which reads the word embedding's weight itself), an evaluation and a save must not see one
step-old shards of the other rank."""

import pytest
import torch
from torch.distributed.checkpoint.format_utils import dcp_to_torch_save
from trainer_cli import read_jsonl, run_trainer, tiny_llama_tst_args

pytestmark = pytest.mark.e2e

ITERS, SUP = 6, 3
BASE = (tiny_llama_tst_args(train_iters=ITERS, superposition_iters=SUP, global_batch_size=8)
        + " --use-distributed-optimizer --overlap-grad-reduce --ddp-bucket-size 2000 --save-interval 4")
SAVES = (4, ITERS)  # 4: right after an optimizer step (no evaluation in between to gather the parameters)


@pytest.fixture(scope="module")
def runs(tmp_path_factory):
    out = {}
    for name, extra in (("stock", ""), ("overlap", "--overlap-param-gather")):
        directory = tmp_path_factory.mktemp(name)
        args = f"{BASE} {extra} --save {directory}/ckpt --metrics-jsonl {directory}/metrics.jsonl".split()
        result = run_trainer(args)
        assert result.returncode == 0, result.stdout[-3000:] + result.stderr[-5000:]
        saved = {}
        for iteration in SAVES:
            dcp_to_torch_save(f"{directory}/ckpt/iter_{iteration:07d}", directory / f"{iteration}.pt")
            saved[iteration] = torch.load(directory / f"{iteration}.pt", weights_only=False)
        out[name] = (read_jsonl(directory / "metrics.jsonl"), saved)
    return out


def _by_step(records, kind):
    return {(r["iteration"], r["phase"]): r for r in records if r["kind"] == kind}


def test_overlapped_param_gather_trains_and_evaluates_as_without_it(runs):
    for kind in ("train", "eval"):
        stock, overlap = _by_step(runs["stock"][0], kind), _by_step(runs["overlap"][0], kind)
        assert sorted(overlap) == sorted(stock) and len(stock) == (ITERS if kind == "train" else 2)
        assert {phase for _, phase in stock} == {"superposition", "recovery"}
        for step, record in stock.items():
            for key in ("loss", "grad_norm", "eval_lm_loss", "eval_mce_loss"):
                if key in record:
                    assert overlap[step][key] == record[key], (kind, step, key)


@pytest.mark.parametrize("iteration", SAVES)
def test_overlapped_param_gather_saves_the_whole_model(runs, iteration):
    """The model's tensors as saved (the distributed optimizer's bucket tensors hold uninitialized padding, so
    they are not compared byte for byte)."""
    stock, overlap = runs["stock"][1][iteration], runs["overlap"][1][iteration]
    tensors = [key for key, value in stock.items() if torch.is_tensor(value) and not key.startswith("optimizer.")]
    assert "embedding.word_embeddings.weight" in tensors and "decoder.final_layernorm.weight" in tensors
    different = [key for key in tensors if not torch.equal(overlap[key], stock[key])]
    assert not different, different
