"""goku-train: the training loop, top to bottom.

    goku-train                                   # toy recipe on CPU, creates the toy data
    goku-train --config goku-2b train.steps=20   # any recipe, dotted overrides
    goku-train --dry-run --world-size 64 ...     # resolved config, layout, backends, size
    torchrun --nproc-per-node 4 -m goku_megatron.train parallel.tp=2 parallel.pp=2

Every step, for every run (toy included): the data-parallel rank's packs from the one data path
(goku_megatron/data/pipeline.py: samples -> latents -> rectified-flow inputs seeded per sample ->
Patch n' Pack) -> megatron's forward_backward_func (1F1B across pipeline stages) with the one
rectified-flow loss (flow.flow_loss) -> megatron DDP gradient reduction -> megatron optimizer
(AdamW, clipping) and the warmup + cosine schedule.
"""

from __future__ import annotations

import argparse
import contextlib
import gc
import logging
import math
import os
import sys
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable, Iterator

import torch
import yaml

from goku_megatron import cpu_compat, flow
from goku_megatron.batch import Pack
from goku_megatron.config import Config, ConfigError, load_config, validate
from goku_megatron.data.encoders import check_weights
from goku_megatron.data.pipeline import DataWaitStopped, PackedBatches, build_data_source
from goku_megatron.flops import training_flops
from goku_megatron.platform import Backends, choose_backends, has_cuda, world_size_from_env

log = logging.getLogger("goku_megatron")

# ----------------------------------------------------------------------------------------------
# Building blocks


def build_transformer_config(cfg: Config, backends: Backends) -> Any:
    from megatron.core.transformer.transformer_config import TransformerConfig

    m, p = cfg.model, cfg.parallel
    bf16 = backends.precision == "bf16"
    recompute = m.recompute_granularity if m.recompute else None
    tc = TransformerConfig(
        num_layers=m.num_layers,
        hidden_size=m.hidden_size,
        ffn_hidden_size=m.ffn_hidden_size,
        num_attention_heads=m.num_heads,
        layernorm_epsilon=m.norm_eps,
        tensor_model_parallel_size=p.tp,
        pipeline_model_parallel_size=p.pp,
        context_parallel_size=p.cp,
        cp_comm_type=p.cp_comm_type,
        pipeline_dtype=torch.bfloat16 if bf16 else torch.float32,
        bf16=bf16,
        params_dtype=torch.bfloat16 if bf16 else torch.float32,
        use_cpu_initialization=backends.device == "cpu",
        # megatron sets the tensor-parallel attributes of its linears only in its init path, so it
        # initialises first; GokuModel.init_weights then overwrites every weight, layout-free.
        perform_initialization=True,
        init_method_std=m.init_std,
        # Batched isend/irecv over gloo is not reliable; NCCL batches them.
        batch_p2p_comm=backends.distributed == "nccl",
        # GokuModel and GokuLayer read these: "full" checkpoints each layer, "selective" each
        # core attention (megatron's own options, so its validation applies).
        recompute_granularity=recompute,
        recompute_method="uniform" if recompute == "full" else None,
        recompute_num_layers=1 if recompute == "full" else None,
        recompute_modules=["core_attn"] if recompute == "selective" else None,
        # FP8 through TE: GokuModel enters megatron's fp8 context around each layer (fp8_utils).
        fp8=m.fp8 or None,
        fp8_recipe=m.fp8_recipe,
        fp8_param=cfg.optim.fp8_param_gather,
        first_last_layers_bf16=m.fp8_bf16_layers > 0,
        num_layers_at_start_in_bf16=m.fp8_bf16_layers,
        num_layers_at_end_in_bf16=m.fp8_bf16_layers,
    )
    tc.has_cond_embedder = True  # finalize_model_grads syncs the replicated embedders over PP
    return tc


