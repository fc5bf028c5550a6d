"""torchrun worker for test_sample.py: in-training samples (sample.LiveSampler) from the model in
its parallel layout, then a checkpoint of the same weights for goku-sample to compare with.

Usage: torchrun --nproc-per-node N tests/live_sample_worker.py OUT_DIR key=value ...
Writes OUT_DIR/pixels.pt (rank 0) and the checkpoint under OUT_DIR/checkpoints.
"""

from __future__ import annotations

import sys
from pathlib import Path

import torch

PROMPTS = ["a red square moving left", "a blue circle moving up"]
SPEC = dict(frames=4, height=8, width=8, steps=3, cfg_scale=3.0, seed=5)


def main() -> None:
    from goku_megatron import cpu_compat
    from goku_megatron.checkpoint import save_checkpoint
    from goku_megatron.config import load_config, validate
    from goku_megatron.platform import world_size_from_env
    from goku_megatron.sample import LiveSampler, SampleSpec
    from goku_megatron.train import setup

    out_dir = Path(sys.argv[1])
    cpu_compat.apply()
    cfg = load_config("toy", ["model.zero_init=false", "data.toy_size=8", "data.toy_frames=4", *sys.argv[2:]])
    validate(cfg, world_size_from_env())
    training = setup(cfg)
    pixels = LiveSampler(cfg, training.model, torch.device("cpu")).sample(PROMPTS, SampleSpec(**SPEC))
    if torch.distributed.get_rank() == 0:
        out_dir.mkdir(parents=True, exist_ok=True)
        torch.save(pixels, out_dir / "pixels.pt")
    save_checkpoint(out_dir, 1, training.model, cfg.to_dict())
    torch.distributed.destroy_process_group()


if __name__ == "__main__":
    main()
