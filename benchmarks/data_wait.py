"""How long the training loop waits for its data, inline vs read ahead (data.workers).

    python benchmarks/data_wait.py                  # toy recipe, 60 steps, workers 0 and 2
    python benchmarks/data_wait.py --workers 0 1 2 --steps 100 -- data.toy_size=32

Runs goku-train (the toy recipe with data.cache_mb=0, so that every step reads, decodes and packs
its clips through the raw-data path: toy shards are raw shards whose "VAE" is the identity) once
per data.workers value, then reads metrics.jsonl: the mean step time, the mean data_wait_s (the
time each step waited for its packs) and their ratio, over the steps after the first five and
before the last (which saves a checkpoint), and the median step time, which a few steps slowed by
other processes on a shared machine do not move. The final losses must agree: read-ahead changes
when data is prepared, not what. Not a test: figures depend on the machine.
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import tempfile
from pathlib import Path


def run(workers: int, steps: int, data: Path, out: Path, extra: list[str]) -> list[dict]:
    run_dir = out / f"workers{workers}"
    cmd = [sys.executable, "-m", "goku_megatron.cli.train", "--config", "toy", f"train.steps={steps}",
           "train.log_interval=1", "train.save_interval=0", "data.cache_mb=0", f"data.workers={workers}",
           f"data.path={data}", f"train.run_dir={run_dir}", *extra]
    proc = subprocess.run(cmd, capture_output=True, text=True, env={**os.environ})
    if proc.returncode != 0:
        sys.exit(f"goku-train failed (workers={workers}):\n{proc.stdout[-2000:]}{proc.stderr[-2000:]}")
    return [json.loads(line) for line in (run_dir / "metrics.jsonl").read_text().splitlines()]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--workers", type=int, nargs="+", default=[0, 2])
    parser.add_argument("--steps", type=int, default=60)
    parser.add_argument("overrides", nargs="*", help="goku-train overrides, e.g. data.toy_size=32")
    args = parser.parse_args()
    with tempfile.TemporaryDirectory() as tmp:
        data = Path(tmp) / "toy"
        print(f"toy recipe, data.cache_mb=0, {args.steps} steps, overrides {args.overrides or 'none'}; "
              f"means over steps 6..{args.steps - 1}; {os.cpu_count()} cores")
        print(f"{'data.workers':>12} {'step s':>8} {'median s':>9} {'data_wait s':>12} {'wait/step':>10} "
              f"{'samples/s':>10} {'final loss':>11}")
        for workers in args.workers:
            records = run(workers, args.steps, data, Path(tmp), args.overrides)
            kept = [r for r in records if 5 < r["step"] < args.steps]
            step = statistics.mean(r["step_time_s"] for r in kept)
            median = statistics.median(r["step_time_s"] for r in kept)
            wait = statistics.mean(r["data_wait_s"] for r in kept)
            rate = statistics.mean(r["samples_per_s"] for r in kept)
            print(f"{workers:>12} {step:>8.3f} {median:>9.3f} {wait:>12.4f} {wait / step:>9.1%} {rate:>10.1f} "
                  f"{records[-1]['loss']:>11.6f}")


if __name__ == "__main__":
    main()
