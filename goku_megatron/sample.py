"""goku-sample: prompts to videos (MP4) or images (PNG) from any goku-train checkpoint.

    goku-sample --checkpoint runs/toy-20261122-0500 --prompt "a red square moving left" --out samples/
    goku-sample --checkpoint runs/x/checkpoints/iter_0001000 --prompts-file prompts.txt --steps 50

The checkpoint may come from any TP/PP layout: the weights are loaded into one unsharded model
(dist_checkpointing reshards). Sampling integrates the rectified-flow ODE from noise with Euler
steps and classifier-free guidance (flow.euler_sample); latent runs decode with their VAE, toy
runs sample pixels directly. Each prompt's noise comes from (seed, prompt index), so a prompt's
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

from goku_megatron.config import Config, ConfigError, StageConfig, load_config

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


def resolve_checkpoint(path: Path) -> Path:
    """A checkpoint directory, or a run directory whose ``latest`` pointer names one."""
    from goku_megatron.checkpoint import latest_checkpoint

    path = Path(path)
    if (path / "checkpoints").is_dir():
        found = latest_checkpoint(path)
        if found is None:
            raise FileNotFoundError(f"{path}: no complete checkpoint (checkpoints/latest missing); "
                                    "train longer or pass a checkpoints/iter_N directory")
        return found
    if not (path / "metadata.json").is_file():
        raise FileNotFoundError(f"{path}: not a goku-train checkpoint (no metadata.json); pass a run "
                                "directory or its checkpoints/iter_N")
    return path


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


class Sampler:
    """One unsharded Goku model with its text encoder (and VAE for latent runs), ready to sample."""

    def __init__(self, checkpoint: Path) -> None:
        from goku_megatron.checkpoint import load_model_weights
        from goku_megatron.data.encoders import build_text_encoder

        self.checkpoint = resolve_checkpoint(checkpoint)
        self.cfg = cfg = checkpoint_config(self.checkpoint)
        self.model, backends = unsharded_model(cfg)
        self.device = torch.device("cuda" if backends.device == "cuda" else "cpu")
        info = load_model_weights(self.checkpoint, [self.model])
        self.step = info["step"]
        self.model.eval()
        d = cfg.data
        self.text_encoder = build_text_encoder(d.text_encoder, d.text_encoder_path, cfg.model.text_dim,
                                               d.max_text_tokens, self.device)
        self.vae = None
        if d.kind != "toy":
            from goku_megatron.data.encoders import build_vae

            self.vae = build_vae(d.vae_path, self.device)
        log.info("sampler: %s (step %d), %s on %s", self.checkpoint, self.step,
                 "pixel space" if self.vae is None else f"VAE {d.vae_path}", self.device)

    def latent_shape(self, spec: SampleSpec) -> tuple[int, int, int, int]:
        if self.vae is None:
            return (self.cfg.model.in_channels, spec.frames, spec.height, spec.width)
        return self.vae.latent_shape(spec.frames, spec.height, spec.width)

    @torch.no_grad()
    def sample(self, prompts: list[str], spec: SampleSpec) -> torch.Tensor:
        """Pixels [N, 3, T, H, W] in [-1, 1], one per prompt."""
        from goku_megatron import flow

        shape = self.latent_shape(spec)
        noise = torch.stack([torch.randn(shape, generator=torch.Generator().manual_seed(spec.seed * 100003 + i))
                             for i in range(len(prompts))]).to(self.device)
        text, mask = self.text_encoder(prompts)
        null_text, null_mask = self.text_encoder([""] * len(prompts))

        def velocity(x: torch.Tensor, t: torch.Tensor, cond: tuple[torch.Tensor, torch.Tensor]) -> torch.Tensor:
            return self.model(x, t, cond[0].to(self.device), cond[1].to(self.device))

        latents = flow.euler_sample(velocity, noise, steps=spec.steps, cond=(text, mask),
                                    uncond=(null_text, null_mask), cfg_scale=spec.cfg_scale,
                                    shift=self.cfg.flow.shift)
        if self.vae is None:
            return latents.clamp(-1, 1).float().cpu()
        return self.vae.decode(latents.to(self.vae.dtype)).float().cpu()


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
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--fps", type=int, default=8)
    return parser.parse_args(argv)


def default_spec(cfg: Config, args: argparse.Namespace) -> SampleSpec:
    """Unset sizes come from the run: the toy clip size, or its last stage's resolution."""
    d = cfg.data
    if d.kind == "toy":
        frames, height, width = d.toy_frames, d.toy_size, d.toy_size
    else:
        stage = d.stages[-1]
        frames, height, width = stage.frames, stage.height, stage.width
    return SampleSpec(
        frames=args.frames or frames, height=args.height or height, width=args.width or width,
        steps=args.steps or cfg.flow.sample_steps,
        cfg_scale=args.cfg_scale if args.cfg_scale is not None else cfg.flow.cfg_scale,
        seed=args.seed, fps=args.fps,
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
    except (FileNotFoundError, ConfigError, ValueError) as err:
        print(f"goku-sample: error: {err}", file=sys.stderr)
        return 2
    args.out.mkdir(parents=True, exist_ok=True)
    pixels = sampler.sample(prompts, spec)
    for i, (prompt, sample) in enumerate(zip(prompts, pixels)):
        path = write_media(sample, args.out / slug(prompt, i), spec.fps)
        log.info("wrote %s  (%s)", path, prompt)
    return 0


if __name__ == "__main__":
    sys.exit(main())
