"""Saving and publishing checkpoints: the Checkpointer (sync or async, atomic, keep-K).

A save writes into ``iter_N.partial``; once every rank has finished (for an async save: when
megatron's finalisation runs on all ranks), rank 0 writes the manifest, renames the directory to
``iter_N``, moves ``latest`` and removes checkpoints beyond the last ``keep_last``. An interrupted
save leaves only a ``.partial`` directory; the previous checkpoint is untouched. An async save
blocks training only for the snapshot of this rank's tensors (writer.py); a thread serialises,
writes and hashes them while training goes on. A write that fails, a full disk included, ends in
one line and never touches the newest complete checkpoint.
"""

from __future__ import annotations

import contextlib
import errno
import functools
import json
import logging
import math
import os
import shutil
import time
from pathlib import Path
from typing import Any, Iterator

import torch
from megatron.core import dist_checkpointing, parallel_state
from megatron.core.dist_checkpointing import ShardedTensor
from megatron.core.dist_checkpointing.dict_utils import nested_values
from megatron.core.dist_checkpointing.mapping import ShardedBase, is_main_replica
from megatron.core.dist_checkpointing.strategies.torch import TorchDistSaveShardedStrategy
from torch.distributed.checkpoint import CheckpointException

from goku_megatron.checkpoint.integrity import file_crc32, record_checksums, validate_checkpoint
from goku_megatron.checkpoint.layout import (CHECKSUMS_GLOB, FORMAT, LATEST, MANIFEST, PARTIAL_SUFFIX,
                                             checkpoint_bytes, checkpoint_dir, complete_checkpoints, fsync_dir,
                                             latest_checkpoint, loader_state_path, read_manifest,
                                             write_atomically)
from goku_megatron.checkpoint.optimizer_state import (drop_optimizer_from_consistency_check,
                                                      optimizer_has_state, optimizer_sharded_state_dict)
from goku_megatron.checkpoint.state import (TrainingState, fsdp_rows, model_sharded_state_dict, parallel_layout,
                                            rng_sharded, rng_state, stage_of)
from goku_megatron.checkpoint.writer import (Snapshot, WriterQueue, WriterTimeout, in_writer_thread,
                                             install_in_process_results_queue)
from goku_megatron.config import ConfigError
from goku_megatron.platform import barrier, local_device

log = logging.getLogger(__name__)

# How long a save waits for the previous async save's writer before it gives up (a stalled disk).
WRITE_TIMEOUT_S = 1800.0


