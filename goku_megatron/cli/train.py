"""goku-train: train a Goku model (the loop is goku_megatron/train.py).

    goku-train                                   # toy recipe on CPU, creates the toy data
    goku-train --config goku-2b train.steps=20   # any recipe, dotted overrides
    goku-train --dry-run --world-size 64 ...     # resolved config, layout, backends, size
    torchrun --nproc-per-node 4 -m goku_megatron.cli.train parallel.tp=2 parallel.pp=2

Exit codes (resilience.EXIT_*): 0 done, 2 a fault in the config, environment, data or checkpoint
(one line on stderr names the field or file and the fix), 3 diverged, 99 stopped by a signal with
a checkpoint saved.
"""

from __future__ import annotations

import argparse
import logging
import sys

import yaml

from goku_megatron import cpu_compat
from goku_megatron.config import Config, ConfigError, load_config, validate
from goku_megatron.logs import setup_logging
from goku_megatron.model.goku import count_parameters
from goku_megatron.planner import resolve_layout
from goku_megatron.platform import choose_backends, has_cuda, sharding, shutdown_distributed, world_size_from_env
from goku_megatron.resilience import EXIT_CONFIG_ERROR, EXIT_DIVERGED, EXIT_PREEMPTED, Diverged, Preempted
from goku_megatron.train import run

log = logging.getLogger(__name__)


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(prog="goku-train", description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--config", default="toy", help="recipe name (goku_megatron/recipes) or YAML path")
    parser.add_argument("--dry-run", action="store_true", help="print config, layout, backends, size; exit")
    parser.add_argument("--world-size", type=int, default=None,
                        help="world size to plan for in --dry-run (default: $WORLD_SIZE or 1)")
    parser.add_argument("--resume", metavar="PATH", default=None,
                        help="start from this checkpoint (checkpoints/iter_N) or run directory; same as "
                             "checkpoint.resume=PATH (restarts continue from the run dir's own checkpoints)")
    parser.add_argument("overrides", nargs="*", help="dotted key=value overrides, e.g. train.steps=20")
    return parser.parse_intermixed_args(argv)


def resolved_config(args: argparse.Namespace, world_size: int) -> Config:
    """The recipe with its overrides, parallel.auto resolved by the planner, validated."""
    cfg = load_config(args.config, args.overrides)
    if args.resume is not None:
        cfg.checkpoint.resume = args.resume
    resolve_layout(cfg, world_size)
    validate(cfg, world_size, has_cuda=has_cuda())
    return cfg


def dry_run_report(cfg: Config, world_size: int) -> str:
    """Everything --dry-run prints: nothing is allocated, no process group is started."""
    backends = choose_backends(cfg)
    p, t = cfg.parallel, cfg.train
    n_micro = t.global_batch_size // (t.micro_batch_size * p.dp)
    params = count_parameters(cfg.model)
    lines = [
        "# resolved config",
        yaml.safe_dump(cfg.to_dict(), sort_keys=False).rstrip(),
        "# parallel layout",
        f"world_size={world_size} tp={p.tp} pp={p.pp} cp={p.cp} dp={p.dp} sharding='{sharding(cfg)}' "
        f"layers_per_stage={cfg.model.num_layers // p.pp} micro_batches_per_step={n_micro} "
        f"micro_batch_size={t.micro_batch_size} global_batch_size={t.global_batch_size}",
        "# backends",
        f"attention={backends.attention} linear={backends.linear} optimizer={backends.optimizer} "
        f"data={backends.data} distributed={backends.distributed} device={backends.device} "
        f"precision={backends.precision}",
        "# parameters",
        f"parameters={params:,} ({params / 1e9:.2f} B)",
    ]
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    """goku-train; returns the exit code (the module docstring lists them)."""
    args = parse_args(argv)
    setup_logging()
    world_size = args.world_size if args.world_size is not None else world_size_from_env()
    try:
        cfg = resolved_config(args, world_size)
        cpu_compat.apply()
        if args.dry_run:
            print(dry_run_report(cfg, world_size))
            return 0
        run(cfg)
    except ConfigError as err:
        print(f"goku-train: error: {err}", file=sys.stderr)
        return EXIT_CONFIG_ERROR
    except Preempted as stop:
        log.warning("%s", stop)
        return EXIT_PREEMPTED
    except Diverged as err:
        print(f"goku-train: error: {err}", file=sys.stderr)
        return EXIT_DIVERGED
    finally:
        shutdown_distributed()
    return 0


if __name__ == "__main__":
    sys.exit(main())
