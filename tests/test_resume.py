"""Resume anywhere, bitwise, through Megatron-LM's loop: `kill -9` (at a random point, and in the middle of a save),
SIGTERM with --exit-signal-handler (the SLURM launch scripts' requeue contract: $TST_EXIT_MARKER), then the same
command again.

The run: TST (bags of 4, 5 superposition steps of 12), dropout 0.1 (so the RNG streams must come back too: the
model-parallel tracker's states and, on CPU, the default generator that is also the data loaders'), DP=2 with the
distributed optimizer, on real text (`--data-path`), a checkpoint every 2 steps. The interrupted runs are real
trainer processes (`torchrun --nproc-per-node 2 -m megatron_tst.pretrain`, the same command line every time, --save
and --load on one directory); the uninterrupted reference runs once, in process (the same `megatron_tst.pretrain.main`
in 2 spawned gloo processes), and is shared with test_cross_version.py.

Compared: every --metrics-jsonl train record of every interrupted run, bitwise, with the reference's. (A process's
first iteration line ends no log interval, in Megatron-LM 0.17 and 0.19 alike: the first record after a resume at
iteration s is iteration s + 2's, whose loss is the mean of s + 1's and s + 2's.) And the final checkpoints hold the
same tensors, bitwise.
"""

import os
import random
import re
import signal
import subprocess
import time
import uuid

import pytest
from cli import read_jsonl, run_in_workers, tiny_args, trainer_command, trainer_env
from text_corpus import build_byte_corpus

from megatron_tst.platform.mcore_compat import MCORE_VERSION

pytestmark = pytest.mark.e2e

TRAIN_ITERS, SUPERPOSITION_ITERS, SAVE_INTERVAL = 12, 5, 2
TRACKER = "latest_checkpointed_iteration.txt"


def corpus_vocab_flag(mcore_minor: int) -> str:
    """--vocab-size of the byte corpus (ids 0..255, end of document 256: 257 ids) for NullTokenizer on a
    megatron-core release: 257 on >= 0.18, 256 on 0.17 (whose NullTokenizer adds the end-of-document id)."""
    return "257" if mcore_minor >= 18 else "256"


def resume_flags(corpus: str, mcore_minor: int = MCORE_VERSION.minor):
    """The command line of every run here (and of test_cross_version.py), without --save/--load/--metrics-jsonl."""
    argv = tiny_args(train_iters=TRAIN_ITERS, superposition_iters=SUPERPOSITION_ITERS)
    for flag, value in (("--attention-dropout", "0.1"), ("--hidden-dropout", "0.1"),
                        ("--vocab-size", corpus_vocab_flag(mcore_minor))):
        argv[argv.index(flag) + 1] = value
    argv.remove("--mock-data")
    return argv + ["--data-path", corpus, "--split", "98,2,0", "--use-distributed-optimizer", "--exit-signal-handler",
                   "--save-interval", str(SAVE_INTERVAL)]


_SHARED = {}  # session fixtures imported by other modules get a definition there too: one value per process


def _shared(name, make):
    if name not in _SHARED:
        _SHARED[name] = make()
    return _SHARED[name]


@pytest.fixture(scope="session")
def corpus(tmp_path_factory):
    return _shared("corpus", lambda: build_byte_corpus(str(tmp_path_factory.mktemp("corpus"))))


def _reference_worker(argv):
    from megatron_tst.testing.megatron_lm import run_pretrain

    return run_pretrain(argv)


@pytest.fixture(scope="session")
def reference(corpus, tmp_path_factory):
    """The uninterrupted run (in process, 2 ranks): its directory (checkpoints in ckpt/, metrics in run.jsonl)."""
    return _shared("reference", lambda: _reference_run(corpus, tmp_path_factory.mktemp("reference")))


