"""The trainer as the end-to-end tests launch it: `python -m megatron_tst.pretrain ARGS`, under torchrun
(`python -m torch.distributed.run --standalone`) for more than one process."""

import json
import os
import subprocess
import sys

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def trainer_command(args, nproc=2, python=sys.executable):
    """The argv of a run of `nproc` processes (1: the trainer itself, no torchrun) with `python`."""
    launcher = ([python, "-m", "torch.distributed.run", "--standalone", f"--nproc-per-node={nproc}"]
                if nproc > 1 else [python])
    return launcher + ["-m", "megatron_tst.pretrain"] + list(args)


def trainer_env():
    """os.environ for a launch of its own (not the pytest process's rendezvous, if it has one), one OpenMP thread
    per process, this checkout's megatron_tst first."""
    env = {k: v for k, v in os.environ.items() if k not in ("RANK", "WORLD_SIZE", "MASTER_ADDR", "MASTER_PORT")}
    return {**env, "OMP_NUM_THREADS": "1", "PYTHONWARNINGS": "ignore",
            "PYTHONPATH": os.pathsep.join(filter(None, [ROOT, env.get("PYTHONPATH")]))}


def run_trainer(args, nproc=2, timeout=600, python=sys.executable):
    """Run the trainer to its end; returns the CompletedProcess (stdout, stderr as text)."""
    return subprocess.run(trainer_command(args, nproc, python), capture_output=True, text=True, timeout=timeout,
                          env=trainer_env())


def tiny_llama_tst_args(*, seq_length=16, train_iters=6, superposition_iters=3, global_batch_size=4):
    """A 2-layer Llama-style model (GQA, RoPE, RMSNorm, SwiGLU, untied; no dropout) on mock data, float32, bags of
    4: `superposition_iters` superposition steps then recovery, an evaluation every `superposition_iters` steps
    (one in each phase), every iteration logged. A flag string, for tests that compare two runs of it."""
    return ("--num-layers 2 --hidden-size 32 --num-attention-heads 4 --group-query-attention --num-query-groups 2 "
            f"--seq-length {seq_length} --position-embedding-type rope --normalization RMSNorm --swiglu "
            "--disable-bias-linear --untie-embeddings-and-output-weights --attention-dropout 0.0 --hidden-dropout 0.0 "
            f"--micro-batch-size 2 --global-batch-size {global_batch_size} --train-iters {train_iters} --lr 3e-3 "
            "--lr-warmup-iters 1 --seed 1234 --tokenizer-type NullTokenizer --vocab-size 250 --mock-data "
            f"--log-interval 1 --eval-interval {superposition_iters} --eval-iters 1 --num-workers 0 "
            f"--tst-bag-size 4 --tst-superposition-iters {superposition_iters}")


def read_jsonl(path):
    with open(path) as f:
        return [json.loads(line) for line in f]
