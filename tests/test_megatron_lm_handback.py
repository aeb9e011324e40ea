"""Hand back to Megatron-LM: Megatron-LM 0.19.2's own `load_checkpoint` loads what our trainer wrote.

Our trainer (`python -m megatron_tst.pretrain`, this pytest's Python: megatron-core 0.16.1 or 0.19.2) trains a tiny
GPT / MoE through both TST phases (superposition, then recovery) at TP=1 and TP=2 and saves. Our loader and our
evaluation give the loss of a fixed batch. Then tests/megatron_lm/handback.py, on megatron-core 0.19.2's Python
(`megatron.training` is in that wheel), builds the model from Megatron-LM's own command line (pretrain_gpt.py's,
as in the shared Megatron-LM fixtures), loads the checkpoint with `megatron.training.checkpointing.load_checkpoint`
through `setup_model_and_optimizer`, and evaluates the same batch: same loss to 1e-5 relative, iteration and
consumed samples back. Also with `--use-checkpoint-args`, the model flags left off the command line: Megatron-LM
rebuilds the model from our checkpoint's `args`.
"""

import json
import os
import subprocess
import sys

import pytest
import torch
from run_harness import Trainer

pytestmark = pytest.mark.e2e

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
HANDBACK = os.path.join(ROOT, "tests", "megatron_lm", "handback.py")
TRAIN_ITERS, SUP_ITERS, BAG = 4, 2, 2
# Megatron-LM's model flags (arity) that --use-checkpoint-args takes from the checkpoint instead.
MODEL_FLAGS = {"--num-layers": 1, "--hidden-size": 1, "--ffn-hidden-size": 1, "--num-attention-heads": 1,
               "--group-query-attention": 0, "--num-query-groups": 1, "--seq-length": 1,
               "--max-position-embeddings": 1, "--position-embedding-type": 1, "--normalization": 1, "--swiglu": 0,
               "--disable-bias-linear": 0, "--untie-embeddings-and-output-weights": 0, "--attention-dropout": 1,
               "--hidden-dropout": 1, "--num-experts": 1, "--moe-router-topk": 1, "--moe-ffn-hidden-size": 1}
# pretrain_gpt.py command lines: those Megatron-LM 0.19.2 wrote the shared fixtures with
# (shared/fixtures/megatron_lm/megatron_lm_{gpt,moe}_tp1.json, `megatron_cli_args_str`), for TRAIN_ITERS iterations.
DENSE = ("--num-layers 2 --hidden-size 64 --num-attention-heads 4 --group-query-attention --num-query-groups 2 "
         "--ffn-hidden-size 128 --seq-length 64 --max-position-embeddings 64 --position-embedding-type rope "
         "--normalization RMSNorm --swiglu --disable-bias-linear --untie-embeddings-and-output-weights "
         "--attention-dropout 0.0 --hidden-dropout 0.0 --tokenizer-type NullTokenizer --vocab-size 1024 "
         f"--micro-batch-size 2 --global-batch-size 4 --train-iters {TRAIN_ITERS} --lr 1e-2 --min-lr 1e-3 "
         "--lr-warmup-iters 1 --weight-decay 0.1 --clip-grad 1.0 --adam-beta1 0.9 --adam-beta2 0.95 "
         "--init-method-std 0.02 --seed 1234 --transformer-impl local --use-cpu-initialization "
         "--no-gradient-accumulation-fusion --no-masked-softmax-fusion --no-bias-swiglu-fusion --no-rope-fusion "
         "--no-bias-dropout-fusion --no-persist-layer-norm --distributed-backend gloo --ckpt-format torch_dist "
         f"--save-interval {TRAIN_ITERS}")
COMMAND_LINES = {
    "dense": DENSE + " --lr-decay-style cosine",
    "moe": DENSE + " --lr-decay-style WSD --lr-wsd-decay-style linear --lr-wsd-decay-iters 2 --num-experts 4 "
                   "--moe-router-topk 2 --moe-ffn-hidden-size 64 --moe-token-dispatcher-type alltoall "
                   "--moe-aux-loss-coeff 1e-2 --moe-router-load-balancing-type aux_loss",
}


