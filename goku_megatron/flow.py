"""Rectified-flow primitives for Goku-style training and sampling.

Convention (Goku paper): ``x_t = t * x1 + (1 - t) * x0`` with ``x1`` the data latent and
``x0 ~ N(0, I)``, so ``t = 0`` is pure noise and ``t = 1`` is data. The network predicts the
constant velocity ``v = x1 - x0`` of the straight path, trained with an MSE loss.

Note that SD3 / MovieGen write the same path in terms of the noise level ``sigma = 1 - t``;
every function here takes and returns ``t`` in the Goku convention.
"""

from __future__ import annotations

import zlib
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

import torch
from torch import Tensor

__all__ = [
    "TIMESTEP_KINDS",
    "caption_dropout_mask",
    "euler_sample",
    "first_frame_condition",
    "flow_loss",
    "interpolate",
    "noise_sample",
    "resolution_shift",
    "sample_timesteps",
    "shift_timesteps",
    "velocity_target",
]

TIMESTEP_KINDS = ("uniform", "logit_normal")

# Keeps training timesteps off the endpoints, where the loss carries no signal (t = 0) or the
# interpolant is exactly the data (t = 1).
_T_EPS = 1e-5

VelocityFn = Callable[[Tensor, Tensor, Any], Tensor]


def shift_timesteps(t: Tensor, shift: float) -> Tensor:
    """Apply the SD3 / MovieGen resolution shift, expressed in the Goku ``t`` convention.

    SD3 shifts the noise level as ``sigma' = shift * sigma / (1 + (shift - 1) * sigma)``.
    With ``sigma = 1 - t`` and ``t' = 1 - sigma'`` this is ``t' = t / (shift - (shift - 1) * t)``.
    For ``shift > 1`` timesteps move towards the noise end (``t = 0``), which larger inputs
    need because more tokens keep more signal at a given noise level. The map is monotone,
    fixes 0 and 1, and is the identity for ``shift == 1``.
    """
    if shift <= 0:
        raise ValueError(f"shift must be positive, got {shift}")
    if shift == 1.0:
        return t
    return t / (shift - (shift - 1.0) * t)


def resolution_shift(
    num_tokens: int,
    base_tokens: int = 4096,
    base_shift: float = 1.0,
    max_tokens: int = 220_000,
    max_shift: float = 3.0,
) -> float:
    """Shift for a sequence of ``num_tokens`` latent tokens, linear between two anchors.

    Recipes use it so that higher resolutions / longer clips get proportionally more noise;
    the result is clipped to the range spanned by ``base_shift`` and ``max_shift``.
    """
    if max_tokens <= base_tokens:
        raise ValueError(f"max_tokens ({max_tokens}) must exceed base_tokens ({base_tokens})")
    slope = (max_shift - base_shift) / (max_tokens - base_tokens)
    shift = base_shift + slope * (num_tokens - base_tokens)
    low, high = min(base_shift, max_shift), max(base_shift, max_shift)
    return float(min(max(shift, low), high))


def sample_timesteps(
    n: int,
    kind: str,
    *,
    logit_mean: float = 0.0,
    logit_std: float = 1.0,
    shift: float = 1.0,
    generator: torch.Generator | None = None,
    device: torch.device | str | None = None,
) -> Tensor:
    """Draw ``n`` training timesteps in the open interval (0, 1), float32, shape ``[n]``.

    ``logit_normal`` (``sigmoid(N(logit_mean, logit_std))``) concentrates samples at
    intermediate t, where the velocity is hardest to predict (SD3). Sampling happens on the
    generator's device so a CPU generator stays usable for GPU training, then moves to ``device``.
    """
    if kind not in TIMESTEP_KINDS:
        raise ValueError(f"unknown timestep kind {kind!r}; expected one of {TIMESTEP_KINDS}")
    sample_device = generator.device if generator is not None else device
    if kind == "uniform":
        t = torch.rand(n, generator=generator, device=sample_device)
    else:
        z = torch.randn(n, generator=generator, device=sample_device)
        t = torch.sigmoid(logit_mean + logit_std * z)
    t = t.clamp(_T_EPS, 1.0 - _T_EPS)
    return shift_timesteps(t, shift).to(device)


def interpolate(x1: Tensor, x0: Tensor, t: Tensor) -> Tensor:
    """Point on the straight noise-to-data path, ``t * x1 + (1 - t) * x0``, with ``t`` per sample."""
    if t.dim() != 1 or t.shape[0] != x1.shape[0]:
        raise ValueError(f"t must have shape [{x1.shape[0]}], got {tuple(t.shape)}")
    t = t.to(dtype=x1.dtype).reshape(-1, *([1] * (x1.dim() - 1)))
    return t * x1 + (1.0 - t) * x0


def velocity_target(x1: Tensor, x0: Tensor) -> Tensor:
    """Velocity of the straight path, ``d x_t / dt = x1 - x0``, independent of t."""
    return x1 - x0


