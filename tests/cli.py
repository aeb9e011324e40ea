"""Command lines and launchers shared by the trainer-level tests.

Every command line here is an ordinary Megatron-LM `pretrain_gpt.py` command line (plus `--tst-*`): tiny models,
float32, dropout 0, NullTokenizer over mock data unless a test gives data. Two ways to run it:

- `run_trainer(argv, nproc)`: `torchrun ... -m megatron_tst.pretrain` as a user runs it, in a subprocess; for
  end-to-end tests (logs, exit status, signals, checkpoints on disk, other megatron-core venvs);
- `run_in_workers(fn, world_size, ...)`: spawned gloo workers that call `megatron_tst.testing.megatron_lm.
  run_pretrain(argv)` (the same `megatron_tst.pretrain.main`, in process) as often as they like: one spawn for many
  runs (layouts, resumes), seconds instead of a process start per run.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
from typing import List, Optional, Sequence

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
VOCAB = 255  # NullTokenizer ids; Megatron pads the vocabulary to 256 at TP <= 2


def tiny_args(*, seq_length: int = 32, train_iters: int = 6, global_batch_size: int = 8, micro_batch_size: int = 2,
              bag_size: Optional[int] = 4, superposition_iters: Optional[int] = 3, moe: bool = False,
              log_interval: int = 1, eval_interval: int = 1000, eval_iters: int = 0) -> List[str]:
    """A 2-layer Llama-style model (GQA 4/2, RoPE, RMSNorm, SwiGLU, untied, no bias, dropout 0) on mock data, float32;
    `superposition_iters` superposition steps with bags of `bag_size` (None: no --tst-* flags), every iteration
    logged. `moe`: 4 experts, top-2, alltoall, aux loss 1e-2 (Mixtral-style)."""
    argv = (f"--num-layers 2 --hidden-size 64 --num-attention-heads 4 --group-query-attention --num-query-groups 2 "
            f"--ffn-hidden-size 128 --seq-length {seq_length} --max-position-embeddings {seq_length} "
            "--position-embedding-type rope --normalization RMSNorm --swiglu --disable-bias-linear "
            "--untie-embeddings-and-output-weights --attention-dropout 0 --hidden-dropout 0 --init-method-std 0.02 "
            f"--micro-batch-size {micro_batch_size} --global-batch-size {global_batch_size} "
            f"--train-iters {train_iters} --lr 1e-3 --lr-warmup-iters 1 --lr-decay-style linear --min-lr 1e-4 "
            f"--weight-decay 0.1 --clip-grad 1.0 --seed 1234 --tokenizer-type NullTokenizer --vocab-size {VOCAB} "
            f"--mock-data --num-workers 0 --log-interval {log_interval} --eval-interval {eval_interval} "
            f"--eval-iters {eval_iters}").split()
    if moe:
        argv += ("--num-experts 4 --moe-router-topk 2 --moe-ffn-hidden-size 64 --moe-aux-loss-coeff 1e-2 "
                 "--moe-router-load-balancing-type aux_loss --moe-token-dispatcher-type alltoall").split()
    if bag_size is not None:
        argv += ["--tst-bag-size", str(bag_size), "--tst-superposition-iters", str(superposition_iters or 0)]
    return argv


# ----------------------------------------------------------------------------------------------- subprocess runs


def trainer_command(args: Sequence[str], nproc: int = 2, python: str = sys.executable) -> List[str]:
    """The argv of a run of `nproc` processes with `python`, launched as Megatron-LM runs are: by torchrun."""
    return [python, "-m", "torch.distributed.run", "--standalone", f"--nproc-per-node={nproc}",
            "-m", "megatron_tst.pretrain"] + list(args)


def trainer_env(**extra: str) -> dict:
    """os.environ for a launch of its own (not the pytest process's rendezvous, if it has one), one OpenMP thread
    per process, CUDA_DEVICE_MAX_CONNECTIONS=1 (Megatron-LM requires it with TP or CP > 1, as its example scripts
    set it), this checkout's megatron_tst first."""
    env = {k: v for k, v in os.environ.items()
           if k not in ("RANK", "WORLD_SIZE", "LOCAL_RANK", "MASTER_ADDR", "MASTER_PORT")}
    return {**env, "OMP_NUM_THREADS": "1", "PYTHONWARNINGS": "ignore", "CUDA_DEVICE_MAX_CONNECTIONS": "1",
            "PYTHONPATH": os.pathsep.join(filter(None, [ROOT, env.get("PYTHONPATH")])), **extra}


def run_trainer(args: Sequence[str], nproc: int = 2, timeout: float = 600, python: str = sys.executable,
                **env: str) -> subprocess.CompletedProcess:
    """Run the trainer to its end; returns the CompletedProcess (stdout, stderr as text)."""
    return subprocess.run(trainer_command(args, nproc, python), capture_output=True, text=True, timeout=timeout,
                          env=trainer_env(**env), cwd=ROOT)


# ----------------------------------------------------------------------------------------------- in-process runs


def run_in_workers(fn, world_size: int = 2, args: Sequence = (), kwargs: Optional[dict] = None,
                   timeout_s: float = 600.0) -> list:
    """`fn(*args, **kwargs)` on `world_size` spawned gloo workers with torch.distributed only (Megatron-LM sets up
    the parallel state); `fn` calls `megatron_tst.testing.megatron_lm.run_pretrain`. Returns per-rank results."""
    from megatron_tst.testing.distributed import run_distributed

    os.environ.setdefault("CUDA_DEVICE_MAX_CONNECTIONS", "1")
    return run_distributed(fn, world_size=world_size, layout=None, args=args, kwargs=kwargs, timeout_s=timeout_s)


def read_jsonl(path: str, kind: Optional[str] = None) -> List[dict]:
    """The records of a JSON-lines file (of one `kind`, e.g. "train" or "eval", when given)."""
    with open(path) as f:
        records = [json.loads(line) for line in f if line.strip()]
    return [r for r in records if kind is None or r.get("kind") == kind]


def losses(path: str) -> dict:
    """{iteration: (loss, grad_norm)} of a --metrics-jsonl file's train records (the latest per iteration)."""
    return {r["iteration"]: (r["loss"], r["grad_norm"]) for r in read_jsonl(path, "train")}


def worker_tracebacks(stderr: str) -> List[str]:
    """The Python tracebacks in a torchrun run's stderr other than torchrun's own report of a worker that exited
    non-zero (`ChildFailedError`, which every failing Megatron-LM run prints): what a clean refusal has none of."""
    chunks = stderr.split("Traceback (most recent call last):")[1:]
    return [chunk[:3000] for chunk in chunks if "ChildFailedError" not in chunk.split("\n\n")[0]
            and "torch/distributed/run.py" not in chunk[:3000]]