class Checkpointer:
    """Saves the checkpoints of one run directory: sync or async, atomic, keeping the last K.

    ``save`` and ``poll``/``wait`` are collective (every rank calls them at the same step). An async
    save blocks training for the snapshot of this rank's tensors (writer.Snapshot) and
    is written by a thread. At most one async save is in flight: a new save first waits for the
    previous one, so there is one snapshot. A writer that fails, or has not finished
    ``write_timeout_s`` after a save started waiting for it, ends in a ConfigError (one line).
    Building one makes megatron's writers report in this process (writer.
    install_in_process_results_queue), on every device.
    """

    def __init__(self, run_dir: Path, keep_last: int = 0, async_save: bool = False, interval: int = 0,
                 last_step: int = 0, write_timeout_s: float = WRITE_TIMEOUT_S) -> None:
        install_in_process_results_queue()
        self.run_dir = Path(run_dir)
        self.root = self.run_dir / "checkpoints"
        self.keep_last = keep_last
        self.async_save = async_save
        self.interval, self.last_step = interval, last_step  # train.save_interval, train.steps
        self.write_timeout_s = write_timeout_s
        self._queue: WriterQueue | None = None
        self._snapshot = Snapshot()
        self._in_flight: Path | None = None  # the checkpoint an async save is writing
        self._strategy: TorchDistSaveShardedStrategy | None = None  # see _planning
        self._structure: int | None = None
        self.last_snapshot_s = 0.0  # how long the last async save's snapshot took
        self._needed: int | None = None  # bytes a checkpoint takes (see _check_space)
        self._space_warned = False
        # A LoRA run's base (load.start_from_base's record): its checkpoints hold what trains, and
        # their manifests name where the frozen rest comes from.
        self.base: dict[str, Any] | None = None

    def due(self, step: int, stopping: bool = False) -> bool:
        """The training loop's question: save after ``step``? Every ``interval`` steps, at the
        last step, and when the run stops (a signal)."""
        return stopping or step == self.last_step or bool(self.interval and step % self.interval == 0)

    def must_block(self, step: int, stopping: bool = False) -> bool:
        """A save the process exits after (the last step, a stop) is written before ``save``
        returns; the others may be async."""
        return stopping or step == self.last_step

    def remove_leftovers(self) -> None:
        """Deal with the ``.partial`` directories of saves a crash interrupted (rank 0, at
        start-up): one whose manifest was written is complete and only missed its rename, so it
        is published; the others are deleted."""
        if torch.distributed.get_rank() == 0 and self.root.is_dir():
            for stale in sorted(self.root.glob(f"iter_*{PARTIAL_SUFFIX}")):
                final = stale.with_name(stale.name[:-len(PARTIAL_SUFFIX)])
                if validate_checkpoint(stale) is None and not final.exists():
                    log.info("publishing %s (saved completely, interrupted before its rename)", final)
                    os.replace(stale, final)
                    newest = complete_checkpoints(self.root)[0]
                    write_atomically(self.root / LATEST, newest.name + "\n")
                else:
                    log.info("removing %s (an interrupted save)", stale)
                    shutil.rmtree(stale, ignore_errors=True)
        barrier()

    def save(self, step: int, state: TrainingState, config: dict[str, Any], *,
             train_state: dict[str, Any] | None = None, loader_state: dict[str, Any] | None = None,
             blocking: bool = False) -> float:
        """Write checkpoint ``step``; returns the seconds training was blocked (for an async save:
        waiting for the previous one, the snapshot of this rank's tensors, planning and the common
        part; serialising, writing and hashing overlap the next steps). ``blocking`` forces a
        synchronous save."""
        start = time.perf_counter()
        self.wait()
        final = checkpoint_dir(self.run_dir, step)
        partial = final.with_name(final.name + PARTIAL_SUFFIX)
        if self.base is None and not all(p.requires_grad for p in stage_of(state.model).parameters()):
            raise ValueError("the model has frozen weights, which a checkpoint does not hold: name their base "
                             "(Checkpointer.base, from load.start_from_base)")
        model_sd = model_sharded_state_dict(state.model)
        sharded: dict[str, Any] = dict(model_sd)
        parts = {"optimizer": False, "ema": state.ema is not None, "scheduler": state.scheduler is not None}
        if state.ema is not None:
            sharded.update(state.ema.sharded_state_dict(model_sd))
        sharded = fsdp_rows(sharded)
        if state.optimizer is not None and optimizer_has_state(state.optimizer):
            sharded["optimizer"] = optimizer_sharded_state_dict(state.optimizer, model_sd)
            parts["optimizer"] = True
        if state.scheduler is not None:
            sharded["scheduler"] = state.scheduler.state_dict()
        sharded["rng_state"] = rng_sharded(rng_state())
        sharded["step"] = step
        sharded["config"] = config
        sharded["train_state"] = train_state or {}
        with self._named_write_errors(final.name, partial):
            self._check_space(final.name, sharded)
            if torch.distributed.get_rank() == 0:
                shutil.rmtree(partial, ignore_errors=True)
                partial.mkdir(parents=True)
            barrier()

            use_async = self.async_save and not blocking
            if use_async:  # from here on training may change the tensors: the writer has its copies
                snapshot_start = time.perf_counter()
                sharded = self._snapshot.take(sharded)
                self.last_snapshot_s = time.perf_counter() - snapshot_start
            # Always megatron's async request: run by the writer thread, or here for a sync save (the
            # same writes; megatron's sync path would fork writer processes, and a fork write-protects
            # every page of the training process until it is written again).
            strategy, validate = self._planning(sharded)
            request = dist_checkpointing.save(
                sharded, str(partial), strategy, validate_access_integrity=validate, async_sharded_save=True,
                preprocess_common_before_consistancy_check=drop_optimizer_from_consistency_check)
            # The loader state differs per DP rank and is the same on its TP/CP/PP peers: one file each.
            if loader_state is not None and parallel_state.get_tensor_model_parallel_rank() == 0 \
                    and parallel_state.get_pipeline_model_parallel_rank() == 0 \
                    and parallel_state.get_context_parallel_rank() == 0:
                write_atomically(loader_state_path(partial, parallel_state.get_data_parallel_rank()),
                                  json.dumps(loader_state))
            manifest = {"format": FORMAT, "step": step, "layout": parallel_layout(), "parts": parts, "config": config,
                        **({"base": self.base} if self.base is not None else {})}
            finalize = functools.partial(self._finalize, partial, final, manifest)
            # The writer hashes the tensor files it wrote, once they are written.
            request = in_writer_thread(request, functools.partial(record_checksums, partial, torch.distributed.get_rank()))
            request.add_finalize_fn(finalize)
            if use_async:
                self._in_flight = final
                self._async_queue().schedule_async_request(request)
            else:
                request.execute_sync()
        return time.perf_counter() - start

    def _check_space(self, name: str, sharded: dict[str, Any]) -> None:
        """Warn once (rank 0) when the run directory's file system has less free space than a
        checkpoint takes: the last one's size (its manifest), or before there is one an estimate,
        the bytes of the tensors every rank writes (collective, on a Checkpointer's first save)."""
        if self._needed is None:
            mine = sum(v.data.nbytes for v in nested_values(sharded)
                       if isinstance(v, ShardedTensor) and is_main_replica(v.replica_id))
            written = torch.tensor([mine], dtype=torch.int64, device=local_device())
            torch.distributed.all_reduce(written)
            self._needed = int(written.item())
            latest = latest_checkpoint(self.run_dir)
            if torch.distributed.get_rank() == 0 and latest is not None and validate_checkpoint(latest) is None:
                self._needed = checkpoint_bytes(read_manifest(latest))
        if torch.distributed.get_rank() != 0 or self._space_warned:
            return
        if (free := free_bytes(self.root)) < self._needed:
            self._space_warned = True
            log.warning("checkpoint %s: %s has %s free, a checkpoint takes about %s: this save will likely fail; "
                        "free space there", name, self.root, _size(free), _size(self._needed))

    @contextlib.contextmanager
    def _named_write_errors(self, name: str, partial: Path) -> Iterator[None]:
        """A write of checkpoint ``name`` that fails in the block ends in one ConfigError."""
        try:
            yield
        except (CheckpointException, OSError, RuntimeError) as err:
            if (error := self._write_error(name, partial, err)) is None:
                raise
            raise error from None

    def _write_error(self, name: str, partial: Path, err: BaseException) -> ConfigError | None:
        """The one line for a save whose writing failed, its ``partial`` directory removed (the
        newest complete checkpoint stays latest); None when ``err`` is no write failure.

        A full disk is named with the bytes a checkpoint needs and those free: found by ENOSPC
        (or a quota's EDQUOT) anywhere in the error, or, as torch.save's zip writer reports a full
        disk only as "unexpected pos ...", by the space the save had (free now plus what it wrote)
        being less than a checkpoint takes."""
        if not (isinstance(err, (CheckpointException, OSError)) or any(w in str(err) for w in _ZIP_WRITER)):
            return None
        wrote = sum(p.stat().st_size for p in partial.rglob("*") if p.is_file()) if partial.is_dir() else 0
        needed = self._needed or 0
        full = _out_of_space(err) or free_bytes(self.root) + wrote < needed
        shutil.rmtree(partial, ignore_errors=True)
        if not full:
            return ConfigError(_write_failed(name, err, self.root))
        return ConfigError(f"checkpoint {name}: the disk is full: a checkpoint needs about {_size(needed)}, "
                           f"{self.root} has {_size(free_bytes(self.root))} free; the partial save was removed and "
                           "the newest complete checkpoint stays latest: free space there (older iter_N "
                           "directories than latest may go), then restart")

    def _planning(self, sharded: dict[str, Any]) -> tuple[TorchDistSaveShardedStrategy, bool]:
        """How dist_checkpointing plans this save: (its sharded strategy, whether to validate).

        For every save megatron checks the sharding (every rank's metadata gathered to all, the
        common part compared) and plans the files (local plans gathered to rank 0); both come out
        the same while the checkpoint's structure (keys, shapes, offsets, dtypes, replica ids) does
        not change, which in a run it does not once the optimizer has its state. So a
        Checkpointer's first save, and a save whose structure changed on any rank, is checked and
        planned afresh; the others skip the check and reuse the plan (megatron's
        ``cached_metadata``), which takes it off the time a save blocks training. Collective:
        one all-reduce of a flag."""
        structure = hash(tuple(_structure_of(v) for v in nested_values(sharded) if isinstance(v, ShardedBase)))
        changed = torch.tensor([int(structure != self._structure or self._strategy is None)], dtype=torch.int32,
                               device=local_device())
        torch.distributed.all_reduce(changed, op=torch.distributed.ReduceOp.MAX)
        if changed.item():
            self._strategy = TorchDistSaveShardedStrategy("torch_dist", 1, cached_metadata=True)
        self._structure = structure
        return self._strategy, bool(changed.item())

    def poll(self) -> None:
        """Complete the async save once every rank has written it (collective, cheap when idle)."""
        self._finalize_written(blocking=False)

    def wait(self) -> None:
        """Block until the save in flight, if any, is complete (collective)."""
        self._finalize_written(blocking=True)

    def close(self) -> None:
        self.wait()
        if self._queue is not None:
            self._queue.close()
            self._queue = None
        self._snapshot.clear()

    @property
    def snapshot_bytes(self) -> int:
        """The memory the async writer's snapshot holds (kept from one async save to the next)."""
        return self._snapshot.nbytes

    def _async_queue(self) -> WriterQueue:
        if self._queue is None:
            self._queue = WriterQueue(self.write_timeout_s)
        return self._queue

    def _finalize_written(self, blocking: bool) -> None:
        if self._queue is None or not self._queue.get_num_unfinalized_calls():
            return
        name = self._in_flight.name if self._in_flight is not None else "in flight"
        partial = self.root / (name + PARTIAL_SUFFIX)
        try:
            with self._named_write_errors(name, partial):
                self._queue.maybe_finalize_async_calls(blocking=blocking)
        except WriterTimeout as err:
            raise ConfigError(f"checkpoint {name}: the background writer is {err} (a stalled disk?); the "
                              f"newest complete checkpoint in {self.root} stays latest") from None

    def _finalize(self, partial: Path, final: Path, manifest: dict[str, Any]) -> None:
        """Every rank finished writing: publish the checkpoint (collective; rank 0 does the work)."""
        barrier()
        if torch.distributed.get_rank() == 0:
            hashed: dict[str, str] = {}  # the tensor files, hashed by the ranks that wrote them
            for record in partial.glob(CHECKSUMS_GLOB):
                hashed.update(json.loads(record.read_text()))
            files = {}
            for p in sorted(partial.rglob("*")):
                if p.is_file():
                    name = str(p.relative_to(partial))
                    files[name] = {"size": p.stat().st_size, "crc32": hashed.get(name) or file_crc32(p)}
            write_atomically(partial / MANIFEST, json.dumps({**manifest, "files": files}, indent=1))
            self._needed = checkpoint_bytes({"files": files})  # what the next save will take
            if final.exists():  # the same step saved again (a run resumed from before it)
                shutil.rmtree(final)
            os.replace(partial, final)
            fsync_dir(final.parent)
            write_atomically(self.root / LATEST, final.name + "\n")
            self._prune()
            log.info("checkpoint %s complete", final)
        barrier()

    def _prune(self) -> None:
        if not self.keep_last:
            return
        for old in complete_checkpoints(self.root)[self.keep_last:]:
            shutil.rmtree(old, ignore_errors=True)


