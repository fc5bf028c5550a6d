"""goku-data: make, curate and encode datasets, and convert checkpoints.

    goku-data make-toy --out data/toy --clips 2048 --images 512
    goku-data prepare-shards --input clips/ --output data/raw-480p --stage 480p --append-motion-to-caption
    torchrun --nproc-per-node 8 --no-python goku-data precompute-latents --input data/raw-480p \\
        --output data/latents-480p --vae ckpt/CogVideoX-2b --text-encoder ckpt/flan-t5-xl \\
        --fps 8 --frames 33 --height 480 --width 864
    goku-data convert-checkpoint export runs/goku8b out/goku8b.safetensors
    goku-data convert-checkpoint import out/goku8b.safetensors runs/finetune

A user mistake (a missing input, a bad value) stops with one line ``goku-data: error: ...`` on
stderr and exit code 2 (resilience.EXIT_CONFIG_ERROR).
"""
from __future__ import annotations

import argparse
import os
import sys
import time
from pathlib import Path
from typing import NoReturn

from goku_megatron.cli.args import color_list, positive
from goku_megatron.config import DECODERS, StageConfig
from goku_megatron.convert import export_checkpoint, import_checkpoint
from goku_megatron.data.curation import REPORT_NAME, STAGES, RawFilter, curate_folder
from goku_megatron.data.frames import FrameSpec
from goku_megatron.data.precompute import DEFAULT_MAX_TEXT_TOKENS, input_shards, load_job, precompute_latents
from goku_megatron.data.toy import COLORS, PIX_FMTS, ToyDatasetSpec, make_toy_dataset
from goku_megatron.logs import setup_logging
from goku_megatron.platform import use_local_device
from goku_megatron.resilience import EXIT_CONFIG_ERROR

PROG = "goku-data"


class Parser(argparse.ArgumentParser):
    """argparse, with a usage mistake reported in one line like every other goku-data error."""

    def error(self, message: str) -> NoReturn:
        print(f"{PROG}: error: {message} (see '{self.prog} --help')", file=sys.stderr)
        sys.exit(EXIT_CONFIG_ERROR)


def fail(err: Exception) -> int:
    print(f"{PROG}: error: {err}", file=sys.stderr)
    return EXIT_CONFIG_ERROR


def make_toy(args: argparse.Namespace) -> int:
    start = time.perf_counter()
    try:
        shards = make_toy_dataset(args.out, clips=args.clips, images=args.images, size=args.size,
                                  frames=args.frames, shard_size=args.shard_size, seed=args.seed,
                                  pix_fmt=args.pix_fmt, val_clips=args.val_clips, colors=args.colors)
    except (FileExistsError, ValueError) as err:
        return fail(err)
    only = f" ({', '.join(args.colors)} only)" if args.colors else ""
    print(f"wrote {args.clips} clips + {args.images} images{only} in {len(shards)} shards and "
          f"{args.val_clips} validation clips to {args.out} in {time.perf_counter() - start:.1f} s")
    return 0


def prepare_shards(args: argparse.Namespace) -> int:
    start = time.perf_counter()
    try:
        report = curate_folder(args.input, args.output,
                               raw=None if args.filters_off else RawFilter(),
                               stage=STAGES[args.stage] if args.stage else None,
                               append_motion=args.append_motion_to_caption,
                               samples_per_shard=args.samples_per_shard)
    except (FileNotFoundError, FileExistsError, ValueError) as err:
        return fail(err)
    print(report.table())
    print(f"wrote {report.kept_total} samples to {args.output} in "
          f"{time.perf_counter() - start:.1f} s; report: {args.output / REPORT_NAME}")
    return 0


def precompute(args: argparse.Namespace) -> int:
    rank, world = int(os.environ.get("RANK", 0)), int(os.environ.get("WORLD_SIZE", 1))
    start = time.perf_counter()
    try:
        spec = FrameSpec(args.fps, args.frames, args.height, args.width)
        shards = input_shards(args.input, args.output)
        job = load_job(args.vae, spec, args.decoder, use_local_device(), args.text_encoder, args.max_text_tokens)
    except (FileNotFoundError, ValueError) as err:
        return fail(err)
    stats = precompute_latents(shards, args.output, job, rank=rank, world=world,
                               samples_per_shard=args.samples_per_shard, batch_size=args.batch_size)
    print(f"precompute-latents {stats.line(rank, world, time.perf_counter() - start)}", flush=True)
    return 0


def convert(args: argparse.Namespace) -> int:
    try:
        if args.direction == "export":
            written = export_checkpoint(args.checkpoint, args.out, adapters=args.adapters)
        else:
            written = import_checkpoint(args.weights, args.run_dir)
    except (FileNotFoundError, ValueError) as err:
        return fail(err)
    print(f"wrote {written}")
    return 0


