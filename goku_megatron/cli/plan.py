"""goku-plan: candidate TP/CP/PP/DP (and FSDP) layouts of a model on N GPUs, ranked; the planner's estimates
are documented in goku_megatron/planner.py."""

from __future__ import annotations

import argparse
import sys

from goku_megatron import planner
from goku_megatron.config import LORA_TARGETS, MODEL_PRESETS, ConfigError, LoraConfig, ModelConfig, load_config
from goku_megatron.logs import setup_logging
from goku_megatron.planner import (GIB, Hardware, Layout, Workload, lora_on, plan, planned_stage, stage_workload,
                                   tokens_for, trainable_params)
from goku_megatron.resilience import EXIT_CONFIG_ERROR


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="goku-plan", description=planner.__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--config", help="plan a recipe (or YAML): its model, its largest stage's packs and "
                                         "its global batch, as parallel.auto does; the shape options are ignored")
    parser.add_argument("--preset", default="goku-8b", choices=sorted(MODEL_PRESETS))
    parser.add_argument("--gpus", type=int, required=True)
    parser.add_argument("--gpu-memory-gb", type=float, default=80.0)
    parser.add_argument("--tokens", type=int, help="tokens per pack (or give --frames/--height/--width)")
    parser.add_argument("--frames", type=int, default=33)
    parser.add_argument("--height", type=int, default=720)
    parser.add_argument("--width", type=int, default=1280)
    parser.add_argument("--samples-per-pack", type=int, default=1)
    parser.add_argument("--global-packs", type=int, default=256, help="packs per optimizer step")
    parser.add_argument("--efficiency", type=float, default=0.4, help="assumed fraction of bf16 peak")
    parser.add_argument("--lora-rank", type=int, help="plan a LoRA finetune with adapters of this rank, the "
                                                       "base frozen (with --config: the recipe's lora section)")
    parser.add_argument("--lora-targets", nargs="+", choices=LORA_TARGETS, metavar="TARGET",
                        help=f"the linears --lora-rank adapts (default: lora.targets' default); from "
                             f"{', '.join(LORA_TARGETS)}")
    parser.add_argument("--top", type=int, default=10)
    args = parser.parse_args(argv)
    setup_logging()

    if args.config and (args.lora_rank is not None or args.lora_targets):
        print("goku-plan: error: --lora-rank/--lora-targets plan a --preset; with --config the recipe's lora "
              "section is planned (pass lora.* in the recipe)", file=sys.stderr)
        return EXIT_CONFIG_ERROR
    if args.config:
        try:
            cfg = load_config(args.config)
        except ConfigError as err:
            print(f"goku-plan: error: {err}", file=sys.stderr)
            return EXIT_CONFIG_ERROR
        if not cfg.data.stages:
            print(f"goku-plan: error: {args.config} has no data.stages to plan for", file=sys.stderr)
            return EXIT_CONFIG_ERROR
        model, lora = cfg.model, lora_on(cfg.lora)
        work = stage_workload(cfg, planned_stage(cfg))
        args.preset, args.global_packs = model.preset, work.global_packs
    else:
        if args.lora_rank is not None and args.lora_rank < 1:
            print(f"goku-plan: error: --lora-rank must be >= 1, got {args.lora_rank}", file=sys.stderr)
            return EXIT_CONFIG_ERROR
        if args.lora_targets and args.lora_rank is None:
            print("goku-plan: error: --lora-targets needs --lora-rank", file=sys.stderr)
            return EXIT_CONFIG_ERROR
        model = ModelConfig(preset=args.preset, **MODEL_PRESETS[args.preset])
        tokens = args.tokens or args.samples_per_pack * tokens_for(model, args.frames, args.height, args.width)
        work = Workload(tokens=tokens, samples_per_pack=args.samples_per_pack, global_packs=args.global_packs)
        lora = None
        if args.lora_rank is not None:
            targets = {"targets": list(args.lora_targets)} if args.lora_targets else {}
            lora = LoraConfig(rank=args.lora_rank, **targets)
    tokens = work.tokens
    hw = Hardware(gpus=args.gpus, memory_bytes=args.gpu_memory_gb * GIB, efficiency=args.efficiency)
    ranked = plan(model, work, hw, lora=lora)
    if not ranked:
        print(f"goku-plan: error: no TP/CP/PP layout divides {args.gpus} GPUs for {args.preset}", file=sys.stderr)
        return EXIT_CONFIG_ERROR
    print(f"# {args.preset}: {tokens} tokens per pack, {args.global_packs} packs per step, {args.gpus} GPUs "
          f"x {args.gpu_memory_gb:g} GiB, efficiency {args.efficiency:g} (estimates, see goku-plan --help)")
    if lora is not None:
        print(f"# LoRA rank {lora.rank} on {','.join(lora.targets)}: {trainable_params(model, 1, 1, lora):,.0f} "
              f"trained parameters (TP=1), the base frozen")
    print(f"{'tp':>3} {'cp':>3} {'pp':>3} {'dp':>4} {'fsdp':>4} {'recompute':>9} {'weights GiB':>11} {'acts GiB':>9} "
          f"{'total GiB':>9} {'step s':>8}  fits")
    for est, fits in ranked[: args.top]:
        lay = est.layout
        print(f"{lay.tp:>3} {lay.cp:>3} {lay.pp:>3} {lay.dp:>4} {fsdp_column(lay):>4} {str(lay.recompute):>9} "
              f"{est.weights_bytes / GIB:>11.1f} {est.activation_bytes / GIB:>9.1f} "
              f"{est.memory_bytes / GIB:>9.1f} {est.step_time_s:>8.2f}  {'yes' if fits else 'no'}")
    best, fits = ranked[0]
    if not fits:
        print("recommendation: none fits; add GPUs, lower the token budget, or pack fewer samples")
        return 1
    lay = best.layout
    fsdp = (f" parallel.fsdp=true parallel.fsdp_shard_size={lay.fsdp_shard_size} optim.distributed_optimizer=false"
            if lay.fsdp_shard else "")
    print(f"recommendation: parallel.tp={lay.tp} parallel.cp={lay.cp} parallel.pp={lay.pp}{fsdp} "
          f"model.recompute={str(lay.recompute).lower()}  (dp={lay.dp})")
    return 0


def fsdp_column(layout: Layout) -> str:
    """'-' without FSDP, 'all' when it shards over all DP x CP ranks, else the shard group's size."""
    if not layout.fsdp_shard:
        return "-"
    return str(layout.fsdp_shard_size) if layout.fsdp_shard_size else "all"


if __name__ == "__main__":
    sys.exit(main())
