"""One writer per run directory (goku_megatron/run_lock.py): a second goku-train on a run
directory refuses in one line naming the holder, before it touches a file there; the lock dies with
the process that holds it, SIGKILL included, so there is no stale lock to remove by hand."""

from __future__ import annotations

import errno
import fcntl
import logging
import os
import signal
import socket
import subprocess
import sys

import pytest

from goku_megatron.cli.train import main
from goku_megatron.resilience import EXIT_CONFIG_ERROR
from goku_megatron.run_lock import LOCK_FILE, HeldLock, lock_run_dir

# Another process that takes a run directory's lock the way goku-train's rank 0 does, then waits.
HOLDER = ("import sys, time; from pathlib import Path; from goku_megatron.run_lock import lock_run_dir; "
          "held = lock_run_dir(Path(sys.argv[1])); print('locked', flush=True); time.sleep(600)")


@pytest.fixture
def holder(tmp_path):
    """A run directory with a run's files in it, locked by another process."""
    run_dir = tmp_path / "run"
    (run_dir / "checkpoints").mkdir(parents=True)
    for name, text in (("config.yaml", "train: {}\n"), ("metrics.jsonl", '{"step": 1}\n'),
                       ("checkpoints/latest", "iter_0000001\n")):
        (run_dir / name).write_text(text)
    proc = subprocess.Popen([sys.executable, "-c", HOLDER, str(run_dir)], stdout=subprocess.PIPE, text=True)
    try:
        assert proc.stdout.readline().strip() == "locked"
        yield run_dir, proc
    finally:
        proc.kill()
        proc.wait()


def _files(run_dir) -> dict[str, tuple[bytes, int]]:
    return {str(p.relative_to(run_dir)): (p.read_bytes(), p.stat().st_mtime_ns)
            for p in sorted(run_dir.rglob("*")) if p.is_file()}


def test_a_second_goku_train_on_a_run_dir_is_refused_in_one_line(holder, tmp_path, capsys):
    run_dir, proc = holder
    before = _files(run_dir)
    code = main([f"train.run_dir={run_dir}", f"data.path={tmp_path / 'nodata'}", "data.create_if_missing=false"])
    err = capsys.readouterr().err.splitlines()
    assert code == EXIT_CONFIG_ERROR and len(err) == 1
    assert err[0].startswith(f"goku-train: error: train.run_dir {run_dir} is in use by another goku-train "
                             f"(host {socket.gethostname()}, pid {proc.pid}, started ")
    assert err[0].endswith("); wait for it to end or stop it, or give this run another train.run_dir")
    assert _files(run_dir) == before  # nothing read as ours, nothing written


def test_the_lock_dies_with_its_holder_sigkill_included(holder):
    run_dir, proc = holder
    assert isinstance(lock_run_dir(run_dir), str)
    proc.send_signal(signal.SIGKILL)
    proc.wait()
    held = lock_run_dir(run_dir)  # no stale lock to clean up
    assert isinstance(held, HeldLock)
    assert (run_dir / LOCK_FILE).read_text().startswith(f"host {socket.gethostname()}, pid {os.getpid()}, started ")
    held.release()


def test_two_holders_in_one_process_exclude_each_other(tmp_path):
    """The lock belongs to the open file, so a second start inside one process (a test calling
    train.run twice at once) is refused too; after the release the next one gets it."""
    first = lock_run_dir(tmp_path)
    assert isinstance(first, HeldLock)
    assert lock_run_dir(tmp_path).startswith(f"host {socket.gethostname()}, pid {os.getpid()}, started ")
    first.release()
    second = lock_run_dir(tmp_path)
    assert isinstance(second, HeldLock)
    second.release()
    assert (tmp_path / LOCK_FILE).is_file()  # a directory it did not create keeps the file


def test_a_refused_start_leaves_no_directory_it_created(tmp_path):
    """A start that fails after taking the lock (bad data, weights) removes the run directory and
    parents the lock created, unless something else was written there."""
    held = lock_run_dir(tmp_path / "runs" / "toy-1")
    held.release()
    assert list(tmp_path.iterdir()) == []
    held = lock_run_dir(tmp_path / "runs" / "toy-2")
    (tmp_path / "runs" / "toy-2" / "config.yaml").write_text("{}\n")
    held.release()
    assert sorted(p.name for p in (tmp_path / "runs" / "toy-2").iterdir()) == [LOCK_FILE, "config.yaml"]


def test_a_file_system_without_locks_warns_and_trains_unlocked(tmp_path, monkeypatch, caplog):
    def no_locks(fd, operation):
        raise OSError(errno.ENOLCK, os.strerror(errno.ENOLCK))

    monkeypatch.setattr(fcntl, "flock", no_locks)
    with caplog.at_level(logging.WARNING, logger="goku_megatron"):
        assert lock_run_dir(tmp_path) is None
    assert caplog.records[0].getMessage() == (f"{tmp_path / LOCK_FILE}: the file system keeps no locks (No locks "
                                              "available); a second goku-train on this run directory would not be "
                                              "refused")
