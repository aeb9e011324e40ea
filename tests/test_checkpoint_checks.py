"""A damaged or hostile checkpoint is named before heavy work, and nothing in it ever runs
(`megatron_tst.loop.checkpoint_checks`, `platform/mcore_compat.py`: `load_checkpoint_metadata`,
`install_safe_metadata_reading`, `safe_torch_load`).

The checkpoints are copies of the one Megatron-LM 0.19.2 wrote (tests/fixtures/megatron_lm/megatron_lm_gpt_tp1,
iteration 30), each damaged one way, next to an intact copy at iteration 20 (the way forward the errors must name),
and one this megatron-core release writes (so each supported release's layout: 0.17 writes `common.pt`, 0.19 the
common state inside the shards).
A hostile file is a pickle whose `__reduce__` would `touch` a marker file; the controls show that torch's plain
readers do run it. Each damaged root is then loaded by the trainer (`megatron_tst.pretrain.main` in process, one
spawned gloo process), which must end with status 2 and the named error before the model is built (on
megatron-core >= 0.18 before any process group exists: TST's checks run between Megatron-LM's argument validation
and its initialisation; 0.17 validates inside `initialize_megatron`, so there the groups exist already), and
`--ckpt-step 20` continues.
"""

import io
import os
import pickle
import shutil

import pytest
import torch
from cli import run_in_workers
from test_checkpoints import ROOT, fixture_argv, load_record

from megatron_tst.platform.mcore_compat import MCORE_VERSION

pytestmark = pytest.mark.e2e

FIXTURE = os.path.join(ROOT, "megatron_lm_gpt_tp1", "iter_0000030")
SHARD = "__0_0.distcp"
SHARDED_OBJECT = "rng_state/shard_0.0_1.1"


class RunsCode:
    """Unpickling it calls os.system: what a hostile checkpoint object looks like."""

    def __init__(self, marker):
        self.marker = marker

    def __reduce__(self):
        return (os.system, (f"touch {self.marker}",))


def _root(directory, name, tracker="30"):
    """<directory>/<name>: an intact copy of the fixture as iteration 20 and another as 30; the tracker text."""
    root = os.path.join(directory, name)
    for iteration in (20, 30):
        shutil.copytree(FIXTURE, os.path.join(root, f"iter_{iteration:07d}"))
    with open(os.path.join(root, "latest_checkpointed_iteration.txt"), "w") as f:
        f.write(tracker)
    return root


def _hostile_sharded_object(checkpoint, marker):
    """Overwrite the sharded object's bytes in the shard, in place and at the same length: torch's legacy
    (non-zip) serialization of a RunsCode, zero-padded (an unpickler stops at the pickle's end)."""
    from torch.distributed.checkpoint import FileSystemReader

    info = next(info for index, info in FileSystemReader(checkpoint).read_metadata().storage_data.items()
                if index.fqn == SHARDED_OBJECT)
    payload = io.BytesIO()
    torch.save(RunsCode(marker), payload, _use_new_zipfile_serialization=False)
    data = payload.getvalue()
    assert len(data) <= info.length
    with open(os.path.join(checkpoint, info.relative_path), "r+b") as f:
        f.seek(info.offset)
        f.write(data + bytes(info.length - len(data)))
    return data


