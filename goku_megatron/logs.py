"""One logging setup for every goku command (goku-train, goku-sample, goku-eval, goku-plan, goku-data).

Each line names its logger, so a reader sees which library wrote it:

    [12:00:01 rank0 goku_megatron.train] step 1/600 | loss 1.4545 | ...

goku's own loggers (``goku_megatron.*``) log at INFO on rank 0 and at WARNING on the other ranks;
megatron-core and every other library log at WARNING, which keeps megatron's per-parameter
bucket dump and its optimizer/DDP config echoes out of a run's output. Python warnings go through
logging too (logger ``py.warnings``).

megatron-core warns at import time that Transformer Engine or apex is missing and names the
fallback it takes. Those facts are what ``platform.Backends.describe`` prints on the one
``backends:`` line (linear, attention, optimizer, norm), so ``fold_known_warnings`` drops exactly
those messages; any other warning still reaches the log. The package's ``__init__`` calls it, so
it holds before megatron-core is first imported, whoever imports goku_megatron.

It also drops the notices megatron-core 0.16.1 raises from its own code on every run, which a
user cannot act on and every rank printed (``KNOWN_LIBRARY_NOTICES``): its checkpoint loader
calls torch's deprecated ``torch.distributed.checkpoint.load_state_dict`` (every resume and every
goku-sample), its distributed optimizer calls the collectives torch 2.13 renamed, and with fp32
weights it zeroes ``.grad`` on views of the weights (each DP > 1 run). Each filter names the
message and, where torch attributes the warning to megatron-core, megatron's module; the same
warning raised from anywhere else still reaches the log.
"""

from __future__ import annotations

import logging
import os
import sys
import warnings
from typing import Any

GOKU_LOGGER = "goku_megatron"

# megatron-core 0.16.1's import-time fallback notices; each is restated on the backends: line.
KNOWN_FALLBACK_WARNINGS = (
    r"Transformer Engine and Apex are not installed\. Falling back to",
    r"Apex is not installed\. Falling back to Torch Norm",
)

# (category, message, module) of what megatron-core 0.16.1's own code raises on torch 2.13.
KNOWN_LIBRARY_NOTICES = (
    # dist_checkpointing's loader uses torch's deprecated checkpoint.load_state_dict.
    (FutureWarning, r"`load_state_dict` is deprecated", r"megatron\.core\.dist_checkpointing\.strategies\.torch"),
    # The distributed optimizer's collectives, renamed *_single in torch 2.13; torch's deprecation
    # wrapper, not the caller, is the warning's module, so the message alone selects them.
    (FutureWarning, r"`torch\.distributed\.(reduce_scatter_tensor|all_gather_into_tensor)` is deprecated",
     r"torch\.distributed\."),
    # With fp32 weights the distributed optimizer's shards are views of the weights (not leaves),
    # and megatron's zero_grad reads their .grad, which megatron itself sets.
    (UserWarning, r"The \.grad attribute of a Tensor that is not a leaf Tensor is being accessed",
     r"megatron\.core\.optimizer\.optimizer"),
)


def fold_known_warnings() -> None:
    """Drop megatron-core's "TE/apex not installed, falling back" warnings (the backends: line
    says which backend runs) and ``KNOWN_LIBRARY_NOTICES``; leaves every other warning alone."""
    for message in KNOWN_FALLBACK_WARNINGS:
        warnings.filterwarnings("ignore", message=message, category=UserWarning)
    for category, message, module in KNOWN_LIBRARY_NOTICES:
        warnings.filterwarnings("ignore", message=message, category=category, module=module)


class _StdoutHandler(logging.StreamHandler):
    """A StreamHandler on whatever ``sys.stdout`` is when a record is written, not when logging
    was set up: a command run in-process under a test's output capture keeps logging after the
    capture is gone."""

    @property
    def stream(self) -> Any:
        return sys.stdout

    @stream.setter
    def stream(self, value: Any) -> None:
        """StreamHandler.__init__ sets a stream; this handler always writes to sys.stdout."""


def setup_logging(rank: int | None = None, verbose: bool = False) -> None:
    """Configure logging for a goku command: one handler on stdout, the logger name in each line,
    goku at INFO (rank 0; WARNING elsewhere, or DEBUG with ``verbose``), everything else at
    WARNING. ``rank`` defaults to torchrun's $RANK. Safe to call twice (the last call wins)."""
    rank = int(os.environ.get("RANK", "0")) if rank is None else rank
    handler = _StdoutHandler()
    handler.setFormatter(logging.Formatter(f"[%(asctime)s rank{rank} %(name)s] %(message)s", datefmt="%H:%M:%S"))
    root = logging.getLogger()
    for old in list(root.handlers):
        root.removeHandler(old)
    root.addHandler(handler)
    root.setLevel(logging.WARNING)
    goku_level = logging.DEBUG if verbose else logging.INFO if rank == 0 else logging.WARNING
    logging.getLogger(GOKU_LOGGER).setLevel(goku_level)
    logging.captureWarnings(True)