def build_model(cfg: Config, backends: Backends) -> tuple[list[torch.nn.Module], Any]:
    """This rank's pipeline stage, initialised and wrapped in megatron DDP (and Float16Module)."""
    from megatron.core import parallel_state
    from megatron.core.distributed import DistributedDataParallel, DistributedDataParallelConfig
    from megatron.core.fp8_utils import get_fp8_context
    from megatron.core.transformer.module import Float16Module

    from goku_megatron.model.goku import GokuModel
    from goku_megatron.model.specs import layer_spec

    o = cfg.optim
    tc = build_transformer_config(cfg, backends)
    # optim.fp8_param_gather: TE creates its linears' weights as FP8 tensors (a no-op context
    # otherwise). Without grad, TE keeps no high-precision copy of megatron's initial values,
    # so the optimizer's fp32 main weights start from the FP8 weights that init_weights wrote.
    with torch.no_grad(), get_fp8_context(tc, is_init=True):
        stage = GokuModel(
            tc, cfg.model, layer_spec(backends.linear, backends.attention),
            pre_process=parallel_state.is_pipeline_first_stage(),
            post_process=parallel_state.is_pipeline_last_stage(),
        )
    stage.init_weights(cfg.train.seed)
    module: torch.nn.Module = stage
    if backends.device == "cuda":
        module = module.cuda()
    if tc.bf16:
        module = Float16Module(tc, module)
    ddp_config = DistributedDataParallelConfig(
        grad_reduce_in_fp32=True, use_distributed_optimizer=o.distributed_optimizer,
        overlap_grad_reduce=o.overlap_grad_reduce, overlap_param_gather=o.overlap_param_gather,
        fp8_param_gather=o.fp8_param_gather, bucket_size=o.ddp_bucket_size or None,
    )
    return [DistributedDataParallel(config=tc, ddp_config=ddp_config, module=module)], tc


def build_optimizer(cfg: Config, model: list[torch.nn.Module], tc: Any) -> tuple[Any, Any]:
    from megatron.core.optimizer import OptimizerConfig, get_megatron_optimizer
    from megatron.core.optimizer_param_scheduler import OptimizerParamScheduler

    o = cfg.optim
    optimizer = get_megatron_optimizer(
        OptimizerConfig(
            optimizer="adam", lr=o.lr, min_lr=o.min_lr, weight_decay=o.weight_decay,
            adam_beta1=o.adam_beta1, adam_beta2=o.adam_beta2, adam_eps=o.adam_eps,
            clip_grad=o.clip_grad, bf16=tc.bf16, params_dtype=tc.params_dtype,
            use_distributed_optimizer=o.distributed_optimizer,
            # How the distributed optimizer treats FP8 weights (optim.fp8_param_gather) depends on
            # the recipe; overlap_param_gather mirrors the DDP setting, as megatron asks.
            fp8_recipe=tc.fp8_recipe if tc.fp8 else None, overlap_param_gather=o.overlap_param_gather,
        ),
        model,
    )
    scheduler = OptimizerParamScheduler(
        optimizer,
        init_lr=0.0,
        max_lr=o.lr,
        min_lr=o.min_lr if o.decay == "cosine" else o.lr,
        lr_warmup_steps=o.warmup_steps,
        lr_decay_steps=max(cfg.train.steps, o.warmup_steps + 1),
        lr_decay_style=o.decay,
        start_wd=o.weight_decay,
        end_wd=o.weight_decay,
        wd_incr_steps=cfg.train.steps,
        wd_incr_style="constant",
    )
    return optimizer, scheduler


def forward_step(data_iterator: Iterator[Pack], model: torch.nn.Module) -> tuple[torch.Tensor, Callable]:
    """megatron's forward_step_func: run the stage on one pack, and on the last stage return the loss.

    With context parallelism the stage outputs this CP rank's tokens and the loss is this rank's
    share of the pack's loss (the shares add up to it). megatron's schedule multiplies the
    returned loss by cp and DDP averages gradients over dp x cp ranks, which leaves the CP=1
    gradients; the reported loss sums the shares over CP and averages over DP."""
    from megatron.core import parallel_state

    from goku_megatron.model.goku import iter_stage_models

    pack = next(data_iterator)
    (stage,) = iter_stage_models([model])
    output = model(pack)

    def loss_func(output_tensor: torch.Tensor) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
        loss = flow.flow_loss(output_tensor, pack, tokens=stage.pack_shard(pack).source)
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


