"""Fault-tolerant distributed checkpoints: megatron-core dist_checkpointing (torch_dist format).

Layout of a run directory's ``checkpoints/`` (docs/checkpointing.md):

    iter_0000100/              one complete checkpoint
        __R_0.distcp, .metadata, metadata.json   tensors and their index (torch.distributed.checkpoint)
        common.pt              step, config, LR schedule, trainer state (consumed samples, step guard)
        loader_dp00000.json    each data-parallel rank's data-loader state
        checksums_00000.json   each rank's CRC32 of the tensor files it wrote (by its writer)
        manifest.json          written last: every file with its size and CRC32, the layout, the config
    iter_0000110.partial/      a save in progress or interrupted: never loaded, removed at start-up
    latest                     the name of the newest complete checkpoint

A checkpoint holds everything an exact resume needs: the weights, the optimizer (in megatron's
``fully_reshardable`` format whatever the optimizer: the distributed optimizer's, which each rank
writes from the shards it owns, plain DDP's and FSDP's alike), the fp32 EMA of
the weights, every rank's RNG states (python, numpy, torch, CUDA and megatron's model-parallel
tracker), the data-loader state, step and consumed samples, and the resolved config. Tensors are
stored by global name and offset, so a checkpoint loads into any TP/PP/DP layout; only the RNG
states and the loader state belong to one layout and are restored only into that layout.

Atomicity: a save writes into ``iter_N.partial``; once every rank has finished (for an async
save: when megatron's finalisation runs on all ranks), rank 0 writes the manifest, renames the
directory to ``iter_N``, moves ``latest`` and removes checkpoints beyond the last ``keep_last``.
An interrupted save leaves only a ``.partial`` directory; the previous checkpoint is untouched.
On load the manifest detects a missing or truncated file, and every file's CRC32 is checked (the
ranks split the files between them), with common.pt and .metadata read back: a checkpoint that
fails any check is moved aside as ``iter_N.invalid-<time>`` and the run falls back to the newest
checkpoint that passes, with one line. Hashing costs the training loop nothing for an async save:
each rank's writer thread hashes the files it wrote once they are written.

Async saves block training only for the snapshot of this rank's tensors (checkpoint_writer.py:
a host copy into buffers reused from save to save); a thread serialises, writes and hashes them
while training goes on.
"""

from __future__ import annotations

import contextlib
import dataclasses
import errno
import functools
import json
import logging
import math
import os
import random
import re
import shutil
import time
import zlib
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Iterator, Sequence

import numpy as np
import torch
from megatron.core import dist_checkpointing, parallel_state
from megatron.core.dist_checkpointing import ShardedObject, ShardedTensor
from megatron.core.dist_checkpointing.dict_utils import nested_values
from megatron.core.dist_checkpointing.mapping import ShardedBase, is_main_replica
from megatron.core.dist_checkpointing.strategies.torch import TorchDistSaveShardedStrategy
from megatron.core.optimizer.distrib_optimizer import DistributedOptimizer
from megatron.core.tensor_parallel import get_cuda_rng_tracker
from torch.distributed.checkpoint import CheckpointException

from goku_megatron.checkpoint_writer import (
    Snapshot,
    WriterQueue,
    WriterTimeout,
    in_writer_thread,
    install_in_process_results_queue,
)
from goku_megatron.config import Config, ConfigError
from goku_megatron.ema import EMA, EMA_PREFIX, MODEL_PREFIX
from goku_megatron.model.fsdp import describe_weights, is_sharded, local, local_shard, replica_index
from goku_megatron.model.goku import iter_stage_models
from goku_megatron.platform import barrier, has_cuda, local_device

log = logging.getLogger(__name__)

LATEST = "latest"
MANIFEST = "manifest.json"
# /2: files map to {"size", "crc32"}; /1 (sizes only) still loads, checked by size alone.
FORMAT = "goku-megatron-checkpoint/2"
FORMATS = ("goku-megatron-checkpoint/1", FORMAT)
CHECKSUMS = "checksums_{rank:05d}.json"
CHECKSUMS_GLOB = "checksums_*.json"
_HASH_CHUNK = 8 << 20
PARTIAL_SUFFIX = ".partial"
# How long a save waits for the previous async save's writer before it gives up (a stalled disk).
WRITE_TIMEOUT_S = 1800.0
_ITER_NAME = re.compile(r"iter_(\d{7,})")
# model.* fields that fix the weights' shapes: a checkpoint loads only into a model with the same.
SHAPE_FIELDS = ("num_layers", "hidden_size", "ffn_hidden_size", "num_heads", "in_channels", "patch_size",
                "text_dim", "timestep_freq_dim", "i2v")
# Shape fields added after checkpoints began, with the value a checkpoint that predates them had.
NEWER_SHAPE_FIELDS = {"i2v": False}
# Layers a finetune (checkpoint.init_from) may add to the model it starts from: they keep their
# initialisation. model.i2v's image_cond starts as the identity on the noisy tokens.
NEW_LAYERS = ("image_cond.",)


def checkpoint_dir(run_dir: Path, step: int) -> Path:
    return Path(run_dir) / "checkpoints" / f"iter_{step:07d}"


def loader_state_path(checkpoint: Path, dp_rank: int) -> Path:
    return checkpoint / f"loader_dp{dp_rank:05d}.json"


def load_loader_state(checkpoint: Path, dp_rank: int) -> dict[str, Any] | None:
    """The loader state DP rank ``dp_rank`` saved with ``checkpoint`` (None if it saved none)."""
    path = loader_state_path(checkpoint, dp_rank)
    return json.loads(path.read_text()) if path.is_file() else None


def latest_checkpoint(run_dir: Path) -> Path | None:
    """The checkpoint the ``latest`` pointer names (see ``newest_valid_checkpoint`` for one that is
    also checked for completeness)."""
    pointer = Path(run_dir) / "checkpoints" / LATEST
    if not pointer.is_file():
        return None
    return Path(run_dir) / "checkpoints" / pointer.read_text().strip()