def build_parser() -> Parser:
    parser = Parser(prog=PROG, description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    commands = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")

    toy = commands.add_parser(
        "make-toy", help="write the toy text-to-video dataset (coloured shapes moving)",
        description="Writes the toy dataset (what goku-train data.kind=toy also makes when it is "
                    "missing); the validation split (every colour/shape/direction combination, the "
                    "ones held out of training included) goes to OUT/val.")
    toy.add_argument("--out", type=Path, required=True, help="output directory")
    toy.add_argument("--clips", type=int, default=ToyDatasetSpec.clips)
    toy.add_argument("--images", type=int, default=ToyDatasetSpec.images)
    toy.add_argument("--size", type=int, default=ToyDatasetSpec.size, help="frame side in px")
    toy.add_argument("--frames", type=int, default=ToyDatasetSpec.frames)
    toy.add_argument("--shard-size", type=int, default=ToyDatasetSpec.shard_size, help="samples per tar shard")
    toy.add_argument("--seed", type=int, default=ToyDatasetSpec.seed)
    toy.add_argument("--pix-fmt", choices=PIX_FMTS, default=ToyDatasetSpec.pix_fmt,
                     help="VP9 pixel format: yuv420p decodes everywhere (NVDEC too), yuv444p keeps the "
                          "colour of edge pixels exact")
    toy.add_argument("--val-clips", type=int, default=ToyDatasetSpec.val_clips,
                     help="validation clips in OUT/val (0: none); clip i shows combination i mod 32")
    toy.add_argument("--colors", type=color_list, default=(), metavar="NAMES",
                     help=f"comma-separated colours the training samples show, of {', '.join(COLORS)} "
                          "(default: all); the validation split shows every colour")
    toy.set_defaults(run=make_toy)

    shards = commands.add_parser(
        "prepare-shards", help="a folder of captioned clips/images -> raw shards, filtered Goku's way",
        description="Keeps what passes Goku's curation filters (paper Table 3, and a Table 4 tier with "
                    "--stage). Input: videos (.mp4/.webm/.mov/.mkv) and images (.jpg/.jpeg/.png) at any "
                    "depth, each captioned by the .txt of the same stem beside it; an optional .json of "
                    "the same stem may carry the DINO / aesthetic / OCR scores the stage tiers check. "
                    "Output: shard-NNNNN.tar with DALI index files shard-NNNNN.idx, and report.json "
                    "(written last: the output is complete once it exists) counting kept samples and "
                    "dropped ones per reason.")
    shards.add_argument("--input", type=Path, required=True, help="folder of clips, images and captions")
    shards.add_argument("--output", type=Path, required=True, help="new or empty output folder")
    shards.add_argument("--stage", choices=list(STAGES),
                        help="also apply this Table 4 tier (resolution, motion, scores present)")
    shards.add_argument("--append-motion-to-caption", action="store_true",
                        help="append ' motion score: X.X' to each clip's caption, as Goku does")
    shards.add_argument("--samples-per-shard", type=positive, default=1000)
    shards.add_argument("--filters-off", action="store_true",
                        help="skip the Table 3 raw-video filters and the image short-side check "
                             "(a --stage tier still applies)")
    shards.set_defaults(run=prepare_shards)

    stage = StageConfig()
    latents = commands.add_parser(
        "precompute-latents", help="raw shards -> VAE latent + T5 shards (torchrun, resumable)",
        description="Encodes raw shards into latent shards (goku_megatron/data/precompute.py: the "
                    "format, rank split and resumption). Under torchrun each rank takes every "
                    "WORLD_SIZE-th input shard; a rerun redoes only unfinished input shards.")
    latents.add_argument("--input", nargs="+", required=True, help="raw shard folder(s) or .tar files")
    latents.add_argument("--output", type=Path, required=True, help="latent shard folder")
    latents.add_argument("--vae", required=True, help="local CogVideoX VAE (or CogVideoX checkout)")
    latents.add_argument("--text-encoder", default=None,
                         help="local FLAN-T5 checkout; without it no t5.pth is written")
    latents.add_argument("--max-text-tokens", type=positive, default=DEFAULT_MAX_TEXT_TOKENS,
                         help="T5 tokens kept per caption (</s> included)")
    latents.add_argument("--fps", type=float, default=stage.fps, help="frame rate clips are sampled at")
    latents.add_argument("--frames", type=int, default=stage.frames, help="frames per clip (1 + 4k)")
    latents.add_argument("--height", type=int, default=stage.height)
    latents.add_argument("--width", type=int, default=stage.width)
    latents.add_argument("--decoder", choices=DECODERS, default="auto",
                         help="auto: DALI where it takes the codec, else PyAV")
    latents.add_argument("--samples-per-shard", type=positive, default=1000)
    latents.add_argument("--batch-size", type=positive, default=8, help="samples encoded together")
    latents.set_defaults(run=precompute)

    conv = commands.add_parser(
        "convert-checkpoint", help="checkpoint <-> one safetensors file in the reference block layout",
        description="export: a checkpoint of any TP/PP layout -> one safetensors file, transformer "
                    "blocks under the authors' reference names (blocks.{i}.*), the run's config in its "
                    "metadata. import: such a file -> a step-0 goku-train run directory, to sample "
                    "from or to fine-tune (goku-train checkpoint.init_from=RUN_DIR).")
    directions = conv.add_subparsers(dest="direction", required=True, metavar="DIRECTION")
    exp = directions.add_parser("export", help="checkpoint -> one safetensors file")
    exp.add_argument("checkpoint", type=Path, help="run directory or checkpoints/iter_N")
    exp.add_argument("out", type=Path, help="the .safetensors file to write")
    exp.add_argument("--adapters", action="store_true",
                     help="a LoRA run's adapters alone (lora_A/lora_B per adapted layer); without it a LoRA "
                          "checkpoint is exported merged into its base, a whole model")
    imp = directions.add_parser("import", help="safetensors file -> goku-train run directory (step 0)")
    imp.add_argument("weights", type=Path, help="a .safetensors file written by export")
    imp.add_argument("run_dir", type=Path, help="the run directory to write")
    conv.set_defaults(run=convert)
    return parser


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    setup_logging()
    return args.run(args)


if __name__ == "__main__":
    sys.exit(main())
