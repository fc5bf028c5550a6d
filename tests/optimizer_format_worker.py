"""torchrun worker for test_checkpoint_dist.py: the distributed optimizer's checkpoint written two
ways, by every rank from its own shards (goku's) and gathered to data-parallel rank 0 (megatron's
``fully_reshardable`` sharded_state_dict), after two optimizer steps.

Usage: torchrun --nproc-per-node N tests/optimizer_format_worker.py OUT_DIR key=value ...
Writes OUT_DIR/own and OUT_DIR/gathered (run directories with checkpoint 1 each).
"""

from __future__ import annotations

import sys
from pathlib import Path

import torch


def main() -> None:
    from goku_megatron import checkpoint, cpu_compat
    from goku_megatron.checkpoint import optimizer_state
    from goku_megatron.checkpoint import save as checkpoint_save
    from goku_megatron.config import load_config, validate
    from goku_megatron.platform import shutdown_distributed, world_size_from_env
    from goku_megatron.train import setup

    out = Path(sys.argv[1])
    cpu_compat.apply()
    cfg = load_config("toy", sys.argv[2:])
    validate(cfg, world_size_from_env())
    training = setup(cfg)
    for seed in (0, 1):  # gradients of the whole model, the same on every rank
        gen = torch.Generator().manual_seed(seed)
        for p in training.model[0].parameters():
            p.main_grad.copy_(torch.randn(p.shape, generator=gen))
        training.optimizer.step()
    state = checkpoint.TrainingState(training.model, training.optimizer, training.scheduler)
    checkpoint.Checkpointer(out / "own").save(1, state, cfg.to_dict(), blocking=True)
    checkpoint_save.optimizer_sharded_state_dict = lambda optimizer, model_sd: optimizer_state.unwrapped(
        optimizer).sharded_state_dict(model_sd, metadata=optimizer_state.optimizer_metadata())
    checkpoint.Checkpointer(out / "gathered").save(1, state, cfg.to_dict(), blocking=True)
    shutdown_distributed()


if __name__ == "__main__":
    main()