def _reference_run(corpus, directory):
    argv = resume_flags(corpus) + ["--save", str(directory / "ckpt"), "--metrics-jsonl", str(directory / "run.jsonl")]
    assert run_in_workers(_reference_worker, 2, args=(argv,)) == [0, 0]
    records = read_jsonl(directory / "run.jsonl", "train")
    assert [r["iteration"] for r in records] == list(range(2, TRAIN_ITERS + 1))
    return directory


def records_of(path):
    """{iteration: (loss, grad norm)} of a metrics file's train records."""
    return {r["iteration"]: (r["loss"], r["grad_norm"]) for r in read_jsonl(path, "train")} if os.path.exists(
        path) else {}


def expected_records(reference_records, start, superposition_iters=SUPERPOSITION_ITERS):
    """The train records a process that resumed at iteration `start` writes, from the reference's: its first line
    (start + 1) ends no interval, so record start + 2 holds the mean loss of start + 1 and start + 2, unless
    start + 1 is the last superposition step (a log interval never mixes phases: that line is a record)."""
    expected = dict(reference_records)
    if start >= 2 and start + 1 != superposition_iters and start + 2 in reference_records:  # (record 2: 1 and 2)
        (a, _), (b, grad_norm) = reference_records[start + 1], reference_records[start + 2]
        expected[start + 2] = ((a + b) / 2, grad_norm)
    return expected


# ----------------------------------------------------------------------------------------------- processes


class Trainer:
    """One `torchrun` of the trainer with the shared command line; its output in <workdir>/<name>.log."""

    def __init__(self, argv, workdir, name, **env):
        self.log_path = workdir / f"{name}.log"
        self.tag = uuid.uuid4().hex  # every process of this launch carries it in its environment
        self.log = open(self.log_path, "w")
        self.proc = subprocess.Popen(trainer_command(argv, nproc=2), stdout=self.log, stderr=subprocess.STDOUT,
                                     env=trainer_env(TST_TEST_LAUNCH=self.tag, **env), start_new_session=True)

    def output(self):
        self.log.flush()
        return open(self.log_path).read()

    def last_iteration(self):
        """The last iteration line the trainer printed."""
        lines = [line for line in self.output().splitlines() if " iteration " in line and "/" in line]
        numbers = [int(line.split(" iteration ")[1].split("/")[0]) for line in lines
                   if line.split(" iteration ")[1].split("/")[0].strip().isdigit()]
        return max(numbers, default=0)

    def wait_until(self, condition, timeout=300, poll=0.005):
        deadline = time.time() + timeout
        while time.time() < deadline:
            if condition():
                return True
            if self.proc.poll() is not None:
                return False
            time.sleep(poll)
        raise AssertionError(f"timed out; output:\n{self.output()[-3000:]}")

    def workers(self):
        """torchrun's worker processes (the ranks)."""
        return _children(self.proc.pid)

    def kill_9(self):
        """SIGKILL torchrun and every process under it, at once (the workers run in sessions of their own)."""
        for pid in [self.proc.pid] + _descendants(self.proc.pid):
            try:
                os.kill(pid, signal.SIGKILL)
            except ProcessLookupError:
                pass
        self.proc.wait()

    def finish(self, timeout=300):
        self.proc.wait(timeout=timeout)
        self.log.close()
        return self.proc.returncode, open(self.log_path).read()

    def survivors(self, timeout=10.0):
        """Processes of this launch still alive `timeout` s after it ended (e.g. a checkpoint writer)."""
        deadline = time.time() + timeout
        while True:
            alive = _processes_with(f"TST_TEST_LAUNCH={self.tag}")
            if not alive or time.time() > deadline:
                return alive
            time.sleep(0.1)


def _children(pid):
    try:
        return [int(c) for t in os.listdir(f"/proc/{pid}/task")
                for c in open(f"/proc/{pid}/task/{t}/children").read().split()]
    except (FileNotFoundError, ProcessLookupError):
        return []


def _descendants(pid):
    children = _children(pid)
    return children + [d for c in children for d in _descendants(c)]


