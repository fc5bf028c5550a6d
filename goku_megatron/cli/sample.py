"""goku-sample: prompts to videos (MP4) or images (PNG) from any goku-train checkpoint.

    goku-sample --checkpoint runs/toy-20261122-0500 --prompt "a red square moving left" --out samples/
    goku-sample --checkpoint runs/x/checkpoints/iter_0001000 --prompts-file prompts.txt --steps 50

The checkpoint may come from any TP/PP layout: the weights are loaded into one unsharded model
(goku_megatron/sample.py says how sampling works).
"""

from __future__ import annotations

import argparse
import logging
import sys
from pathlib import Path

from goku_megatron.config import Config, ConfigError
from goku_megatron.logs import setup_logging
from goku_megatron.media import load_frame, slug, write_media
from goku_megatron.resilience import EXIT_CONFIG_ERROR
from goku_megatron.sample import Sampler, SampleSpec, run_spec

log = logging.getLogger(__name__)


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(prog="goku-sample", description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--checkpoint", required=True, type=Path, help="run directory or checkpoints/iter_N")
    parser.add_argument("--prompt", action="append", default=[], help="a prompt (repeatable)")
    parser.add_argument("--prompts-file", type=Path, help="one prompt per line")
    parser.add_argument("--out", type=Path, default=Path("samples"), help="output directory")
    parser.add_argument("--frames", type=int, default=None, help="pixel frames (default: the run's)")
    parser.add_argument("--height", type=int, default=None)
    parser.add_argument("--width", type=int, default=None)
    parser.add_argument("--steps", type=int, default=None, help="Euler steps (default flow.sample_steps)")
    parser.add_argument("--cfg-scale", type=float, default=None, help="guidance (default flow.cfg_scale)")
    parser.add_argument("--image", type=Path, default=None,
                        help="image-to-video: the first frame (PNG/JPEG) of every sample (model.i2v checkpoints)")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--fps", type=int, default=None, help="output fps (default: the run's)")
    return parser.parse_args(argv)


def default_spec(cfg: Config, args: argparse.Namespace) -> SampleSpec:
    """The command line's sizes, steps and guidance; unset ones from the run (run_spec)."""
    run = run_spec(cfg)
    return SampleSpec(
        frames=args.frames or run.frames, height=args.height or run.height, width=args.width or run.width,
        steps=args.steps or run.steps,
        cfg_scale=args.cfg_scale if args.cfg_scale is not None else run.cfg_scale,
        seed=args.seed, fps=args.fps or run.fps,
    )


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    setup_logging()
    prompts = list(args.prompt)
    if args.prompts_file:
        if not args.prompts_file.is_file():
            print(f"goku-sample: error: {args.prompts_file}: no such prompts file", file=sys.stderr)
            return EXIT_CONFIG_ERROR
        prompts += [line.strip() for line in args.prompts_file.read_text().splitlines() if line.strip()]
    if not prompts:
        print("goku-sample: error: no prompt; pass --prompt TEXT or --prompts-file FILE", file=sys.stderr)
        return EXIT_CONFIG_ERROR
    try:
        sampler = Sampler(args.checkpoint)
        spec = default_spec(sampler.cfg, args)
        sampler.latent_shape(spec)  # refuses sizes the VAE cannot encode, before any work
        sampler.check_condition(args.image is not None)
        image = None if args.image is None else load_frame(args.image, spec.height, spec.width)
    except (FileNotFoundError, ConfigError, ValueError) as err:
        print(f"goku-sample: error: {err}", file=sys.stderr)
        return EXIT_CONFIG_ERROR
    args.out.mkdir(parents=True, exist_ok=True)
    pixels = sampler.sample(prompts, spec, image)
    for i, (prompt, sample) in enumerate(zip(prompts, pixels)):
        path = write_media(sample, args.out / slug(prompt, i), spec.fps)
        log.info("wrote %s  (%s)", path, prompt)
    return 0


if __name__ == "__main__":
    sys.exit(main())
