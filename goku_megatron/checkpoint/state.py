"""What a checkpoint holds of a training process, and this rank's view of it.

``TrainingState`` names the parts (model, optimizer, LR schedule, EMA); the model's weights are
described by global name and offset (``model_sharded_state_dict``: every layout reads every
other's), under FSDP as this rank's rows (``fsdp_rows``). RNG states are per rank and belong to
one layout (``rng_sharded``). The optimizer's part is optimizer_state.py's.
"""

from __future__ import annotations

import random
from dataclasses import dataclass
from typing import Any, Callable

import numpy as np
import torch
from megatron.core import parallel_state
from megatron.core.dist_checkpointing import ShardedObject, ShardedTensor
from megatron.core.tensor_parallel import get_cuda_rng_tracker

from goku_megatron.ema import EMA, MODEL_PREFIX
from goku_megatron.model.fsdp import describe_weights, local_shard, replica_index
from goku_megatron.model.goku import iter_stage_models
from goku_megatron.platform import has_cuda


@dataclass
class TrainingState:
    """The parts of a training process that a checkpoint covers; all but the model are optional."""

    model: list[torch.nn.Module]
    optimizer: Any = None
    scheduler: Any = None
    ema: EMA | None = None


def parallel_layout() -> dict[str, int]:
    """This process group's parallel layout, as recorded in a checkpoint's manifest."""
    return {"tp": parallel_state.get_tensor_model_parallel_world_size(),
            "pp": parallel_state.get_pipeline_model_parallel_world_size(),
            "cp": parallel_state.get_context_parallel_world_size(),
            "dp": parallel_state.get_data_parallel_world_size(),
            "world_size": torch.distributed.get_world_size()}


def stage_of(model: list[torch.nn.Module]) -> Any:
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


def trained(key: str, param: torch.nn.Parameter | None) -> bool:
    """The weights a checkpoint holds: those that train, with every entry that is not a weight
    (TE's extra state). A LoRA run's frozen base is not saved again in each of its checkpoints: the
    manifest names the base it came from (``base``)."""
    return param is None or param.requires_grad


def model_sharded_state_dict(model: list[torch.nn.Module],
                             select: Callable[[str, torch.nn.Parameter | None], bool] = trained) -> dict[str, Any]:
    """This rank's stage by global key (``model.<global name>``): the entries ``select`` keeps,
    given each entry's key and its parameter (None for an entry that is not a weight)."""
    gather_weights(model)
    stage = stage_of(model)
    params = {MODEL_PREFIX + stage.global_name(n): p for n, p in stage.named_parameters()}
    sharded = describe_weights(stage.sharded_state_dict(prefix=MODEL_PREFIX), params)
    return {name: entry for name, entry in sharded.items()
            if not hasattr(entry, "key") or select(entry.key, params.get(entry.key))}


def fsdp_rows(sharded: dict[str, Any]) -> dict[str, Any]:
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


def rng_state() -> dict[str, Any]:
    return {"python": random.getstate(), "numpy": np.random.get_state(), "torch": torch.get_rng_state(),
            "cuda": torch.cuda.get_rng_state() if has_cuda() else None,
            "tracker": {k: v.clone() for k, v in get_cuda_rng_tracker().get_states().items()}}


def set_rng_state(state: dict[str, Any]) -> None:
    random.setstate(state["python"])
    np.random.set_state(state["numpy"])
    torch.set_rng_state(state["torch"])
    if state["cuda"] is not None and has_cuda():
        torch.cuda.set_rng_state(state["cuda"])
    get_cuda_rng_tracker().set_states(state["tracker"])


def rng_sharded(state: dict[str, Any]) -> ShardedObject:
    """One entry per global rank (RNG states are rank-local; they only make sense in one layout)."""
    rank, world = torch.distributed.get_rank(), torch.distributed.get_world_size()
    return ShardedObject("rng_state", state, (world,), (rank,), replica_id=0)