def _processes_with(marker):
    found = []
    for entry in os.listdir("/proc"):
        if not entry.isdigit():
            continue
        try:
            with open(f"/proc/{entry}/environ", "rb") as f:
                environ = f.read().split(b"\0")
            with open(f"/proc/{entry}/stat") as f:
                state = f.read().rsplit(")", 1)[1].split()[0]
        except OSError:
            continue
        if marker.encode() in environ and state != "Z":
            found.append(int(entry))
    return found


def _tracked(ckpt):
    path = ckpt / TRACKER
    return int(open(path).read()) if path.exists() else 0


# ------------------------------------------------------------------------------------------------- the test


@pytest.fixture(scope="module")
def interrupted(corpus, reference, tmp_path_factory):
    """The same command four times on one --save/--load directory:
    a. kill -9 at a random point of the superposition phase;
    b. resumes inside the superposition phase; kill -9 while its first checkpoint is being written;
    c. resumes from the same checkpoint, crosses the phase switch; SIGTERM to its ranks in recovery: saves, exits 0,
       rank 0 writes $TST_EXIT_MARKER;
    d. resumes in recovery and runs to the end;
    e. the same command once more (a requeued job whose run had ended): nothing to train, exits 0.
    The kill point is random on purpose (each run tries another); TST_RESUME_KILL_SEED=N replays a seed."""
    workdir = tmp_path_factory.mktemp("interrupted")
    ckpt = workdir / "ckpt"
    seed = int(os.environ.get("TST_RESUME_KILL_SEED") or time.time_ns() % 2**32)
    rng = random.Random(seed)
    marker = workdir / "exit_marker"
    out = {"seed": seed, "runs": [], "marker": marker}

    def command(name):
        return resume_flags(corpus) + ["--save", str(ckpt), "--load", str(ckpt),
                                       "--metrics-jsonl", str(workdir / f"{name}.jsonl")]

    def launch(name):
        out["runs"].append((name, _tracked(ckpt)))
        return Trainer(command(name), workdir, name, TST_EXIT_MARKER=str(marker))

    # a. kill -9 at a random iteration of the superposition phase (after a random part of it), once a checkpoint
    #    (iteration 2) is complete
    kill_at = rng.randint(3, SUPERPOSITION_ITERS - 1)
    a = launch("a")
    assert a.wait_until(lambda: a.last_iteration() >= kill_at and _tracked(ckpt) >= 2), a.output()[-3000:]
    time.sleep(rng.uniform(0.0, 0.1))
    a.kill_9()
    out["a"] = {"kill_at": kill_at, "survivors": a.survivors(), "tracked": _tracked(ckpt)}

    # b. kill -9 in the middle of the first save after the resume: once Megatron-LM announces it (the first save of
    #    a process takes seconds here: it starts the checkpoint writer)
    start = _tracked(ckpt)
    b = launch("b")
    assert b.wait_until(lambda: "saving checkpoint at iteration" in b.output(), poll=0.002), b.output()[-3000:]
    b.kill_9()
    output = b.output()
    saving = int(output.split("saving checkpoint at iteration")[1].split()[0])
    out["b"] = {"start": start, "saving": saving, "tracked": _tracked(ckpt), "survivors": b.survivors(),
                "completed": f"successfully saved checkpoint from iteration {saving:8d}" in output,
                "partial": (ckpt / f"iter_{saving:07d}").exists()}

    # c. SIGTERM to the ranks once past the phase switch
    c = launch("c")
    assert c.wait_until(lambda: c.last_iteration() >= SUPERPOSITION_ITERS + 1), c.output()[-3000:]
    workers = c.workers()
    for pid in workers:  # as SLURM (or an operator) signals the training processes
        os.kill(pid, signal.SIGTERM)
    code, output = c.finish()
    out["c"] = {"code": code, "output": output, "workers": len(workers), "tracked": _tracked(ckpt),
                "marker": open(marker).read() if marker.exists() else None,
                "last_iteration": max(records_of(workdir / "c.jsonl"), default=0)}

    # d. to the end
    marker.unlink(missing_ok=True)
    d = launch("d")
    code, output = d.finish()
    out["d"] = {"code": code, "output": output, "marker": marker.exists()}

    # e. once more, at the end
    e = launch("e")
    code, output = e.finish()
    out["e"] = {"code": code, "output": output, "tracked": _tracked(ckpt), "records": records_of(workdir / "e.jsonl")}
    out["workdir"] = workdir
    return out


