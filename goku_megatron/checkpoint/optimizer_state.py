"""The optimizer's part of a checkpoint: megatron's ``fully_reshardable`` format for every optimizer.

Whatever the optimizer (the distributed optimizer, plain DDP's, FSDP's), a checkpoint holds its
state as ``optimizer.state.{param,exp_avg,exp_avg_sq}.<weight key>`` sharded like the weight, and
the param groups with Adam's step as the common part, so a checkpoint of any of them resumes
under any other and any layout (docs/checkpointing.md, "Optimizer state"). Here: writing it
without gathering (``optimizer_sharded_state_dict``), reading it into a plain optimizer
(``plain_fully_reshardable``, ``load_plain_optimizer``), Adam's step, and megatron's older
plain-optimizer format (``saved_by_megatrons_plain_optimizer``).
"""

from __future__ import annotations

import dataclasses
import math
from pathlib import Path
from typing import Any

import torch
from megatron.core import dist_checkpointing
from megatron.core.dist_checkpointing import ShardedTensor
from megatron.core.dist_checkpointing.dict_utils import nested_values
from megatron.core.optimizer.distrib_optimizer import DistributedOptimizer

from goku_megatron.model.fsdp import local, local_shard, replica_index
from goku_megatron.platform import local_device


def unwrapped(optimizer: Any) -> Any:
    """megatron's optimizer inside resilience.SkipNonFiniteSteps."""
    return getattr(optimizer, "inner", optimizer)


def optimizer_parts(optimizer: Any) -> list[Any]:
    optimizer = unwrapped(optimizer)
    return list(getattr(optimizer, "chained_optimizers", [optimizer]))


def optimizer_metadata() -> dict[str, Any]:
    """How the distributed optimizer lays out its state: ``fully_reshardable`` (per parameter, by
    global name: reshards over TP/PP/DP). megatron builds it this way for loading (and for the
    plain optimizer); ``optimizer_sharded_state_dict`` writes it without megatron's gather."""
    return {"distrib_optim_sharding_type": "fully_reshardable",
            "distrib_optim_fully_reshardable_mem_efficient": torch.distributed.get_backend() == "gloo",
            "chained_optim_avoid_prefix": True}


def optimizer_sharded_state_dict(optimizer: Any, model_sd: dict[str, Any]) -> dict[str, Any]:
    """The optimizer's sharded state dict for saving, in megatron's ``fully_reshardable`` format
    whatever the optimizer: a distributed optimizer's part is ``_own_shards_fully_reshardable``
    (each rank writes its own shards, nothing is gathered), a plain optimizer's (DDP without the
    distributed optimizer, or FSDP) is ``plain_fully_reshardable``. The structure is megatron's
    ChainedOptimizer's with ``chained_optim_avoid_prefix``, so a checkpoint of any of them loads
    into any other."""
    inner, parts = unwrapped(optimizer), optimizer_parts(optimizer)
    if not any(isinstance(part, DistributedOptimizer) for part in parts):
        (part,) = parts
        return plain_fully_reshardable(part, model_sd)
    if len(parts) > 1 and hasattr(inner, "_synchronize_steps"):
        inner._synchronize_steps()  # as megatron's ChainedOptimizer does before a save
    states = [_own_shards_fully_reshardable(part, model_sd) if isinstance(part, DistributedOptimizer)
              else part.sharded_state_dict(model_sd, metadata=optimizer_metadata()) for part in parts]
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


def plain_fully_reshardable(part: Any, model_sd: dict[str, Any], loading: bool = False) -> dict[str, Any]:
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


def load_plain_optimizer(part: Any, loaded: dict[str, Any]) -> None:
    """Finish loading ``plain_fully_reshardable``: the tensors were read into the optimizer's
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


def saved_by_megatrons_plain_optimizer(path: Path) -> bool:
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


def optimizer_has_state(optimizer: Any) -> bool:
    """Whether every rank's optimizer has taken a step (before that there is nothing to save, and a
    fresh optimizer is exactly what a resume would restore). Collective."""
    has = all(len(p.optimizer.state) > 0 for p in optimizer_parts(optimizer) if p.optimizer is not None)
    flag = torch.tensor([int(has)], dtype=torch.int32, device=local_device())
    torch.distributed.all_reduce(flag, op=torch.distributed.ReduceOp.MIN)
    return bool(flag.item())


def drop_optimizer_from_consistency_check(common: dict[str, Any]) -> dict[str, Any]:
    """What remains of the distributed optimizer's state once its tensors are taken out may differ
    between data-parallel ranks (each owns other parameters); everything else must agree."""
    return {k: v for k, v in common.items() if k != "optimizer"}


def prepare_optimizer_for_loading(optimizer: Any) -> None:
    """A distributed optimizer builds its loading template from its own state, which a fresh one
    lacks: megatron's dummy step creates it (the values are then overwritten by the load)."""
    for part in optimizer_parts(optimizer):
        if isinstance(part, DistributedOptimizer) and not part.optimizer.state:
            part._init_optimizer_states_with_dummy_values()
