"""torchrun worker for test_planner.py: what a rank of an FSDP run of the tiny Goku model holds.

Usage: torchrun --nproc-per-node N tests/fsdp_memory_worker.py OUT_DIR key=value ...
One optimizer step (fp32, as on every CPU run) of the tiny model with parallel.fsdp=true, under
torch's FSDPMemTracker; every rank writes OUT_DIR/rank<r>.json with the bytes it holds afterwards
(its shards of the weights, of their gradients and of the Adam moments: DTensor.to_local()) and
the peak, over the tracker's snapshots at every FSDP unit's pre/post forward and backward, of what
FSDP2 holds unsharded (all-gathered weights and their buffers, unsharded gradients and
reduce-scatter buffers): what goku-plan's fsdp_memory estimates.
"""

from __future__ import annotations

import json
import sys
from pathlib import Path

import goku_megatron  # noqa: F401  before megatron-core: cpu_compat.disable_jit_fuser_on_cpu
import torch
from megatron.core import parallel_state
from torch.distributed._tools.fsdp2_mem_tracker import FSDPMemTracker, _FSDPRefType
from torch.distributed.tensor import DTensor

from dist_equivalence import CLIP_SHAPE, global_clips
from goku_megatron import cpu_compat
from goku_megatron.batch import num_tokens
from goku_megatron.config import load_config, validate
from goku_megatron.data.pipeline import noised_pack
from goku_megatron.data.text_encoder import HashTextEncoder
from goku_megatron.platform import shutdown_distributed, world_size_from_env
from goku_megatron.train import setup, train_step

GATHERED = (_FSDPRefType.UNSHARDED_PARAM, _FSDPRefType.UNSHARDED_GRAD, _FSDPRefType.ALL_GATHER,
            _FSDPRefType.REDUCE_SCATTER)


def local_bytes(tensor: torch.Tensor | None) -> int:
    """The bytes this rank stores of ``tensor`` (its shard of a DTensor)."""
    if tensor is None:
        return 0
    if isinstance(tensor, DTensor):
        tensor = tensor.to_local()
    return tensor.numel() * tensor.element_size()


def main() -> None:
    out_dir = Path(sys.argv[1])
    cpu_compat.apply()
    cfg = load_config(None, ["model.preset=tiny", "model.zero_init=false", "model.in_channels=3",
                             "train.micro_batch_size=2", "optim.warmup_steps=0",
                             "parallel.fsdp=true", "optim.distributed_optimizer=false", *sys.argv[2:]])
    validate(cfg, world_size_from_env())
    training = setup(cfg)
    model, optimizer = training.model, training.optimizer

    dp, dp_rank = parallel_state.get_data_parallel_world_size(), parallel_state.get_data_parallel_rank()
    mbs = cfg.train.micro_batch_size
    local = cfg.train.global_batch_size // dp
    clips = global_clips(1, cfg.train.global_batch_size)[dp_rank * local:(dp_rank + 1) * local]
    budget = mbs * num_tokens(CLIP_SHAPE, cfg.model.patch_size)
    encoder = HashTextEncoder(dim=cfg.model.text_dim, max_tokens=8)
    packs = [noised_pack(clips[i:i + mbs], 1, budget, cfg, encoder) for i in range(0, local, mbs)]

    tracker = FSDPMemTracker(model[0].module)  # the FSDP root: GokuModel under fully_shard
    with tracker:
        train_step(packs, model, optimizer, training.scheduler)
    gathered = max(sum(per_device.get(kind, 0) for kind in GATHERED)
                   for stats in tracker.memory_tracking.values()
                   for snapshots in stats.snapshots.values() for snapshot in snapshots
                   for per_device in snapshot.values())

    params = list(model[0].parameters())
    moments = [value for opt in getattr(optimizer, "chained_optimizers", [optimizer])
               for state in opt.optimizer.state.values() for key, value in state.items() if key != "step"]
    record = {"params": sum(local_bytes(p) for p in params), "grads": sum(local_bytes(p.grad) for p in params),
              "optimizer": sum(local_bytes(m) for m in moments), "gathered": gathered,
              "dtensors": all(isinstance(p, DTensor) for p in params)}
    (out_dir / f"rank{torch.distributed.get_rank()}.json").write_text(json.dumps(record))
    shutdown_distributed()


if __name__ == "__main__":
    main()
