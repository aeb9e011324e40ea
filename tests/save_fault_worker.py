"""Checkpoint saves under faults, in processes of their own (the trainer's save path, a 1-rank gloo world).

    python save_fault_worker.py kill DIR TRIALS   kill -9 the saving process until TRIALS kills have landed in the
                                                  middle of a save (a fresh forked trainer each time; a kill that
                                                  lands between two saves is reported and does not count; at most
                                                  3 * TRIALS kills); print JSON: per kill the descendants it had
                                                  just before it, those alive after, the `.tmp` entries left
    python save_fault_worker.py nopsutil DIR      save without psutil importable (Megatron-Core's writer needs it):
                                                  print JSON: the exit message and the directory's entries
    python save_fault_worker.py full DIR          save once, then again with files limited to 16 KiB (RLIMIT_FSIZE:
                                                  writes fail with EFBIG, as on a full disk); print JSON: the
                                                  second save's exit message and the tracker afterwards
"""

import json
import os
import random
import resource
import signal
import sys
import time

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))

ARGV = ("--num-layers 2 --hidden-size 32 --num-attention-heads 4 --seq-length 16 --micro-batch-size 2 "
        "--global-batch-size 2 --train-iters 1000 --lr 1e-3 --tokenizer-type NullTokenizer --vocab-size 128").split()


def _trainer(directory):
    from run_harness import Trainer

    from megatron_tst.testing.distributed import Layout, free_port, init_worker

    init_worker(rank=0, world_size=1, port=free_port(), layout=Layout())
    return Trainer(ARGV + ["--save", directory], padded_vocab_size=128)


def _save_forever(directory):
    from megatron_tst.training.run_state import TrainState

    trainer = _trainer(directory)
    iteration = 0
    while True:
        iteration += 1
        trainer.save(TrainState(iteration=iteration, consumed_train_samples=2 * iteration))


def _descendants(pid):
    out = []
    try:
        for task in os.listdir(f"/proc/{pid}/task"):
            for child in open(f"/proc/{pid}/task/{task}/children").read().split():
                out += [int(child)] + _descendants(int(child))
    except (FileNotFoundError, ProcessLookupError):
        pass
    return out


def _alive(pid):
    try:
        state = open(f"/proc/{pid}/stat").read().rsplit(")", 1)[1].split()[0]
    except FileNotFoundError:
        return False
    return state != "Z"


def inside_a_save(trial: dict) -> bool:
    """The kill left an unfinished `iter_N.tmp` (the tracker's own `.tmp` comes after the data is written)."""
    return any(name.startswith("iter_") for name in trial["tmp_left"])


def kill(directory, trials):
    import run_harness  # noqa: F401

    import megatron_tst.training.checkpointing  # noqa: F401  (imports done once, before forking)

    rng = random.Random(0)
    results = []
    # The delay is random, so on a loaded machine a kill can land between two saves (the tracker's fsync): such a
    # kill proves nothing and is redone rather than failing the run.
    for trial in range(3 * trials):
        if sum(1 for r in results if inside_a_save(r)) == trials:
            break
        save_dir = os.path.join(directory, f"trial{trial}")
        pid = os.fork()
        if pid == 0:
            try:
                _save_forever(save_dir)
            finally:
                os._exit(1)
        deadline = time.time() + 300
        while not any(name.endswith(".tmp") for name in (os.listdir(save_dir) if os.path.isdir(save_dir) else [])):
            if time.time() > deadline:
                raise SystemExit("no save started")
            time.sleep(0.001)
        time.sleep(rng.uniform(0.0, 0.05))  # somewhere inside the save
        before = _descendants(pid)
        os.kill(pid, signal.SIGKILL)
        os.waitpid(pid, 0)
        time.sleep(0.5)  # what a killed parent takes with it is gone by now (an orphaned writer is not)
        results.append({"descendants": before, "alive_after": [p for p in before if _alive(p)],
                        "tmp_left": sorted(n for n in os.listdir(save_dir) if n.endswith(".tmp"))})
        for p in before:  # never leave anything behind on the machine, whatever the result
            try:
                os.kill(p, signal.SIGKILL)
            except ProcessLookupError:
                pass
    print(json.dumps(results))


def full(directory):
    from megatron_tst.training.run_state import TrainState

    trainer = _trainer(directory)
    trainer.save(TrainState(iteration=1, consumed_train_samples=2))
    signal.signal(signal.SIGXFSZ, signal.SIG_IGN)
    resource.setrlimit(resource.RLIMIT_FSIZE, (16 * 1024, resource.getrlimit(resource.RLIMIT_FSIZE)[1]))
    message = None
    try:
        trainer.save(TrainState(iteration=2, consumed_train_samples=4))
    except SystemExit as err:
        message = str(err)
    resource.setrlimit(resource.RLIMIT_FSIZE, (resource.RLIM_INFINITY, resource.RLIM_INFINITY))
    tracker = open(os.path.join(directory, "latest_checkpointed_iteration.txt")).read()
    print(json.dumps({"message": message, "tracker": tracker,
                      "entries": sorted(os.listdir(directory))}))


def nopsutil(directory):
    sys.modules["psutil"] = None  # `import psutil` raises ImportError, as where it is not installed
    from megatron_tst.training.run_state import TrainState

    trainer = _trainer(directory)
    message = None
    try:
        trainer.save(TrainState(iteration=1, consumed_train_samples=2))
    except SystemExit as err:
        message = str(err)
    print(json.dumps({"message": message, "entries": sorted(os.listdir(directory))}))


if __name__ == "__main__":
    if sys.argv[1] == "kill":
        kill(sys.argv[2], int(sys.argv[3]))
    elif sys.argv[1] == "nopsutil":
        nopsutil(sys.argv[2])
    else:
        full(sys.argv[2])