def _structure_of(sharded: ShardedBase) -> tuple[Any, ...]:
    """What of a ShardedTensor or ShardedObject shapes a checkpoint's plan (not its values)."""
    if isinstance(sharded, ShardedTensor):
        return ("tensor", sharded.key, str(sharded.dtype), sharded.local_shape, sharded.global_shape,
                sharded.global_offset, sharded.axis_fragmentations, sharded.replica_id, sharded.prepend_axis_num)
    return (type(sharded).__name__, sharded.key, getattr(sharded, "global_shape", None),
            getattr(sharded, "global_offset", None), sharded.replica_id)


def _write_failed(name: str, err: BaseException, root: Path) -> str:
    """One line for a failed write: for one that megatron's finalisation reported on every rank,
    rank 0 has every rank's exception; the others learn only that a writer failed."""
    reason = "a writer failed; rank 0's error says which and why"
    for cause in _failures(err):
        text = str(cause).splitlines()[0] if str(cause) else ""
        reason = f"{cause.__class__.__name__}: {text}" if text else cause.__class__.__name__
        break
    return (f"checkpoint {name}: writing failed ({reason}); the partial save was removed and the newest complete "
            f"checkpoint in {root} stays latest: check free space and permissions there")


def _failures(err: BaseException) -> list[BaseException]:
    """The ranks' exceptions a CheckpointException carries ((exception, traceback summary) per
    failed rank), or ``err`` itself."""
    if not isinstance(err, CheckpointException):
        return [err]
    return [f[0] if isinstance(f, tuple) else f for f in err.failures.values()]