def train_step(packs: list[Pack], model: list[torch.nn.Module], optimizer: Any, scheduler: Any) -> StepResult:
    """One optimizer step over this rank's micro-batches, one pack each."""
    from megatron.core import parallel_state
    from megatron.core.pipeline_parallel import get_forward_backward_func

    from goku_megatron.model.context_parallel import align_packs
    from goku_megatron.model.goku import iter_stage_models

    for chunk in model:
        chunk.zero_grad_buffer()
    optimizer.zero_grad()
    # megatron divides seq_length by cp for the p2p shape: the CP-local sequence.
    packs, seq_length = align_packs(packs, next(iter_stage_models(model)).cp_layout)
    losses = get_forward_backward_func()(
        forward_step_func=forward_step,
        data_iterator=iter(packs),
        model=model,
        num_microbatches=len(packs),
        seq_length=seq_length,
        micro_batch_size=1,
        forward_only=False,
    )
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


@dataclass
class Training:
    """What a training process holds once set up."""

    backends: Backends
    model: list[torch.nn.Module]
    optimizer: Any
    scheduler: Any
    ema: Any = None  # goku_megatron.ema.EMA, None when checkpoint.ema_decay=0


def setup(cfg: Config, backends: Backends | None = None) -> Training:
    """Process group, seeds, this rank's model stage, optimizer (skipping non-finite steps) and
    schedule, megatron hooks, and the EMA of the weights; ``backends`` when the caller has chosen
    them already (choose_backends otherwise)."""
    from goku_megatron.ema import EMA
    from goku_megatron.platform import init_distributed, seed_everything
    from goku_megatron.resilience import SkipNonFiniteSteps

    backends = backends or choose_backends(cfg)
    init_distributed(cfg, backends)
    seed_everything(cfg.train.seed)
    model, tc = build_model(cfg, backends)
    optimizer, scheduler = build_optimizer(cfg, model, tc)
    optimizer = SkipNonFiniteSteps(optimizer)
    wire_megatron_config(tc, model, optimizer)
    ema = EMA(model, cfg.checkpoint.ema_decay) if cfg.checkpoint.ema_decay else None
    return Training(backends, model, optimizer, scheduler, ema)


def wire_megatron_config(tc: Any, model: list[torch.nn.Module], optimizer: Any) -> None:
    """Hooks megatron's schedules call: grad scaling, DDP no_sync and the final grad reduction."""
    from megatron.core.distributed import finalize_model_grads

    tc.grad_scale_func = optimizer.scale_loss
    tc.no_sync_func = model[0].no_sync
    tc.finalize_model_grads_func = finalize_model_grads


# ----------------------------------------------------------------------------------------------
# The run


def resolve_run_dir(cfg: Config) -> Path:
    """Same directory on every rank: rank 0 picks it and broadcasts. Unless train.run_dir names
    one it is runs/<name>-<torchrun's rendezvous id> under torchrun, so that a job torchrun
    restarts finds its checkpoints, and runs/<name>-<timestamp> otherwise."""
    run_id = os.environ.get("TORCHELASTIC_RUN_ID", "none")
    suffix = run_id if run_id != "none" else time.strftime("%Y%m%d-%H%M%S")
    chosen = [cfg.train.run_dir or f"runs/{cfg.train.name}-{suffix}"]
    torch.distributed.broadcast_object_list(chosen, src=0)
    return Path(chosen[0])


