"""Patch n' Pack, the one batch type: planning, pack layout, a packed sample behaving as the sample
alone, and the equal-segment fast paths behaving as the general ones.

The reference for a packed result is each sample alone: a pack of that one sample, with no other
sample and no padding, through the same layers that tests/test_layer.py checks against the
plain-PyTorch reference block.
"""

from __future__ import annotations

import dataclasses
import random
import sys
from pathlib import Path

import pytest
import torch
from conftest import backward_nodes, build_stage, run_torchrun
from numerics import assert_close_to_scale

from goku_megatron.batch import (
    Pack,
    PackSample,
    build_pack,
    grid_positions,
    num_tokens,
    pack_batch,
    pack_samples,
    plan_packs,
    unpack,
)
from goku_megatron.config import load_config
from goku_megatron.flow import flow_loss
from goku_megatron.model.attention import SDPAAttention
from goku_megatron.model.context_parallel import RowRuns, packed_segments
from goku_megatron.model.goku import GokuModel
from goku_megatron.model.layer import LayerInputs

C, L, TEXT_DIM = 4, 6, 32
# A clip with an odd frame count, an image (T=1) and a tiny clip: (T, H, W), caption tokens, t.
SAMPLES = [((3, 4, 6), 3, 0.2), ((1, 6, 4), 6, 0.7), ((2, 2, 2), 1, 0.9)]
PAD = 5


def _cfg(pt: int, *overrides: str):
    return load_config(None, ["model.zero_init=false", f"model.in_channels={C}", f"model.text_dim={TEXT_DIM}",
                              f"model.patch_size=[{pt},2,2]", *overrides])


def _samples(seed: int = 0) -> list[PackSample]:
    g = torch.Generator().manual_seed(seed)
    out = []
    for i, ((t, h, w), n_text, time) in enumerate(SAMPLES):
        mask = torch.arange(L) < n_text
        out.append(PackSample(noisy=torch.randn(C, t, h, w, generator=g), target=torch.randn(C, t, h, w, generator=g),
                              timestep=time, text=torch.randn(L, TEXT_DIM, generator=g),  # padding is noise too
                              text_mask=mask, key=f"s{i}"))
    return out


