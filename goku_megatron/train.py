"""The training loop, top to bottom (goku-train's command line is goku_megatron/cli/train.py).

Every step, for every run (toy included): the data-parallel rank's packs from the one data path
(goku_megatron/data/pipeline.py: samples -> latents -> rectified-flow inputs seeded per sample ->
Patch n' Pack) -> megatron's forward_backward_func (1F1B across pipeline stages) with the one
rectified-flow loss (flow.flow_loss) -> megatron DDP gradient reduction -> megatron optimizer
(AdamW, clipping) and the warmup + cosine schedule (optim.py). The loop then asks its components
whether to act this step: the checkpointer (checkpoint.Checkpointer), the evaluator
(evaluation.Evaluator), the in-training sampler (sample.TrainingSamples) and the metrics logger.
"""

from __future__ import annotations

import contextlib
import gc
import logging
import os
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Callable, Iterator

import torch
import yaml
from megatron.core import parallel_state
from megatron.core.distributed import finalize_model_grads
from megatron.core.pipeline_parallel import get_forward_backward_func

from goku_megatron import flow
from goku_megatron.batch import Pack
from goku_megatron.checkpoint import (Checkpointer, TrainingState, checkpoint_dir, choose_resume_checkpoint,
                                      init_weights_from, latest_checkpoint, read_manifest, restore, start_from_base)
from goku_megatron.config import Config
from goku_megatron.data.encoders import check_weights
from goku_megatron.data.pipeline import DataWaitStopped, PackedBatches, ReadAhead, build_data_source
from goku_megatron.ema import EMA
from goku_megatron.evaluation import Evaluator
from goku_megatron.flops import gpu_peak_flops, mfu, pack_tokens, training_flops
from goku_megatron.metrics import MetricsLogger, memory_metrics, truncate_metrics
from goku_megatron.model.build import build_model
from goku_megatron.model.context_parallel import align_packs
from goku_megatron.model.goku import iter_stage_models
from goku_megatron.optim import build_optimizer
from goku_megatron.platform import Backends, choose_backends, dp_sum, init_distributed, seed_everything, sharding
from goku_megatron.resilience import Diverged, FaultTolerance, Preempted, StepGuard, StopSignals
from goku_megatron.run_lock import run_dir_lock
from goku_megatron.sample import LiveSampler, TrainingSamples

log = logging.getLogger(__name__)


def forward_step(data_iterator: Iterator[Pack], model: torch.nn.Module) -> tuple[torch.Tensor, Callable]:
    """megatron's forward_step_func: run the stage on one pack, and on the last stage return the loss.

    With context parallelism the stage outputs this CP rank's tokens and the loss is this rank's
    share of the pack's loss (the shares add up to it). megatron's schedule multiplies the
    returned loss by cp and DDP averages gradients over dp x cp ranks, which leaves the CP=1
    gradients; the reported loss sums the shares over CP and averages over DP."""
    pack = next(data_iterator)
    (pipeline_stage,) = iter_stage_models([model])
    output = model(pack)

    def loss_func(output_tensor: torch.Tensor) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
        shard = pipeline_stage.pack_shard(pack)
        loss = flow.flow_loss(output_tensor, pack, tokens=None if shard.whole else shard.source)
        reported = loss.detach().clone()
        torch.distributed.all_reduce(reported, group=parallel_state.get_data_parallel_group(with_context_parallel=True))
        reported /= parallel_state.get_data_parallel_world_size()
        return loss, {"loss": reported}

    return output, loss_func


@dataclass
class StepResult:
    loss: float
    grad_norm: float
    lr: float
    skipped: bool


def train_step(packs: list[Pack], model: list[torch.nn.Module], optimizer, scheduler) -> StepResult:
    """One optimizer step over this rank's micro-batches, one pack each."""
    for chunk in model:
        chunk.zero_grad_buffer()
    optimizer.zero_grad()
    # megatron divides seq_length by cp for the p2p shape: the CP-local sequence.
    packs, seq_length = align_packs(packs, next(iter_stage_models(model)).cp_layout)
    for stage in iter_stage_models(model):  # host work and asynchronous copies, before any kernel runs
        stage.prepare(packs)
    losses = get_forward_backward_func()(
        forward_step_func=forward_step, data_iterator=iter(packs), model=model, num_microbatches=len(packs),
        seq_length=seq_length, micro_batch_size=1, forward_only=False)
    update_ok, grad_norm, _ = optimizer.step()
    if update_ok:
        scheduler.step(increment=1)
    # The loss lives on the last pipeline stage; share it along the pipeline for logging.
    loss = torch.zeros(())
    if losses:
        loss = torch.stack([d["loss"].float().cpu() for d in losses]).mean()
    loss = loss.to(packs[0].noisy.device)
    torch.distributed.all_reduce(loss, group=parallel_state.get_pipeline_model_parallel_group())
    return StepResult(loss=float(loss), grad_norm=float(grad_norm or 0.0),
                      lr=optimizer.param_groups[0]["lr"], skipped=not update_ok)