def _note(interrupted):
    return f"(kill point seed {interrupted['seed']}: rerun with TST_RESUME_KILL_SEED={interrupted['seed']})"


def test_kill_9_leaves_no_process_and_the_last_complete_checkpoint(interrupted):
    note = _note(interrupted)
    a, b = interrupted["a"], interrupted["b"]
    assert a["survivors"] == [] and b["survivors"] == [], note  # no rank, launcher or checkpoint writer survives
    assert 2 <= a["tracked"] <= a["kill_at"] and a["tracked"] % SAVE_INTERVAL == 0, (a, note)
    # b was killed while iter_<saving> was being written: the tracker still names the previous checkpoint
    assert b["saving"] == b["start"] + SAVE_INTERVAL and not b["completed"], (b, note)
    assert b["tracked"] == b["start"] and b["partial"], (b, note)
    assert b["start"] < SUPERPOSITION_ITERS, note  # b resumed inside the superposition phase


def test_sigterm_with_exit_signal_handler_saves_exits_0_and_writes_the_exit_marker(interrupted):
    c = interrupted["c"]
    assert c["workers"] == 2
    assert c["code"] == 0, c["output"][-3000:]
    assert "exiting program after receiving SIGTERM" in c["output"]
    # the checkpoint of the iteration it stopped at, past the phase switch; rank 0 wrote the marker (once, after it)
    assert c["tracked"] == c["last_iteration"] > SUPERPOSITION_ITERS, c["output"][-3000:]
    assert c["marker"] is not None and c["marker"].split()[-1] == str(c["tracked"]), c["marker"]
    assert interrupted["d"]["marker"] is False  # a run that ends normally writes none


@pytest.fixture(scope="module")
def two_trainers(corpus, tmp_path_factory):
    """A trainer (the shared command line, made long: 20,000 steps) and, once it trains, the same command again on
    its --save directory; then SIGTERM to the first (--exit-signal-handler: it saves and exits 0)."""
    workdir = tmp_path_factory.mktemp("two_trainers")
    ckpt = workdir / "ckpt"
    argv = resume_flags(corpus) + ["--save", str(ckpt), "--load", str(ckpt), "--train-iters", "20000",
                                   "--save-interval", "1000"]
    first = Trainer(argv, workdir, "first")
    assert first.wait_until(lambda: first.last_iteration() >= 1), first.output()[-3000:]
    # (without --exit-signal-handler, which would defer torchrun's SIGTERM to the rank that waits for its rank 0 in
    # Megatron-LM's initialisation until torchrun's SIGKILL 30 s later)
    second = Trainer([a for a in argv if a != "--exit-signal-handler"], workdir, "second")
    code, output = second.finish()
    out = {"second": {"code": code, "output": output, "survivors": second.survivors()},
           "first_alive": first.proc.poll() is None, "first_workers": first.workers(), "ckpt": ckpt}
    for pid in out["first_workers"]:
        os.kill(pid, signal.SIGTERM)
    code, output = first.finish()
    last = max((int(m) for m in re.findall(r" iteration +(\d+)/", output)), default=0)
    out["first"] = {"code": code, "output": output, "tracked": _tracked(ckpt), "last": last}
    return out