def resolve_checkpoint(path: Path) -> Path:
    """A checkpoint directory, or a run directory whose ``latest`` pointer names one."""
    path = Path(path)
    if (path / "checkpoints").is_dir():
        found = latest_checkpoint(path)
        if found is None:
            raise FileNotFoundError(f"{path}: no complete checkpoint (checkpoints/latest missing); "
                                    "train longer or pass a checkpoints/iter_N directory")
        return found
    if not (path / "metadata.json").is_file():
        raise FileNotFoundError(f"{path}: not a goku-train checkpoint (no metadata.json); pass a run "
                                "directory or its checkpoints/iter_N")
    return path


def checkpoint_step(path: Path) -> int | None:
    match = _ITER_NAME.fullmatch(Path(path).name)
    return int(match.group(1)) if match else None


def _complete_checkpoints(root: Path) -> list[Path]:
    """``iter_N`` directories under ``root``, newest first (partial and quarantined ones excluded)."""
    found = [p for p in root.iterdir() if p.is_dir() and checkpoint_step(p) is not None] if root.is_dir() else []
    return sorted(found, key=checkpoint_step, reverse=True)


# ----------------------------------------------------------------------------------------------
# What a checkpoint holds


@dataclass
class TrainingState:
    """The parts of a training process that a checkpoint covers; all but the model are optional."""

    model: list[torch.nn.Module]
    optimizer: Any = None
    scheduler: Any = None
    ema: EMA | None = None


def layout() -> dict[str, int]:
    """This process group's parallel layout, as recorded in a checkpoint's manifest."""
    return {"tp": parallel_state.get_tensor_model_parallel_world_size(),
            "pp": parallel_state.get_pipeline_model_parallel_world_size(),
            "cp": parallel_state.get_context_parallel_world_size(),
            "dp": parallel_state.get_data_parallel_world_size(),
            "world_size": torch.distributed.get_world_size()}


def _stage(model: list[torch.nn.Module]) -> Any:
    (stage,) = list(iter_stage_models(model))
    return stage


def gather_weights(model: list[torch.nn.Module]) -> None:
    """Bring this rank's copy of every weight up to date (collective over data parallelism).

    With optim.overlap_param_gather the distributed optimizer leaves the all-gather of the
    updated weights to the next forward pass, which gathers each bucket just before its layers
    run; anything that reads the weights in between (a checkpoint, a dump) must gather first.
    """
    for chunk in model:
        if getattr(chunk, "use_forward_hook", False):
            chunk.start_param_sync(force_sync=True)


def _model_sharded_state_dict(model: list[torch.nn.Module]) -> dict[str, Any]:
    gather_weights(model)
    stage = _stage(model)
    return describe_weights(stage.sharded_state_dict(prefix=MODEL_PREFIX),
                            {MODEL_PREFIX + stage.global_name(n): p for n, p in stage.named_parameters()})


def _fsdp_rows(sharded: dict[str, Any]) -> dict[str, Any]:
    """Under parallel.fsdp, weights and EMA entries hold the FSDP DTensors: each becomes this rank's
    rows of the tensor (model/fsdp.py, ``local_shard``), which is what the rank writes and reads.
    Entries a rank holds no rows of are left out. Other layouts' entries pass unchanged."""
    replica = replica_index()
    out = {}
    for key, value in sharded.items():
        if isinstance(value, ShardedTensor):
            value = local_shard(value, replica)
            if value is None:
                continue
        out[key] = value
    return out


def _unwrapped(optimizer: Any) -> Any:
    """megatron's optimizer inside resilience.SkipNonFiniteSteps."""
    return getattr(optimizer, "inner", optimizer)


def _optimizer_parts(optimizer: Any) -> list[Any]:
    optimizer = _unwrapped(optimizer)
    return list(getattr(optimizer, "chained_optimizers", [optimizer]))


def _optimizer_metadata() -> dict[str, Any]:
    """How the distributed optimizer lays out its state: ``fully_reshardable`` (per parameter, by
    global name: reshards over TP/PP/DP). megatron builds it this way for loading (and for the
    plain optimizer); ``_optimizer_sharded_state_dict`` writes it without megatron's gather."""
    return {"distrib_optim_sharding_type": "fully_reshardable",
            "distrib_optim_fully_reshardable_mem_efficient": torch.distributed.get_backend() == "gloo",
            "chained_optim_avoid_prefix": True}


def _optimizer_sharded_state_dict(optimizer: Any, model_sd: dict[str, Any]) -> dict[str, Any]:
    """The optimizer's sharded state dict for saving, in megatron's ``fully_reshardable`` format
    whatever the optimizer: a distributed optimizer's part is ``_own_shards_fully_reshardable``
    (each rank writes its own shards, nothing is gathered), a plain optimizer's (DDP without the
    distributed optimizer, or FSDP) is ``_plain_fully_reshardable``. The structure is megatron's
    ChainedOptimizer's with ``chained_optim_avoid_prefix``, so a checkpoint of any of them loads
    into any other."""
    inner, parts = _unwrapped(optimizer), _optimizer_parts(optimizer)
    if not any(isinstance(part, DistributedOptimizer) for part in parts):
        (part,) = parts
        return _plain_fully_reshardable(part, model_sd)
    if len(parts) > 1 and hasattr(inner, "_synchronize_steps"):
        inner._synchronize_steps()  # as megatron's ChainedOptimizer does before a save
    states = [_own_shards_fully_reshardable(part, model_sd) if isinstance(part, DistributedOptimizer)
              else part.sharded_state_dict(model_sd, metadata=_optimizer_metadata()) for part in parts]
    return states[0] if len(states) == 1 else dict(enumerate(states))