def run(cfg: Config, source: PackedBatches | None = None) -> list[StepResult]:
    """Train up to step ``cfg.train.steps``, continuing from a checkpoint when there is one
    (``checkpoint.resume``); returns the results of the steps this call ran (on every rank).
    ``source`` replaces the run's own data source (data.pipeline.build_data_source), for tests.

    Checkpoints every ``train.save_interval`` steps (async when ``checkpoint.async_save``) and at
    the end. Raises resilience.Preempted after the checkpoint of the step at which any rank got
    SIGTERM/SIGUSR1, and resilience.Diverged after ``checkpoint.max_bad_steps`` non-finite steps
    in a row (each skipped without touching the weights).
    """
    from megatron.core import parallel_state

    from goku_megatron.checkpoint import (
        Checkpointer,
        TrainingState,
        checkpoint_dir,
        choose_resume_checkpoint,
        init_weights_from,
        latest_checkpoint,
    )
    from goku_megatron.flops import gpu_peak_flops, mfu
    from goku_megatron.metrics import MetricsLogger, memory_metrics, truncate_metrics
    from goku_megatron.data.toy import read_validation
    from goku_megatron.evaluation import eval_scalars, evaluate
    from goku_megatron.sample import LiveSampler, run_spec
    from goku_megatron.platform import init_distributed
    from goku_megatron.resilience import Diverged, FaultTolerance, Preempted, StepGuard, StopSignals

    ck = cfg.checkpoint
    fault_tolerance = FaultTolerance(ck.fault_tolerance)
    with StopSignals() as signals, contextlib.ExitStack() as cleanup:
        cleanup.callback(fault_tolerance.close)
        with fault_tolerance.section("setup"):
            backends = choose_backends(cfg)
            init_distributed(cfg, backends)
            device = torch.device("cuda", torch.cuda.current_device()) if backends.device == "cuda" else torch.device("cpu")
            # Inputs first: missing encoder weights, a missing or empty data path or validation
            # split fail in one line before the model is built.
            check_weights(cfg)
            if source is None:
                source = build_data_source(cfg, parallel_state.get_data_parallel_rank(), cfg.parallel.dp, device)
            source.stop_requested = lambda: signals.received
            try:
                validation = read_validation(Path(cfg.data.path)) if cfg.train.eval_interval else None
            except (FileNotFoundError, ValueError) as err:
                raise ConfigError(f"train.eval_interval={cfg.train.eval_interval} evaluates on the toy "
                                  f"validation split: {err}") from None
            training = setup(cfg, backends)
            model = training.model
            optimizer, scheduler = training.optimizer, training.scheduler
            rank = torch.distributed.get_rank()
            run_dir = resolve_run_dir(cfg)
            log.info("backends: %s", backends.describe())
            log.info("layout: world=%d tp=%d pp=%d cp=%d dp=%d | run dir %s", torch.distributed.get_world_size(),
                     cfg.parallel.tp, cfg.parallel.pp, cfg.parallel.cp, cfg.parallel.dp, run_dir)

            live = LiveSampler(cfg, model, device) if cfg.train.sample_interval or cfg.train.eval_interval else None
            peak_flops = gpu_peak_flops(torch.cuda.get_device_name()) if backends.device == "cuda" else None

            state = TrainingState(model, optimizer, scheduler, training.ema)
            checkpointer = Checkpointer(run_dir, ck.keep_last, ck.async_save)
            checkpointer.remove_leftovers()
            guard = StepGuard(ck.max_bad_steps, ck.spike_factor, ck.spike_window)
            start_step, consumed = 0, 0
            resume = choose_resume_checkpoint(run_dir, cfg)
            if resume is not None:
                start_step, consumed = restore(resume, state, guard, source)
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
        metrics = MetricsLogger(run_dir, cfg.train.steps, enabled=rank == 0)

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

        cleanup.callback(metrics.close)
        results: list[StepResult] = []
        t = cfg.train
        stage = -1
        for step in range(start_step + 1, t.steps + 1):
            start = time.perf_counter()
            if cfg.data.stage_at(step)[0] != stage:
                stage, spec = cfg.data.stage_at(step)
                log.info("step %d: stage %d %s (%dx%d, %d frames at %g fps, %d-token packs, "
                         "image ratio %g)", step, stage, spec.name, spec.height, spec.width,
                         spec.frames, spec.fps, spec.token_budget, spec.image_ratio)
            mark = source.mark()
            try:
                packs = [p.to(device) for p in source.next_step(step)]
            except DataWaitStopped:  # the signal came while this rank's samples were being drawn
                packs = []
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
            extra: dict[str, float] = {"stage": stage, **bad}
            # Work of the step, over all data-parallel ranks: samples, video tokens, model FLOPs.
            video_tokens, text_tokens = step_tokens(packs)
            counts = _dp_sum([len(video_tokens), sum(video_tokens), training_flops(cfg.model, video_tokens, text_tokens),
                              *bad.values()], device)
            samples, tokens, step_flops = counts[:3]
            extra.update(zip(bad, counts[3:]))
            with fault_tolerance.section("step"):
                result = train_step(packs, model, optimizer, scheduler)
            if training.ema is not None and not result.skipped:
                training.ema.update()
            step_time = time.perf_counter() - start
            world = torch.distributed.get_world_size()
            extra.update({"tokens_per_s": tokens / step_time, "tflops_per_gpu": step_flops / step_time / world / 1e12})
            if (utilisation := mfu(step_flops, step_time, world, peak_flops)) is not None:
                extra["mfu"] = utilisation
            results.append(result)
            consumed += samples
            try:
                extra.update(guard.observe(step, result.loss, result.grad_norm, result.skipped))
            except Diverged as err:
                checkpointer.close()  # a save in flight holds good weights: let it complete
                resume_from = latest_checkpoint(run_dir)
                raise Diverged(f"{err}. A restart resumes from {resume_from or 'scratch (no checkpoint yet)'}"
                               + (": check that it is sound first" if resume_from else "")) from None
            stop = signals.agreed(device)
            checkpointer.poll()
            saving = bool(stop) or step == t.steps or bool(t.save_interval and step % t.save_interval == 0)
            if saving:
                extra["checkpoint_blocking_s"] = save(step, blocking=bool(stop) or step == t.steps)
            evaluating = bool(t.eval_interval) and (step % t.eval_interval == 0 or step == t.steps)
            if evaluating:
                eval_start = time.perf_counter()
                bench, losses = evaluate(live, run_spec(cfg, step), validation, t.eval_samples_per_prompt)
                extra.update({**eval_scalars(bench, losses), "eval/time_s": time.perf_counter() - eval_start})
            if step % t.log_interval == 0 or step in (1, t.steps) or saving or evaluating:
                metrics.log(step, {
                    "loss": result.loss, "lr": result.lr, "grad_norm": result.grad_norm,
                    "samples_per_s": samples / step_time, "step_time_s": step_time,
                    "consumed_samples": consumed, **extra, **memory_metrics(device),
                })
            if t.sample_interval and (step % t.sample_interval == 0 or step == t.steps):
                spec = run_spec(cfg, step)
                metrics.media(step, t.sample_prompts, live.sample(t.sample_prompts, spec), spec.fps)
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


