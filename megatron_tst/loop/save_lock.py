"""One trainer per `--save` directory: a lock taken before the first write and held for the run's life.

Two trainers writing one `--save` directory (the same job submitted twice, a requeue while the old job still runs)
interleave their checkpoints and race on `latest_checkpointed_iteration.txt`. Global rank 0 takes an exclusive
`flock` on `<save>/.megatron_tst.lock` once Megatron-LM has validated the arguments, before any checkpoint is read
or written, and keeps it until the process ends: the kernel releases it when the process dies, also by `kill -9`
or a node failure of a local filesystem, so a stale lock never blocks a restart. The file holds who has it (host,
process, SLURM job, start time, command line) for the message a second trainer gets.

Filesystems: `flock` works on local filesystems, Lustre (mounted with `flock`), GPFS, BeeGFS and NFSv4; on some NFS
set-ups (`nolock`, or NFSv3 without lockd) it locks only on the local host, or fails with ENOLCK / EOPNOTSUPP. In
the second case the run warns once that it goes on without the lock; in the first two trainers on different hosts
are not kept apart.
"""

from __future__ import annotations

import datetime
import errno
import fcntl
import json
import os
import socket
import sys
from typing import Optional

LOCK_FILE = ".megatron_tst.lock"

_held = {}  # save directory -> open file object holding the lock (kept for the process's life)


class SaveDirectoryInUse(ValueError):
    """Another live trainer holds the `--save` directory's lock."""


def holder_description() -> dict:
    """Who this process is, as the lock file records it."""
    return {"host": socket.gethostname(), "pid": os.getpid(), "slurm_job": os.environ.get("SLURM_JOB_ID"),
            "since": datetime.datetime.now().isoformat(timespec="seconds"),
            "command": " ".join(sys.argv)[:500]}


def acquire(save_dir: str) -> Optional[str]:
    """Take the lock of `save_dir` for this process (idempotent). Returns a warning when the filesystem cannot
    lock (the run goes on without), else None. Raises SaveDirectoryInUse naming the directory, the holder and what to
    do, when another process holds it."""
    save_dir = os.path.abspath(save_dir)
    if save_dir in _held:
        return None
    os.makedirs(save_dir, exist_ok=True)
    path = os.path.join(save_dir, LOCK_FILE)
    handle = open(path, "a+")
    try:
        fcntl.flock(handle, fcntl.LOCK_EX | fcntl.LOCK_NB)
    except BlockingIOError:
        handle.seek(0)
        text = handle.read()
        handle.close()
        raise SaveDirectoryInUse(_in_use_message(save_dir, text)) from None
    except OSError as err:
        handle.close()
        if err.errno in (errno.ENOLCK, errno.EOPNOTSUPP, errno.ENOSYS):
            return (f"the filesystem of --save {save_dir} cannot lock ({os.strerror(err.errno)}): this run goes on "
                    "without the one-trainer-per-directory lock; make sure no other trainer writes there")
        raise
    handle.seek(0)
    handle.truncate()
    handle.write(json.dumps(holder_description()) + "\n")
    handle.flush()
    _held[save_dir] = handle
    return None


def _in_use_message(save_dir: str, text: str) -> str:
    try:
        holder = json.loads(text)
        who = f"process {holder['pid']} on {holder['host']}"
        if holder.get("slurm_job"):
            who += f" (SLURM job {holder['slurm_job']})"
        who += f", since {holder['since']}"
        cancel = f"cancel it (scancel {holder['slurm_job']})" if holder.get("slurm_job") else "stop it"
    except (ValueError, KeyError, TypeError):
        who, cancel = "another process", "stop it"
    return (f"--save {save_dir} is in use by another trainer: {who}. Two trainers on one directory would interleave "
            f"their checkpoints. Wait for that run to end or {cancel}, or give this run another --save directory "
            f"(the lock is {os.path.join(save_dir, LOCK_FILE)}, released when its holder exits or dies).")
