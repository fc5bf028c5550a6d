"""Milliseconds per training step (forward + backward + AdamW) of a preset on this machine.

    python benchmarks/step_time.py                       # tiny preset, CPU
    python benchmarks/step_time.py model.preset=goku-1b train.micro_batch_size=1 --grid 4 16 16

Runs the real path (megatron schedules, DDP, optimizer) in one process on synthetic data and prints
the median over the timed steps. Not a test: figures depend on the machine.
"""

from __future__ import annotations

import argparse
import statistics
import time

import torch


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--grid", type=int, nargs=3, default=[4, 16, 16], metavar=("T", "H", "W"),
                        help="latent frames, height, width of each sample")
    parser.add_argument("--warmup", type=int, default=3)
    parser.add_argument("--steps", type=int, default=10)
    parser.add_argument("overrides", nargs="*")
    args = parser.parse_args()

    from goku_megatron import cpu_compat
    from goku_megatron.config import load_config, validate
    from goku_megatron.data.text_encoder import HashTextEncoder
    from goku_megatron.platform import has_cuda
    from goku_megatron.train import make_flow_batch, setup, split_microbatches, train_step

    cfg = load_config(None, ["train.global_batch_size=4", "train.micro_batch_size=4", *args.overrides])
    validate(cfg, 1, has_cuda=has_cuda())
    cpu_compat.apply()
    training = setup(cfg)
    backends, model = training.backends, training.model
    encoder = HashTextEncoder(dim=cfg.model.text_dim, max_tokens=cfg.data.max_text_tokens)
    device = torch.device("cuda" if backends.device == "cuda" else "cpu")
    b = cfg.train.global_batch_size
    shape = (cfg.model.in_channels, *args.grid)
    batch = {"pixels": torch.randn(b, *shape), "captions": ["a red square moving left"] * b,
             "keys": [str(i) for i in range(b)]}
    times = []
    for step in range(1, args.warmup + args.steps + 1):
        start = time.perf_counter()
        mbs = split_microbatches(make_flow_batch(batch, step, cfg, encoder, device), cfg.train.micro_batch_size)
        train_step(mbs, model, training.optimizer, training.scheduler, cfg)
        if device.type == "cuda":
            torch.cuda.synchronize()
        if step > args.warmup:
            times.append(time.perf_counter() - start)
    pt, ph, pw = cfg.model.patch_size
    tokens = (args.grid[0] // pt) * (args.grid[1] // ph) * (args.grid[2] // pw)
    print(f"preset={cfg.model.preset} device={backends.device} threads={torch.get_num_threads()} "
          f"batch={b} tokens/sample={tokens} params={sum(p.numel() for p in model[0].parameters()):,}")
    print(f"step_ms median={statistics.median(times) * 1e3:.1f} min={min(times) * 1e3:.1f} "
          f"max={max(times) * 1e3:.1f} over {len(times)} steps")


if __name__ == "__main__":
    main()