def restore(path: Path, state: Any, guard: Any, loader: PackedBatches) -> tuple[int, int]:
    """Load checkpoint ``path`` into the training state, the step guard and the data loader;
    returns (step, consumed samples). The loader continues exactly when the data-parallel size is
    the one it was saved with; otherwise it starts over (one line says so)."""
    from megatron.core import parallel_state

    from goku_megatron.checkpoint import load_checkpoint, load_loader_state, read_manifest

    info = load_checkpoint(path, state)
    train_state = info["train_state"]
    if "guard" in train_state:
        guard.load_state_dict(train_state["guard"])
    saved_dp = read_manifest(path)["layout"]["dp"]
    loader_state = load_loader_state(path, parallel_state.get_data_parallel_rank())
    if saved_dp != parallel_state.get_data_parallel_world_size():
        log.warning("%s was saved with dp=%d, this run has dp=%d: the data order starts over",
                    path.name, saved_dp, parallel_state.get_data_parallel_world_size())
    elif loader_state is None:
        log.warning("%s holds no data loader state: the data order starts over", path.name)
    else:
        loader.load_state_dict(loader_state)
    log.info("resumed from %s: step %d, %d samples consumed", path, info["step"],
             train_state.get("consumed_samples", 0))
    return int(info["step"]), int(train_state.get("consumed_samples", 0))


def step_tokens(packs: list[Pack]) -> tuple[list[int], list[int]]:
    """Video tokens and caption tokens of each sample in this rank's packs (padding and dropped
    captions' null token excluded), for the step's model FLOPs (flops.training_flops)."""
    video = [math.prod(grid) for pack in packs for grid in pack.grids]
    text = [n for pack in packs for n in pack.text_mask.sum(dim=1).tolist()]
    return video, text