def _own_shards_fully_reshardable(optimizer: DistributedOptimizer, model_sd: dict[str, Any]) -> dict[str, Any]:
    """megatron's ``fully_reshardable`` checkpoint of a distributed optimizer, written by every
    data-parallel rank from the shards it owns instead of being gathered to DP rank 0 first.

    The checkpoint is the same: ``optimizer.state.{param,exp_avg,exp_avg_sq}.<weight key>``, each
    with its weight's global shape, and the common part (param groups, Adam step, the sharding
    type), so megatron's own fully_reshardable loading reads it into any TP/PP/DP layout, and
    checkpoints written either way load alike. Only how the tensors are cut differs: a rank owns a
    contiguous range of each flattened weight it holds, which is cut into at most 2 x ndim - 1
    boxes of the weight's shape (``flat_range_boxes``) and saved as megatron-core 0.16's unevenly
    sharded ShardedTensors (no ``axis_fragmentations``). The boxes are views of the optimizer's own
    state: building this dict copies and communicates nothing.

    (megatron's ``fully_sharded_model_space`` format meant the same, but it describes the ranges
    with ``ShardedTensor.flattened_range``, which megatron-core 0.16 removed: it raises
    "flattened_range is not supported" on any device.)
    """
    by_param = {id(sh.data): sh for sh in nested_values(model_sd) if isinstance(sh, ShardedTensor)}
    owned = {param: ranges["param"] for buckets in optimizer.gbuf_ranges for per_dtype in buckets.values()
             for bucket in per_dtype for param, ranges in bucket["param_map"].items()}
    param_state: dict[int, dict[str, list[ShardedTensor]]] = {}
    param_idx = -1  # megatron's order: every parameter of every buffer, owned here or not
    for buffer in optimizer.buffers:
        for param in buffer.param_index_map:
            param_idx += 1
            if param not in owned or owned[param].size == 0:
                continue
            sharded = by_param.get(id(param))
            if sharded is None or not isinstance(sharded.replica_id, tuple) or len(sharded.replica_id) != 3:
                raise ValueError(f"distributed optimizer: parameter {tuple(param.shape)} has no (PP, TP, DP) "
                                 "ShardedTensor in the model's sharded state dict")
            # Every DP rank writes its own range: the DP coordinate of the replica id is the optimizer
            # instance's (0 unless megatron runs several instances); TP/PP replicas as the weight's.
            replica_id = (*sharded.replica_id[:2], optimizer.distributed_optimizer_instance_id)
            start = owned[param].start
            boxes = flat_range_boxes(tuple(sharded.local_shape), start, owned[param].end)
            tensors = {}
            for name, state in optimizer._get_main_param_and_optimizer_states(param).items():
                if name == "step":  # Adam's step lives in the param groups (common part)
                    continue
                flat = state.detach().reshape(-1).float()
                tensors[name] = [ShardedTensor(
                    key=f"optimizer.state.{name}.{sharded.key}",
                    data=flat[flat_start - start:flat_start - start + math.prod(shape)].view(shape),
                    dtype=torch.float32, local_shape=shape, global_shape=sharded.global_shape,
                    global_offset=(*sharded.global_offset[:sharded.prepend_axis_num],
                                   *(g + o for g, o in zip(sharded.global_offset[sharded.prepend_axis_num:], offset))),
                    axis_fragmentations=None, replica_id=replica_id, prepend_axis_num=sharded.prepend_axis_num,
                ) for offset, shape, flat_start in boxes]
            param_state[param_idx] = tensors
    return {**optimizer.state_dict(), "param_state": param_state, "param_state_sharding_type": "fully_reshardable"}


def _main_params(part: Any) -> list[tuple[torch.nn.Parameter, torch.Tensor]]:
    """(model weight, the fp32 weight Adam updates) for each parameter of a plain megatron
    optimizer: the weight itself in fp32, its fp32 copy in bf16 (Float16OptimizerWithFloat16Params)."""
    if hasattr(part, "fp32_from_float16_groups"):
        return [pair for model_group, main_group in zip(part.float16_groups, part.fp32_from_float16_groups)
                for pair in zip(model_group, main_group)]
    return [(param, param) for group in part.optimizer.param_groups for param in group["params"]]


def _plain_fully_reshardable(part: Any, model_sd: dict[str, Any], loading: bool = False) -> dict[str, Any]:
    """A plain megatron optimizer (no distributed optimizer: DDP, or FSDP) in the distributed
    optimizer's ``fully_reshardable`` format (``_own_shards_fully_reshardable``):
    ``optimizer.state.{param,exp_avg,exp_avg_sq}.<weight key>`` sharded like the weight (under FSDP
    each rank writes its rows), and the param groups with Adam's step as the common part. So a
    checkpoint resumes under any optimizer and layout, the distributed optimizer's included. The
    tensors are the optimizer's own state (under FSDP views of its shards), so a load into this
    template (``loading``: the state is created first) fills the optimizer in place."""
    if loading and not part.optimizer.state:
        part.init_state_fn(part.optimizer, part.config)
    by_param = {id(sh.data): sh for sh in nested_values(model_sd) if isinstance(sh, ShardedTensor)}
    replica = replica_index()
    param_state: dict[int, dict[str, ShardedTensor]] = {}
    for idx, (param, main) in enumerate(_main_params(part)):
        sharded = by_param.get(id(param))
        if sharded is None:
            raise ValueError(f"optimizer: parameter {tuple(param.shape)} is not in the model's sharded state dict")
        tensors = {}
        for name, tensor in _adam_tensors(part, main):
            entry = dataclasses.replace(sharded, key=f"optimizer.state.{name}.{sharded.key}", data=tensor,
                                        dtype=torch.float32)
            entry = local_shard(entry, replica)
            if entry is not None:
                tensors[name] = entry
        param_state[idx] = tensors
    groups = [] if loading else [{**{k: v for k, v in group.items() if k != "params"}, "step": _adam_step(part)}
                                 for group in part.optimizer.param_groups]
    return {"optimizer": {"param_groups": groups}, "param_state": param_state,
            "param_state_sharding_type": "fully_reshardable"}


