"""goku-sample: prompts to videos (MP4) or images (PNG) from any goku-train checkpoint.

    goku-sample --checkpoint runs/toy-20261122-0500 --prompt "a red square moving left" --out samples/
    goku-sample --checkpoint runs/x/checkpoints/iter_0001000 --prompts-file prompts.txt --steps 50

The checkpoint may come from any TP/PP layout: the weights are loaded into one unsharded model
(dist_checkpointing reshards). Sampling integrates the rectified-flow ODE from noise with Euler
steps and classifier-free guidance (flow.euler_sample); each velocity is one pass of the model over
a pack of the batch's samples (batch.pack_batch), and the run's VAE decodes the result (toy runs:
PixelSpace, the identity on pixels). Each prompt's noise comes from (seed, prompt index), so a prompt's
output does not depend on the other prompts.
"""

from __future__ import annotations

import argparse
import logging
import re
import sys
from dataclasses import dataclass
from fractions import Fraction
from pathlib import Path
from typing import TYPE_CHECKING, Any

import numpy as np
import torch

from goku_megatron import flow
from goku_megatron.batch import Pack, pack_batch, unpack
from goku_megatron.config import Config, ConfigError, StageConfig, load_config, toy_stage
from goku_megatron.data.encoders import run_text_encoder, run_vae

if TYPE_CHECKING:
    from goku_megatron.platform import Backends

log = logging.getLogger("goku_megatron")


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


def checkpoint_config(path: Path) -> Config:
    """The run's resolved config, stored with the checkpoint, set up for one process."""
    from megatron.core import dist_checkpointing

    return config_for_one_process(dist_checkpointing.load_common_state_dict(str(path))["config"])


def config_for_one_process(saved: dict[str, Any]) -> Config:
    """A saved ``Config.to_dict()`` as a Config for one unsharded process (TP=PP=CP=DP=1)."""
    cfg = load_config(None, [])
    for section, values in saved.items():
        target = getattr(cfg, section, None)
        for key, value in values.items():
            if target is not None and hasattr(target, key):
                setattr(target, key, value)
    cfg.data.stages = [StageConfig(**s) for s in saved["data"].get("stages", [])]
    if cfg.data.kind == "toy":  # derived from the toy fields, as validate does (older runs saved none)
        cfg.data.stages = [toy_stage(cfg.data, cfg.train.steps, cfg.train.micro_batch_size, cfg.model.patch_size)]
    cfg.parallel.tp = cfg.parallel.pp = cfg.parallel.cp = cfg.parallel.dp = 1
    cfg.parallel.distributed_backend = "auto"
    cfg.train.precision = "auto"
    return cfg


def unsharded_model(cfg: Config) -> tuple[torch.nn.Module, Backends]:
    """The whole GokuModel in this process (a one-process megatron world is set up if needed)."""
    from goku_megatron import cpu_compat
    from goku_megatron.model.goku import GokuModel
    from goku_megatron.model.specs import layer_spec
    from goku_megatron.platform import choose_backends, init_distributed
    from goku_megatron.train import build_transformer_config

    cpu_compat.apply()
    backends = choose_backends(cfg)
    if not torch.distributed.is_initialized():
        init_distributed(cfg, backends)
    model = GokuModel(build_transformer_config(cfg, backends), cfg.model,
                      layer_spec(backends.linear, backends.attention))
    return model.to("cuda" if backends.device == "cuda" else "cpu"), backends


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
        from goku_megatron.checkpoint import load_model_weights, resolve_checkpoint

        self.checkpoint = resolve_checkpoint(checkpoint)
        self.name = str(self.checkpoint)
        self.cfg = cfg = checkpoint_config(self.checkpoint)
        self.model, backends = unsharded_model(cfg)
        self.device = torch.device("cuda" if backends.device == "cuda" else "cpu")
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
        from megatron.core import parallel_state
        from megatron.core.pipeline_parallel import get_forward_backward_func

        from goku_megatron.model.context_parallel import align_packs
        from goku_megatron.model.goku import iter_stage_models

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
    from goku_megatron.model.context_parallel import gather_pack
    from goku_megatron.model.goku import iter_stage_models

    pack = next(data_iterator)
    (stage,) = iter_stage_models([model])
    output = model(pack)

    def velocity(output_tensor: torch.Tensor, non_loss_data: bool = True) -> torch.Tensor:
        shard = stage.pack_shard(pack)
        return gather_pack(output_tensor, shard, pack.budget)

    return output, velocity


def to_uint8(pixels: torch.Tensor) -> np.ndarray:
    """[3, T, H, W] in [-1, 1] -> uint8 [T, H, W, 3]."""
    return ((pixels.clamp(-1, 1) + 1) * 127.5).round().to(torch.uint8).permute(1, 2, 3, 0).numpy()


