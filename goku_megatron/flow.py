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
from typing import Any, Literal

import torch
from torch import Tensor

from goku_megatron.batch import Pack
from goku_megatron.config import TIMESTEP_SAMPLERS

__all__ = [
    "caption_dropout_mask",
    "euler_sample",
    "first_frame_condition",
    "flow_loss",
    "interpolate",
    "loss_weights",
    "noise_sample",
    "resolution_shift",
    "sample_timesteps",
    "shift_timesteps",
    "velocity_target",
]

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

    ``kind`` is one of ``config.TIMESTEP_SAMPLERS``. ``logit_normal`` concentrates samples at
    intermediate t, where the velocity is hardest to predict (SD3). Its parameters follow SD3:
    the noise level ``sigma = 1 - t`` is ``sigmoid(N(logit_mean, logit_std))``, i.e.
    ``t = sigmoid(-logit_mean + logit_std * z)``, so a positive ``logit_mean`` puts more steps
    near the noise end (median ``t = sigmoid(-logit_mean)`` < 0.5). Sampling happens on the
    generator's device so a CPU generator stays usable for GPU training, then moves to ``device``.
    """
    if kind not in TIMESTEP_SAMPLERS:
        raise ValueError(f"unknown timestep kind {kind!r}; expected one of {TIMESTEP_SAMPLERS}")
    sample_device = generator.device if generator is not None else device
    if kind == "uniform":
        t = torch.rand(n, generator=generator, device=sample_device)
    else:
        z = torch.randn(n, generator=generator, device=sample_device)
        t = torch.sigmoid(-logit_mean + logit_std * z)
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


def loss_weights(pack: Pack, weighting: Literal["token", "sample"] = "token") -> Tensor:
    """Weight of each token's MSE in the pack's loss: [budget] float32, zero on padding, sum 1.

    - "token" (default): every real token counts the same, 1 / (real tokens). A sample's share
      of the gradient grows with its token count, so a 720p clip outweighs a 256px image, as in
      training on the concatenated sequence; the loss is the mean over real token elements.
    - "sample": every sample counts the same, 1 / (n * its tokens): the pack's loss is the mean of
      the per-sample MSEs.
    """
    lengths = pack.cu_seqlens.diff()[: pack.num_samples].float()
    if weighting == "token":
        per_sample = 1.0 / lengths.sum().expand(pack.num_samples)
    elif weighting == "sample":
        per_sample = 1.0 / (pack.num_samples * lengths)
    else:
        raise ValueError(f"unknown loss weighting {weighting!r}; expected 'token' or 'sample'")
    return torch.where(pack.loss_mask, per_sample[pack.sample_index], 0.0)


def flow_loss(pred: Tensor, pack: Pack, weighting: Literal["token", "sample"] = "token",
              tokens: Tensor | None = None, per_sample: bool = False) -> Tensor:
    """The rectified-flow loss: velocity MSE of a pack's prediction [budget, (1,) patch_dim], a
    float32 scalar. Training, context parallelism and the validation loss all use this function.

    Each token's squared error is averaged over its patch elements in float32 (bf16 sums over a
    video's millions of elements lose precision) and weighted by ``loss_weights``; padding has
    weight zero and its error is dropped with ``where`` before squaring, so whatever the model
    outputs there (even non-finite values) reaches neither the loss nor the gradients.

    ``tokens`` ([S_local] long) says which pack tokens ``pred`` holds when it is one
    context-parallel rank's share (-1: a filler token of the layout, no loss). The weights stay
    those of the whole pack, so the ranks' losses add up to the loss of the whole pack.

    ``per_sample``: instead of the scalar, each sample's own MSE [n] (float32), for losses reported
    per clip (goku_megatron/evaluation.py).
    """
    if pack.target is None:
        raise ValueError("this pack carries no velocity target (a sampling pack); build it with targets")
    weights = loss_weights(pack, "sample" if per_sample else weighting)
    target, mask, index = pack.target, pack.loss_mask, pack.sample_index
    if tokens is not None:
        keep = tokens.clamp_min(0)
        target, weights, index = target[keep], weights[keep], index[keep]
        mask = mask[keep] & (tokens >= 0)
    error = torch.where(mask[:, None], pred.reshape(target.shape).float() - target.float(), 0.0)
    weighted = error.square().mean(dim=-1) * weights
    if per_sample:
        return weighted.new_zeros(pack.num_samples).index_add(0, index, weighted) * pack.num_samples
    return weighted.sum()


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
