"""The background writer of async checkpoints: a snapshot of this rank's shards, then a thread.

An async save (save.Checkpointer.save) blocks training only while ``Snapshot.take`` copies
every tensor this rank writes into a host buffer: a device-to-host copy on GPU (pinned buffers),
a memory copy on CPU. The buffers are kept for the next save, so once the first save has
allocated them a snapshot is a plain copy. Everything else runs in the writer thread
(``WriterThread``, megatron-core's AsyncCaller contract): torch.distributed.checkpoint's
serialisation, the writes and fsyncs of megatron's FileSystemWriterAsync (``write_buckets``),
and the CRC32 of the files written. torch.save, file I/O and zlib release the GIL while they work.

Why not megatron's forked writer process: a fork shares the training process's memory
copy-on-write, so every page that training writes while the writer lives is first copied by the
kernel, a page fault at a time, on the training thread: the snapshot is taken after all, only
later, slower and outside the measured blocking time. A thread shares nothing that training
writes: the snapshot is the only copy.

Memory: one snapshot, the size of this rank's main-replica tensors (what it writes: weights, EMA,
optimizer state; a tensor two entries share, like the fp32 weights that are also the distributed
optimizer's main weights, is copied once). It stays allocated between saves. A save first waits
for the previous one to finish writing (Checkpointer.save calls wait), so there is never a
second snapshot.

Results: megatron's writers report through ``filesystem_async._get_write_results_queue``, a queue
of a spawned Manager process; ``install_in_process_results_queue`` makes it a plain queue of this
process, on every device (the writer is a thread, sync saves run in the training process).
"""

from __future__ import annotations

import copy
import functools
import logging
import queue
import threading
from typing import Any, Callable

import torch
from megatron.core.dist_checkpointing import ShardedTensor
from megatron.core.dist_checkpointing.dict_utils import dict_list_map_outplace
from megatron.core.dist_checkpointing.mapping import is_main_replica
from megatron.core.dist_checkpointing.strategies.async_utils import AsyncCaller, AsyncCallsQueue, AsyncRequest
from megatron.core.dist_checkpointing.strategies.filesystem_async import FileSystemWriterAsync

from goku_megatron.patching import check_version, patch_attr
from goku_megatron.platform import has_cuda

log = logging.getLogger(__name__)

_results_queue: queue.Queue | None = None


class WriterTimeout(RuntimeError):
    """The writer thread did not finish within its time limit."""


class Snapshot:
    """Host copies of the tensors one rank writes, reused from one save to the next."""

    def __init__(self) -> None:
        self._buffers: dict[tuple[str, tuple[int, ...]], torch.Tensor] = {}

    @property
    def nbytes(self) -> int:
        """The memory the snapshot holds (between saves too)."""
        return sum(b.nbytes for b in self._buffers.values())

    def take(self, sharded_state_dict: dict[str, Any]) -> dict[str, Any]:
        """``sharded_state_dict`` with the data of each ShardedTensor this rank writes (main
        replicas) replaced by a host copy; other entries as they are. Training may change the
        original tensors as soon as this returns."""
        pinned = has_cuda()  # page-locked buffers: the device-to-host copies run asynchronously
        buffers: dict[tuple[str, tuple[int, ...]], torch.Tensor] = {}
        copies: dict[tuple[Any, ...], torch.Tensor] = {}  # by the memory copied: shared tensors once

        def host_copy(value: Any) -> Any:
            if not isinstance(value, ShardedTensor) or not is_main_replica(value.replica_id):
                return value
            src = value.data
            memory = (src.device, src.data_ptr(), src.dtype, tuple(src.shape), src.stride())
            buffer = copies.get(memory)
            if buffer is None:
                slot = (value.key, tuple(value.global_offset))
                buffer = self._buffers.get(slot)
                if buffer is None or buffer.shape != src.shape or buffer.dtype != src.dtype:
                    buffer = torch.empty(src.shape, dtype=src.dtype, device="cpu", pin_memory=pinned)
                buffer.copy_(src, non_blocking=pinned)
                copies[memory] = buffers[slot] = buffer
            copied = copy.copy(value)  # the same metadata (dataclasses.replace would validate it again)
            copied.data = buffer
            return copied

        snapshot = dict_list_map_outplace(host_copy, sharded_state_dict)
        if pinned:
            torch.cuda.synchronize()
        self._buffers = buffers  # buffers of tensors no longer saved are freed
        return snapshot

    def clear(self) -> None:
        self._buffers = {}


def write_buckets(transforms: list[Any], after: Callable[[], None], rank: int, buckets: list[Any],
                  results_queue: Any) -> None:
    """The writer thread's work for one save: megatron's write of each bucket (one file each, with
    fsync) in turn, then ``after`` (the checksums). The outcome goes to ``results_queue`` as
    megatron's forked writer reports it (a dict of write results per bucket, or the exception), so
    megatron's finalisation reads it unchanged."""
    outcome: dict[int, Any] | Exception = {}
    try:
        for index, bucket in enumerate(buckets):
            results: queue.Queue = queue.Queue()
            done: queue.Queue = queue.Queue()
            done.put(index)  # write_preloaded_data takes it back when it is done
            FileSystemWriterAsync.write_preloaded_data(transforms, index, bucket, results, done, True)
            _, written = results.get_nowait()
            if isinstance(written, Exception):
                raise written
            outcome[index] = written
        after()
    except Exception as err:  # noqa: BLE001 - reported to every rank by megatron's finalisation
        outcome = err
    results_queue.put(outcome)