def damage(directory):
    """{case: (root, the file the error must name, words it must say)}; the markers of the hostile cases."""
    marker = os.path.join(directory, "ran")
    cases = {}

    root = _root(directory, "truncated")
    shard = os.path.join(root, "iter_0000030", SHARD)
    os.truncate(shard, os.path.getsize(shard) // 2)
    cases["truncated_shard"] = (root, shard, ["is shorter than .metadata says"])

    root = _root(directory, "missing")
    shard = os.path.join(root, "iter_0000030", SHARD)
    os.remove(shard)
    cases["missing_shard"] = (root, shard, ["is missing"])

    for name, text, words in (("empty_tracker", "", "holds nothing"), ("garbage_tracker", "abc", "holds 'abc'"),
                              ("tracker_of_a_missing_iteration", "40", "iter_0000040, which does not exist")):
        root = _root(directory, name, tracker=text)
        cases[name] = (root, os.path.join(root, "latest_checkpointed_iteration.txt"), [words])

    root = _root(directory, "hostile_metadata")
    metadata = os.path.join(root, "iter_0000030", ".metadata")
    with open(metadata, "wb") as f:
        pickle.dump(RunsCode(marker), f)
    cases["hostile_metadata"] = (root, metadata, ["posix.system", "refused without running it"])

    root = _root(directory, "hostile_common")  # as megatron-core <= 0.18 writes it (0.19 reads it too)
    common = os.path.join(root, "iter_0000030", "common.pt")
    torch.save({"args": RunsCode(marker)}, common)
    cases["hostile_common_pt"] = (root, common, ["posix.system", "refused without running it"])

    root = _root(directory, "hostile_object")
    _hostile_sharded_object(os.path.join(root, "iter_0000030"), marker)
    cases["hostile_sharded_object"] = (root, os.path.join(root, "iter_0000030", SHARD),
                                       [SHARDED_OBJECT, "posix.system", "refused without running it"])
    return cases, marker


def checks_worker(directory):
    import contextlib

    from megatron_tst.testing.megatron_lm import run_pretrain

    cases, marker = damage(directory)
    record = load_record("megatron_lm_gpt_tp1")
    argv = fixture_argv(record, os.path.join(directory, "save")) + ["--exit-interval", "31"]
    results = {}
    for name, (root, _, _) in cases.items():
        out, err = io.StringIO(), io.StringIO()
        with contextlib.redirect_stdout(out), contextlib.redirect_stderr(err):
            status = run_pretrain(argv + ["--load", root])
        results[name] = {"status": status, "stderr": err.getvalue(), "stdout": out.getvalue(),
                         "ran": os.path.exists(marker)}
    # the way forward the errors name
    results["ckpt_step"] = run_pretrain(argv + ["--load", cases["truncated_shard"][0], "--ckpt-step", "20"])
    results["own"] = own_release_checkpoints(directory, marker)
    return {"cases": {name: (root, path, words) for name, (root, path, words) in cases.items()},
            "marker": marker, "results": results}


def own_release_checkpoints(directory, marker):
    """A checkpoint this megatron-core release writes (a TST run: one superposition step), and copies of it with a
    hostile `.metadata`, `common.pt` (the file <= 0.18 writes; 0.19 reads one too) and sharded object:
    {kind: checkpoint_problem(copy)}, {"intact": ...} for the original."""
    from cli import tiny_args

    from megatron_tst.loop.checkpoint_checks import checkpoint_problem
    from megatron_tst.testing.megatron_lm import run_pretrain

    save = os.path.join(directory, "own")
    assert run_pretrain(tiny_args(train_iters=2, superposition_iters=1) + [
        "--save", save, "--save-interval", "1", "--exit-interval", "1"]) == 0
    original = os.path.join(save, "iter_0000001")
    problems = {"intact": checkpoint_problem(original)}
    for kind in ("metadata", "common_pt", "sharded_object"):
        copy = os.path.join(directory, f"own_{kind}")
        shutil.copytree(original, copy)
        if kind == "metadata":
            with open(os.path.join(copy, ".metadata"), "wb") as f:
                pickle.dump(RunsCode(marker), f)
        elif kind == "common_pt":
            torch.save({"args": RunsCode(marker)}, os.path.join(copy, "common.pt"))
        else:
            _hostile_sharded_object(copy, marker)
        problems[kind] = checkpoint_problem(copy)
    problems["ran"] = os.path.exists(marker)
    return problems


@pytest.fixture(scope="module")
def checked(tmp_path_factory):
    return run_in_workers(checks_worker, 1, args=(str(tmp_path_factory.mktemp("damaged")),))[0]


CASES = ["truncated_shard", "missing_shard", "empty_tracker", "garbage_tracker", "tracker_of_a_missing_iteration",
         "hostile_metadata", "hostile_common_pt", "hostile_sharded_object"]


@pytest.mark.parametrize("case", CASES)
def test_a_damaged_or_hostile_checkpoint_is_named_before_the_model_is_built(checked, case):
    root, path, words = checked["cases"][case]
    result = checked["results"][case]
    message = result["stderr"]
    assert result["status"] == 2, (result["stdout"][-2000:], message[-3000:])
    assert "building GPT model" not in result["stdout"] and "Traceback" not in message
    assert message.count("error:") == 1 and path in message, message
    for word in words:
        assert word in message, message
    # the newest intact checkpoint: 20 beside a damaged 30; both when the tracker is what is wrong
    intact = "30, 20" if "tracker" in case else "20"
    assert f"--ckpt-step {intact[:2]}" in message and f"iterations, newest first): {intact}." in message, message
    if MCORE_VERSION.minor >= 18:  # before initialize_megatron: no process group yet
        assert "initializing torch distributed" not in result["stdout"], result["stdout"][-2000:]
    assert not result["ran"], "a checkpoint object ran code"


def test_the_intact_checkpoint_the_error_names_continues(checked):
    assert checked["results"]["ckpt_step"] == 0


def test_hostile_objects_in_this_releases_own_checkpoints_are_named_and_never_run(checked):
    own = checked["results"]["own"]
    assert own["intact"] is None and not own["ran"], own
    for kind, file in (("metadata", ".metadata"), ("common_pt", "common.pt"), ("sharded_object", SHARD)):
        assert file in own[kind] and "posix.system" in own[kind], (kind, own[kind])


def test_the_allow_lists_accept_every_checkpoint_megatron_lm_and_we_write():
    """Megatron-LM's own checkpoints (dense and MoE, 0.19.2) pass; ours are checked by every resume test (each
    load goes through these checks)."""
    from megatron_tst.loop.checkpoint_checks import checkpoint_problem

    for name in ("megatron_lm_gpt_tp1", "megatron_lm_moe_tp1"):
        assert checkpoint_problem(os.path.join(ROOT, name, "iter_0000030")) is None


def readers_worker(directory):
    """torch's own readers on hostile files: plain (the controls) and after megatron_tst's bends."""
    from torch.distributed.checkpoint import FileSystemReader

    from megatron_tst.platform import mcore_compat

    marker = os.path.join(directory, "ran")
    checkpoint = os.path.join(directory, "hostile")
    shutil.copytree(FIXTURE, checkpoint)
    with open(os.path.join(checkpoint, ".metadata"), "wb") as f:
        pickle.dump(RunsCode(marker), f)
    outcome = {}
    try:
        FileSystemReader(checkpoint).read_metadata()
    except Exception:  # noqa: BLE001  (the payload's return value is no Metadata)
        pass
    outcome["control_ran"] = os.path.exists(marker)
    os.remove(marker)
    mcore_compat.install_safe_metadata_reading()
    try:
        FileSystemReader(checkpoint).read_metadata()
        outcome["read"] = "loaded"
    except mcore_compat.RefusedCheckpointObject as refused:
        outcome["read"] = str(refused)
    outcome["ran"] = os.path.exists(marker)
    # writing is unchanged: torch's writer still pickles the metadata it reads back
    shutil.rmtree(checkpoint)
    shutil.copytree(FIXTURE, checkpoint)
    outcome["intact"] = type(FileSystemReader(checkpoint).read_metadata()).__name__
    return outcome


def test_torch_reads_metadata_only_through_the_allow_list(tmp_path):
    (outcome,) = [run_in_workers(readers_worker, 1, args=(str(tmp_path),))[0]]
    assert outcome["control_ran"], "the control: torch's plain pickle.load runs the payload"
    assert not outcome["ran"] and "posix.system" in outcome["read"] and ".metadata" in outcome["read"], outcome
    assert outcome["intact"] == "Metadata"