def setup(cfg: Config, backends: Backends | None = None) -> TrainingState:
    """Process group, seeds, this rank's model stage, optimizer and schedule, megatron's schedule
    hooks (grad scaling, DDP no_sync, the final grad reduction) and the EMA of the weights;
    ``backends`` when the caller has chosen them already (choose_backends otherwise)."""
    backends = backends or choose_backends(cfg)
    init_distributed(cfg, backends)
    seed_everything(cfg.train.seed)
    model, tc = build_model(cfg, backends)
    optimizer, scheduler = build_optimizer(cfg, model, tc)
    tc.grad_scale_func = optimizer.scale_loss
    tc.no_sync_func = model[0].no_sync
    tc.finalize_model_grads_func = finalize_model_grads
    ema = EMA(model, cfg.checkpoint.ema_decay) if cfg.checkpoint.ema_decay else None
    return TrainingState(model, optimizer, scheduler, ema)


def resolve_run_dir(cfg: Config) -> Path:
    """Same directory on every rank: rank 0 picks it and broadcasts. Unless train.run_dir names
    one it is runs/<name>-<torchrun's rendezvous id> under torchrun, so that a job torchrun
    restarts finds its checkpoints, and runs/<name>-<timestamp> otherwise."""
    run_id = os.environ.get("TORCHELASTIC_RUN_ID", "none")
    suffix = run_id if run_id != "none" else time.strftime("%Y%m%d-%H%M%S")
    chosen = [cfg.train.run_dir or f"runs/{cfg.train.name}-{suffix}"]
    torch.distributed.broadcast_object_list(chosen, src=0)
    return Path(chosen[0])