def _adam_tensors(part: Any, main: torch.Tensor) -> list[tuple[str, torch.Tensor]]:
    state = part.optimizer.state[main]
    return [("param", main), ("exp_avg", state["exp_avg"]), ("exp_avg_sq", state["exp_avg_sq"])]


def _adam_step(part: Any) -> float:
    """Adam's step count: per parameter in torch's Adam, per param group in TE's/apex's FusedAdam."""
    steps = {float(s["step"]) for s in part.optimizer.state.values() if "step" in s}
    steps |= {float(g["step"]) for g in part.optimizer.param_groups if "step" in g and g["params"]}
    if len(steps) > 1:
        raise ValueError(f"optimizer: parameters at different Adam steps {sorted(steps)}")
    return steps.pop() if steps else 0.0


def _load_plain_optimizer(part: Any, loaded: dict[str, Any]) -> None:
    """Finish loading ``_plain_fully_reshardable``: the tensors were read into the optimizer's
    state; the param groups' settings and Adam's step come from the common part (written by a
    plain or a distributed optimizer, whose groups are the same: megatron builds both alike,
    matched in order)."""
    groups = loaded["optimizer"]["param_groups"]
    if len(groups) != len(part.optimizer.param_groups):
        raise ValueError(f"optimizer: the checkpoint has {len(groups)} param groups, this model "
                         f"{len(part.optimizer.param_groups)}")
    per_param_step = isinstance(part.optimizer, torch.optim.Adam)  # torch's Adam/AdamW; FusedAdam: per group
    with torch.no_grad():
        for group, saved in zip(part.optimizer.param_groups, groups):
            group.update({k: v for k, v in saved.items() if k not in ("params", "step")})
            if not per_param_step:
                group["step"] = int(saved["step"])
                continue
            for main in group["params"]:
                part.optimizer.state[main]["step"] = torch.tensor(float(saved["step"]), dtype=torch.float32)
        for idx, (_, main) in enumerate(_main_params(part)):
            for name, tensor in _adam_tensors(part, main):
                value = loaded["param_state"][idx].get(name)
                if value is not None:
                    local(tensor).copy_(value)


def _saved_by_megatrons_plain_optimizer(path: Path) -> bool:
    """Whether a checkpoint's optimizer is in megatron's own plain-optimizer format, which goku
    wrote before every optimizer used ``fully_reshardable``; only a plain optimizer reads it."""
    common = dist_checkpointing.load_common_state_dict(str(path)).get("optimizer", {})
    return isinstance(common, dict) and "param_state_sharding_type" not in common


