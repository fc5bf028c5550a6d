"""Behavioural tests for the rectified-flow primitives in goku_megatron.flow."""

from __future__ import annotations

import math

import pytest
import torch
from numerics import assert_close_to_scale

from goku_megatron.batch import Pack, PackSample, build_pack
from goku_megatron.config import TIMESTEP_SAMPLERS
from goku_megatron.flow import (
    caption_dropout_mask,
    euler_sample,
    flow_loss,
    interpolate,
    resolution_shift,
    sample_timesteps,
    shift_timesteps,
)

N_DRAWS = 100_000


def _gen(seed: int = 0) -> torch.Generator:
    return torch.Generator().manual_seed(seed)


# ----------------------------------------------------------------------------- Euler sampler


@pytest.mark.parametrize("steps", [1, 4, 16])
@pytest.mark.parametrize("shift", [1.0, 3.0])
def test_euler_follows_straight_line_to_target(steps: int, shift: float) -> None:
    g = _gen(1)
    x0 = torch.randn(3, 2, 5, generator=g)
    x1 = torch.randn(3, 2, 5, generator=g)
    seen_t: list[torch.Tensor] = []

    def velocity(x: torch.Tensor, t: torch.Tensor, cond: object) -> torch.Tensor:
        assert cond == "c"
        assert t.shape == (x.shape[0],)
        seen_t.append(t.clone())
        return (x1 - x) / (1.0 - t).view(-1, 1, 1)

    out = euler_sample(velocity, x0, steps=steps, cond="c", shift=shift)
    assert_close_to_scale(out, x1, ulps=64)
    assert len(seen_t) == steps
    assert seen_t[0].eq(0).all()
    # The evaluation times are the (shifted) grid i / steps.
    expected = shift_timesteps(torch.arange(steps, dtype=torch.float64) / steps, shift)
    torch.testing.assert_close(torch.stack([t[0].double() for t in seen_t]), expected)


@pytest.mark.parametrize("steps", [1, 7])
@pytest.mark.parametrize("shift", [1.0, 2.5])
def test_euler_constant_field(steps: int, shift: float) -> None:
    g = _gen(2)
    x0 = torch.randn(4, 3, generator=g)
    c = torch.randn(4, 3, generator=g)
    out = euler_sample(lambda x, t, cond: c, x0, steps=steps, cond=None, shift=shift)
    assert_close_to_scale(out, x0 + c, ulps=16)


def test_euler_does_not_track_gradients() -> None:
    x0 = torch.randn(2, 3, requires_grad=True)
    w = torch.ones(3, requires_grad=True)
    out = euler_sample(lambda x, t, cond: x * w, x0, steps=2, cond=None)
    assert not out.requires_grad


def test_euler_rejects_zero_steps() -> None:
    with pytest.raises(ValueError):
        euler_sample(lambda x, t, cond: x, torch.zeros(1, 2), steps=0, cond=None)


@pytest.mark.parametrize("scale", [0.0, 1.0, 4.5])
def test_cfg_combines_constant_fields(scale: float) -> None:
    g = _gen(3)
    x0 = torch.randn(2, 6, generator=g)
    v_c = torch.randn(2, 6, generator=g)
    v_u = torch.randn(2, 6, generator=g)
    fields = {"cond": v_c, "null": v_u}

    out = euler_sample(
        lambda x, t, cond: fields[cond], x0, steps=5, cond="cond", uncond="null", cfg_scale=scale
    )
    assert_close_to_scale(out, x0 + v_u + scale * (v_c - v_u), ulps=64)


def test_cfg_without_uncond_uses_conditional_only() -> None:
    x0 = torch.zeros(1, 2)
    v_c = torch.tensor([[1.0, -2.0]])
    out = euler_sample(lambda x, t, cond: v_c, x0, steps=3, cond="cond", cfg_scale=7.0)
    torch.testing.assert_close(out, x0 + v_c)


# ----------------------------------------------------------------------------- loss