def run(cfg: Config, source: PackedBatches | ReadAhead | None = None) -> list[StepResult]:
    """Train up to step ``cfg.train.steps``, continuing from a checkpoint when there is one
    (``checkpoint.resume``); returns the results of the steps this call ran (on every rank).
    ``source`` replaces the run's own data source (data.pipeline.build_data_source), for tests.

    Raises resilience.Preempted after the checkpoint of the last complete step once any rank got
    SIGTERM/SIGUSR1, and resilience.Diverged after ``checkpoint.max_bad_steps`` non-finite steps
    in a row (each skipped without touching the weights).
    """
    ck, t = cfg.checkpoint, cfg.train
    fault_tolerance = FaultTolerance(ck.fault_tolerance)
    with StopSignals() as signals, contextlib.ExitStack() as cleanup:
        cleanup.callback(fault_tolerance.close)
        with fault_tolerance.section("setup"):
            backends = choose_backends(cfg)
            init_distributed(cfg, backends)
            # One writer per run directory, refused before anything is read, built or written.
            run_dir = resolve_run_dir(cfg)
            cleanup.enter_context(run_dir_lock(run_dir))
            device = backends.torch_device()
            # Inputs first: missing encoder weights, a missing or empty data path or validation
            # split fail in one line before the model is built.
            check_weights(cfg)
            if source is None:
                source = build_data_source(cfg, parallel_state.get_data_parallel_rank(), cfg.parallel.dp, device)
            source.stop_requested = lambda: signals.received
            cleanup.callback(source.close)
            evaluator = Evaluator(cfg)
            state = setup(cfg, backends)
            rank = torch.distributed.get_rank()
            log.info("backends: %s", backends.describe())
            log.info("layout: world=%d tp=%d pp=%d cp=%d dp=%d (%s) | run dir %s", torch.distributed.get_world_size(),
                     cfg.parallel.tp, cfg.parallel.pp, cfg.parallel.cp, cfg.parallel.dp, sharding(cfg), run_dir)
            live = LiveSampler(cfg, state.model, device) if t.sample_interval or t.eval_interval else None
            samples = TrainingSamples(cfg)
            peak_flops = gpu_peak_flops(torch.cuda.get_device_name()) if backends.device == "cuda" else None
            checkpointer = Checkpointer(run_dir, ck.keep_last, ck.async_save, t.save_interval, t.steps)
            checkpointer.remove_leftovers()
            guard = StepGuard(ck.max_bad_steps, ck.spike_factor, ck.spike_window)
            start_step, consumed = 0, 0
            if (resume := choose_resume_checkpoint(run_dir, cfg)) is not None:
                start_step, consumed = restore(resume, state, guard, source)
                checkpointer.base = read_manifest(resume).get("base")
            elif cfg.lora.rank:
                checkpointer.base = start_from_base(state, cfg)
                log.info("LoRA: rank %d adapters on %s, the base frozen", cfg.lora.rank, checkpointer.base["path"])
            elif ck.init_from:
                origin = init_weights_from(Path(ck.init_from), state, cfg, ema=ck.init_from_ema)
                log.info("finetuning: %s weights from %s; optimizer, schedule and data start anew",
                         "EMA" if ck.init_from_ema else "trained", origin)
            if rank == 0:
                run_dir.mkdir(parents=True, exist_ok=True)
                (run_dir / "config.yaml").write_text(yaml.safe_dump(cfg.to_dict(), sort_keys=False))
                truncate_metrics(run_dir, start_step)  # steps past the checkpoint are done again
            # megatron's distributed optimizer runs gc.collect() at every save; with the set-up
            # objects (modules, model, data) frozen out of collection it takes milliseconds.
            gc.freeze()
        metrics = cleanup.enter_context(MetricsLogger(run_dir, cfg, enabled=rank == 0))

        def save(step: int, blocking: bool) -> float:
            """Checkpoint the state after ``step`` (the last step run: ``consumed`` counts its
            samples); returns the seconds training was blocked."""
            with fault_tolerance.section("checkpointing"):
                blocked = checkpointer.save(
                    step, state, cfg.to_dict(), blocking=blocking,
                    train_state={"consumed_samples": consumed, "guard": guard.state_dict()},
                    loader_state=source.state_dict())
            log.info("step %d: checkpoint saved (training blocked %.3f s)", step, blocked)
            return blocked

        results: list[StepResult] = []
        stage = -1
        for step in range(start_step + 1, t.steps + 1):
            start = time.perf_counter()
            if cfg.data.stage_at(step)[0] != stage:
                stage, spec = cfg.data.stage_at(step)
                log.info("step %d: stage %d %s (%dx%d, %d frames at %g fps, %d-token packs, image ratio %g)",
                         step, stage, spec.name, spec.height, spec.width, spec.frames, spec.fps,
                         spec.token_budget, spec.image_ratio)
            mark = source.mark()
            try:
                packs = [p.to(device) for p in source.next_step(step)]
            except DataWaitStopped:  # the signal came while this rank's samples were being drawn
                packs = []
            data_wait = time.perf_counter() - start  # what the step waited for its packs
            # Collective: a rank stopped inside its data wait must not leave the others in the
            # step's collectives, so every rank learns of it before the step starts and all stop
            # after the last complete step, its data unread.
            if stop := signals.agreed(device):
                source.rollback(mark)
                checkpointer.wait()  # the last step's async save, if in flight, completes first
                if not checkpoint_dir(run_dir, step - 1).exists():
                    save(step - 1, blocking=True)
                raise Preempted(stop, step - 1)
            bad = source.bad.as_metrics()
            extra: dict[str, float] = {"stage": stage, "data_wait_s": data_wait, **bad}
            # Work of the step, over all data-parallel ranks: samples, video tokens, model FLOPs.
            video_tokens, text_tokens = pack_tokens(packs)
            flops = training_flops(cfg.model, video_tokens, text_tokens, frozen_base=cfg.lora.rank > 0)
            counts = dp_sum([len(video_tokens), sum(video_tokens), flops, *bad.values()], device)
            samples_done, tokens, step_flops = counts[:3]
            extra.update(zip(bad, counts[3:]))
            with fault_tolerance.section("step"):
                result = train_step(packs, state.model, state.optimizer, state.scheduler)
            if state.ema is not None and not result.skipped:
                state.ema.update()
            step_time = time.perf_counter() - start
            world = torch.distributed.get_world_size()
            extra.update({"tokens_per_s": tokens / step_time, "tflops_per_gpu": step_flops / step_time / world / 1e12})
            if (utilisation := mfu(step_flops, step_time, world, peak_flops)) is not None:
                extra["mfu"] = utilisation
            results.append(result)
            consumed += samples_done
            try:
                extra.update(guard.observe(step, result.loss, result.grad_norm, result.skipped))
            except Diverged as err:
                checkpointer.close()  # a save in flight holds good weights: let it complete
                resume_from = latest_checkpoint(run_dir)
                raise Diverged(f"{err}. A restart resumes from {resume_from or 'scratch (no checkpoint yet)'}"
                               + (": check that it is sound first" if resume_from else "")) from None
            stop = signals.agreed(device)
            checkpointer.poll()
            if saving := checkpointer.due(step, bool(stop)):
                extra["checkpoint_blocking_s"] = save(step, blocking=checkpointer.must_block(step, bool(stop)))
            if evaluating := evaluator.due(step):
                extra.update(evaluator.run(step, live))
            if metrics.due(step, forced=saving or evaluating):
                metrics.log(step, {
                    "loss": result.loss, "lr": result.lr, "grad_norm": result.grad_norm,
                    "samples_per_s": samples_done / step_time, "step_time_s": step_time,
                    "consumed_samples": consumed, **extra, **memory_metrics(device),
                })
            if samples.due(step):
                metrics.media(step, *samples.draw(step, live))
            fault_tolerance.heartbeat()
            if stop and step < t.steps:  # at the last step the run is simply done
                raise Preempted(stop, step)
        checkpointer.close()
    if results:
        log.info("done: steps %d..%d in %.1f s, loss %.4f -> %.4f", start_step + 1, t.steps,
                 metrics.elapsed(), results[0].loss, results[-1].loss)
    else:
        log.info("done: the checkpoint is at step %d = train.steps; nothing to train", start_step)
    return results