def in_writer_thread(request: AsyncRequest, after: Callable[[], None]) -> AsyncRequest:
    """``request`` (from dist_checkpointing.save with async_sharded_save) with its forking write
    replaced by ``write_buckets`` for the writer thread; ``after`` runs there once the files are
    written. A request with nothing to write on this rank is returned as it is."""
    write = request.async_fn
    if write is None:
        return request
    if not (isinstance(write, functools.partial)
            and write.func is FileSystemWriterAsync.write_preloaded_data_multiproc and len(write.args) == 2):
        raise RuntimeError("megatron-core's async save request is not FileSystemWriterAsync's; update "
                           "goku_megatron/checkpoint/writer.py for this megatron-core version")
    transforms, use_msc = write.args
    if use_msc:
        raise RuntimeError("the checkpoint writer thread writes to local files only (multi-storage client is on)")
    return request._replace(async_fn=functools.partial(write_buckets, transforms, after))


def in_process_write_results_queue() -> queue.Queue:
    """Replacement for filesystem_async._get_write_results_queue: the queue through which
    checkpoint writers report their results, in this process (one per process)."""
    global _results_queue
    if _results_queue is None:
        _results_queue = queue.Queue()
    return _results_queue


def install_in_process_results_queue() -> None:
    """Have megatron's checkpoint writers report through ``in_process_write_results_queue``.

    megatron asks for the queue in every save, sync or async (FileSystemWriterAsync.
    prepare_write_data, inside dist_checkpointing.save), and its own queue is a spawned Manager's,
    because its async writer is a forked process: the first save starts a fresh interpreter that
    imports torch and re-imports the main module (the first async save of a run on an H200 blocked
    training 8-13 s without this; seconds on a busy CPU; a hang for a torchrun script without an
    ``if __name__ == "__main__"`` guard). goku's results never cross a process: async saves are written by
    ``WriterThread``, sync ones by the training process, so a plain queue does, on every device.
    (A forked Manager would also share the training process's memory copy-on-write for the rest of
    the run.) megatron's own forked writer (TemporalAsyncCaller) cannot report through it.

    Called where a ``save.Checkpointer`` is built: every goku save is made by one, and
    megatron asks for the queue only inside a save, so this precedes every use on every device
    and costs programs that never save nothing. Idempotent.
    """
    check_version()
    patch_attr("megatron.core.dist_checkpointing.strategies.filesystem_async", "_get_write_results_queue",
               in_process_write_results_queue)


class WriterThread(AsyncCaller):
    """megatron's AsyncCaller with a thread in place of a forked process (see the module doc)."""

    def __init__(self, timeout_s: float) -> None:
        self.timeout_s = timeout_s
        self.thread: threading.Thread | None = None

    def schedule_async_call(self, async_req: AsyncRequest) -> None:
        if async_req.async_fn is None:
            return
        args = list(async_req.async_fn_args)
        if async_req.preload_fn:  # device tensors to host: a no-op for Snapshot's host copies
            args[1] = async_req.preload_fn()

        def target() -> None:
            try:
                async_req.async_fn(*args, **async_req.async_fn_kwargs)
            except Exception:  # noqa: BLE001 - write_buckets reports its own failures
                log.exception("checkpoint writer thread failed")

        self.thread = threading.Thread(target=target, name="checkpoint-writer", daemon=True)
        self.thread.start()

    def is_current_async_call_done(self, blocking: bool = False, no_dist: bool = False) -> bool:
        """Whether every rank's writer is done (collective unless ``no_dist``); ``blocking`` waits
        for this rank's, at most ``timeout_s`` (then WriterTimeout)."""
        if blocking and self.thread is not None:
            self.thread.join(self.timeout_s)
            if self.thread.is_alive():
                raise WriterTimeout(f"still writing after {self.timeout_s:g} s")
        alive = int(self.thread is not None and self.thread.is_alive())
        done = not alive if no_dist else bool(self.sync_all_async_calls(alive))
        if done:
            self.thread = None
        return done

    def close(self, abort: bool = False) -> None:
        if self.thread is not None and not abort:
            self.thread.join(self.timeout_s)
        self.thread = None

    def __del__(self) -> None:
        pass  # a daemon thread: nothing to tear down (AsyncCaller's raises)


class WriterQueue(AsyncCallsQueue):
    """megatron's queue of async calls (finalisation on every rank once all have written), each
    call written by a WriterThread."""

    def __init__(self, timeout_s: float) -> None:
        super().__init__(persistent=False)
        self.timeout_s = timeout_s

    def _get_async_caller(self) -> AsyncCaller:
        return WriterThread(self.timeout_s)
