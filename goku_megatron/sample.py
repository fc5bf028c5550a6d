"""Sampling: prompts (and an I2V first frame) to pixels from a trained Goku model.

The rectified-flow ODE is integrated from noise with Euler steps and classifier-free guidance
(flow.euler_sample); each velocity is one pass of the model over a pack of the batch's samples
(batch.pack_batch), and the run's VAE decodes the result (toy runs: PixelSpace, the identity on
pixels). Each prompt's noise comes from (seed, prompt index), so a prompt's output does not depend
on the other prompts. ``Sampler`` loads one unsharded model from a checkpoint of any TP/PP layout
(goku-sample, goku-eval; dist_checkpointing reshards); ``LiveSampler`` samples from the model being
trained, in its layout; ``TrainingSamples`` is the loop's train.sample_interval component.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from megatron.core import dist_checkpointing, parallel_state
from megatron.core.pipeline_parallel import get_forward_backward_func

from goku_megatron import cpu_compat, flow
from goku_megatron.batch import Pack, pack_batch, unpack
from goku_megatron.checkpoint import load_model_weights, resolve_checkpoint
from goku_megatron.config import Config, config_from_dict, toy_stage
from goku_megatron.data.encoders import run_text_encoder, run_vae
from goku_megatron.model.build import build_unsharded_model
from goku_megatron.model.context_parallel import align_packs, gather_pack
from goku_megatron.model.goku import iter_stage_models
from goku_megatron.platform import Backends, choose_backends, init_distributed

log = logging.getLogger(__name__)


@dataclass
class SampleSpec:
    """What to generate: pixel frames x height x width, ODE steps, guidance, seed, output fps."""

    frames: int
    height: int
    width: int
    steps: int = 25
    cfg_scale: float = 5.0
    seed: int = 0
    fps: int = 8


# One unsharded process, whatever layout trained the run (dist_checkpointing reshards): hybrid
# FSDP's shard groups need DP x CP ranks, and the process-group backend follows this machine.
ONE_PROCESS: dict[str, dict[str, Any]] = {
    "parallel": {"tp": 1, "pp": 1, "cp": 1, "dp": 1, "fsdp": False, "fsdp_shard_size": 0,
                 "distributed_backend": "auto"},
}


def checkpoint_config(path: Path) -> Config:
    """The run's resolved config, stored with the checkpoint, set up for one process."""
    return config_for_one_process(dist_checkpointing.load_common_state_dict(str(path))["config"], str(path))


def config_for_one_process(saved: dict[str, Any], source: str = "a run") -> Config:
    """A saved ``Config.to_dict()`` (from ``source``, named in errors) as a Config for one unsharded
    process (``ONE_PROCESS``), in the run's precision (``auto`` resolves on this machine as it did
    for training)."""
    cfg = config_from_dict(saved, source, overrides=ONE_PROCESS)
    if cfg.data.kind == "toy":  # derived from the toy fields, as validate does (older runs saved none)
        cfg.data.stages = [toy_stage(cfg.data, cfg.train.steps, cfg.train.micro_batch_size, cfg.model.patch_size)]
    return cfg


def unsharded_model(cfg: Config) -> tuple[torch.nn.Module, Backends]:
    """The whole GokuModel in this process, wrapped and typed as training runs it, weights not yet
    loaded (a one-process megatron world is set up if needed)."""
    cpu_compat.apply()
    backends = choose_backends(cfg)
    if not torch.distributed.is_initialized():
        init_distributed(cfg, backends)
    return build_unsharded_model(cfg, backends), backends