def _dp_sum(local: list[float], device: torch.device) -> list[int]:
    """Per-DP-rank counts summed over the data-parallel group."""
    from megatron.core import parallel_state

    total = torch.tensor(local, dtype=torch.float64, device=device)
    torch.distributed.all_reduce(total, group=parallel_state.get_data_parallel_group())
    return [int(v) for v in total.tolist()]


# ----------------------------------------------------------------------------------------------
# Command line


def dry_run_report(cfg: Config, world_size: int) -> str:
    """Everything --dry-run prints: nothing is allocated, no process group is started."""
    from goku_megatron.model.goku import count_parameters

    backends = choose_backends(cfg)
    p, t = cfg.parallel, cfg.train
    n_micro = t.global_batch_size // (t.micro_batch_size * p.dp)
    params = count_parameters(cfg.model)
    lines = [
        "# resolved config",
        yaml.safe_dump(cfg.to_dict(), sort_keys=False).rstrip(),
        "# parallel layout",
        f"world_size={world_size} tp={p.tp} pp={p.pp} cp={p.cp} dp={p.dp} "
        f"layers_per_stage={cfg.model.num_layers // p.pp} micro_batches_per_step={n_micro} "
        f"micro_batch_size={t.micro_batch_size} global_batch_size={t.global_batch_size}",
        "# backends",
        f"attention={backends.attention} linear={backends.linear} optimizer={backends.optimizer} "
        f"data={backends.data} distributed={backends.distributed} device={backends.device} "
        f"precision={backends.precision}",
        "# parameters",
        f"parameters={params:,} ({params / 1e9:.2f} B)",
    ]
    return "\n".join(lines)


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(prog="goku-train", description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--config", default="toy", help="recipe name (goku_megatron/recipes) or YAML path")
    parser.add_argument("--dry-run", action="store_true", help="print config, layout, backends, size; exit")
    parser.add_argument("--world-size", type=int, default=None,
                        help="world size to plan for in --dry-run (default: $WORLD_SIZE or 1)")
    parser.add_argument("--resume", metavar="PATH", default=None,
                        help="start from this checkpoint (checkpoints/iter_N) or run directory; same as "
                             "checkpoint.resume=PATH (restarts continue from the run dir's own checkpoints)")
    parser.add_argument("overrides", nargs="*", help="dotted key=value overrides, e.g. train.steps=20")
    return parser.parse_intermixed_args(argv)


def setup_logging() -> None:
    rank = int(os.environ.get("RANK", "0"))
    logging.basicConfig(level=logging.INFO if rank == 0 else logging.WARNING,
                        format=f"[%(asctime)s rank{rank}] %(message)s", datefmt="%H:%M:%S",
                        stream=sys.stdout)


def main(argv: list[str] | None = None) -> int:
    """goku-train; the exit codes are resilience.EXIT_* (0 done, 2 bad config, 3 diverged,
    99 preempted with a checkpoint saved)."""
    from goku_megatron.resilience import EXIT_CONFIG_ERROR, EXIT_DIVERGED, EXIT_PREEMPTED, Diverged, Preempted

    args = parse_args(argv)
    setup_logging()
    world_size = args.world_size if args.world_size is not None else world_size_from_env()
    try:
        cfg = load_config(args.config, args.overrides)
        if args.resume is not None:
            cfg.checkpoint.resume = args.resume
        validate(cfg, world_size, has_cuda=has_cuda())
    except ConfigError as err:
        print(f"goku-train: error: {err}", file=sys.stderr)
        return EXIT_CONFIG_ERROR
    cpu_compat.apply()
    if args.dry_run:
        print(dry_run_report(cfg, world_size))
        return 0
    from goku_megatron.platform import shutdown_distributed

    try:
        run(cfg)
    except ConfigError as err:
        print(f"goku-train: error: {err}", file=sys.stderr)
        return EXIT_CONFIG_ERROR
    except Preempted as stop:
        log.warning("%s", stop)
        return EXIT_PREEMPTED
    except Diverged as err:
        print(f"goku-train: error: {err}", file=sys.stderr)
        return EXIT_DIVERGED
    finally:
        shutdown_distributed()
    return 0


if __name__ == "__main__":
    sys.exit(main())