def flow_loss(pred: Tensor, target: Tensor, mask: Tensor | None = None) -> Tensor:
    """Per-sample MSE over all non-batch dims, shape ``[B]``, in float32.

    The reduction runs in float32 because bf16 sums over a video's millions of elements lose
    precision. With ``mask`` (broadcastable to ``pred``; nonzero counts, 0 is padding) the mean
    covers the counted elements only; padded elements are dropped with ``where`` so that
    non-finite padding cannot leak in, and a sample with nothing counted gives 0 rather than NaN.
    """
    if pred.shape != target.shape:
        raise ValueError(f"pred {tuple(pred.shape)} and target {tuple(target.shape)} differ")
    sq = (pred.float() - target.float()).square()
    if mask is None:
        return sq.flatten(1).mean(dim=1)
    weight = torch.broadcast_to(mask.to(device=sq.device, dtype=sq.dtype), sq.shape)
    sq = torch.where(weight != 0, sq * weight, torch.zeros((), dtype=sq.dtype, device=sq.device))
    total = sq.flatten(1).sum(dim=1)
    count = weight.flatten(1).sum(dim=1)
    return torch.where(count > 0, total / count.clamp_min(torch.finfo(sq.dtype).tiny), 0.0)


def first_frame_condition(x1: Tensor) -> Tensor:
    """The image-to-video condition of a clip [..., T, H, W]: its first frame, broadcast over T.

    GOKU's causal VAE encodes the first frame on its own, so the first latent frame is exactly the
    latent of the conditioning image; at sampling time that image is encoded as a one-frame clip.
    """
    return x1[..., :1, :, :].expand_as(x1)


def caption_dropout_mask(
    n: int,
    prob: float,
    generator: torch.Generator | None = None,
    *,
    device: torch.device | str | None = None,
) -> Tensor:
    """Bool ``[n]``, True where the caption is replaced by the null caption.

    Training on some unconditional samples is what makes classifier-free guidance possible.
    """
    if not 0.0 <= prob <= 1.0:
        raise ValueError(f"prob must be in [0, 1], got {prob}")
    sample_device = generator.device if generator is not None else device
    return (torch.rand(n, generator=generator, device=sample_device) < prob).to(device)


@torch.no_grad()
def euler_sample(
    velocity_fn: VelocityFn,
    x0: Tensor,
    *,
    steps: int,
    cond: Any,
    uncond: Any = None,
    cfg_scale: float = 1.0,
    shift: float = 1.0,
) -> Tensor:
    """Integrate ``dx/dt = v(x, t, cond)`` from noise ``x0`` at t=0 to data at t=1.

    Uses ``steps`` explicit Euler steps on ``t_i = shift_timesteps(i / steps, shift)``, so a
    shift > 1 spends more steps near the noise end, matching training. Classifier-free guidance
    ``v = v_u + cfg_scale * (v_c - v_u)`` is applied when ``cfg_scale != 1`` and ``uncond`` is
    given; otherwise only the conditional velocity is used.
    """
    if steps < 1:
        raise ValueError(f"steps must be >= 1, got {steps}")
    grid = shift_timesteps(torch.arange(steps + 1, dtype=torch.float64) / steps, shift)
    grid[0], grid[-1] = 0.0, 1.0
    use_cfg = cfg_scale != 1.0 and uncond is not None
    x = x0
    batch = x.shape[0]
    for i in range(steps):
        t = torch.full((batch,), float(grid[i]), dtype=x.dtype, device=x.device)
        v = velocity_fn(x, t, cond)
        if use_cfg:
            v_u = velocity_fn(x, t, uncond)
            v = v_u + cfg_scale * (v - v_u)
        x = x + float(grid[i + 1] - grid[i]) * v
    return x


@dataclass
class SampleNoise:
    """One training sample's draws: noise x0, timestep t ([1]) and whether its caption is dropped."""

    x0: Tensor
    t: Tensor
    drop_caption: bool


def noise_sample(x1: Tensor, seed: int, step: int, key: str, cfg: Any) -> SampleNoise:
    """The draws of sample ``key`` at ``step`` from an RNG seeded by (seed, step, key), so they do
    not depend on the parallel layout, the batch a sample lands in, or packing. ``cfg`` is the run's
    FlowConfig (timestep_sampling, logit_mean, logit_std, shift, caption_dropout)."""
    gen = torch.Generator().manual_seed(zlib.crc32(f"{seed}:{step}:{key}".encode()))
    x0 = torch.randn(x1.shape, generator=gen)
    t = sample_timesteps(1, cfg.timestep_sampling, logit_mean=cfg.logit_mean,
                         logit_std=cfg.logit_std, shift=cfg.shift, generator=gen)
    dropped = bool(caption_dropout_mask(1, cfg.caption_dropout, generator=gen)[0])
    return SampleNoise(x0, t, dropped)
