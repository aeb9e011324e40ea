"""Before anything reads the checkpoint a run loads: which one it is, and whether it is whole and only data.

Megatron-LM's `load_checkpoint` finds the checkpoint through `<load>/latest_checkpointed_iteration.txt` (or
`--ckpt-step`), then torch's distributed-checkpoint reader unpickles `<checkpoint>/.metadata`, and Megatron-Core
reads the shards (`__<rank>_<i>.distcp`) at the offsets the metadata gives, unpickling the sharded objects (RNG
states; the common state on 0.19) and, on <= 0.18, `common.pt`. A damaged checkpoint then ends in a traceback from
deep inside that loader (an `EOFError` in a `CheckpointException` for a truncated shard), or, for an unreadable
tracker, Megatron-LM 0.19 prints "ERROR: Invalid metadata file" and exits with status 0. Here, once Megatron-LM has
validated the arguments and before any model exists, every rank checks the checkpoint it will load:

- the tracker holds an iteration (or `release`) and names a directory that exists; `--ckpt-step K` names one;
- `.metadata` unpickles with the allow-list (`mcore_compat.load_checkpoint_metadata`), and every shard file it names
  exists and is as long as the metadata says;
- every pickled object (`common.pt`, each sharded object inside the shards) unpickles with the allow-list
  (`mcore_compat.safe_torch_load`): a class outside it is refused, naming the file and the class, never executed.

A damaged checkpoint is an error naming the file, what is wrong, and the way forward: `--ckpt-step` of the newest
intact checkpoint of the same directory (each checked the same way). Checkpoints in other formats than torch_dist
(`--ckpt-format torch`, `fsdp_dtensor`) are checked for the tracker and directory only.
"""

from __future__ import annotations

import io
import os
import re
from dataclasses import dataclass
from typing import List, Optional

TRACKER = "latest_checkpointed_iteration.txt"  # Megatron-LM's training/checkpointing.py
METADATA = ".metadata"  # torch's distributed checkpoint (torch/distributed/checkpoint/filesystem.py)
_ITERATION_DIR = re.compile(r"iter_(\d{7})$")


class CheckpointError(ValueError):
    """The checkpoint a run would load is missing, damaged or holds something other than data."""


@dataclass(frozen=True)
class CheckpointToLoad:
    """What Megatron-LM's `load_checkpoint` loads for a command line: `directory` (`<root>/iter_XXXXXXX` or
    `<root>/release`), its `iteration` (0 for a release checkpoint), and `finetune` (True with --finetune or when
    it comes from --pretrained-checkpoint: iteration, data and schedule start anew)."""

    root: str
    directory: str
    iteration: int
    finetune: bool


def checkpoint_to_load(args) -> Optional[CheckpointToLoad]:
    """The checkpoint Megatron-LM's `load_checkpoint` (training/checkpointing.py) loads for `args`, or None (it
    starts from scratch: no --load, or no tracker there and no --pretrained-checkpoint / --ckpt-step).

    Follows Megatron-LM: `--load` first (with `--ckpt-step K`: `iter_K`, no tracker needed); a --load without
    a checkpoint falls back to `--pretrained-checkpoint`, loaded as --finetune.
    Raises CheckpointError: an unreadable or empty tracker, or a tracker / --ckpt-step naming a missing directory.
    """
    for root, finetune in ((args.load, bool(args.finetune)), (getattr(args, "pretrained_checkpoint", None), True)):
        if not root:
            continue
        step = getattr(args, "ckpt_step", None) if root == args.load else None
        if step is not None:
            return _existing(root, int(step), finetune, f"--ckpt-step {step}")
        tracker = os.path.join(root, TRACKER)
        if not os.path.isfile(tracker):
            continue
        text = open(tracker).read().strip()
        if text == "release":
            return _existing(root, None, finetune, f"{tracker} ('release')")
        if not text.isdigit():
            raise CheckpointError(
                f"{tracker} should hold the iteration of the latest checkpoint but holds "
                f"{repr(text[:40]) if text else 'nothing'}. " + _way_forward(root))
        return _existing(root, int(text), finetune, f"{tracker} (iteration {int(text)})")
    return None


def _existing(root: str, iteration: Optional[int], finetune: bool, named_by: str) -> CheckpointToLoad:
    name = "release" if iteration is None else f"iter_{iteration:07d}"
    directory = os.path.join(root, name)
    if not os.path.isdir(directory):
        raise CheckpointError(f"{named_by} names checkpoint {directory}, which does not exist. " + _way_forward(root))
    return CheckpointToLoad(root, directory, iteration or 0, finetune)


