"""goku-eval: ShapesBench prompt adherence and the validation loss of a toy run's checkpoint
(goku_megatron/evaluation.py says what is measured and how).

    goku-eval shapes --checkpoint runs/toy-20261122-0500 --out shapes.json --samples-per-prompt 4
    goku-eval shapes --checkpoint runs/toy-20261122-0500 --colors yellow   # its 8 prompts only
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

from goku_megatron import evaluation
from goku_megatron.cli.args import color_list, positive
from goku_megatron.config import ConfigError
from goku_megatron.data.toy import COLORS, read_validation
from goku_megatron.evaluation import VAL_TIMESTEPS, evaluate, format_table
from goku_megatron.logs import setup_logging
from goku_megatron.resilience import EXIT_CONFIG_ERROR
from goku_megatron.sample import Sampler, SampleSpec


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(prog="goku-eval", description=evaluation.__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    commands = parser.add_subparsers(dest="command", required=True)
    shapes = commands.add_parser("shapes", help="ShapesBench prompt adherence and validation loss of a toy run")
    shapes.add_argument("--checkpoint", required=True, type=Path, help="run directory or checkpoints/iter_N")
    shapes.add_argument("--out", type=Path, default=Path("shapes_report.json"), help="JSON report to write")
    shapes.add_argument("--samples-per-prompt", type=positive, default=4)
    shapes.add_argument("--steps", type=positive, default=None, help="Euler steps (default flow.sample_steps)")
    shapes.add_argument("--cfg-scale", type=float, default=None, help="guidance (default flow.cfg_scale)")
    shapes.add_argument("--seed", type=int, default=0, help="sampling seed; repeat r uses seed + r")
    shapes.add_argument("--data", type=Path, default=None,
                        help="toy dataset whose val/ split gives the validation loss (default: the run's data.path)")
    shapes.add_argument("--colors", type=color_list, default=(), metavar="NAMES",
                        help=f"sample only the prompts of these comma-separated colours, of {', '.join(COLORS)} "
                             "(default: all); the validation loss stays on the whole split")
    return parser.parse_args(argv)


def _load(args: argparse.Namespace) -> tuple[Sampler, SampleSpec, Path]:
    """The checkpoint's sampler, the sampling spec and the dataset, checked before any sampling."""
    sampler = Sampler(args.checkpoint)
    cfg = sampler.cfg
    d = cfg.data
    if d.kind != "toy" or cfg.model.i2v:
        raise ValueError(f"{sampler.checkpoint}: a data.kind={d.kind}, model.i2v={cfg.model.i2v} run; ShapesBench "
                         "scores text-to-video toy runs: pass the checkpoint of one")
    return sampler, SampleSpec(
        frames=d.toy_frames, height=d.toy_size, width=d.toy_size, steps=args.steps or cfg.flow.sample_steps,
        cfg_scale=cfg.flow.cfg_scale if args.cfg_scale is None else args.cfg_scale, seed=args.seed,
    ), args.data or Path(d.path)




def shapes_main(args: argparse.Namespace) -> int:
    try:
        sampler, spec, data = _load(args)
        val = read_validation(data)
        if tuple(val.pixels.shape[2:]) != (spec.frames, spec.height, spec.width):
            raise ValueError(f"{data}: validation clips are (T, H, W) = {tuple(val.pixels.shape[2:])}, the run's "
                             f"{(spec.frames, spec.height, spec.width)}; pass --data with the run's toy dataset")
    except (FileNotFoundError, ConfigError, ValueError) as err:
        print(f"goku-eval: error: {err}", file=sys.stderr)
        return EXIT_CONFIG_ERROR
    bench, losses = evaluate(sampler, spec, val, args.samples_per_prompt, args.colors)
    report = {
        "checkpoint": str(sampler.checkpoint),
        "step": sampler.step,
        "sampling": {"samples_per_prompt": args.samples_per_prompt, "steps": spec.steps,
                     "cfg_scale": spec.cfg_scale, "seed": spec.seed, "colors": list(args.colors or COLORS)},
        "validation": {"data": str(data), "clips": len(val.keys), "held_out_clips": sum(val.held_out),
                       "timesteps": list(VAL_TIMESTEPS), **losses},
        **bench,
    }
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps(report, indent=2) + "\n")
    print(format_table(report))
    print(f"wrote {args.out}")
    return 0


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    setup_logging()
    return shapes_main(args)


if __name__ == "__main__":
    sys.exit(main())
