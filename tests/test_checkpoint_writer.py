"""checkpoint/writer.py's patch of megatron-core, on every device: megatron's checkpoint writers
report through a queue of this process, not through the queue of a Manager process that megatron
spawns at the first save (a GPU run's first async save blocked training 8-13 s on it). The writer
thread itself is tested with the Checkpointer (tests/test_checkpoint.py)."""

from __future__ import annotations

import inspect
import multiprocessing
import multiprocessing.context
import queue

import pytest
import torch
from conftest import build_stage
from megatron.core.dist_checkpointing.strategies import filesystem_async

from goku_megatron import cpu_compat
from goku_megatron.checkpoint import writer as checkpoint_writer
from goku_megatron.checkpoint import Checkpointer, TrainingState, latest_checkpoint
from goku_megatron.config import load_config, validate

# megatron's own function, taken when this file is imported: no goku code installs its queue then.
MEGATRONS_RESULTS_QUEUE = filesystem_async._get_write_results_queue


@pytest.fixture
def megatrons_queue(monkeypatch):
    """filesystem_async as megatron ships it, with no queue made yet (what a GPU run had before
    the install: cpu_compat does not apply with CUDA); monkeypatch puts back what was there."""
    assert MEGATRONS_RESULTS_QUEUE.__module__ == filesystem_async.__name__
    monkeypatch.setattr(filesystem_async, "_get_write_results_queue", MEGATRONS_RESULTS_QUEUE)
    monkeypatch.setattr(filesystem_async, "_results_queue", None)


def test_the_install_makes_the_writers_report_in_process_whatever_the_device(megatrons_queue, monkeypatch):
    """As on a GPU: CUDA is there and cpu_compat applies nothing; the install still applies."""
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    monkeypatch.setattr(cpu_compat, "_applied", False)
    assert cpu_compat.apply() is False
    checkpoint_writer.install_in_process_results_queue()
    checkpoint_writer.install_in_process_results_queue()  # idempotent
    assert filesystem_async._get_write_results_queue is checkpoint_writer.in_process_write_results_queue
    results = filesystem_async._get_write_results_queue()
    assert isinstance(results, queue.Queue)  # thread-safe, no process behind it
    assert filesystem_async._get_write_results_queue() is results  # one per process
    results.put({"rank": 0})
    assert results.get(timeout=10) == {"rank": 0}


def test_megatrons_own_queue_is_still_a_spawned_managers():
    assert 'get_context("spawn")' in inspect.getsource(MEGATRONS_RESULTS_QUEUE), (
        "megatron's results queue is no longer a spawned Manager's: drop install_in_process_results_queue")


@pytest.mark.parametrize("async_save", [True, False], ids=["async", "sync"])
def test_a_checkpointers_first_save_starts_no_process(megatrons_queue, megatron_world, monkeypatch, tmp_path,
                                                      async_save):
    """Building a Checkpointer installs the queue: its first save, async or sync, completes with
    multiprocessing's Manager forbidden and leaves no child process behind."""

    def no_manager(*args, **kwargs):
        raise AssertionError("the save started a multiprocessing Manager")

    monkeypatch.setattr(multiprocessing.context.BaseContext, "Manager", no_manager)
    children = set(multiprocessing.active_children())
    cfg = load_config(None, [])
    validate(cfg, 1)
    checkpointer = Checkpointer(tmp_path, async_save=async_save)
    checkpointer.save(1, TrainingState([build_stage(cfg)]), cfg.to_dict())
    checkpointer.close()
    assert latest_checkpoint(tmp_path).name == "iter_0000001"
    assert set(multiprocessing.active_children()) == children
