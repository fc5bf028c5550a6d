"""Fully sharded data parallelism (parallel.fsdp): megatron-core's FSDP2 wrapper around GokuModel.

megatron-core offers two FSDPs. Megatron-FSDP (``use_megatron_fsdp``) keeps its own flat buffers
and CUDA streams in some hundred places; megatron's ``TorchFullyShardedDataParallel`` hands every
layer to torch's ``fully_shard`` (FSDP2), which runs on gloo and NCCL alike. goku uses the latter
(docs/parallelism.md, "Fully sharded data parallelism"), with three additions:

- each GokuLayer is its own FSDP unit (megatron's default set names only its GPT classes), so a
  layer's weights are all-gathered just before it runs and freed after;
- hybrid sharding (parallel.fsdp_shard_size): the wrapper shards over megatron's intra-instance
  DP x CP group, and a hook all-reduces every unit's reduce-scattered gradient shard over the
  inter-instance group (its replicas), as FSDP2's own HSDP would, inside the backward pass;
- ``finish_grad_sync`` accepts finalize_model_grads' ``force_all_reduce`` (megatron-core 0.16's
  base class does not, so finalize_model_grads fails on the plain wrapper).

Every weight, gradient and Adam state is then a DTensor sharded along dim 0 over the shard group
(torch.chunk's split: the first ranks hold ceil(rows / N) rows each). Checkpoints store the same
global tensors as every other layout and reshard between them (checkpoint/state.py): ``describe_weights``
gives each weight's checkpoint entry the DTensor and its tensor-parallel place, and ``local_shard``
cuts an entry to the rows this rank holds. (megatron-core 0.16 describes FSDP2 weights itself, but
as even splits over the whole DP x CP group: wrong for uneven rows and for hybrid sharding.)
"""

from __future__ import annotations

import dataclasses
import math
from typing import Any

import torch
from megatron.core import parallel_state
from megatron.core.dist_checkpointing import ShardedTensor
from megatron.core.distributed import TorchFullyShardedDataParallel, TorchFullyShardedDataParallelConfig
from megatron.core.transformer.transformer_config import TransformerConfig
from torch.distributed.fsdp import FSDPModule
from torch.distributed.tensor import DTensor

from goku_megatron.config import ParallelConfig
from goku_megatron.model.layer import GokuLayer


class ShardedDataParallel(TorchFullyShardedDataParallel):
    """GokuModel (or its Float16Module) sharded by FSDP2 over the DP x CP ranks, or hybrid:
    sharded inside megatron's distributed-optimizer instances, replicated across them."""

    def __init__(self, config: TransformerConfig, module: torch.nn.Module, parallel: ParallelConfig) -> None:
        hybrid = parallel_state.get_inter_distributed_optimizer_instance_group(check_initialized=False)
        self.replicas = hybrid.size() if hybrid is not None else 1
        shard_group = parallel_state.get_data_parallel_group(with_context_parallel=True,
                                                             partial_data_parallel=self.replicas > 1)
        ddp_config = TorchFullyShardedDataParallelConfig(
            reshard_after_forward=parallel.fsdp_reshard_after_forward, use_distributed_optimizer=False)
        super().__init__(config, ddp_config, module, sub_modules_to_wrap={GokuLayer}, process_group=shard_group)
        if self.replicas > 1:
            self._replica_group = hybrid
            for unit in self.module.modules():
                if isinstance(unit, FSDPModule):
                    unit.set_all_reduce_hook(self._average_over_replicas)

    def _average_over_replicas(self, grad_shard: torch.Tensor) -> None:
        """FSDP2 averaged the gradient over the shard group; average it over the replicas too, so
        every parameter ends with the mean over all DP x CP ranks, as megatron DDP's."""
        torch.distributed.all_reduce(grad_shard, group=self._replica_group)
        grad_shard.div_(self.replicas)

    def finish_grad_sync(self, force_all_reduce: bool = False) -> None:
        """Nothing left to do: FSDP2 reduce-scatters (and all-reduces over replicas) each layer's
        gradients during the backward pass."""