def flat_range_boxes(shape: tuple[int, ...], start: int, stop: int) -> list[tuple[tuple[int, ...], tuple[int, ...], int]]:
    """Cut the elements ``start:stop`` of a row-major tensor of ``shape``, flattened, into boxes
    (hyperrectangles): a list of (offset, box shape, flat index of the box's first element), in
    flat order. At most 2 x ndim - 1 boxes: a partial row, whole rows, a partial row, recursively."""
    if start >= stop:
        return []
    if len(shape) <= 1:
        return [((start,), (stop - start,), start)] if shape else [((), (), start)]
    row = math.prod(shape[1:])
    boxes: list[tuple[tuple[int, ...], tuple[int, ...], int]] = []

    def part_of_row(r: int, lo: int, hi: int) -> None:  # elements lo:hi of row r
        boxes.extend(((r, *o), (1, *s), r * row + f) for o, s, f in flat_range_boxes(shape[1:], lo, hi))

    if start % row:  # a partial first row
        first = start // row
        part_of_row(first, start % row, min(stop, (first + 1) * row) - first * row)
        start = min(stop, (first + 1) * row)
    if (whole := (stop - start) // row) > 0:
        boxes.append(((start // row, *[0] * (len(shape) - 1)), (whole, *shape[1:]), start))
        start += whole * row
    if start < stop:  # a partial last row
        part_of_row(start // row, 0, stop - start)
    return boxes


def _optimizer_has_state(optimizer: Any) -> bool:
    """Whether every rank's optimizer has taken a step (before that there is nothing to save, and a
    fresh optimizer is exactly what a resume would restore). Collective."""
    has = all(len(p.optimizer.state) > 0 for p in _optimizer_parts(optimizer) if p.optimizer is not None)
    flag = torch.tensor([int(has)], dtype=torch.int32, device=local_device())
    torch.distributed.all_reduce(flag, op=torch.distributed.ReduceOp.MIN)
    return bool(flag.item())


def _rng_state() -> dict[str, Any]:
    return {"python": random.getstate(), "numpy": np.random.get_state(), "torch": torch.get_rng_state(),
            "cuda": torch.cuda.get_rng_state() if has_cuda() else None,
            "tracker": {k: v.clone() for k, v in get_cuda_rng_tracker().get_states().items()}}


def _set_rng_state(state: dict[str, Any]) -> None:
    random.setstate(state["python"])
    np.random.set_state(state["numpy"])
    torch.set_rng_state(state["torch"])
    if state["cuda"] is not None and has_cuda():
        torch.cuda.set_rng_state(state["cuda"])
    get_cuda_rng_tracker().set_states(state["tracker"])


def _rng_sharded(state: dict[str, Any]) -> ShardedObject:
    """One entry per global rank (RNG states are rank-local; they only make sense in one layout)."""
    rank, world = torch.distributed.get_rank(), torch.distributed.get_world_size()
    return ShardedObject("rng_state", state, (world,), (rank,), replica_id=0)


def _drop_optimizer_from_consistency_check(common: dict[str, Any]) -> dict[str, Any]:
    """What remains of the distributed optimizer's state once its tensors are taken out may differ
    between data-parallel ranks (each owns other parameters); everything else must agree."""
    return {k: v for k, v in common.items() if k != "optimizer"}


# ----------------------------------------------------------------------------------------------
# Saving


class Checkpointer:
    """Saves the checkpoints of one run directory: sync or async, atomic, keeping the last K.

    ``save`` and ``poll``/``wait`` are collective (every rank calls them at the same step). An async
    save blocks training for the snapshot of this rank's tensors (checkpoint_writer.Snapshot) and
    is written by a thread. At most one async save is in flight: a new save first waits for the
    previous one, so there is one snapshot. A writer that fails, or has not finished
    ``write_timeout_s`` after a save started waiting for it, ends in a ConfigError (one line).
    Building one makes megatron's writers report in this process (checkpoint_writer.
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
                    newest = _complete_checkpoints(self.root)[0]
                    _write_atomically(self.root / LATEST, newest.name + "\n")
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
        model_sd = _model_sharded_state_dict(state.model)
        sharded: dict[str, Any] = dict(model_sd)
        parts = {"optimizer": False, "ema": state.ema is not None, "scheduler": state.scheduler is not None}
        if state.ema is not None:
            sharded.update(state.ema.sharded_state_dict(model_sd))
        sharded = _fsdp_rows(sharded)
        if state.optimizer is not None and _optimizer_has_state(state.optimizer):
            sharded["optimizer"] = _optimizer_sharded_state_dict(state.optimizer, model_sd)
            parts["optimizer"] = True
        if state.scheduler is not None:
            sharded["scheduler"] = state.scheduler.state_dict()
        sharded["rng_state"] = _rng_sharded(_rng_state())
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
                preprocess_common_before_consistancy_check=_drop_optimizer_from_consistency_check)
            # The loader state differs per DP rank and is the same on its TP/CP/PP peers: one file each.
            if loader_state is not None and parallel_state.get_tensor_model_parallel_rank() == 0 \
                    and parallel_state.get_pipeline_model_parallel_rank() == 0 \
                    and parallel_state.get_context_parallel_rank() == 0:
                _write_atomically(loader_state_path(partial, parallel_state.get_data_parallel_rank()),
                                  json.dumps(loader_state))
            manifest = {"format": FORMAT, "step": step, "layout": layout(), "parts": parts, "config": config}
            finalize = functools.partial(self._finalize, partial, final, manifest)
            # The writer hashes the tensor files it wrote, once they are written.
            request = in_writer_thread(request, functools.partial(_record_checksums, partial, torch.distributed.get_rank()))
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
                self._needed = _checkpoint_bytes(read_manifest(latest))
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
            _write_atomically(partial / MANIFEST, json.dumps({**manifest, "files": files}, indent=1))
            self._needed = _checkpoint_bytes({"files": files})  # what the next save will take
            if final.exists():  # the same step saved again (a run resumed from before it)
                shutil.rmtree(final)
            os.replace(partial, final)
            _fsync_dir(final.parent)
            _write_atomically(self.root / LATEST, final.name + "\n")
            self._prune()
            log.info("checkpoint %s complete", final)
        barrier()

    def _prune(self) -> None:
        if not self.keep_last:
            return
        for old in _complete_checkpoints(self.root)[self.keep_last:]:
            shutil.rmtree(old, ignore_errors=True)


def _structure_of(sharded: ShardedBase) -> tuple[Any, ...]:
    """What of a ShardedTensor or ShardedObject shapes a checkpoint's plan (not its values)."""
    if isinstance(sharded, ShardedTensor):
        return ("tensor", sharded.key, str(sharded.dtype), sharded.local_shape, sharded.global_shape,
                sharded.global_offset, sharded.axis_fragmentations, sharded.replica_id, sharded.prepend_axis_num)
    return (type(sharded).__name__, sharded.key, getattr(sharded, "global_shape", None),
            getattr(sharded, "global_offset", None), sharded.replica_id)


def file_crc32(path: Path) -> str:
    """CRC32 of a file's bytes (zlib's, the fast hash the standard library has), as 8 hex digits.
    Reads into one reused buffer; zlib releases the GIL while it hashes, so files hash in parallel
    threads."""
    crc = 0
    buffer = bytearray(_HASH_CHUNK)
    view = memoryview(buffer)
    with open(path, "rb", buffering=0) as f:
        while n := f.readinto(buffer):
            crc = zlib.crc32(view[:n], crc)
    return f"{crc:08x}"


def _record_checksums(directory: Path, rank: int) -> None:
    """Write the CRC32 of the tensor files ``rank`` wrote (torch_dist names them
    ``__<rank>_<n>.distcp``, one per writer thread) to its CHECKSUMS file, for the manifest."""
    files = sorted(directory.glob(f"__{rank}_*.distcp"))
    with ThreadPoolExecutor(max_workers=max(1, min(len(files), os.cpu_count() or 1))) as pool:
        hashes = dict(zip((p.name for p in files), pool.map(file_crc32, files)))
    _write_atomically(directory / CHECKSUMS.format(rank=rank), json.dumps(hashes))


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


def _checkpoint_bytes(manifest: dict[str, Any]) -> int:
    """What a checkpoint takes on disk: the sizes of the files its manifest lists (format 1
    lists bare sizes)."""
    return sum(entry["size"] if isinstance(entry, dict) else entry for entry in manifest["files"].values())


def _write_atomically(path: Path, text: str) -> None:
    tmp = path.with_name(f".{path.name}.tmp{os.getpid()}")
    with open(tmp, "w") as f:
        f.write(text)
        f.flush()
        os.fsync(f.fileno())
    os.replace(tmp, path)


def _fsync_dir(path: Path) -> None:
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def save_checkpoint(run_dir: Path, step: int, model: list[torch.nn.Module], config: dict[str, Any],
                    loader_state: dict[str, Any] | None = None) -> Path:
    """Save the weights alone (synchronously), e.g. an imported or freshly converted model."""
    Checkpointer(run_dir).save(step, TrainingState(model), config, loader_state=loader_state, blocking=True)
    return checkpoint_dir(run_dir, step)


# ----------------------------------------------------------------------------------------------
# Validating and choosing


def read_manifest(path: Path) -> dict[str, Any]:
    return json.loads((Path(path) / MANIFEST).read_text())


def validate_checkpoint(path: Path) -> str | None:
    """Why ``path`` is not a complete checkpoint (None when it is), from its manifest alone: the
    manifest is missing or unreadable, or a file it lists is missing or has another size
    (truncated). ``verify_checkpoint`` checks the contents too."""
    path = Path(path)
    try:
        manifest = read_manifest(path)
    except FileNotFoundError:
        return f"no {MANIFEST} (an incomplete save)"
    except (OSError, ValueError) as err:
        return f"{MANIFEST} is unreadable ({err.__class__.__name__})"
    if manifest.get("format") not in FORMATS or not isinstance(manifest.get("files"), dict):
        return f"{MANIFEST} is not a {FORMAT} manifest"
    for name, entry in manifest["files"].items():
        size = entry["size"] if isinstance(entry, dict) else entry
        file = path / name
        if not file.is_file():
            return f"{name} is missing"
        actual = file.stat().st_size
        if actual != size:
            return f"{name} has {actual} bytes, the manifest says {size} (truncated)"
    return None


def _verify_share(path: Path, rank: int, world: int) -> str | None:
    """Contents check of this rank's share of a complete checkpoint's files (every ``world``-th,
    from ``rank``): their CRC32 against the manifest; rank 0 also reads common.pt and .metadata
    back (a checkpoint of format /1 has no checksums)."""
    files = read_manifest(path)["files"]
    for name in sorted(files)[rank::world]:
        entry = files[name]
        if isinstance(entry, dict) and file_crc32(path / name) != entry["crc32"]:
            return f"{name} does not match its checksum (corrupt)"
    if rank == 0:
        try:
            dist_checkpointing.load_common_state_dict(str(path))
        except Exception as err:  # noqa: BLE001 - any failure to unpickle means unusable
            return f"common.pt does not load ({err.__class__.__name__})"
        try:
            dist_checkpointing.load_tensors_metadata(str(path))
        except Exception as err:  # noqa: BLE001
            return f".metadata does not load ({err.__class__.__name__})"
    return None


def verify_checkpoint(path: Path) -> str | None:
    """Why the complete checkpoint ``path`` cannot be trusted (None when it can): a file whose
    contents do not match the manifest's checksum, or common state or tensor metadata that does
    not load. Collective: the ranks split the files and agree on the answer."""
    rank, world = torch.distributed.get_rank(), torch.distributed.get_world_size()
    reasons: list[str | None] = [None] * world
    torch.distributed.all_gather_object(reasons, _verify_share(Path(path), rank, world))
    return next((r for r in reasons if r is not None), None)


def check_compatible(manifest: dict[str, Any], cfg: Config, path: Path,
                     fields: Sequence[str] = SHAPE_FIELDS) -> None:
    """Refuse, in one line, a checkpoint saved for a model of another shape (``fields`` differ)."""
    saved = {**NEWER_SHAPE_FIELDS, **manifest.get("config", {}).get("model", {})}
    current = dataclasses.asdict(cfg.model)
    diffs = [f"{k} {saved.get(k)} (checkpoint) vs {current[k]} (this run)" for k in fields
             if saved.get(k) != current[k]]
    if diffs:
        raise ConfigError(f"{path}: saved for another model: model.{'; model.'.join(diffs)}; resume it with "
                          f"the same model.* shape, or start a new train.run_dir")


def newest_valid_checkpoint(root: Path, quarantine: bool = False) -> tuple[Path | None, list[str]]:
    """The newest complete checkpoint under ``root`` (a run dir or its ``checkpoints/``) and one
    line per newer one that is not. ``quarantine`` renames those to ``iter_N.invalid-<time>`` so
    that keep_last never counts them (done only in the run's own directory)."""
    root = Path(root)
    if (root / "checkpoints").is_dir():
        root = root / "checkpoints"
    notes = []
    for candidate in _complete_checkpoints(root):
        reason = validate_checkpoint(candidate)
        if reason is None:
            return candidate, notes
        if quarantine:
            reason += f", moved to {_quarantine(candidate).name}"
        notes.append(f"{candidate.name}: {reason}")
    return None, notes


def choose_resume_checkpoint(run_dir: Path, cfg: Config) -> Path | None:
    """The checkpoint this run starts from (None: from scratch), per ``checkpoint.resume``.

    The run directory's own newest sound checkpoint always wins when resuming is on (so a run
    restarted by torchrun or requeued by SLURM continues where it stopped); otherwise ``auto``
    starts fresh and a path names the checkpoint (or the run directory) to start from. A
    checkpoint of the run's own that is incomplete or fails ``verify_checkpoint`` is moved aside
    and the next older one is tried; one line says which were passed over and where the run
    falls back to. A named checkpoint that fails is refused in one line. Collective: rank 0
    chooses, all ranks verify.
    """
    notes: list[str] = []
    while True:
        decision: list[Any] = [None, None]  # (path, error)
        if torch.distributed.get_rank() == 0:
            try:
                chosen, passed_over = _choose(Path(run_dir), cfg)
                decision[0] = chosen
                notes += passed_over
            except ConfigError as err:
                decision[1] = str(err)
        torch.distributed.broadcast_object_list(decision, src=0)
        if decision[1] is not None:
            raise ConfigError(decision[1])
        chosen = None if decision[0] is None else Path(decision[0])
        reason = None if chosen is None else verify_checkpoint(chosen)
        if reason is None:
            break
        if chosen.parent != Path(run_dir) / "checkpoints":
            raise ConfigError(f"checkpoint.resume={chosen}: {reason}; pass a sound checkpoint")
        if torch.distributed.get_rank() == 0:
            notes.append(f"{chosen.name}: {reason}, moved to {_quarantine(chosen).name}")
        barrier()
    if notes:
        where = f"falling back to {chosen}" if chosen is not None else f"starting from scratch ({run_dir} has none left)"
        log.warning("%s; %s", "; ".join(f"checkpoint {n}" for n in notes), where)
    if chosen is not None:
        check_compatible(read_manifest(chosen), cfg, chosen)
    return chosen


def _quarantine(checkpoint: Path) -> Path:
    """Move a checkpoint that must not be loaded aside (keep_last never counts it, nothing loads
    it) and point ``latest`` at the newest checkpoint left."""
    moved = checkpoint.with_name(f"{checkpoint.name}.invalid-{time.strftime('%Y%m%d-%H%M%S')}")
    checkpoint.rename(moved)
    remaining = _complete_checkpoints(checkpoint.parent)
    if remaining:
        _write_atomically(checkpoint.parent / LATEST, remaining[0].name + "\n")
    else:
        (checkpoint.parent / LATEST).unlink(missing_ok=True)
    return moved


def _choose(run_dir: Path, cfg: Config) -> tuple[str | None, list[str]]:
    """Rank 0's choice for choose_resume_checkpoint, by the manifests alone: the checkpoint and
    one note per newer checkpoint of the run's own that was incomplete (moved aside)."""
    resume = cfg.checkpoint.resume
    if resume == "":
        if _complete_checkpoints(run_dir / "checkpoints"):
            log.warning("checkpoint.resume='': starting from scratch although %s holds checkpoints",
                        run_dir / "checkpoints")
        return None, []
    own, notes = newest_valid_checkpoint(run_dir, quarantine=True)
    if own is not None or resume == "auto":
        if own is not None and resume != "auto":
            log.info("%s holds checkpoints of its own: continuing from %s (not checkpoint.resume=%s)",
                     run_dir, own.name, resume)
        return (None if own is None else str(own)), notes
    given = Path(resume)
    if checkpoint_step(given) is not None or (given / MANIFEST).is_file():
        reason = validate_checkpoint(given)
        if reason is not None:
            raise ConfigError(f"checkpoint.resume={given}: {reason}; pass a complete checkpoint")
        return str(given), notes
    chosen, others = newest_valid_checkpoint(given)
    if chosen is None:
        raise ConfigError(f"checkpoint.resume={given}: no complete checkpoint there"
                          + (f" ({'; '.join(others)})" if others else ""))
    return str(chosen), notes


# ----------------------------------------------------------------------------------------------
# Loading


def load_checkpoint(path: Path, state: TrainingState) -> dict[str, Any]:
    """Load every part of ``state`` that ``path`` holds, resharding weights, optimizer and EMA to
    this layout. RNG states are restored only in the layout they were saved in. Returns the common
    part: step, config, train_state, and ``same_layout``."""
    path = Path(path)
    manifest = read_manifest(path)
    same_layout = manifest["layout"] == layout()
    model_sd = _model_sharded_state_dict(state.model)
    template: dict[str, Any] = dict(model_sd)
    ema_template: dict[str, ShardedTensor] = {}
    if state.ema is not None and manifest["parts"]["ema"]:
        ema_template = state.ema.sharded_state_dict(model_sd)
        template.update(ema_template)
    template = _fsdp_rows(template)
    has_ema = bool(ema_template)
    ema_template = {key: template[key] for key in ema_template if key in template}
    load_optimizer = state.optimizer is not None and manifest["parts"]["optimizer"]
    parts = _optimizer_parts(state.optimizer) if load_optimizer else []
    plain = load_optimizer and not any(isinstance(p, DistributedOptimizer) for p in parts)
    legacy = load_optimizer and _saved_by_megatrons_plain_optimizer(path)
    fsdp = any(is_sharded(param) for param in _stage(state.model).parameters())
    if legacy and (fsdp or not plain):
        raise ConfigError(f"{path}: its optimizer state is megatron's plain-optimizer format, which only a run "
                          f"with optim.distributed_optimizer=false and parallel.fsdp=false reads; resume with "
                          f"those, or start a new optimizer from its weights with checkpoint.init_from={path}")
    if plain and not legacy:
        (part,) = parts
        template["optimizer"] = _plain_fully_reshardable(part, model_sd, loading=True)
    elif load_optimizer:
        optimizer = _unwrapped(state.optimizer)
        _prepare_optimizer_for_loading(optimizer)
        template["optimizer"] = optimizer.sharded_state_dict(model_sd, is_loading=True,
                                                             metadata=_optimizer_metadata())
    if same_layout:
        template["rng_state"] = _rng_sharded(_rng_state())

    loaded = dist_checkpointing.load(template, str(path))

    _load_weights(state.model, loaded, MODEL_PREFIX)
    if plain and not legacy:
        _load_plain_optimizer(part, loaded["optimizer"])
    elif load_optimizer:
        _unwrapped(state.optimizer).load_state_dict(loaded["optimizer"])
    if state.scheduler is not None and "scheduler" in loaded:
        state.scheduler.load_state_dict(loaded["scheduler"])
    with torch.no_grad():
        for key, sharded in ema_template.items():
            sharded.data.copy_(loaded[key])
    if state.ema is not None and not has_ema:
        state.ema.restart()
        log.info("%s has no EMA: the EMA starts from its weights", path.name)
    if same_layout:
        _set_rng_state(loaded["rng_state"])
    else:
        log.info("resharding %s from %s to %s: weights, optimizer and EMA are exact; RNG states restart "
                 "from the seed", path.name, _describe(manifest["layout"]), _describe(layout()))
    return {"step": loaded["step"], "config": loaded["config"], "train_state": loaded.get("train_state", {}),
            "same_layout": same_layout}


def restore(path: Path, state: TrainingState, guard: Any, loader: Any) -> tuple[int, int]:
    """Resume a run: load checkpoint ``path`` into the training state, the step guard
    (resilience.StepGuard) and the data loader (data.pipeline.PackedBatches); returns (step,
    consumed samples). The loader continues exactly when the data-parallel size is the one it was
    saved with; otherwise it starts over (one line says so)."""
    info = load_checkpoint(path, state)
    train_state = info["train_state"]
    if "guard" in train_state:
        guard.load_state_dict(train_state["guard"])
    saved_dp = read_manifest(path)["layout"]["dp"]
    loader_state = load_loader_state(path, parallel_state.get_data_parallel_rank())
    if saved_dp != parallel_state.get_data_parallel_world_size():
        log.warning("%s was saved with dp=%d, this run has dp=%d: the data order starts over",
                    path.name, saved_dp, parallel_state.get_data_parallel_world_size())
    elif loader_state is None:
        log.warning("%s holds no data loader state: the data order starts over", path.name)
    else:
        loader.load_state_dict(loader_state)
    log.info("resumed from %s: step %d, %d samples consumed", path, info["step"],
             train_state.get("consumed_samples", 0))
    return int(info["step"]), int(train_state.get("consumed_samples", 0))


def _describe(lay: dict[str, int]) -> str:
    return " ".join(f"{k}={v}" for k, v in lay.items())


def _prepare_optimizer_for_loading(optimizer: Any) -> None:
    """A distributed optimizer builds its loading template from its own state, which a fresh one
    lacks: megatron's dummy step creates it (the values are then overwritten by the load)."""
    for part in _optimizer_parts(optimizer):
        if isinstance(part, DistributedOptimizer) and not part.optimizer.state:
            part._init_optimizer_states_with_dummy_values()


def _load_weights(model: list[torch.nn.Module], loaded: dict[str, Any], prefix: str,
                  new_layers: tuple[str, ...] = ()) -> None:
    stage = _stage(model)
    weights = {_local_name(stage, k[len(prefix):]): v for k, v in loaded.items()
               if isinstance(k, str) and k.startswith(prefix)}
    params = dict(stage.named_parameters())
    if any(is_sharded(param) for param in params.values()):  # parallel.fsdp: this rank's rows of each
        missing = []
        with torch.no_grad():
            for name, param in params.items():
                if name in weights:
                    local(param).copy_(weights[name])
                elif local(param).numel():
                    missing.append(name)
    else:
        missing, _ = stage.load_state_dict(weights, strict=False)
    missing = [k for k in missing if not k.endswith("_extra_state") and not k.startswith(new_layers)]
    if missing:
        raise ConfigError(f"the checkpoint lacks weights for {missing[:3]}: it holds another model.* shape; "
                          "use a checkpoint of this model")


def _local_name(stage: Any, global_key: str) -> str:
    if global_key.startswith("layers."):
        _, idx, rest = global_key.split(".", 2)
        return f"layers.{int(idx) - stage.layer_offset}.{rest}"
    return global_key


def load_model_weights(path: Path, model: list[torch.nn.Module], ema: bool = False,
                       new_layers: tuple[str, ...] = ()) -> dict[str, Any]:
    """Load only the weights (any TP/PP layout), or with ``ema`` the EMA weights in their place;
    returns step and config. Parameters whose names start with one of ``new_layers`` may be
    missing from the checkpoint and then keep their current values."""
    model_sd = _fsdp_rows(_model_sharded_state_dict(model))
    if new_layers:
        saved = dist_checkpointing.load_tensors_metadata(str(path))
        model_sd = {k: v for k, v in model_sd.items() if not (
            isinstance(v, ShardedTensor) and v.key.startswith(tuple(MODEL_PREFIX + n for n in new_layers))
            and (EMA_PREFIX + v.key[len(MODEL_PREFIX):] if ema else v.key) not in saved)}
    if ema:
        if not read_manifest(path)["parts"]["ema"]:
            raise ConfigError(f"{path}: no EMA weights in this checkpoint (checkpoint.ema_decay was 0); "
                              "load its trained weights instead (checkpoint.init_from_ema=false)")
        template = {EMA_PREFIX + k[len(MODEL_PREFIX):]: dataclasses.replace(
            sh, key=EMA_PREFIX + sh.key[len(MODEL_PREFIX):], data=torch.empty_like(sh.data, dtype=torch.float32),
            dtype=torch.float32) for k, sh in model_sd.items() if isinstance(sh, ShardedTensor)}
    else:
        template = dict(model_sd)
    template["step"] = 0
    template["config"] = {}
    loaded = dist_checkpointing.load(template, str(path))
    _load_weights(model, loaded, EMA_PREFIX if ema else MODEL_PREFIX, new_layers)
    return {"step": loaded["step"], "config": loaded["config"]}


def init_weights_from(path: Path, state: TrainingState, cfg: Config, ema: bool = False) -> Path:
    """Finetuning: a fresh run's weights from ``path`` (a run directory or checkpoints/iter_N),
    optimizer, schedule and step starting anew. Layers of this model that the checkpoint lacks
    (NEW_LAYERS, e.g. the I2V condition layer of a T2V checkpoint) keep their initialisation; the
    optimizer's fp32 main weights and the EMA restart from the loaded weights."""
    try:
        checkpoint = resolve_checkpoint(Path(path))
    except FileNotFoundError as err:
        raise ConfigError(f"checkpoint.init_from: {err}") from None
    reason = validate_checkpoint(checkpoint) or verify_checkpoint(checkpoint)
    if reason is not None:
        raise ConfigError(f"checkpoint.init_from={path}: {reason}; pass a sound checkpoint")
    # The I2V layer may be new (NEW_LAYERS): every other shape must match.
    check_compatible(read_manifest(checkpoint), cfg, checkpoint, fields=[f for f in SHAPE_FIELDS if f != "i2v"])
    load_model_weights(checkpoint, state.model, ema=ema, new_layers=NEW_LAYERS)
    _unwrapped(state.optimizer).reload_model_params()
    if state.ema is not None:
        state.ema.restart()
    return checkpoint
