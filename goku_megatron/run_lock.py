"""One writer per run directory: goku-train's rank 0 holds a lock on ``RUN/.goku-train.lock``.

Two processes training into the same ``train.run_dir`` would both write its checkpoints,
metrics.jsonl and ``latest`` in turn, each overwriting the other's. The lock is ``flock`` on an
open file, which the kernel releases when the process ends however it ends (SIGKILL included), so
there is never a stale lock to clean up by hand: the lock is the flock, not the file, which stays
after a run. Its text, the holder's host, PID and start time, is only for the message a second
start prints.

On NFS the Linux client turns flock into a POSIX lock the server keeps, so processes on other
hosts see it; a crashed host's lock lasts until its NFSv4 lease ends (about 90 s), or under NFSv3
until that host reboots, so a job requeued sooner is refused and must be requeued again. A mount
with ``local_lock=flock`` and Lustre mounted with ``localflock`` see only processes of the same
node; Lustre's ``noflock`` refuses locks: goku-train then warns once and trains unlocked
(docs/checkpointing.md, "One writer per run directory").
"""

from __future__ import annotations

import contextlib
import errno
import fcntl
import logging
import os
import socket
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Iterator

import torch

from goku_megatron.config import ConfigError

log = logging.getLogger(__name__)

LOCK_FILE = ".goku-train.lock"
# flock's answers on a file system that keeps no locks (NFS without lockd, Lustre -o noflock).
_NO_LOCKS = (errno.ENOLCK, errno.ENOSYS, errno.EOPNOTSUPP, errno.EINVAL)
_ATTEMPTS = 3  # a lock file removed between our open and our flock (see HeldLock.release): open again


@dataclass
class HeldLock:
    """The run directory's lock, held by this process through ``fd``."""

    fd: int
    path: Path
    created: list[Path]  # the directories taking the lock created, innermost first

    def release(self) -> None:
        """Unlock. A run directory this lock created and nobody wrote to (a start refused for bad
        input after the lock was taken) is removed again, with the parents it created: a failed
        start leaves nothing behind. The file goes while still locked, and a process that opened
        it just before finds, once it has the lock, that the path is no longer its file."""
        if self.created and [p.name for p in self.path.parent.iterdir()] == [LOCK_FILE]:
            self.path.unlink()
            for directory in self.created:
                try:
                    directory.rmdir()
                except OSError:  # something else appeared in it meanwhile: keep it
                    break
        os.close(self.fd)


def lock_run_dir(run_dir: Path) -> HeldLock | str | None:
    """Take the run directory's lock for this process: the HeldLock (closing its descriptor, or
    the process ending, releases it), the holder's description when another process holds it,
    or None when the file system keeps no locks. Creates ``run_dir`` and the lock file if
    missing; an existing lock file is read, never changed, until the lock is ours."""
    created = [p for p in (run_dir, *run_dir.parents) if not p.exists()]
    run_dir.mkdir(parents=True, exist_ok=True)
    path = run_dir / LOCK_FILE
    for _ in range(_ATTEMPTS):
        fd = os.open(path, os.O_RDWR | os.O_CREAT, 0o644)
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except OSError as err:
            holder = os.pread(fd, 4096, 0).decode(errors="replace").strip()
            os.close(fd)
            if err.errno in (errno.EWOULDBLOCK, errno.EACCES):
                return holder or "a process that is still starting (no host or PID written yet)"
            if err.errno in _NO_LOCKS:
                log.warning("%s: the file system keeps no locks (%s); a second goku-train on this run directory "
                            "would not be refused", path, os.strerror(err.errno))
                return None
            raise
        if path.exists() and os.stat(path).st_ino == os.fstat(fd).st_ino:
            break
        os.close(fd)  # the holder removed the file as we opened it: lock the path's file
    else:
        raise OSError(errno.EAGAIN, f"{LOCK_FILE} kept being replaced")
    started = time.strftime("%Y-%m-%d %H:%M:%S %Z")
    os.ftruncate(fd, 0)
    os.pwrite(fd, f"host {socket.gethostname()}, pid {os.getpid()}, started {started}\n".encode(), 0)
    return HeldLock(fd, path, created)


@contextlib.contextmanager
def run_dir_lock(run_dir: Path) -> Iterator[None]:
    """Collective: rank 0 holds the run directory's lock while the block runs. When another
    process holds it (or the directory cannot be opened), every rank raises the same one-line
    ConfigError, before any file of the run directory is written."""
    held: HeldLock | str | None = None
    refusal = None
    if torch.distributed.get_rank() == 0:
        try:
            held = lock_run_dir(run_dir)
        except OSError as err:
            refusal = (f"train.run_dir {run_dir}: cannot open {LOCK_FILE} there ({err.strerror}); check the "
                       "directory's permissions, or give this run another train.run_dir")
        if isinstance(held, str):
            refusal = (f"train.run_dir {run_dir} is in use by another goku-train ({held}); wait for it to end "
                       "or stop it, or give this run another train.run_dir")
    shared = [refusal]
    torch.distributed.broadcast_object_list(shared, src=0)
    if shared[0] is not None:
        raise ConfigError(shared[0])
    try:
        yield
    finally:
        if isinstance(held, HeldLock):
            held.release()