def is_sharded(tensor: Any) -> bool:
    return isinstance(tensor, DTensor)


def local(tensor: torch.Tensor) -> torch.Tensor:
    """This rank's rows of an FSDP-sharded tensor (a view: writing it writes the shard); any other
    tensor as it is."""
    return tensor.to_local() if isinstance(tensor, DTensor) else tensor


def row_range(tensor: DTensor) -> tuple[int, int]:
    """The rows [start, stop) of dim 0 that this rank holds: FSDP2 splits like torch.chunk."""
    mesh = tensor.device_mesh
    shards, rank = mesh.size(), mesh.get_local_rank()
    rows = tensor.shape[0]
    chunk = math.ceil(rows / shards)
    return min(rank * chunk, rows), min((rank + 1) * chunk, rows)


def describe_weights(sharded: dict[str, Any], params: dict[str, torch.nn.Parameter]) -> dict[str, Any]:
    """A model's sharded state dict with the entry of every FSDP weight (``params``: checkpoint key
    -> parameter) describing that DTensor whole: its tensor-parallel rank's full tensor, at its
    tensor-parallel offset, with the DTensor as data (the EMA and the optimizer find their entries
    by it). Other entries pass unchanged; ``local_shard`` later cuts each to this rank's rows."""
    fsdp = {key: param for key, param in params.items() if isinstance(param, DTensor)}
    if not fsdp:
        return sharded
    tp, tp_rank = parallel_state.get_tensor_model_parallel_world_size(), parallel_state.get_tensor_model_parallel_rank()
    out = dict(sharded)
    for name, entry in sharded.items():
        param = fsdp.pop(getattr(entry, "key", None), None)
        if param is None:
            continue
        if entry.prepend_axis_num:
            raise ValueError(f"FSDP checkpoint: {entry.key} has prepended axes, which goku's weights never have")
        shape, global_shape, offset = tuple(param.shape), list(param.shape), [0] * param.dim()
        if getattr(param, "tensor_model_parallel", False) and tp > 1:
            global_shape[param.partition_dim] *= tp
            offset[param.partition_dim] = tp_rank * shape[param.partition_dim]
        out[name] = dataclasses.replace(entry, data=param, dtype=param.dtype, local_shape=shape,
                                        global_shape=tuple(global_shape), global_offset=tuple(offset),
                                        axis_fragmentations=None)
    if fsdp:
        raise ValueError(f"FSDP checkpoint: no sharded state dict entry for {sorted(fsdp)[:3]}")
    return out


def local_shard(sharded: ShardedTensor, replica: int) -> ShardedTensor | None:
    """``sharded`` (a megatron ShardedTensor whose data is an FSDP DTensor) cut to this rank's rows,
    as an unevenly sharded ShardedTensor whose data is the rank's local view; None if the rank holds
    no rows of it. ``replica`` is the hybrid-FSDP replica index (0 without replicas): only replica 0
    writes a tensor, every replica may read it. An entry of any other tensor is returned as it is."""
    if not isinstance(sharded.data, DTensor):
        return sharded
    start, stop = row_range(sharded.data)
    if start == stop:
        return None
    axis = sharded.prepend_axis_num
    offset = list(sharded.global_offset)
    offset[axis] += start
    data = local(sharded.data)
    return dataclasses.replace(
        sharded, data=data, local_shape=tuple(data.shape), global_offset=tuple(offset), axis_fragmentations=None,
        replica_id=(*sharded.replica_id[:-1], replica) if isinstance(sharded.replica_id, tuple) else replica)


def replica_index() -> int:
    """This rank's hybrid-FSDP replica (0 without hybrid sharding)."""
    group = parallel_state.get_inter_distributed_optimizer_instance_group(check_initialized=False)
    return group.rank() if group is not None else 0
