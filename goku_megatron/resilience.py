"""Surviving faults: preemption signals, non-finite steps, loss spikes, hung ranks.

- ``StopSignals``: SIGTERM and SIGUSR1 (SLURM's ``--signal=USR1@120`` warning before preemption)
  only set a flag; at the next step boundary every rank learns, through one all-reduce, whether
  any rank got one, so all ranks save the same step and exit together with ``EXIT_PREEMPTED``.
- ``SkipNonFiniteSteps``: megatron's optimizer, except that a step whose gradient norm is NaN or
  Inf changes nothing (megatron itself skips only when a loss scaler finds an overflow, i.e. fp16).
  The norm is reduced over every rank that holds gradients, so all ranks skip the same step.
- ``StepGuard``: counts skipped steps, stops the run (``Diverged``) after ``max_bad_steps`` in a
  row, and logs loss spikes against a running mean.
- ``FaultTolerance``: heartbeats and timed sections for nvidia-resiliency-ext's ft_launcher, which
  restarts ranks that hang.

Exit codes of goku-train (docs/checkpointing.md): 0 done; 2 bad configuration; 3 diverged (too
many non-finite steps in a row; nothing saved past the last good checkpoint); 99 preempted by
SIGTERM or SIGUSR1 after saving a checkpoint (the SLURM scripts requeue on 99).
"""

from __future__ import annotations

import contextlib
import ctypes
import logging
import math
import os
import signal
import sys
from collections import deque
from types import FrameType
from typing import Any, Iterator

import torch
from megatron.core.optimizer import optimizer as mcore_optimizer

from goku_megatron.config import ConfigError

log = logging.getLogger(__name__)

EXIT_CONFIG_ERROR = 2
EXIT_DIVERGED = 3
EXIT_PREEMPTED = 99

STOP_SIGNALS = (signal.SIGTERM, signal.SIGUSR1)


class Preempted(Exception):
    """Raised once the checkpoint of the step at which a stop signal was agreed is on disk."""

    def __init__(self, signum: int, step: int) -> None:
        self.signum, self.step = signum, step
        super().__init__(f"{signal.Signals(signum).name}: stopped after step {step} with a checkpoint; "
                         f"exit code {EXIT_PREEMPTED}")


class Diverged(Exception):
    """Too many non-finite steps in a row; the message is the one-line diagnostic."""


_PR_SET_PDEATHSIG = 1
_fork_hook = {"registered": False, "armed": False}


def _forked_child() -> None:
    """Runs in every process forked while StopSignals is active (goku's checkpoint writer is a
    thread and forks nothing; a library's helper process may be forked). Such a helper must not
    inherit the trainer's signal handling, and it must die with it: a helper outliving a killed
    rank keeps that rank's sockets open, so its peers' collectives wait for a dead rank instead of
    failing (and torchrun cannot restart the job)."""
    if not _fork_hook["armed"]:
        return
    for signum in STOP_SIGNALS:
        signal.signal(signum, signal.SIG_DFL)
    if sys.platform.startswith("linux"):
        ctypes.CDLL(None, use_errno=True).prctl(_PR_SET_PDEATHSIG, signal.SIGKILL)


class StopSignals:
    """Turns SIGTERM/SIGUSR1 into a stop at the next step boundary, agreed by all ranks.

    A second signal of the same kind gets the default action (the process ends at once), so a
    run that is stuck before its next step boundary can still be stopped. Processes forked
    meanwhile keep the default actions and die with this one (``_forked_child``).
    """

    def __init__(self) -> None:
        self.received = 0
        self._previous: dict[int, Any] = {}

    def __enter__(self) -> StopSignals:
        for signum in STOP_SIGNALS:
            self._previous[signum] = signal.signal(signum, self._handle)
        if not _fork_hook["registered"]:
            os.register_at_fork(after_in_child=_forked_child)
            _fork_hook["registered"] = True
        _fork_hook["armed"] = True
        return self

    def __exit__(self, *exc: object) -> None:
        _fork_hook["armed"] = False
        for signum, handler in self._previous.items():
            signal.signal(signum, handler)
        self._previous.clear()

    def _handle(self, signum: int, frame: FrameType | None) -> None:
        if self.received == signum:
            signal.signal(signum, signal.SIG_DFL)
            os.kill(os.getpid(), signum)
            return
        self.received = signum
        log.warning("received %s: saving a checkpoint of the last complete step, then exiting with %d",
                    signal.Signals(signum).name, EXIT_PREEMPTED)

    def agreed(self, device: torch.device) -> int:
        """The signal any rank received (0: none). Collective: every rank calls it at the same
        points of every step (train.run: once its data is drawn, once it has run)."""
        flag = torch.tensor([self.received], dtype=torch.int32, device=device)
        torch.distributed.all_reduce(flag, op=torch.distributed.ReduceOp.MAX)
        return int(flag.item())