def _loss_pack(budget: int = 20) -> tuple[Pack, list[torch.Tensor], list[torch.Tensor]]:
    """A pack of two samples of 8 and 4 tokens (patch 1x1x1, 3 channels) and 8 padding tokens;
    returns it with each sample's target and a prediction, as latents [C, T, H, W]."""
    g = _gen(7)
    shapes = [(3, 2, 2, 2), (3, 1, 2, 2)]
    targets = [torch.randn(s, generator=g) for s in shapes]
    preds = [torch.randn(s, generator=g) for s in shapes]
    samples = [PackSample(noisy=torch.zeros(s), target=t, timestep=0.5, text=torch.ones(1, 4),
                          text_mask=torch.ones(1, dtype=torch.bool), key=str(i))
               for i, (s, t) in enumerate(zip(shapes, targets))]
    return build_pack(samples, budget, (1, 1, 1)), targets, preds


def _tokens(pack: Pack, latents: list[torch.Tensor]) -> torch.Tensor:
    """Latents [C, T, H, W] -> the pack's token layout [budget, C] (padding zero)."""
    return build_pack([PackSample(noisy=x, target=None, timestep=0.0, text=torch.ones(1, 4),
                                  text_mask=torch.ones(1, dtype=torch.bool)) for x in latents],
                      pack.budget, pack.patch).noisy


def test_loss_is_zero_for_the_true_velocity() -> None:
    pack, targets, _ = _loss_pack()
    assert torch.equal(flow_loss(_tokens(pack, targets), pack), torch.zeros(()))


def test_loss_weightings_against_float64() -> None:
    pack, targets, preds = _loss_pack()
    sq = [(p.double() - t.double()).square() for p, t in zip(preds, targets)]
    per_sample = torch.stack([s.mean() for s in sq])
    by_token = torch.cat([s.flatten() for s in sq]).mean()
    pred = _tokens(pack, preds)
    # sums of a dozen fp32 squares: a few ulps of the scale
    assert_close_to_scale(flow_loss(pred, pack).double(), by_token, ulps=16)
    assert_close_to_scale(flow_loss(pred, pack, "sample").double(), per_sample.mean(), ulps=16)
    assert_close_to_scale(flow_loss(pred, pack, per_sample=True).double(), per_sample, ulps=16)
    assert flow_loss(pred[:, None], pack) == flow_loss(pred, pack)  # [budget, 1, patch_dim] as well
    with pytest.raises(ValueError, match="weighting"):
        flow_loss(pred, pack, "pixel")


def test_loss_ignores_padding_even_when_it_is_not_finite() -> None:
    pack, targets, preds = _loss_pack()
    pred = _tokens(pack, preds)
    garbage = pred.clone()
    garbage[12:] = float("nan")
    garbage[15, 1] = float("inf")
    assert torch.equal(flow_loss(garbage, pack), flow_loss(pred, pack))
    garbage.requires_grad_(True)
    flow_loss(garbage, pack).backward()
    assert torch.isfinite(garbage.grad).all() and torch.equal(garbage.grad[12:], torch.zeros(8, 3))


def test_loss_needs_a_target() -> None:
    pack, _, preds = _loss_pack()
    sampling = _tokens(pack, preds)
    inference = build_pack([PackSample(noisy=p, target=None, timestep=0.5, text=torch.ones(1, 4),
                                       text_mask=torch.ones(1, dtype=torch.bool)) for p in preds], 20, (1, 1, 1))
    with pytest.raises(ValueError, match="no velocity target"):
        flow_loss(sampling, inference)


# ----------------------------------------------------------------------------- interpolation


def test_interpolate_endpoints_and_broadcast() -> None:
    g = _gen(6)
    x0 = torch.randn(3, 2, 4, 4, generator=g)
    x1 = torch.randn(3, 2, 4, 4, generator=g)
    torch.testing.assert_close(interpolate(x1, x0, torch.zeros(3)), x0)
    torch.testing.assert_close(interpolate(x1, x0, torch.ones(3)), x1)

    t = torch.tensor([0.0, 0.25, 1.0])
    xt = interpolate(x1, x0, t)
    assert xt.shape == x1.shape
    for i in range(3):
        torch.testing.assert_close(xt[i], t[i] * x1[i] + (1 - t[i]) * x0[i])


