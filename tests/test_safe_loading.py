"""Loading a checkpoint never runs code from it (`platform/mcore_compat.py`: `safe_torch_load`, `_SafeLoadPlanner`).

Megatron-Core's torch_dist loader unpickles sharded objects (RNG states, 0.19's common state) with
`torch.load(weights_only=False)`; `megatron_tst.pretrain` replaces its load planner so that they go through
`torch.load(weights_only=True)` with Megatron-Core's allow-list. The malicious object here would `touch` a file when
unpickled; the control load through Megatron-Core's own planner shows that it does.
"""

import os
import pickle

import pytest
import torch


class RunsCode:
    """Unpickling it calls os.system: what a hostile checkpoint object looks like."""

    def __init__(self, marker):
        self.marker = marker

    def __reduce__(self):
        return (os.system, (f"touch {self.marker}",))


@pytest.mark.unit
def test_safe_torch_load_refuses_code_and_keeps_newer_megatron_classes_inert(tmp_path):
    import megatron.core.transformer.enums as enums

    from megatron_tst.platform.mcore_compat import UnknownMegatronObject, safe_torch_load

    marker = tmp_path / "ran"
    torch.save({"x": RunsCode(marker)}, tmp_path / "hostile.pt")
    with pytest.raises(pickle.UnpicklingError):
        safe_torch_load(str(tmp_path / "hostile.pt"))
    assert not marker.exists()

    class FutureEnum:  # a class of a newer megatron-core (e.g. an enum inside a 0.19 checkpoint's args)
        def __init__(self, value):
            self.value = value

        def __reduce__(self):
            return (FutureEnum, (self.value,))

    FutureEnum.__module__, FutureEnum.__qualname__ = enums.__name__, "FutureEnum"
    enums.FutureEnum = FutureEnum
    try:
        torch.save({"e": FutureEnum(1)}, tmp_path / "future.pt")
    finally:
        del enums.FutureEnum  # as if this megatron-core did not have it
    loaded = safe_torch_load(str(tmp_path / "future.pt"))
    assert isinstance(loaded["e"], UnknownMegatronObject) and loaded["e"].args == (1,)


def sharded_object_worker(directory):
    """Megatron-Core's own dist_checkpointing.save / load of a ShardedObject holding a hostile object: first with
    Megatron-Core's planner (the control), then with what `megatron_tst.pretrain` installs."""
    from megatron.core import dist_checkpointing
    from megatron.core.dist_checkpointing import ShardedObject

    from megatron_tst.platform import mcore_compat

    marker = os.path.join(directory, "ran")
    checkpoint = os.path.join(directory, "ckpt")
    os.makedirs(checkpoint)
    dist_checkpointing.save({"obj": ShardedObject("obj", RunsCode(marker), (1,), (0,), replica_id=0)}, checkpoint)
    request = {"obj": ShardedObject("obj", None, (1,), (0,), replica_id=0)}
    dist_checkpointing.load(request, checkpoint)
    control = os.path.exists(marker)
    os.remove(marker)
    mcore_compat.install_safe_sharded_object_loading()
    try:
        dist_checkpointing.load({"obj": ShardedObject("obj", None, (1,), (0,), replica_id=0)}, checkpoint)
        outcome = "loaded"
    except BaseException as err:  # torch's reader wraps the UnpicklingError in CheckpointException(BaseException)
        outcome = f"{type(err).__name__}: {err}"
    return {"control_ran": control, "ran": os.path.exists(marker), "outcome": outcome}


@pytest.mark.e2e
def test_megatron_core_sharded_objects_are_loaded_without_running_code(tmp_path):
    from megatron_tst.testing.distributed import run_distributed

    (result,) = run_distributed(sharded_object_worker, 1, args=(str(tmp_path),))
    assert result["control_ran"], "the control: Megatron-Core's own planner unpickles the object"
    assert not result["ran"] and "posix.system" in result["outcome"] and "refused" in result["outcome"], result