class SkipNonFiniteSteps:
    """A megatron optimizer whose ``step`` skips the update when the gradient norm is not finite.

    ``step`` follows megatron's ChainedOptimizer.step (prepare gradients, one grad norm over all
    chained optimizers, clip, update) with the finiteness check between the norm and the clip:
    a NaN norm would leave the gradients unclipped and turn every weight into NaN. Returns
    (update_successful, grad_norm, None) like megatron. Everything else is the wrapped optimizer.
    """

    def __init__(self, inner: Any) -> None:
        self.inner = inner

    def __getattr__(self, name: str) -> Any:
        if name == "inner":  # not set yet (e.g. copy.copy): no recursion
            raise AttributeError(name)
        return getattr(self.inner, name)

    @torch.no_grad()
    def step(self) -> tuple[bool, float | None, None]:
        inner = self.inner
        if inner.prepare_grads():  # a loss scaler found inf/nan (fp16)
            return False, None, None
        grad_norm = inner.get_grad_norm()
        if not math.isfinite(grad_norm):
            return False, grad_norm, None
        for opt in getattr(inner, "chained_optimizers", [inner]):
            params = [] if getattr(opt, "is_stub_optimizer", False) else opt.get_parameters()
            if params and opt.config.clip_grad > 0.0:
                mcore_optimizer.clip_grad_by_total_norm_fp32(
                    params, max_norm=opt.config.clip_grad, total_norm=grad_norm,
                    use_decoupled_grad=opt.config.use_precision_aware_optimizer_no_fp8_or_ds_fp8)
        return inner.step_with_ready_grads(), grad_norm, None


class StepGuard:
    """Counts skipped (non-finite) steps and loss spikes; stops after too many bad steps in a row.

    Decisions use the loss and grad norm that every rank already shares (all-reduced), so every
    rank decides the same. The state is part of the checkpoint, so a resumed run decides as the
    uninterrupted one would have.
    """

    def __init__(self, max_bad_steps: int, spike_factor: float, spike_window: int) -> None:
        self.max_bad_steps = max_bad_steps
        self.spike_factor = spike_factor
        self.recent: deque[float] = deque(maxlen=spike_window)
        self.skipped = 0
        self.bad_in_a_row = 0
        self.spikes = 0
        self.first_bad_step = 0

    def observe(self, step: int, loss: float, grad_norm: float | None, skipped: bool) -> dict[str, float]:
        """Record one step's outcome; returns the counters for metrics.jsonl. Raises Diverged."""
        if skipped or not math.isfinite(loss):
            self.skipped += skipped
            self.bad_in_a_row += 1
            self.first_bad_step = self.first_bad_step or step
            log.warning("step %d: non-finite loss or gradient (loss %s, grad_norm %s): %s (%d in a row)",
                        step, loss, grad_norm, "update skipped" if skipped else "update applied",
                        self.bad_in_a_row)
            if self.bad_in_a_row >= self.max_bad_steps:
                raise Diverged(
                    f"steps {self.first_bad_step}..{step}: {self.bad_in_a_row} steps in a row had a non-finite "
                    f"loss or gradient norm (last loss {loss}, grad_norm {grad_norm}, mean of the "
                    f"{len(self.recent)} good steps before {self._mean():.4g}); stopping. The latest "
                    "checkpoint holds the weights before them: lower optim.lr, raise optim.warmup_steps "
                    "or optim.clip_grad, or check the data of those steps")
        else:
            self.bad_in_a_row = 0
            self.first_bad_step = 0
            mean = self._mean()
            if self.spike_factor and len(self.recent) >= min(5, self.recent.maxlen) and loss > self.spike_factor * mean:
                self.spikes += 1
                log.warning("step %d: loss spike %.4g = %.1f x the running mean %.4g of the last %d steps",
                            step, loss, loss / mean, mean, len(self.recent))
            else:
                self.recent.append(loss)
        return {"skipped_steps": self.skipped, "loss_spikes": self.spikes}

    def _mean(self) -> float:
        return sum(self.recent) / len(self.recent) if self.recent else float("nan")

    def state_dict(self) -> dict[str, Any]:
        return {"recent": list(self.recent), "skipped": self.skipped, "bad_in_a_row": self.bad_in_a_row,
                "spikes": self.spikes, "first_bad_step": self.first_bad_step}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        self.recent.clear()
        self.recent.extend(state["recent"])
        self.skipped = int(state["skipped"])
        self.bad_in_a_row = int(state["bad_in_a_row"])
        self.spikes = int(state["spikes"])
        self.first_bad_step = int(state["first_bad_step"])


class FaultTolerance:
    """nvidia-resiliency-ext's rank monitor client, when enabled: a heartbeat per step and the
    timed sections ``setup``, ``step`` and ``checkpointing``, so that its ft_launcher terminates
    and restarts a rank that hangs (docs/checkpointing.md gives the launcher flags). Disabled,
    every method does nothing."""

    def __init__(self, enabled: bool) -> None:
        self.client: Any = None
        if not enabled:
            return
        try:
            from nvidia_resiliency_ext.fault_tolerance import RankMonitorClient
        except ImportError as err:
            raise ConfigError(f"checkpoint.fault_tolerance=true but nvidia_resiliency_ext does not import "
                              f"({err}); pip install nvidia-resiliency-ext") from None
        self.client = RankMonitorClient()
        self.client.init_workload_monitoring()

    def heartbeat(self) -> None:
        if self.client is not None:
            self.client.send_heartbeat()

    @contextlib.contextmanager
    def section(self, name: str) -> Iterator[None]:
        if self.client is None:
            yield
            return
        self.client.start_section(name)
        try:
            yield
        finally:
            self.client.end_section(name)

    def close(self) -> None:
        if self.client is not None:
            self.client.shutdown_workload_monitoring()
            self.client = None