def mcore019_python():
    """Megatron-core 0.19.2's Python: $MEGATRON_TST_PYTHON_0_19 (tools/test.sh exports it), else
    $MEGATRON_TST_MCORE019_PYTHON, else <repo>/.venv-mcore019/bin/python."""
    path = (os.environ.get("MEGATRON_TST_PYTHON_0_19") or os.environ.get("MEGATRON_TST_MCORE019_PYTHON")
            or os.path.join(ROOT, ".venv-mcore019", "bin", "python"))
    if not os.path.isfile(path):
        pytest.skip(f"no megatron-core 0.19.2 Python at {path}: run the suite through tools/test.sh (or "
                    "tools/install.sh --mcore 0.19.2), or set MEGATRON_TST_PYTHON_0_19")
    return path


def megatron_lm_argv(kind, tp):
    """Megatron-LM's pretrain_gpt.py command line for `kind` at TP=tp (MoE with TP needs sequence parallelism)."""
    sequence_parallel = ["--sequence-parallel"] if kind == "moe" and tp > 1 else []
    return COMMAND_LINES[kind].split() + ["--tensor-model-parallel-size", str(tp)] + sequence_parallel


def without_model_flags(argv):
    out, i = [], 0
    while i < len(argv):
        if argv[i] in MODEL_FLAGS:
            i += 1 + MODEL_FLAGS[argv[i]]
        else:
            out.append(argv[i])
            i += 1
    return out


def launcher(python, nproc):
    if nproc == 1:
        return [python]
    return [python, "-m", "torch.distributed.run", "--standalone", f"--nproc-per-node={nproc}"]


def run(cmd, timeout=600):
    # A launch of its own: not the pytest process's rendezvous, if it has one.
    env = {k: v for k, v in os.environ.items() if k not in ("RANK", "WORLD_SIZE", "LOCAL_RANK", "MASTER_ADDR",
                                                            "MASTER_PORT")}
    env = {**env, "OMP_NUM_THREADS": "1", "PYTHONWARNINGS": "ignore", "CUDA_DEVICE_MAX_CONNECTIONS": "1",
           "PYTHONPATH": os.pathsep.join([ROOT] + [p for p in [os.environ.get("PYTHONPATH")] if p])}
    result = subprocess.run(cmd, capture_output=True, text=True, timeout=timeout, env=env, cwd=ROOT)
    assert result.returncode == 0, " ".join(cmd) + "\n" + result.stdout[-3000:] + result.stderr[-5000:]
    return result


def fixed_batch(seed=0, batch=2, seq_length=64, vocab=1024):
    """Rows of consecutive token ids from random starts, as --mock-data's samples are (so the trained weights
    predict them better than the initial ones): tokens, labels [b, s] int64 (labels = tokens shifted by one),
    loss_mask [b, s] float32 all ones."""
    starts = torch.randint(0, vocab, (batch, 1), generator=torch.Generator().manual_seed(seed))
    sequences = (starts + torch.arange(seq_length + 1)) % vocab
    return {"tokens": sequences[:, :-1].contiguous(), "labels": sequences[:, 1:].contiguous(),
            "loss_mask": torch.ones(batch, seq_length)}


@pytest.fixture(scope="module")
def batch_file(tmp_path_factory):
    path = tmp_path_factory.mktemp("batch") / "batch.pt"
    torch.save(fixed_batch(), path)
    return str(path)


_written = {}