# What a full disk looks like in a failed write: the errno of an OSError, or its text where
# megatron's writer reports a worker's OSError as a RuntimeError ("Worker failure: [Errno 28] ...").
_FULL = (errno.ENOSPC, errno.EDQUOT)
_FULL_TEXT = tuple(os.strerror(code) for code in _FULL)
# torch.save's zip writer: its errors carry no errno ("[enforce fail at inline_container.cc:672]
# . unexpected pos 704 vs 598" on a full disk).
_ZIP_WRITER = ("inline_container", "PytorchStreamWriter", "Worker failure")


def _out_of_space(err: BaseException) -> bool:
    """Whether ``err``, its causes or the ranks' failures it carries say the disk is full."""
    pending, seen = [err], set()
    while pending:
        e = pending.pop()
        if e is None or id(e) in seen:
            continue
        seen.add(id(e))
        if (isinstance(e, OSError) and e.errno in _FULL) or any(text in str(e) for text in _FULL_TEXT):
            return True
        pending += [e.__cause__, e.__context__, *(_failures(e) if isinstance(e, CheckpointException) else [])]
    return False


def free_bytes(path: Path) -> int:
    """Free bytes of the file system that holds ``path`` (or its nearest existing parent)."""
    path = Path(path).absolute()
    while not path.exists() and path != path.parent:
        path = path.parent
    return shutil.disk_usage(path).free


def _size(n: int) -> str:
    """``n`` bytes in decimal units, as df -H prints them: 956.2 MB."""
    units = ("bytes", "kB", "MB", "GB", "TB", "PB")
    power = min(len(units) - 1, int(math.log10(n) // 3)) if n >= 1000 else 0
    return f"{n / 1000 ** power:.1f} {units[power]}" if power else f"{n} bytes"


def save_checkpoint(run_dir: Path, step: int, model: list[torch.nn.Module], config: dict[str, Any],
                    loader_state: dict[str, Any] | None = None, base: dict[str, Any] | None = None) -> Path:
    """Save the weights alone (synchronously), e.g. an imported or freshly converted model; a LoRA
    model's with the record of its ``base`` (load.base_of)."""
    checkpointer = Checkpointer(run_dir)
    checkpointer.base = base
    checkpointer.save(step, TrainingState(model), config, loader_state=loader_state, blocking=True)
    return checkpoint_dir(run_dir, step)
