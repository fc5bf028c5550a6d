"""Run outputs a person reads: the progress line, metrics.jsonl, TensorBoard events and, when
train.wandb_project names one, a Weights & Biases run (rank 0)."""

from __future__ import annotations

import io
import json
import logging
import math
import os
import resource
import time
from pathlib import Path
from types import TracebackType
from typing import Any, Callable

import torch
from PIL import Image
from tensorboard.compat.proto.summary_pb2 import Summary
from torch.utils.tensorboard import SummaryWriter

from goku_megatron.config import Config, TrainConfig
from goku_megatron.media import slug, to_uint8, write_media
from goku_megatron.resilience import EXIT_PREEMPTED, Preempted

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


def chart_tag(key: str) -> str:
    """A metric's name in TensorBoard and W&B: eval/* and bad/* as named, the others under train/."""
    return key if "/" in key else f"train/{key}"


class WandbSink:
    """The W&B side of MetricsLogger (rank 0): the same records at the same steps, the resolved
    config, and the in-training samples as videos.

    W&B is an extra, never a condition of training: a missing package, or an exception from any
    W&B call (no network, a bad API key, wandb.init, wandb.log), is logged in one line, after which
    the sink turns itself off; metrics.jsonl and TensorBoard carry on. The run's id is kept in
    ``run_dir/wandb_run_id``, so a restart in the same run directory (torchrun, a requeued SLURM
    job) continues the same W&B run and its curves. Those restarts redo the steps since the last
    checkpoint; W&B keeps one point per step (the first), so online the sink leaves out the steps
    the resumed run already has, which W&B would drop with a warning each (a resume is exact, so
    the values are the same)."""

    def __init__(self, run_dir: Path, train: TrainConfig, config: dict[str, Any]) -> None:
        self._run: Any = None  # wandb's Run while the sink is on
        self._first_step = 0
        try:
            import wandb
        except ImportError:
            log.warning("train.wandb_project=%s but the wandb package is not installed (pip install "
                        "'goku-megatron[wandb]'): no W&B for this run; TensorBoard and metrics.jsonl continue",
                        train.wandb_project)
            return
        except Exception as err:  # a broken install, e.g. a protobuf its generated code cannot use
            self._turn_off("import wandb", err)
            return
        self._wandb = wandb
        id_file = run_dir / "wandb_run_id"
        run_id = id_file.read_text().strip() if id_file.is_file() else None
        self._run = self._call("wandb.init", lambda: wandb.init(
            project=train.wandb_project, entity=train.wandb_entity or None,
            name=train.wandb_run_name or run_dir.name, id=run_id, resume="allow", dir=str(run_dir),
            mode=train.wandb_mode, config=config, settings=wandb.Settings(silent=True)))  # this log says it
        if self._run is None:
            return
        id_file.write_text(self._run.id + "\n")
        self._first_step = self._run.starting_step  # online, after a resume: the step after W&B's last
        url = f" {self._run.url}" if train.wandb_mode == "online" else ""
        log.info("W&B: %s run %s in project %s (%s)%s", "continuing" if run_id else "new", self._run.id,
                 train.wandb_project, train.wandb_mode, url)

    def log(self, step: int, values: dict[str, Any]) -> None:
        """Values (scalars, or W&B media) for ``step``; several calls for one step add to one row."""
        if self._run is not None and step >= self._first_step:
            self._call("wandb.log", lambda: self._run.log(values, step=step))

    def videos(self, step: int, samples: dict[str, tuple[Path, str]]) -> None:
        """Sample files by tag, each with its prompt: MP4s as W&B videos, one-frame PNGs as images."""
        if self._run is not None:
            self.log(step, {tag: (self._wandb.Video if path.suffix == ".mp4" else self._wandb.Image)(
                str(path), caption=prompt) for tag, (path, prompt) in samples.items()})

    def close(self, error: BaseException | None) -> None:
        """Finish the W&B run: failed when training raised, preempted (to be resumed) on a stop signal."""
        run, self._run = self._run, None

        def finish() -> None:
            if isinstance(error, Preempted):
                run.mark_preempting()
            run.finish(exit_code=0 if error is None else EXIT_PREEMPTED if isinstance(error, Preempted) else 1)

        if run is not None:
            self._call("run.finish", finish)

    def _call(self, what: str, action: Callable[[], Any]) -> Any:
        """``action()``, or None after one log line when it raises; the sink is off from then on."""
        try:
            return action()
        except Exception as err:  # any W&B failure: training goes on without it
            self._turn_off(what, err)
            return None

    def _turn_off(self, what: str, err: Exception) -> None:
        """The one line that says W&B failed, with the first line of its error."""
        self._run = None
        message = f"{type(err).__name__}: {(str(err).splitlines() or [''])[0]}"
        if key := os.environ.get("WANDB_API_KEY"):  # W&B's own messages may quote it
            message = message.replace(key, "<WANDB_API_KEY>")
        log.warning("W&B: %s failed (%s); W&B is off for the rest of this run, TensorBoard and "
                    "metrics.jsonl continue", what, message)


class MetricsLogger:
    """Writes one JSON object per logged step and the same scalars to TensorBoard and W&B; a
    context manager, so that the W&B run learns how training ended."""

    def __init__(self, run_dir: Path, cfg: Config, enabled: bool) -> None:
        t = cfg.train
        self.run_dir = run_dir
        self.total_steps = t.steps
        self.interval = t.log_interval
        self.enabled = enabled
        self.start = time.perf_counter()
        self._jsonl = None
        self._tb = None
        self._wandb: WandbSink | None = None
        if enabled:
            run_dir.mkdir(parents=True, exist_ok=True)
            self._jsonl = open(run_dir / "metrics.jsonl", "a", buffering=1)
            self._tb = SummaryWriter(log_dir=str(run_dir / "tensorboard"))
            if t.wandb_project and t.wandb_mode != "disabled":
                self._wandb = WandbSink(run_dir, t, cfg.to_dict())

    def __enter__(self) -> MetricsLogger:
        return self

    def __exit__(self, kind: type[BaseException] | None, error: BaseException | None,
                 traceback: TracebackType | None) -> None:
        self.close(error)

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
        charts = {chart_tag(key): value for key, value in record.items()
                  if key != "step" and isinstance(value, (int, float))}
        for tag, value in charts.items():
            if math.isfinite(value):
                self._tb.add_scalar(tag, value, step)
        if self._wandb:
            self._wandb.log(step, charts)
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
        an animated GIF in TensorBoard's images tab and those files in W&B (tag ``samples/<prompt>``)."""
        if not self.enabled:
            return
        folder = self.run_dir / "samples" / f"step_{step:07d}"
        folder.mkdir(parents=True, exist_ok=True)
        files = {}
        for i, (prompt, sample) in enumerate(zip(prompts, pixels)):
            tag = f"samples/{slug(prompt, i)}"
            files[tag] = (write_media(sample, folder / slug(prompt, i), fps), prompt)
            self._tb.file_writer.add_summary(gif_summary(tag, to_uint8(sample), fps), step)
        self._tb.flush()
        if self._wandb:
            self._wandb.videos(step, files)

    def close(self, error: BaseException | None = None) -> None:
        """``error``: what stopped training, if anything (the W&B run records it)."""
        if self._jsonl:
            self._jsonl.close()
        if self._tb:
            self._tb.close()
        if self._wandb:
            self._wandb.close(error)
