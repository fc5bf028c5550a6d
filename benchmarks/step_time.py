"""Milliseconds per training step (forward + backward + AdamW) of a preset on this machine, its
peak GPU memory, and what goku-plan predicts for both.

    python benchmarks/step_time.py                       # tiny preset, CPU
    python benchmarks/step_time.py lora.rank=16 lora.base=seed   # LoRA adapters on a frozen base
    python benchmarks/step_time.py model.preset=goku-1b train.micro_batch_size=1 --grid 4 16 16
    python benchmarks/step_time.py model.preset=goku-2b train.global_batch_size=1 \\
        train.micro_batch_size=1 --grid 9 60 108 --fit        # one GPU: 14580 tokens, full depth

Runs the path real training takes in one process on synthetic latents: each step's samples become
packs of micro_batch_size samples through the data pipeline's noised_pack (noise, timesteps,
caption dropout, Patch n' Pack), then train_step (megatron schedules, DDP, optimizer) runs them. It
prints the median over the timed steps, packing included, and on a GPU the peak memory allocated
during the timed steps; on Linux CPUs, where no allocator counts tensors, the process's resident
set (VmRSS) before the timed steps and its peak (VmHWM, reset first) during them: the whole
process (interpreter, libraries, data), so compare runs with each other rather than with the plan.
Beside them stands goku_megatron.planner's estimate of the same step (one GPU, this precision,
recompute and lora.* as configured): the memory goku-plan and parallel.auto plan with, and the step
time at the planner's assumed efficiency. ``--fit`` turns full activation recompute on when the
planner's estimate without it exceeds the GPU's memory with the planner's headroom (goku-2b at full
depth fits an H200 without recompute, an H100 only with it), and says so. Not a test: figures
depend on the machine.
"""

from __future__ import annotations

import argparse
import re
import statistics
import time
from pathlib import Path

import torch


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--grid", type=int, nargs=3, default=[4, 16, 16], metavar=("T", "H", "W"),
                        help="latent frames, height, width of each sample")
    parser.add_argument("--warmup", type=int, default=3)
    parser.add_argument("--steps", type=int, default=10)
    parser.add_argument("--fit", action="store_true",
                        help="on a GPU, recompute activations if the planner says the step does not fit without")
    parser.add_argument("overrides", nargs="*")
    return parser.parse_args(argv)


def main(argv: list[str] | None = None) -> None:
    args = parse_args(argv)

    from goku_megatron import cpu_compat
    from goku_megatron.batch import num_tokens
    from goku_megatron.config import load_config, validate
    from goku_megatron.data.encoders import run_text_encoder
    from goku_megatron.data.pipeline import Prepared, noised_pack
    from goku_megatron.flops import gpu_peak_flops
    from goku_megatron.planner import GIB, HEADROOM, Hardware, Layout, Workload, estimate, lora_on
    from goku_megatron.platform import choose_backends, has_cuda
    from goku_megatron.train import setup, train_step

    cfg = load_config(None, ["train.global_batch_size=4", "train.micro_batch_size=4", *args.overrides])
    validate(cfg, 1, has_cuda=has_cuda())
    cpu_compat.apply()
    backends = choose_backends(cfg)
    cuda = backends.device == "cuda"
    b, mbs = cfg.train.global_batch_size, cfg.train.micro_batch_size
    shape = (cfg.model.in_channels, *args.grid)
    tokens = num_tokens(shape, cfg.model.patch_size)
    work = Workload(tokens=mbs * tokens, samples_per_pack=mbs, caption_tokens=cfg.data.max_text_tokens,
                    global_packs=b // mbs)
    hardware = Hardware(gpus=1, precision=backends.precision, **(
        {"memory_bytes": torch.cuda.get_device_properties(0).total_memory,
         "peak_flops": gpu_peak_flops(torch.cuda.get_device_name()) or Hardware.peak_flops} if cuda else {}))

    def planned(recompute: bool):
        return estimate(cfg.model, work, hardware, Layout(1, 1, 1, 1, recompute, cfg.optim.distributed_optimizer),
                        lora_on(cfg.lora))

    if args.fit and cuda and not cfg.model.recompute:
        without = planned(False).memory_bytes
        if without > HEADROOM * hardware.memory_bytes:
            cfg.model.recompute, cfg.model.recompute_granularity = True, "full"
            print(f"fit: full recompute on (planned {without / GIB:.1f} GiB without it > {HEADROOM:g} x "
                  f"{hardware.memory_bytes / GIB:.1f} GiB)")
    plan = planned(cfg.model.recompute)

    training = setup(cfg, backends)
    model = training.model
    encoder = run_text_encoder(cfg)
    device = torch.device("cuda" if cuda else "cpu")
    samples = [(str(i), Prepared(torch.randn(shape), "a red square moving left")) for i in range(b)]
    times = []
    rss_before: int | None = None
    for step in range(1, args.warmup + args.steps + 1):
        if step == args.warmup + 1:
            if cuda:
                torch.cuda.reset_peak_memory_stats()
            else:
                rss_before = reset_peak_rss()
        start = time.perf_counter()
        packs = [noised_pack(samples[i : i + mbs], step, mbs * tokens, cfg, encoder).to(device)
                 for i in range(0, b, mbs)]
        train_step(packs, model, training.optimizer, training.scheduler)
        if cuda:
            torch.cuda.synchronize()
        if step > args.warmup:
            times.append(time.perf_counter() - start)
    print(f"preset={cfg.model.preset} layers={cfg.model.num_layers} device={backends.device} "
          f"precision={backends.precision} recompute={str(cfg.model.recompute).lower()} "
          f"threads={torch.get_num_threads()} batch={b} packs={b // mbs} tokens/sample={tokens} "
          f"params={sum(p.numel() for p in model[0].parameters()):,} "
          f"trained={sum(p.numel() for p in model[0].parameters() if p.requires_grad):,}")
    print(f"step_ms median={statistics.median(times) * 1e3:.1f} min={min(times) * 1e3:.1f} "
          f"max={max(times) * 1e3:.1f} over {len(times)} steps; planned_ms={plan.step_time_s * 1e3:.4g} "
          f"(at {hardware.efficiency:g} of {hardware.peak_flops / 1e12:.0f} TFLOP/s)")
    peak = f"{torch.cuda.max_memory_allocated() / GIB:.4g}" if cuda else "n/a"
    print(f"memory_gib peak={peak} planned={plan.memory_bytes / GIB:.4g} "
          f"(weights {plan.weights_bytes / GIB:.4g} + activations {plan.activation_bytes / GIB:.4g})")
    if rss_before is not None:
        print(f"host_rss_gib before={rss_before / GIB:.4g} peak={status_bytes('VmHWM') / GIB:.4g} "
              f"(the whole process; peak over the timed steps)")


def status_bytes(field: str) -> int:
    """A memory field of /proc/self/status (VmRSS, VmHWM), in bytes."""
    return int(re.search(rf"^{field}:\s+(\d+) kB", Path("/proc/self/status").read_text(), re.M).group(1)) * 1024


def reset_peak_rss() -> int | None:
    """Reset the process's peak resident set (VmHWM) to its current one (Linux: clear_refs 5) and
    return the current one; None where there is no /proc/self/clear_refs (not Linux)."""
    clear_refs = Path("/proc/self/clear_refs")
    if not clear_refs.exists():
        return None
    clear_refs.write_text("5")
    return status_bytes("VmRSS")


if __name__ == "__main__":
    main()