def check_checkpoint(target: CheckpointToLoad) -> None:
    """Raise CheckpointError when `target`'s files are damaged or hold anything but data (see module docstring),
    naming the file, what is wrong and the way forward (the newest intact checkpoint of its root)."""
    problem = checkpoint_problem(target.directory)
    if problem is not None:
        raise CheckpointError(f"checkpoint {target.directory} cannot be loaded: {problem}. "
                              + _way_forward(target.root, excluding=target.directory))


def checkpoint_problem(directory: str) -> Optional[str]:
    """What is wrong with the torch_dist checkpoint `directory` (`file: problem`), or None when it is whole and
    every pickle in it unpickles with the allow-list. Reads `.metadata`, stats every shard, and reads the pickled
    objects only (bytes items and `common.pt`: kilobytes), not the tensors. Any rank, no process group."""
    from megatron_tst.platform import mcore_compat

    metadata_path = os.path.join(directory, METADATA)
    common_path = os.path.join(directory, mcore_compat.COMMON_STATE_FNAME)
    if not os.path.exists(metadata_path):
        if any(name.endswith(".distcp") for name in os.listdir(directory)):
            return f"{metadata_path} is missing (the checkpoint was not finished, or was copied without it)"
        return None  # another format (--ckpt-format torch, fsdp_dtensor): Megatron-LM's loader checks it
    try:
        with open(metadata_path, "rb") as f:
            metadata = mcore_compat.load_checkpoint_metadata(f, metadata_path)
    except mcore_compat.RefusedCheckpointObject as refused:
        return str(refused)
    except Exception as err:  # noqa: BLE001  (any unpickling failure of a truncated or foreign file)
        return f"{metadata_path} cannot be read ({type(err).__name__}: {err})"
    storage = getattr(metadata, "storage_data", None)
    if not isinstance(storage, dict):
        return f"{metadata_path} holds no shard table: not a torch distributed-checkpoint metadata file"
    needed = {}
    for info in storage.values():
        needed[info.relative_path] = max(needed.get(info.relative_path, 0), info.offset + info.length)
    for relative, length in sorted(needed.items()):
        path = os.path.join(directory, relative)
        if not os.path.isfile(path):
            return f"shard {path} is missing ({METADATA} lists it)"
        size = os.path.getsize(path)
        if size < length:
            return (f"shard {path} is shorter than {METADATA} says ({size:,} bytes, at least {length:,} expected: "
                    "truncated, e.g. by a full disk or an interrupted copy)")
    try:
        if os.path.exists(common_path):
            mcore_compat.safe_torch_load(common_path)
        _load_sharded_objects(directory, metadata)
    except mcore_compat.RefusedCheckpointObject as refused:
        return str(refused)
    except Exception as err:  # noqa: BLE001
        return f"a pickled object of the checkpoint cannot be read ({type(err).__name__}: {err})"
    return None


def _load_sharded_objects(directory: str, metadata) -> None:
    """Unpickle (allow-listed) every bytes item of the checkpoint, as Megatron-Core's loader would."""
    from torch.distributed.checkpoint.metadata import BytesStorageMetadata

    from megatron_tst.platform import mcore_compat

    for index, info in metadata.storage_data.items():
        if not isinstance(metadata.state_dict_metadata.get(index.fqn), BytesStorageMetadata):
            continue
        if getattr(info, "transform_descriptors", None):
            continue  # compressed or otherwise transformed by the writer: torch's reader decodes it (allow-listed)
        path = os.path.join(directory, info.relative_path)
        with open(path, "rb") as f:
            f.seek(info.offset)
            data = f.read(info.length)
        mcore_compat.safe_torch_load(io.BytesIO(data), name=f"{path} (sharded object {index.fqn!r})")


def intact_iterations(root: str, excluding: Optional[str] = None) -> List[int]:
    """The iterations of `root`'s checkpoints that `checkpoint_problem` finds whole, newest first."""
    found = []
    for name in os.listdir(root) if os.path.isdir(root) else []:
        match = _ITERATION_DIR.match(name)
        directory = os.path.join(root, name)
        if match and directory != excluding and os.path.isdir(directory) and checkpoint_problem(directory) is None:
            found.append(int(match.group(1)))
    return sorted(found, reverse=True)


def _way_forward(root: str, excluding: Optional[str] = None) -> str:
    intact = intact_iterations(root, excluding)
    if not intact:
        return (f"{root} holds no intact checkpoint: restore the checkpoint from a copy, or start from scratch with "
                "another --save/--load directory.")
    listed = ", ".join(str(i) for i in intact[:8]) + (" ..." if len(intact) > 8 else "")
    tracker = os.path.join(root, TRACKER)
    fix = (f"then move {excluding} out of the way" if excluding else f"or write {intact[0]} into {tracker}")
    return (f"Intact checkpoints in {root} (iterations, newest first): {listed}. Continue from the newest with "
            f"--ckpt-step {intact[0]} ({fix}).")
