"""Milliseconds per training step (forward + backward + AdamW) of a preset on this machine.

    python benchmarks/step_time.py                       # tiny preset, CPU
    python benchmarks/step_time.py model.preset=goku-1b train.micro_batch_size=1 --grid 4 16 16

Runs the path real training takes in one process on synthetic latents: each step's samples become
packs of micro_batch_size samples through the data pipeline's noised_pack (noise, timesteps,
caption dropout, Patch n' Pack), then train_step (megatron schedules, DDP, optimizer) runs them. It
prints the median over the timed steps, packing included. Not a test: figures depend on the
machine.
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
    from goku_megatron.batch import num_tokens
    from goku_megatron.config import load_config, validate
    from goku_megatron.data.encoders import run_text_encoder
    from goku_megatron.data.pipeline import Prepared, noised_pack
    from goku_megatron.platform import choose_backends, has_cuda
    from goku_megatron.train import setup, train_step

    cfg = load_config(None, ["train.global_batch_size=4", "train.micro_batch_size=4", *args.overrides])
    validate(cfg, 1, has_cuda=has_cuda())
    cpu_compat.apply()
    backends = choose_backends(cfg)
    training = setup(cfg, backends)
    model = training.model
    encoder = run_text_encoder(cfg)
    device = torch.device("cuda" if backends.device == "cuda" else "cpu")
    b, mbs = cfg.train.global_batch_size, cfg.train.micro_batch_size
    shape = (cfg.model.in_channels, *args.grid)
    tokens = num_tokens(shape, cfg.model.patch_size)
    samples = [(str(i), Prepared(torch.randn(shape), "a red square moving left")) for i in range(b)]
    times = []
    for step in range(1, args.warmup + args.steps + 1):
        start = time.perf_counter()
        packs = [noised_pack(samples[i : i + mbs], step, mbs * tokens, cfg, encoder).to(device)
                 for i in range(0, b, mbs)]
        train_step(packs, model, training.optimizer, training.scheduler)
        if device.type == "cuda":
            torch.cuda.synchronize()
        if step > args.warmup:
            times.append(time.perf_counter() - start)
    print(f"preset={cfg.model.preset} device={backends.device} threads={torch.get_num_threads()} "
          f"batch={b} packs={b // mbs} tokens/sample={tokens} params={sum(p.numel() for p in model[0].parameters()):,}")
    print(f"step_ms median={statistics.median(times) * 1e3:.1f} min={min(times) * 1e3:.1f} "
          f"max={max(times) * 1e3:.1f} over {len(times)} steps")


if __name__ == "__main__":
    main()