@pytest.fixture
def written(request, tmp_path_factory, megatron_single_process):
    """(kind, tp) -> our trainer's checkpoint after both TST phases, with our loss on the fixed batch (cached)."""

    def get(kind, tp):
        if (kind, tp) not in _written:
            save = str(tmp_path_factory.mktemp(f"{kind}_tp{tp}"))
            tst_flags = ["--tst-bag-size", str(BAG), "--tst-superposition-iters", str(SUP_ITERS)]
            argv = megatron_lm_argv(kind, tp) + ["--mock-data", *tst_flags, "--save", save, "--log-interval", "1",
                                                 "--eval-iters", "0"]
            result = run(launcher(sys.executable, tp) + ["-m", "megatron_tst.pretrain"] + argv)
            # Ours, at TP=1 (a TP=2 checkpoint resharded by our loader): the production load and evaluation, with
            # the run's own TST flags (without them our loader refuses a resume on another sample stream).
            ours = Trainer(megatron_lm_argv(kind, 1) + tst_flags + ["--load", save])
            state = ours.load()
            batch = fixed_batch()
            sequences = torch.cat([batch["tokens"], batch["labels"][:, -1:]], dim=1).tolist()
            initial = Trainer(megatron_lm_argv(kind, 1))
            _written[kind, tp] = {"save": save, "stdout": result.stdout, "state": state,
                                  "loss": ours.eval_loss(sequences), "initial_loss": initial.eval_loss(sequences),
                                  "lr": ours.optimizer.param_groups[0]["lr"],
                                  "scheduler_num_steps": ours.scheduler.num_steps}
        return _written[kind, tp]

    return get


def hand_back(save, kind, tp, batch_file, out, use_checkpoint_args):
    argv = megatron_lm_argv(kind, tp) + ["--load", save, "--no-load-rng"]  # CPU RNG states: see README
    if use_checkpoint_args:
        argv = without_model_flags(argv) + ["--use-checkpoint-args"]
    run(launcher(mcore019_python(), tp) + [HANDBACK, "--batch", batch_file, "--out", str(out), "--"] + argv)
    with open(out) as f:
        return json.load(f)


@pytest.mark.parametrize("use_checkpoint_args", [False, True], ids=["command_line", "use_checkpoint_args"])
@pytest.mark.parametrize("tp", [1, 2], ids=["tp1", "tp2"])
@pytest.mark.parametrize("kind", ["dense", "moe"])
def test_megatron_lm_loads_our_checkpoint(kind, tp, use_checkpoint_args, written, batch_file, tmp_path):
    mcore019_python()
    ours = written(kind, tp)
    assert "phase: superposition" in ours["stdout"] and "phase: recovery" in ours["stdout"]
    assert ours["state"].iteration == TRAIN_ITERS
    result = hand_back(ours["save"], kind, tp, batch_file, tmp_path / "out.json", use_checkpoint_args)
    assert result["megatron_core_version"].startswith("0.19.2") and result["world_size"] == tp
    assert result["loss"] == pytest.approx(ours["loss"], rel=1e-5)
    assert result["iteration"] == ours["state"].iteration == TRAIN_ITERS
    # superposition steps consume BAG samples per position: 2 * 2 * 4 + 2 * 4
    assert result["consumed_train_samples"] == ours["state"].consumed_train_samples == 24
    # the LR schedule comes back too (Megatron-LM counts it in samples of the global batch: 4 per iteration)
    assert result["scheduler_num_steps"] == ours["scheduler_num_steps"] == TRAIN_ITERS * 4
    assert result["lr"] == pytest.approx(ours["lr"], rel=1e-12)
    model = result["model_args"]
    assert (model["num_layers"], model["hidden_size"], model["ffn_hidden_size"], model["num_query_groups"],
            model["position_embedding_type"], model["swiglu"], model["add_bias_linear"]) == (
        2, 64, 128, 2, "rope", True, False)
    assert model["num_experts"] == (4 if kind == "moe" else None)
    assert model["tensor_model_parallel_size"] == tp


def test_fixed_batch_tells_trained_from_initial_weights(written):
    """The fixed batch's loss depends on the trained weights: it differs from the loss at the run's initial weights."""
    for kind in ("dense", "moe"):
        ours = written(kind, 1)
        assert ours["initial_loss"] - ours["loss"] > 1e-2 * ours["loss"], (kind, ours["loss"], ours["initial_loss"])
