r"""Builds raw WebDataset shards from a folder of captioned clips and images, filtered Goku's way.

Only what passes Goku's curation filters (paper Table 3, and a Table 4 tier with --stage) is kept.

    python tools/prepare_shards.py --input clips/ --output data/raw-480p --stage 480p \
        --append-motion-to-caption

Input: videos (.mp4/.webm/.mov/.mkv) and images (.jpg/.jpeg/.png) at any depth, each captioned by
the .txt of the same stem beside it; an optional .json of the same stem may carry the DINO /
aesthetic / OCR scores that the stage tiers check. Output: shard-NNNNN.tar with DALI index files
shard-NNNNN.idx, and report.json (written last: the output is complete once it exists) counting
kept samples and dropped ones per reason. A thin wrapper over
goku_megatron.data.curation.curate_folder.
"""
from __future__ import annotations

import argparse
import sys
import time
from pathlib import Path

from goku_megatron.data.curation import REPORT_NAME, STAGES, RawFilter, curate_folder


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--input", type=Path, required=True,
                        help="folder of clips, images and captions")
    parser.add_argument("--output", type=Path, required=True, help="new or empty output folder")
    parser.add_argument("--stage", choices=list(STAGES),
                        help="also apply this Table 4 tier (resolution, motion, scores present)")
    parser.add_argument("--append-motion-to-caption", action="store_true",
                        help="append ' motion score: X.X' to each clip's caption, as Goku does")
    parser.add_argument("--samples-per-shard", type=int, default=1000)
    parser.add_argument("--filters-off", action="store_true",
                        help="skip the Table 3 raw-video filters and the image short-side check "
                             "(a --stage tier still applies)")
    args = parser.parse_args(argv)
    if args.samples_per_shard < 1:
        parser.error(f"--samples-per-shard must be >= 1, got {args.samples_per_shard}")
    start = time.perf_counter()
    try:
        report = curate_folder(args.input, args.output,
                               raw=None if args.filters_off else RawFilter(),
                               stage=STAGES[args.stage] if args.stage else None,
                               append_motion=args.append_motion_to_caption,
                               samples_per_shard=args.samples_per_shard)
    except (FileNotFoundError, FileExistsError, ValueError) as e:
        sys.exit(f"prepare_shards: {e}")
    print(report.table())
    print(f"wrote {report.kept_total} samples to {args.output} in "
          f"{time.perf_counter() - start:.1f} s; report: {args.output / REPORT_NAME}")


if __name__ == "__main__":
    main()