def _budget(pt: int) -> int:
    return sum(-(-t // pt) * (h // 2) * (w // 2) for (t, h, w), _, _ in SAMPLES) + PAD


def repeat_first_frame(x: torch.Tensor, pt: int) -> torch.Tensor:
    """The documented time padding, written out: repeat frame 0 in front up to a multiple of pt."""
    frames = -(-x.shape[1] // pt) * pt
    return torch.cat([x[:, :1]] * (frames - x.shape[1]) + [x], dim=1)


def _alone(model: GokuModel, s: PackSample, pt: int) -> tuple[Pack, torch.Tensor]:
    """The sample alone: a pack of it and nothing else, and the model's velocity tokens for it."""
    pack = build_pack([s], num_tokens(s.noisy.shape, (pt, 2, 2)), (pt, 2, 2))
    return pack, model(pack)


def _grads(model: torch.nn.Module) -> dict[str, torch.Tensor]:
    return {name: p.grad.clone() for name, p in model.named_parameters()}


# ------------------------------------------------------------------------------------------------
# Planning


def test_plan_packs_first_fit_decreasing():
    # Largest first (8, 7, 5, 5 by index, 3, 2, 1), each into the first pack with room.
    assert plan_packs([3, 7, 5, 5, 2, 8, 1], budget=10) == [[5, 4], [1, 0], [2, 3], [6]]


def test_plan_packs_places_every_sample_once_within_budget():
    rng = random.Random(0)
    counts = [rng.randint(1, 64) for _ in range(200)]
    packs = plan_packs(counts, budget=64)
    assert sorted(i for pack in packs for i in pack) == list(range(len(counts)))
    assert all(sum(counts[i] for i in pack) <= 64 for pack in packs)
    assert len(packs) <= 11 / 9 * -(-sum(counts) // 64) + 1  # FFD's guarantee over the lower bound
    assert plan_packs(counts, budget=64) == packs


def test_plan_packs_rejects_oversized_sample():
    with pytest.raises(ValueError, match=r"sample 2 has 12 tokens, over the token budget of 10: "
                                         r"raise data.stages\[\].token_budget or lower"):
        plan_packs([3, 10, 12], budget=10)


# ------------------------------------------------------------------------------------------------
# Pack layout


@pytest.mark.parametrize("pt", [1, 2])
def test_unpack_round_trips_latents(pt):
    samples = _samples()
    pack = build_pack(samples, _budget(pt), (pt, 2, 2))
    for kind in ("noisy", "target"):
        for got, s in zip(unpack(pack, getattr(pack, kind)), samples):
            assert torch.equal(got, getattr(s, kind))


def test_pack_layout_with_temporal_patch():
    """pt=2: the 3-frame clip and the image gain one repeated leading frame; padding is a segment."""
    samples = _samples()
    pack = build_pack(samples, _budget(2), (2, 2, 2))
    assert pack.grids == [(2, 2, 3), (1, 3, 2), (1, 1, 1)] and pack.frames == [3, 1, 2]
    assert pack.cu_seqlens.tolist() == [0, 12, 18, 19, 24] and pack.max_seqlen == 12
    assert pack.cu_seqlens_text.tolist() == [0, 3, 9, 10, 11] and pack.max_seqlen_text == 6
    assert pack.padding == PAD and pack.loss_mask.tolist() == [True] * 19 + [False] * PAD
    assert pack.sample_index.tolist() == [0] * 12 + [1] * 6 + [2] + [2] * PAD
    assert torch.equal(pack.positions[12:18], grid_positions(1, 3, 2))  # restarts per sample
    assert not pack.noisy[19:].any() and not pack.positions[19:].any()
    torch.testing.assert_close(pack.timesteps, torch.tensor([0.2, 0.7, 0.9]))
    image = pack.noisy[12:18].reshape(6, C, 2, 2, 2)  # token = (c, pt, ph, pw)
    assert torch.equal(image[:, :, 0], image[:, :, 1])  # both time slots hold the image


def test_pack_pads_captions_of_different_widths():
    samples = _samples()
    samples[2] = dataclasses.replace(samples[2], text=samples[2].text[:2], text_mask=samples[2].text_mask[:2])
    pack = build_pack(samples, _budget(1), (1, 2, 2))
    assert pack.text.shape == (3, L, TEXT_DIM) and pack.text_mask.sum(1).tolist() == [3, 6, 1]
    assert torch.equal(pack.text[pack.text_mask], torch.cat([s.text[s.text_mask] for s in samples]))


def test_pack_samples_splits_by_budget():
    samples = _samples()
    packs = pack_samples(samples, budget=20, patch=(1, 2, 2))  # 18 + 6 + 2 tokens
    assert [p.keys for p in packs] == [["s0", "s2"], ["s1"]]
    assert [p.budget for p in packs] == [20, 20]
    with pytest.raises(ValueError, match="sample 0 has 18 tokens"):
        pack_samples(samples, budget=16, patch=(1, 2, 2))


def test_build_pack_rejects_unpackable_samples():
    samples = _samples()
    with pytest.raises(ValueError, match="no valid text token"):
        build_pack([dataclasses.replace(samples[0], text_mask=torch.zeros(L, dtype=torch.bool))], 64, (1, 2, 2))
    with pytest.raises(ValueError, match="not divisible by the spatial patch"):
        build_pack(samples, 64, (1, 4, 4))
    with pytest.raises(ValueError, match="over the token budget of 20"):
        build_pack(samples, 20, (1, 2, 2))


# ------------------------------------------------------------------------------------------------
# The model: a packed sample equals the sample alone


@pytest.mark.parametrize("pt", [1, 2])
def test_packed_forward_matches_each_sample_alone(megatron_world, pt):
    model = build_stage(_cfg(pt))
    samples = _samples()
    pack = build_pack(samples, _budget(pt), (pt, 2, 2))
    with torch.no_grad():
        out = model(pack)
        alone = [_alone(model, s, pt) for s in samples]
    assert out.shape == (pack.budget, 1, C * pt * 4) and torch.isfinite(out).all()
    cu = pack.cu_seqlens.tolist()
    for i, ((one, ref), s) in enumerate(zip(alone, samples)):
        assert ref.abs().mean() > 0.1  # not the trivial zero output of zero_init
        # the same layers over another token count: other BLAS blocking, the same math
        assert_close_to_scale(out[cu[i]:cu[i + 1]], ref, ulps=64)
        velocity = unpack(one, ref)[0]
        assert velocity.shape == s.noisy.shape  # time padding dropped again
        assert_close_to_scale(unpack(pack, out)[i], velocity, ulps=64)


def test_padding_changes_neither_loss_nor_gradients(megatron_world):
    model = build_stage(_cfg(2))
    pack = build_pack(_samples(), _budget(2), (2, 2, 2))
    g = torch.Generator().manual_seed(5)
    pad = ~pack.loss_mask
    noisy, target = pack.noisy.clone(), pack.target.clone()
    noisy[pad] = 100 * torch.randn(PAD, noisy.shape[1], generator=g)
    target[pad] = 100 * torch.randn(PAD, target.shape[1], generator=g)
    results = []
    for p in (pack, dataclasses.replace(pack, noisy=noisy, target=target)):
        model.zero_grad()
        loss = flow_loss(model(p), p)
        loss.backward()
        results.append((loss.detach(), _grads(model)))
    (loss_a, grads_a), (loss_b, grads_b) = results
    torch.testing.assert_close(loss_b, loss_a, rtol=0, atol=0)
    for name, grad in grads_a.items():
        torch.testing.assert_close(grads_b[name], grad, rtol=0, atol=0, msg=name)


@pytest.mark.parametrize("weighting", ["token", "sample"])
def test_packed_loss_and_gradient_equal_weighted_unpacked_losses(megatron_world, weighting):
    """token: sample i weighs (its tokens) / (real tokens); sample: every sample weighs 1/n."""
    pt = 2
    model = build_stage(_cfg(pt))
    samples = _samples()
    pack = build_pack(samples, _budget(pt), (pt, 2, 2))
    model.zero_grad()
    loss = flow_loss(model(pack), pack, weighting)
    loss.backward()
    packed_grads = _grads(model)

    model.zero_grad()
    tokens = [pack.cu_seqlens[i + 1] - pack.cu_seqlens[i] for i in range(len(samples))]
    expected = torch.zeros(())
    for s, n in zip(samples, tokens):
        one, out = _alone(model, s, pt)
        mse = flow_loss(out, one)  # one sample: its MSE over its (time-padded) tokens
        weight = n / sum(tokens) if weighting == "token" else 1 / len(samples)
        (weight * mse).backward()
        expected += weight * mse.detach()
    assert_close_to_scale(loss.detach(), expected, ulps=64)
    for name, grad in _grads(model).items():
        assert packed_grads[name].abs().sum() > 0, name
        assert_close_to_scale(packed_grads[name], grad, ulps=256, msg=name)


def test_packed_recompute_matches(megatron_world):
    pack = build_pack(_samples(), _budget(1), (1, 2, 2))
    results = []
    for recompute in ("false", "true"):
        model = build_stage(_cfg(1, f"model.recompute={recompute}"))
        flow_loss(model(pack), pack).backward()
        results.append(_grads(model))
    for name, grad in results[0].items():
        # the same kernels on the same shapes; a shared parameter's gradient contributions may be
        # summed in another order when layers run again in the backward pass
        assert_close_to_scale(results[1][name], grad, ulps=16, msg=name)


def test_packed_pipeline_stages_chain(megatron_world):
    """A first stage (patch embed + layers 0-1) handing [budget, 1, D] to a last stage (layers 2-3
    + final layer) through set_input_tensor gives the whole model's output."""
    from goku_megatron.model.specs import local_layer_spec
    from goku_megatron.platform import choose_backends
    from goku_megatron.model.build import build_transformer_config

    whole = build_stage(_cfg(2))
    half = _cfg(2, "model.num_layers=2")
    tc = build_transformer_config(half, choose_backends(half))
    first = GokuModel(tc, half.model, local_layer_spec(), pre_process=True, post_process=False)
    last = GokuModel(tc, half.model, local_layer_spec(), pre_process=False, post_process=True)
    state = whole.state_dict()
    for stage, offset in ((first, 0), (last, 2)):
        mine = {k: v for k, v in state.items() if not k.startswith("layers.")}
        mine.update({f"layers.{int(k.split('.')[1]) - offset}.{k.split('.', 2)[2]}": v
                     for k, v in state.items() if k.startswith("layers.") and
                     int(k.split(".")[1]) - offset in (0, 1)})
        missing, _ = stage.load_state_dict(mine, strict=False)
        assert not [k for k in missing if not k.endswith("_extra_state")]
    pack = build_pack(_samples(), _budget(2), (2, 2, 2))
    with torch.no_grad():
        hidden = first(pack)
        assert hidden.shape == (pack.budget, 1, half.model.hidden_size)
        last.set_input_tensor([hidden])
        assert_close_to_scale(last(pack), whole(pack), ulps=64)


def test_time_padding_repeats_the_first_frame():
    s = _samples()[0]  # 3 frames, patch t=2: one repeated frame in front
    pack = build_pack([s], num_tokens(s.noisy.shape, (2, 2, 2)), (2, 2, 2))
    padded = build_pack([dataclasses.replace(s, noisy=repeat_first_frame(s.noisy, 2),
                                             target=repeat_first_frame(s.target, 2))], pack.budget, (2, 2, 2))
    assert torch.equal(pack.noisy, padded.noisy) and torch.equal(pack.target, padded.target)


# ------------------------------------------------------------------------------------------------
# Equal segments: the fast paths equal the general ones


@pytest.mark.parametrize("q_lengths, kv_lengths", [
    ([6, 6, 6], [6, 6, 6]),  # a toy pack's self-attention: one reshape, one call
    ([6, 6, 6], [3, 1, 5]),  # its cross-attention: captions of other lengths, one call each
    ([6, 2, 2, 6, 1], [3, 2, 2, 3, 1]),  # samples of other sizes: consecutive equal ones together
])
def test_sdpa_equal_segments_match_the_segment_loop(q_lengths, kv_lengths):
    g = torch.Generator().manual_seed(3)
    heads, dim = 2, 8
    q = torch.randn(sum(q_lengths), 1, heads, dim, generator=g, dtype=torch.float64)
    k, v = (torch.randn(sum(kv_lengths), 1, heads, dim, generator=g, dtype=torch.float64) for _ in range(2))
    cu_q, cu_kv = ([0, *torch.tensor(lengths).cumsum(0).tolist()] for lengths in (q_lengths, kv_lengths))
    attention = SDPAAttention()
    loop = torch.cat([attention(q[cu_q[i]:cu_q[i + 1]], k[cu_kv[i]:cu_kv[i + 1]], v[cu_kv[i]:cu_kv[i + 1]])
                      for i in range(len(q_lengths))])
    packed = packed_segments(q_lengths, kv_lengths)
    # float64 on both sides: batched kernels against one call per segment
    torch.testing.assert_close(attention(q, k, v, packed=packed), loop, rtol=0, atol=1e-12)
    fp32 = attention(q.float(), k.float(), v.float(), packed=packed)
    assert_close_to_scale(fp32, loop, ulps=16)


@pytest.mark.parametrize("runs, blocks", [
    (((0, 4), (1, 4), (2, 4)), ((0, 3, 4),)),  # equal clips: one [3, 4, F] view, rows[0:3]
    (((1, 12),), ((1, 1, 12),)),  # one sample (a CP share inside sample 1): one row over all tokens
    (((0, 4), (1, 4), (2, 7)), ((0, 2, 4), (2, 1, 7))),  # equal clips, the last with the padding
    (((0, 3), (1, 5), (2, 4)), ((0, 1, 3), (1, 1, 5), (2, 1, 4))),  # samples of other sizes
    (((2, 4), (0, 4), (1, 4)), ((2, 1, 4), (0, 2, 4))),  # out of order (as in a zigzag CP share)
])
def test_per_sample_rows_broadcast_per_block_as_the_index_does(runs, blocks):
    """Each block of runs views its tokens as [k, L, F] and broadcasts rows [k, 1, F] over them;
    this gives what indexing the rows by each token's sample gives, in value and in the rows'
    gradient, and the backward is sums over views, never a scatter (IndexBackward: index_put)."""
    rows = torch.randn(3, 1, 5, dtype=torch.float64, requires_grad=True)  # AdaLNModulation's form
    index = torch.cat([torch.full((n,), row) for row, n in runs])
    tokens = torch.randn(len(index), 1, 5, dtype=torch.float64)
    inputs = LayerInputs(context=torch.zeros(1), rope=(torch.zeros(1), torch.zeros(1)), rows=RowRuns(runs))
    assert inputs.rows.blocks == blocks
    got = inputs.per_sample(lambda x, r: x * r, tokens, rows)
    expected = tokens * rows[index]
    assert torch.equal(got, expected)
    assert backward_nodes(expected, "Index") and not backward_nodes(got, "Index")  # the check can fail
    weights = torch.randn(len(index), 1, 5, dtype=torch.float64)
    (grad,) = torch.autograd.grad((got * weights).sum(), rows)
    (grad_expected,) = torch.autograd.grad((expected * weights).sum(), rows)
    torch.testing.assert_close(grad, grad_expected, rtol=0, atol=1e-12)  # float64: sums in another order


def test_a_pack_of_equal_clips_takes_the_fast_path_and_equals_the_general_one(megatron_world):
    """The same four clips as one full pack (equal segments: broadcast modulation, one SDPA call)
    and with padding after them (segment loop and gathers): the same velocities, loss and grads."""
    model = build_stage(_cfg(1))
    g = torch.Generator().manual_seed(4)
    n, shape = 4, (C, 2, 4, 4)
    x = torch.randn(n, *shape, generator=g)
    text = torch.randn(n, L, TEXT_DIM, generator=g)
    mask = torch.arange(L)[None] < torch.tensor([[2], [6], [1], [4]])
    full = pack_batch(x, torch.rand(n, generator=g), text, mask, (1, 2, 2), target=torch.randn(n, *shape, generator=g))
    assert model.pack_shard(full).rows.blocks == ((0, 4, 8),)
    padded = build_pack([PackSample(full_x, t, float(ts), e, m, str(i)) for i, (full_x, t, ts, e, m) in
                         enumerate(zip(x, unpack(full, full.target), full.timesteps, text, mask))], full.budget + 3,
                        (1, 2, 2))
    assert model.pack_shard(padded).rows.blocks == ((0, 3, 8), (3, 1, 11))
    results = []
    for pack in (full, padded):
        model.zero_grad()
        out = model(pack)
        flow_loss(out, pack).backward()
        results.append((out[: full.budget].detach(), _grads(model)))
    (out_a, grads_a), (out_b, grads_b) = results
    assert_close_to_scale(out_a, out_b, ulps=64)
    for name, grad in grads_a.items():
        assert_close_to_scale(grad, grads_b[name], ulps=256, msg=name)


# ------------------------------------------------------------------------------------------------
# Tensor parallelism: this file doubles as the torchrun worker


def _tp_worker(out_dir: Path) -> None:
    """TP=2 with activation recompute: packed loss and backward; rank 0 saves output and full grads."""
    from megatron.core import parallel_state

    from goku_megatron import cpu_compat
    from goku_megatron.platform import choose_backends, init_distributed, seed_everything

    cpu_compat.apply()
    cfg = _cfg(2, "parallel.tp=2", "model.recompute=true")
    init_distributed(cfg, choose_backends(cfg))
    seed_everything(0)
    stage = build_stage(cfg)
    pack = build_pack(_samples(), _budget(2), (2, 2, 2))
    out = stage(pack)
    flow_loss(out, pack).backward()
    grads = {}
    for name, param in stage.named_parameters():
        grad = param.grad
        if getattr(param, "tensor_model_parallel", False):
            parts = [torch.empty_like(grad) for _ in range(2)]
            torch.distributed.all_gather(parts, grad, group=parallel_state.get_tensor_model_parallel_group())
            grad = torch.cat(parts, dim=param.partition_dim)
        grads[name] = grad
    if torch.distributed.get_rank() == 0:
        torch.save({"out": out.detach(), "grads": grads}, out_dir / "tp2.pt")
    torch.distributed.destroy_process_group()


@pytest.mark.slow
def test_packed_tensor_parallel_matches_single_process(megatron_world, tmp_path):
    run_torchrun(2, [__file__, str(tmp_path)])
    got = torch.load(tmp_path / "tp2.pt")
    model = build_stage(_cfg(2))
    pack = build_pack(_samples(), _budget(2), (2, 2, 2))
    out = model(pack)
    flow_loss(out, pack).backward()
    # TP=2 splits each matmul's reduction over two ranks: the same sums in another order
    assert_close_to_scale(got["out"], out.detach(), ulps=64)
    assert got["grads"].keys() == _grads(model).keys()
    for name, grad in _grads(model).items():
        assert_close_to_scale(got["grads"][name], grad, ulps=256, msg=name)


if __name__ == "__main__":
    _tp_worker(Path(sys.argv[1]))