class SamplerBase:
    """Prompts (and an I2V first frame) -> pixels through the rectified-flow ODE: the noise, the
    text encoder, classifier-free guidance and the VAE. Subclasses give the velocity network's
    forward: one unsharded model (Sampler) or the model being trained in its layout (LiveSampler)."""

    cfg: Config
    device: torch.device
    name: str  # what the model is, for messages

    def _set_up_encoders(self) -> None:
        self.text_encoder = run_text_encoder(self.cfg, self.device)
        self.vae = run_vae(self.cfg, self.device)

    def velocity(self, pack: Pack) -> torch.Tensor:
        """The model's velocity tokens [budget, 1, patch_dim] for every token of ``pack``."""
        raise NotImplementedError

    def forward(self, x: torch.Tensor, t: torch.Tensor, text: torch.Tensor, text_mask: torch.Tensor,
                cond: torch.Tensor | None) -> torch.Tensor:
        """The velocity of noisy latents x [N, C, T, H, W] at timesteps t [N]: the batch goes to the
        model as one pack of N equal segments."""
        pack = pack_batch(x, t, text, text_mask, self.cfg.model.patch_size, cond=cond)
        return torch.stack(unpack(pack, self.velocity(pack)))

    def latent_shape(self, spec: SampleSpec) -> tuple[int, int, int, int]:
        return self.vae.latent_shape(spec.frames, spec.height, spec.width)

    def check_condition(self, has_image: bool) -> None:
        """An I2V model (model.i2v) samples from a first frame, any other without one."""
        if self.cfg.model.i2v and not has_image:
            raise ValueError(f"{self.name} is an image-to-video model (model.i2v): pass the first "
                             "frame with --image FILE")
        if has_image and not self.cfg.model.i2v:
            raise ValueError(f"{self.name} is not an image-to-video model (model.i2v): drop --image")

    def image_condition(self, image: torch.Tensor, spec: SampleSpec) -> torch.Tensor:
        """I2V: a first frame [3, H, W] in [-1, 1] at the sample's size -> the model's condition
        [C, T, H, W] (its latent, as a one-frame clip, broadcast over the latent frames)."""
        shape = self.latent_shape(spec)
        if tuple(image.shape) != (3, spec.height, spec.width):
            raise ValueError(f"the first frame is {tuple(image.shape)[1:]}, the samples are "
                             f"{spec.height}x{spec.width}; resize it (load_frame does)")
        first = self.vae.encode(image[None, :, None])[0].float()
        return first.to(self.device).expand(shape)

    @torch.no_grad()
    def sample(self, prompts: list[str], spec: SampleSpec, image: torch.Tensor | None = None) -> torch.Tensor:
        """Pixels [N, 3, T, H, W] in [-1, 1], one per prompt; with an I2V model, ``image`` [3, H, W]
        in [-1, 1] is the first frame of every sample."""
        self.check_condition(image is not None)
        shape = self.latent_shape(spec)
        first = None if image is None else self.image_condition(image, spec).expand(len(prompts), *shape)
        noise = torch.stack([torch.randn(shape, generator=torch.Generator().manual_seed(spec.seed * 100003 + i))
                             for i in range(len(prompts))]).to(self.device)
        text, mask = self.text_encoder(prompts)
        null_text, null_mask = self.text_encoder([""] * len(prompts))

        def velocity(x: torch.Tensor, t: torch.Tensor, cond: tuple[torch.Tensor, torch.Tensor]) -> torch.Tensor:
            return self.forward(x, t, cond[0].to(self.device), cond[1].to(self.device), first)

        latents = flow.euler_sample(velocity, noise, steps=spec.steps, cond=(text, mask),
                                    uncond=(null_text, null_mask), cfg_scale=spec.cfg_scale,
                                    shift=self.cfg.flow.shift)
        return self.vae.decode(latents.to(self.vae.dtype)).float().cpu()


class Sampler(SamplerBase):
    """One unsharded Goku model loaded from a checkpoint of any layout (goku-sample)."""

    def __init__(self, checkpoint: Path) -> None:
        self.checkpoint = resolve_checkpoint(checkpoint)
        self.name = str(self.checkpoint)
        self.cfg = cfg = checkpoint_config(self.checkpoint)
        self.model, backends = unsharded_model(cfg)
        self.device = backends.torch_device()
        info = load_model_weights(self.checkpoint, [self.model])
        self.step = info["step"]
        self.model.eval()
        self._set_up_encoders()
        log.info("sampler: %s (step %d), %s on %s", self.checkpoint, self.step,
                 "pixel space" if cfg.data.kind == "toy" else f"VAE {cfg.data.vae_path}", self.device)

    def velocity(self, pack: Pack) -> torch.Tensor:
        return self.model(pack)


