"""Run outputs a person reads: the progress line, metrics.jsonl and TensorBoard events (rank 0)."""

from __future__ import annotations

import io
import json
import logging
import math
import resource
import time
from pathlib import Path
from typing import Any

import torch
from PIL import Image
from tensorboard.compat.proto.summary_pb2 import Summary
from torch.utils.tensorboard import SummaryWriter

from goku_megatron.media import slug, to_uint8, write_media

log = logging.getLogger(__name__)


def format_duration(seconds: float) -> str:
    seconds = max(0, int(round(seconds)))
    h, rem = divmod(seconds, 3600)
    m, s = divmod(rem, 60)
    return f"{h}h{m:02d}m{s:02d}s" if h else f"{m}m{s:02d}s"


def memory_metrics(device: Any) -> dict[str, float]:
    """Memory scalars: on GPU the peak allocated and the reserved memory since the last call (the
    peak is reset), on CPU the process's peak resident set size."""
    if device.type == "cuda":
        peak = torch.cuda.max_memory_allocated(device) / 2**30
        torch.cuda.reset_peak_memory_stats(device)
        return {"gpu_mem_peak_gib": peak, "gpu_mem_reserved_gib": torch.cuda.memory_reserved(device) / 2**30}
    return {"max_rss_gib": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 2**20}  # KiB on Linux


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


def gif_summary(tag: str, frames: Any, fps: int) -> Any:
    """A TensorBoard image summary holding uint8 frames [T, H, W, 3] as an animated GIF, the form
    TensorBoard plays (what SummaryWriter.add_video writes, without its moviepy dependency)."""
    images = [Image.fromarray(frame) for frame in frames]
    buffer = io.BytesIO()
    images[0].save(buffer, format="GIF", save_all=True, append_images=images[1:],
                   duration=max(1, round(1000 / fps)), loop=0)
    t, h, w, _ = frames.shape
    image = Summary.Image(height=h, width=w, colorspace=3, encoded_image_string=buffer.getvalue())
    return Summary(value=[Summary.Value(tag=tag, image=image)])


class MetricsLogger:
    """Writes one JSON object per logged step and the same scalars to TensorBoard."""

    def __init__(self, run_dir: Path, total_steps: int, enabled: bool, interval: int = 1) -> None:
        self.run_dir = run_dir
        self.total_steps = total_steps
        self.interval = interval  # train.log_interval
        self.enabled = enabled
        self.start = time.perf_counter()
        self._jsonl = None
        self._tb = None
        if enabled:
            run_dir.mkdir(parents=True, exist_ok=True)
            self._jsonl = open(run_dir / "metrics.jsonl", "a", buffering=1)
            self._tb = SummaryWriter(log_dir=str(run_dir / "tensorboard"))

    def due(self, step: int, forced: bool = False) -> bool:
        """The training loop's question: log ``step``? Every ``interval`` steps, the first and the
        last, and ``forced`` (a step that saved or evaluated, so its record holds those numbers)."""
        return forced or step % self.interval == 0 or step in (1, self.total_steps)

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
                self._tb.add_scalar(key if "/" in key else f"train/{key}", value, step)  # eval/* as named
        eta = metrics.get("step_time_s", 0.0) * (self.total_steps - step)
        log.info(
            "step %d/%d | loss %.4f | lr %.2e | grad_norm %.3f | %.1f samples/s | %.3f s/step (data %.3f s) | ETA %s",
            step, self.total_steps, metrics["loss"], metrics["lr"], metrics["grad_norm"],
            metrics["samples_per_s"], metrics["step_time_s"], metrics.get("data_wait_s", 0.0), format_duration(eta),
        )
        if "eval/val_loss" in metrics:
            accuracy = " | ".join(
                f"{split} " + " ".join(f"{name} {metrics.get(f'eval/{name}_{split}', float('nan')):.2f}"
                                       for name in ("color", "shape", "direction"))
                for split in ("seen", "held_out"))
            log.info("step %d eval | %s | val_loss %.4f | %.1f s", step, accuracy, metrics["eval/val_loss"],
                     metrics.get("eval/time_s", 0.0))

    def media(self, step: int, prompts: list[str], pixels: Any, fps: int) -> None:
        """Samples [N, 3, T, H, W] in [-1, 1]: MP4/PNG files under samples/step_N/ and, per prompt,
        an animated GIF in TensorBoard's images tab (tag ``samples/<prompt>``)."""
        if not self.enabled:
            return
        folder = self.run_dir / "samples" / f"step_{step:07d}"
        folder.mkdir(parents=True, exist_ok=True)
        for i, (prompt, sample) in enumerate(zip(prompts, pixels)):
            write_media(sample, folder / slug(prompt, i), fps)
            self._tb.file_writer.add_summary(gif_summary(f"samples/{slug(prompt, i)}", to_uint8(sample), fps), step)
        self._tb.flush()

    def close(self) -> None:
        if self._jsonl:
            self._jsonl.close()
        if self._tb:
            self._tb.close()