def write_media(pixels: torch.Tensor, path: Path, fps: int = 8) -> Path:
    """One sample to ``path.png`` (one frame) or ``path.mp4`` (H.264, yuv420p: plays everywhere)."""
    import av
    from PIL import Image

    frames = to_uint8(pixels)
    if frames.shape[0] == 1:
        out = path.with_suffix(".png")
        Image.fromarray(frames[0]).save(out)
        return out
    out = path.with_suffix(".mp4")
    h, w = frames.shape[1:3]
    with av.open(str(out), mode="w") as container:
        stream = container.add_stream("libx264", rate=Fraction(fps))
        # yuv420p needs even sides; odd ones are padded by one edge pixel.
        stream.width, stream.height = w + w % 2, h + h % 2
        stream.pix_fmt = "yuv420p"
        stream.options = {"crf": "18"}
        for frame in frames:
            if h % 2 or w % 2:
                frame = np.pad(frame, ((0, h % 2), (0, w % 2), (0, 0)), mode="edge")
            for packet in stream.encode(av.VideoFrame.from_ndarray(np.ascontiguousarray(frame), format="rgb24")):
                container.mux(packet)
        for packet in stream.encode():
            container.mux(packet)
    return out


def load_frame(path: Path, height: int, width: int) -> torch.Tensor:
    """An image file -> [3, height, width] in [-1, 1] (resized to cover, centre-cropped), the
    same geometry training applies to clips."""
    from goku_megatron.data.decode import decode_image, to_pixels

    if not path.is_file():
        raise FileNotFoundError(f"{path}: no such image; pass the first frame as a PNG or JPEG file")
    return to_pixels(decode_image(path.read_bytes()), (height, width))[:, 0]


def slug(prompt: str, index: int) -> str:
    return f"{index:03d}_" + (re.sub(r"[^a-z0-9]+", "_", prompt.lower()).strip("_")[:60] or "empty")


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(prog="goku-sample", description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--checkpoint", required=True, type=Path, help="run directory or checkpoints/iter_N")
    parser.add_argument("--prompt", action="append", default=[], help="a prompt (repeatable)")
    parser.add_argument("--prompts-file", type=Path, help="one prompt per line")
    parser.add_argument("--out", type=Path, default=Path("samples"), help="output directory")
    parser.add_argument("--frames", type=int, default=None, help="pixel frames (default: the run's)")
    parser.add_argument("--height", type=int, default=None)
    parser.add_argument("--width", type=int, default=None)
    parser.add_argument("--steps", type=int, default=None, help="Euler steps (default flow.sample_steps)")
    parser.add_argument("--cfg-scale", type=float, default=None, help="guidance (default flow.cfg_scale)")
    parser.add_argument("--image", type=Path, default=None,
                        help="image-to-video: the first frame (PNG/JPEG) of every sample (model.i2v checkpoints)")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--fps", type=int, default=None, help="output fps (default: the run's)")
    return parser.parse_args(argv)


def run_spec(cfg: Config, step: int | None = None) -> SampleSpec:
    """What a run trains on: the resolution, frames and fps of the stage at ``step`` (default: the
    last stage; a toy run's one stage is its clips); the run's ODE steps and guidance, seed 0."""
    d = cfg.data
    stage = d.stages[-1] if step is None else d.stage_at(step)[1]
    return SampleSpec(stage.frames, stage.height, stage.width, cfg.flow.sample_steps, cfg.flow.cfg_scale,
                      fps=round(stage.fps))


def default_spec(cfg: Config, args: argparse.Namespace) -> SampleSpec:
    """The command line's sizes, steps and guidance; unset ones from the run (run_spec)."""
    run = run_spec(cfg)
    return SampleSpec(
        frames=args.frames or run.frames, height=args.height or run.height, width=args.width or run.width,
        steps=args.steps or run.steps,
        cfg_scale=args.cfg_scale if args.cfg_scale is not None else run.cfg_scale,
        seed=args.seed, fps=args.fps or run.fps,
    )


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="[%(asctime)s] %(message)s", datefmt="%H:%M:%S",
                        stream=sys.stdout)
    prompts = list(args.prompt)
    if args.prompts_file:
        if not args.prompts_file.is_file():
            print(f"goku-sample: error: {args.prompts_file}: no such prompts file", file=sys.stderr)
            return 2
        prompts += [line.strip() for line in args.prompts_file.read_text().splitlines() if line.strip()]
    if not prompts:
        print("goku-sample: error: no prompt; pass --prompt TEXT or --prompts-file FILE", file=sys.stderr)
        return 2
    try:
        sampler = Sampler(args.checkpoint)
        spec = default_spec(sampler.cfg, args)
        sampler.latent_shape(spec)  # refuses sizes the VAE cannot encode, before any work
        sampler.check_condition(args.image is not None)
        image = None if args.image is None else load_frame(args.image, spec.height, spec.width)
    except (FileNotFoundError, ConfigError, ValueError) as err:
        print(f"goku-sample: error: {err}", file=sys.stderr)
        return 2
    args.out.mkdir(parents=True, exist_ok=True)
    pixels = sampler.sample(prompts, spec, image)
    for i, (prompt, sample) in enumerate(zip(prompts, pixels)):
        path = write_media(sample, args.out / slug(prompt, i), spec.fps)
        log.info("wrote %s  (%s)", path, prompt)
    return 0


if __name__ == "__main__":
    sys.exit(main())