def test_interpolate_rejects_bad_t_shape() -> None:
    x = torch.zeros(3, 4)
    with pytest.raises(ValueError):
        interpolate(x, x, torch.zeros(2))
    with pytest.raises(ValueError):
        interpolate(x, x, torch.zeros(3, 1))


# ----------------------------------------------------------------------------- timesteps


@pytest.mark.parametrize("kind", TIMESTEP_SAMPLERS)
@pytest.mark.parametrize("shift", [1.0, 3.0])
def test_timesteps_in_open_interval(kind: str, shift: float) -> None:
    # logit_std=50 saturates float32 sigmoid to exactly 0 and 1, so this checks the clamp.
    t = sample_timesteps(N_DRAWS, kind, logit_std=50.0, shift=shift, generator=_gen(7))
    assert t.shape == (N_DRAWS,)
    assert t.dtype == torch.float32
    assert (t > 0).all() and (t < 1).all()


@pytest.mark.parametrize("kind", TIMESTEP_SAMPLERS)
def test_timesteps_reproducible(kind: str) -> None:
    a = sample_timesteps(64, kind, generator=_gen(8))
    b = sample_timesteps(64, kind, generator=_gen(8))
    c = sample_timesteps(64, kind, generator=_gen(9))
    assert torch.equal(a, b)
    assert not torch.equal(a, c)


@pytest.mark.parametrize(("mean", "std"), [(0.0, 1.0), (0.5, 1.3), (-0.5, 1.3)])
def test_logit_normal_statistics(mean: float, std: float) -> None:
    t = sample_timesteps(N_DRAWS, "logit_normal", logit_mean=mean, logit_std=std, generator=_gen(10))
    # SD3's convention: logit_mean/logit_std are those of the logit of the noise level 1 - t.
    noise_logit = -torch.logit(t.double())
    assert abs(noise_logit.mean().item() - mean) < 0.02
    assert abs(noise_logit.std().item() - std) < 0.02
    if mean == 0.0:
        assert abs(t.median().item() - 0.5) < 0.02


@pytest.mark.parametrize(("mean", "std"), [(0.5, 1.0), (1.0, 1.3)])
def test_logit_normal_positive_mean_leans_to_noise(mean: float, std: float) -> None:
    """A positive logit_mean (SD3) puts the median below 0.5, at sigmoid(-mean): nearer t = 0,
    which is noise (interpolate(x1, x0, 0) == x0)."""
    t = sample_timesteps(N_DRAWS, "logit_normal", logit_mean=mean, logit_std=std, generator=_gen(16))
    z = torch.randn(N_DRAWS, generator=_gen(16))  # the sampler's own draw from the same generator
    exact = torch.sigmoid(-mean + std * z.double()).clamp(1e-5, 1 - 1e-5)  # float64 reference
    # One fp32 elementwise pass (fma, sigmoid) from the same z: a few ulps on any SIMD kernel.
    assert_close_to_scale(t, exact, ulps=4)
    assert_close_to_scale(t.median(), exact.median(), ulps=4)
    # The median of N draws of z is 0 within ~1.25 / sqrt(N) = 0.004 (one standard error): its t
    # is sigmoid(-mean) within 0.25 * std * 0.004, so 0.01 is several standard errors.
    median = exact.median().item()
    assert median < 0.5
    assert abs(median - 1.0 / (1.0 + math.exp(mean))) < 0.01


def test_logit_mean_sign_flip_keeps_the_old_draws() -> None:
    """Before issue 16 the key meant the logit of t; its old value -m is now m, bit for bit."""
    old_mean, std = -0.5, 1.0
    z = torch.randn(64, generator=_gen(17))
    old = torch.sigmoid(old_mean + std * z).clamp(1e-5, 1 - 1e-5)
    new = sample_timesteps(64, "logit_normal", logit_mean=-old_mean, logit_std=std, generator=_gen(17))
    assert torch.equal(new, old)


