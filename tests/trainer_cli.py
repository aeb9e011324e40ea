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


def read_jsonl(path):
    with open(path) as f:
        return [json.loads(line) for line in f]
