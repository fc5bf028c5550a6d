"""torchrun worker for test_checkpoint_dist.py: load a checkpoint into this layout and save it again.

Usage: torchrun --nproc-per-node N tests/reshard_worker.py SRC_CHECKPOINT OUT_RUN_DIR key=value ...
The re-saved checkpoint holds what this layout loaded (weights, optimizer, EMA), so comparing its
tensors with SRC's shows whether resharding was exact.
"""

from __future__ import annotations

import sys
from pathlib import Path


def main() -> None:
    from goku_megatron import cpu_compat
    from goku_megatron.checkpoint import Checkpointer, TrainingState, load_checkpoint, read_manifest
    from goku_megatron.config import load_config, validate
    from goku_megatron.platform import shutdown_distributed, world_size_from_env
    from goku_megatron.train import setup

    src, out = Path(sys.argv[1]), Path(sys.argv[2])
    cpu_compat.apply()
    cfg = load_config("toy", sys.argv[3:])
    validate(cfg, world_size_from_env())
    training = setup(cfg)
    state = TrainingState(training.model, training.optimizer, training.scheduler, training.ema)
    info = load_checkpoint(src, state)
    checkpointer = Checkpointer(out)
    checkpointer.base = read_manifest(src).get("base")  # a LoRA checkpoint's frozen weights stay its base's
    checkpointer.save(info["step"], state, cfg.to_dict(), blocking=True)
    shutdown_distributed()


if __name__ == "__main__":
    main()