class LiveSampler(SamplerBase):
    """Samples from the model being trained, in its training layout (any TP/CP/PP/DP), for
    in-training media and evaluation. Collective: every rank calls ``sample`` with the same
    arguments and gets the same pixels. Each velocity is one forward-only pass of megatron's
    pipeline schedule; the last stage returns it (gathered over the CP ranks) and broadcasts it
    along the pipeline, since the first stage needs it for the next ODE step."""

    def __init__(self, cfg: Config, model: list[torch.nn.Module], device: torch.device) -> None:
        self.cfg, self.model, self.device, self.name = cfg, model, device, "this run's model"
        self._set_up_encoders()

    def velocity(self, pack: Pack) -> torch.Tensor:
        packs, seq_length = align_packs([pack], next(iter_stage_models(self.model)).cp_layout)
        for chunk in self.model:
            chunk.eval()
        try:
            outputs = get_forward_backward_func()(
                forward_step_func=_velocity_step, data_iterator=iter(packs), model=self.model,
                num_microbatches=1, seq_length=seq_length, micro_batch_size=1, forward_only=True,
                collect_non_loss_data=True)
        finally:
            for chunk in self.model:
                chunk.train()
        patch_dim = pack.noisy.shape[-1]
        velocity = outputs[0].float() if outputs else torch.empty(pack.budget, 1, patch_dim, device=pack.noisy.device)
        group = parallel_state.get_pipeline_model_parallel_group()
        last = parallel_state.get_pipeline_model_parallel_last_rank()
        torch.distributed.broadcast(velocity, src=last, group=group)
        return velocity


def _velocity_step(data_iterator: Any, model: torch.nn.Module) -> tuple[torch.Tensor, Any]:
    """megatron forward_step_func for sampling: the last stage hands out the whole pack's velocity
    (gathered over the context-parallel ranks)."""
    pack = next(data_iterator)
    (pipeline_stage,) = iter_stage_models([model])
    output = model(pack)

    def velocity(output_tensor: torch.Tensor, non_loss_data: bool = True) -> torch.Tensor:
        shard = pipeline_stage.pack_shard(pack)
        return gather_pack(output_tensor, shard, pack.budget)

    return output, velocity


def run_spec(cfg: Config, step: int | None = None) -> SampleSpec:
    """What a run trains on: the resolution, frames and fps of the stage at ``step`` (default: the
    last stage; a toy run's one stage is its clips); the run's ODE steps and guidance, seed 0."""
    d = cfg.data
    stage = d.stages[-1] if step is None else d.stage_at(step)[1]
    return SampleSpec(stage.frames, stage.height, stage.width, cfg.flow.sample_steps, cfg.flow.cfg_scale,
                      fps=round(stage.fps))


class TrainingSamples:
    """train.sample_interval: the loop's sampling component. Every ``train.sample_interval`` steps
    and at the last step it samples ``train.sample_prompts`` from the model being trained (a
    LiveSampler, at the stage's resolution), for MetricsLogger.media. Collective, like LiveSampler."""

    def __init__(self, cfg: Config) -> None:
        self.cfg = cfg
        self.interval, self.prompts = cfg.train.sample_interval, cfg.train.sample_prompts

    def due(self, step: int) -> bool:
        return bool(self.interval) and (step % self.interval == 0 or step == self.cfg.train.steps)

    def draw(self, step: int, live: LiveSampler) -> tuple[list[str], torch.Tensor, int]:
        """(prompts, pixels [N, 3, T, H, W] in [-1, 1], fps) of the samples at ``step``."""
        spec = run_spec(self.cfg, step)
        return self.prompts, live.sample(self.prompts, spec), spec.fps