def test_uniform_mean() -> None:
    t = sample_timesteps(N_DRAWS, "uniform", generator=_gen(11))
    assert abs(t.mean().item() - 0.5) < 0.01


@pytest.mark.parametrize("kind", TIMESTEP_SAMPLERS)
def test_shift_lowers_mean_timestep(kind: str) -> None:
    base = sample_timesteps(N_DRAWS, kind, generator=_gen(12))
    shifted = sample_timesteps(N_DRAWS, kind, shift=3.0, generator=_gen(12))
    assert shifted.mean() < base.mean() - 0.05
    # Same draws, so the shift acts pointwise and never raises a timestep.
    assert (shifted <= base).all()


def test_shift_identity_endpoints_and_monotone() -> None:
    t = torch.linspace(0, 1, 1001, dtype=torch.float64)
    assert torch.equal(shift_timesteps(t, 1.0), t)
    for s in (0.5, 2.0, 3.0, 10.0):
        out = shift_timesteps(t, s)
        assert out[0].item() == 0.0
        assert out[-1].item() == 1.0
        assert (out.diff() > 0).all()


@pytest.mark.parametrize("s", [2.0, 3.0])
def test_shift_matches_sd3_sigma_formula(s: float) -> None:
    t = torch.linspace(0, 1, 101, dtype=torch.float64)
    sigma = 1 - t
    sigma_shifted = s * sigma / (1 + (s - 1) * sigma)
    torch.testing.assert_close(1 - shift_timesteps(t, s), sigma_shifted)
    # Towards the noise end for shift > 1.
    assert (shift_timesteps(t[1:-1], s) < t[1:-1]).all()


def test_shift_rejects_non_positive() -> None:
    with pytest.raises(ValueError):
        shift_timesteps(torch.tensor([0.5]), 0.0)


def test_unknown_kind_raises() -> None:
    with pytest.raises(ValueError, match="uniform.*logit_normal"):
        sample_timesteps(4, "cosine")


def test_resolution_shift_interpolates_and_clips() -> None:
    assert resolution_shift(4096) == pytest.approx(1.0)
    assert resolution_shift(220_000) == pytest.approx(3.0)
    mid = (4096 + 220_000) // 2
    assert resolution_shift(mid) == pytest.approx(2.0, abs=1e-4)
    assert resolution_shift(16) == pytest.approx(1.0)
    assert resolution_shift(10_000_000) == pytest.approx(3.0)
    assert resolution_shift(
        1000, base_tokens=0, base_shift=0.5, max_tokens=2000, max_shift=1.5
    ) == pytest.approx(1.0)
    with pytest.raises(ValueError):
        resolution_shift(100, base_tokens=10, max_tokens=10)


# ----------------------------------------------------------------------------- caption dropout


@pytest.mark.parametrize("prob", [0.1, 0.5])
def test_caption_dropout_rate(prob: float) -> None:
    mask = caption_dropout_mask(N_DRAWS, prob, generator=_gen(13))
    assert mask.dtype == torch.bool
    assert mask.shape == (N_DRAWS,)
    # ~6 standard errors at n = 1e5.
    assert abs(mask.float().mean().item() - prob) < 6 * math.sqrt(prob * (1 - prob) / N_DRAWS)


def test_caption_dropout_extremes() -> None:
    assert not caption_dropout_mask(N_DRAWS, 0.0, generator=_gen(14)).any()
    assert caption_dropout_mask(N_DRAWS, 1.0, generator=_gen(14)).all()


def test_caption_dropout_reproducible_and_validated() -> None:
    assert torch.equal(caption_dropout_mask(256, 0.3, _gen(15)), caption_dropout_mask(256, 0.3, _gen(15)))
    with pytest.raises(ValueError):
        caption_dropout_mask(4, 1.5)