def test_a_second_trainer_on_the_same_save_directory_is_refused_at_once(two_trainers):
    """`--save`'s lock (loop/save_lock.py), held by the first trainer's rank 0: the second one's rank 0 refuses
    before reading or writing anything, naming the directory and the holder; torchrun then ends its other rank; the
    first trains on and ends with its checkpoint (SIGTERM: saved where it stopped)."""
    second, first = two_trainers["second"], two_trainers["first"]
    assert second["code"] != 0 and second["survivors"] == [], second["output"][-3000:]
    held = f"--save {two_trainers['ckpt']} is in use by another trainer: process "
    assert any(f"{held}{pid} on " in second["output"] for pid in two_trainers["first_workers"]), \
        second["output"][-3000:]
    assert "building GPT model" not in second["output"] and "saving checkpoint" not in second["output"]
    assert two_trainers["first_alive"] and len(two_trainers["first_workers"]) == 2
    assert first["code"] == 0 and first["tracked"] == first["last"] > 1, first["output"][-3000:]


def test_kill_9_releases_the_save_directory(interrupted):
    """a and b were killed by SIGKILL holding --save's lock; b, c and d took it (the kernel drops a dead process's
    flock)."""
    for name in ("b", "c", "d"):
        log = (interrupted["workdir"] / f"{name}.log").read_text()
        assert "is in use by another trainer" not in log and " iteration " in log, log[-3000:]


def test_the_same_command_after_the_end_exits_0_without_training(interrupted):
    """Megatron-LM's sampler asserts consumed < dataset length: TST's train dataset reaches one sample past the run,
    as Megatron's stock GPTDataset (whole epochs) does, so a finished run launched again only loads and ends."""
    e = interrupted["e"]
    assert e["code"] == 0, e["output"][-3000:]
    assert e["tracked"] == TRAIN_ITERS and e["records"] == {}, e["output"][-3000:]


def test_every_resumed_iteration_equals_the_uninterrupted_run_bitwise(interrupted, reference):
    note = _note(interrupted)
    d = interrupted["d"]
    assert d["code"] == 0, d["output"][-3000:]
    reference_records = records_of(reference / "run.jsonl")
    compared = set()
    for name, start in interrupted["runs"]:
        ours = records_of(interrupted["workdir"] / f"{name}.jsonl")
        expected = expected_records(reference_records, start)
        for iteration, values in ours.items():
            assert values == expected[iteration], (name, start, iteration, values, expected[iteration], note)
            compared |= {start + 1, iteration} if iteration == start + 2 and start + 1 not in ours else {iteration}
    # the runs' records together cover every iteration (a record may be a process's first two)
    assert compared == set(range(1, TRAIN_ITERS + 1)), (sorted(compared), interrupted["runs"], note)
    starts = [start for _, start in interrupted["runs"]]
    assert any(0 < s < SUPERPOSITION_ITERS for s in starts) and any(s > SUPERPOSITION_ITERS for s in starts), starts


def test_the_final_checkpoints_are_identical(interrupted, reference):
    ours = checkpoint_tensors(interrupted["workdir"] / "ckpt" / f"iter_{TRAIN_ITERS:07d}")
    theirs = checkpoint_tensors(reference / "ckpt" / f"iter_{TRAIN_ITERS:07d}")
    assert sorted(ours) == sorted(theirs) and any(k.startswith("decoder.") for k in ours)
    different = [key for key in ours if not ours[key].equal(theirs[key])]
    assert not different, (different, _note(interrupted))


def checkpoint_tensors(directory):
    """Every tensor of a torch_dist checkpoint (global shapes), read without a process group."""
    import torch
    import torch.distributed.checkpoint as dcp
    from torch.distributed.checkpoint.metadata import TensorStorageMetadata

    reader = dcp.FileSystemReader(str(directory))
    metadata = reader.read_metadata()
    tensors = {key: torch.empty(meta.size, dtype=meta.properties.dtype)
               for key, meta in metadata.state_dict_metadata.items() if isinstance(meta, TensorStorageMetadata)}
    dcp.load(tensors, storage_reader=reader, no_dist=True)
    return tensors
