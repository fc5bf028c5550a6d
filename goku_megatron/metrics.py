"""Run outputs a person reads: the progress line, metrics.jsonl and TensorBoard events (rank 0)."""

from __future__ import annotations

import json
import logging
import math
import time
from pathlib import Path
from typing import Any

log = logging.getLogger("goku_megatron")


def format_duration(seconds: float) -> str:
    seconds = max(0, int(round(seconds)))
    h, rem = divmod(seconds, 3600)
    m, s = divmod(rem, 60)
    return f"{h}h{m:02d}m{s:02d}s" if h else f"{m}m{s:02d}s"


def truncate_metrics(run_dir: Path, step: int) -> None:
    """Drop the records past ``step`` from ``run_dir/metrics.jsonl``: a run resumed from the
    checkpoint of ``step`` logs those steps again, so the file keeps one record per step."""
    path = run_dir / "metrics.jsonl"
    if not path.is_file():
        return
    kept = [line for line in path.read_text().splitlines() if line and json.loads(line)["step"] <= step]
    tmp = path.with_name(path.name + ".tmp")
    tmp.write_text("".join(line + "\n" for line in kept))
    tmp.replace(path)


class MetricsLogger:
    """Writes one JSON object per logged step and the same scalars to TensorBoard."""

    def __init__(self, run_dir: Path, total_steps: int, enabled: bool) -> None:
        self.total_steps = total_steps
        self.enabled = enabled
        self.start = time.perf_counter()
        self._jsonl = None
        self._tb = None
        if enabled:
            from torch.utils.tensorboard import SummaryWriter

            run_dir.mkdir(parents=True, exist_ok=True)
            self._jsonl = open(run_dir / "metrics.jsonl", "a", buffering=1)
            self._tb = SummaryWriter(log_dir=str(run_dir / "tensorboard"))

    def elapsed(self) -> float:
        return time.perf_counter() - self.start

    def log(self, step: int, metrics: dict[str, float]) -> None:
        """Record ``metrics`` for ``step`` (1-based) and print the progress line."""
        if not self.enabled:
            return
        record: dict[str, Any] = {"step": step, **metrics, "elapsed_s": round(self.elapsed(), 3)}
        self._jsonl.write(json.dumps(record) + "\n")
        for key, value in metrics.items():
            if isinstance(value, (int, float)) and math.isfinite(value):
                self._tb.add_scalar(f"train/{key}", value, step)
        eta = metrics.get("step_time_s", 0.0) * (self.total_steps - step)
        log.info(
            "step %d/%d | loss %.4f | lr %.2e | grad_norm %.3f | %.1f samples/s | %.3f s/step | ETA %s",
            step, self.total_steps, metrics["loss"], metrics["lr"], metrics["grad_norm"],
            metrics["samples_per_s"], metrics["step_time_s"], format_duration(eta),
        )

    def close(self) -> None:
        if self._jsonl:
            self._jsonl.close()
        if self._tb:
            self._tb.close()
