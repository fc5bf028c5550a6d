"""torchrun worker for test_checkpoint_dist.py: goku-train, where one rank's data wait at one step
never ends (every sample it draws is bad) and brings a SIGTERM to that rank only.

Usage: torchrun --nproc-per-node N tests/data_wait_worker.py RANK STEP goku-train-args...
The other ranks have drawn their samples by then, so this shows whether they stop with the
waiting rank instead of entering the step's collectives without it.
"""

from __future__ import annotations

import os
import signal
import sys

from goku_megatron.cli import train as cli_train
from goku_megatron.data.pipeline import PackedBatches


def stall(rank: int, step: int) -> None:
    """From now on, ``rank``'s samples at ``step`` are all bad, the first one with a SIGTERM."""
    next_step = PackedBatches.next_step

    def stalled(self: PackedBatches, at: int):
        if int(os.environ["RANK"]) != rank or at != step:
            return next_step(self, at)
        prepare = self.prepare

        def bad(raw, stage):
            os.kill(os.getpid(), signal.SIGTERM)  # one: the stop handler lets the run checkpoint
            self.prepare = lambda raw, stage: None
            return None
        self.prepare = bad
        try:
            return next_step(self, at)
        finally:
            self.prepare = prepare

    PackedBatches.next_step = stalled


if __name__ == "__main__":
    stall(int(sys.argv[1]), int(sys.argv[2]))
    sys.exit(cli_train.main(sys.argv[3:]))
