"""Writes the toy text-to-video dataset (coloured shapes moving on a grey background).

    python tools/make_toy_dataset.py --out data/toy --clips 2048 --images 512

A thin wrapper over goku_megatron.data.toy.make_toy_dataset, which the trainer also calls when
the dataset is missing. The validation split (every colour/shape/direction combination, the ones
held out of training included) goes to OUT/val.
"""
from __future__ import annotations

import argparse
import time
from pathlib import Path

from goku_megatron.data.toy import PIX_FMTS, ToyDatasetSpec, make_toy_dataset


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--out", type=Path, required=True, help="output directory")
    parser.add_argument("--clips", type=int, default=ToyDatasetSpec.clips)
    parser.add_argument("--images", type=int, default=ToyDatasetSpec.images)
    parser.add_argument("--size", type=int, default=ToyDatasetSpec.size, help="frame side in px")
    parser.add_argument("--frames", type=int, default=ToyDatasetSpec.frames)
    parser.add_argument("--shard-size", type=int, default=ToyDatasetSpec.shard_size,
                        help="samples per tar shard")
    parser.add_argument("--seed", type=int, default=ToyDatasetSpec.seed)
    parser.add_argument("--pix-fmt", choices=PIX_FMTS, default=ToyDatasetSpec.pix_fmt,
                        help="VP9 pixel format: yuv420p decodes everywhere (NVDEC too), yuv444p "
                             "keeps the colour of edge pixels exact")
    parser.add_argument("--val-clips", type=int, default=ToyDatasetSpec.val_clips,
                        help="validation clips in OUT/val (0: none); clip i shows combination i mod 32")
    args = parser.parse_args(argv)
    start = time.perf_counter()
    shards = make_toy_dataset(args.out, clips=args.clips, images=args.images, size=args.size,
                              frames=args.frames, shard_size=args.shard_size, seed=args.seed,
                              pix_fmt=args.pix_fmt, val_clips=args.val_clips)
    print(f"wrote {args.clips} clips + {args.images} images in {len(shards)} shards and "
          f"{args.val_clips} validation clips to {args.out} in {time.perf_counter() - start:.1f} s")


if __name__ == "__main__":
    main()
