"""Self-checks of the plain-PyTorch reference Goku block (tests/reference_goku.py)."""
import math
import os
import sys

import pytest
import torch
import torch.nn.functional as F

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
from numerics import assert_close_to_scale  # noqa: E402
from reference_goku import (  # noqa: E402
    ReferenceGokuBlock,
    apply_rope_3d,
    grid_positions,
    rope_angles,
    rope_pair_split,
)

D, HEADS, FFN, DC = 64, 4, 256, 48  # head_dim 16 -> 8 pairs split (2, 3, 3)


def _block(seed=0, **kw):
    torch.manual_seed(seed)
    return ReferenceGokuBlock(D, HEADS, FFN, DC, **kw).randomize_(seed)


def _inputs(B=2, T=2, H=3, W=4, L=7, seed=1):
    g = torch.Generator().manual_seed(seed)
    S = T * H * W
    x = torch.randn(B, S, D, generator=g)
    temb = torch.randn(B, D, generator=g)
    ctx = torch.randn(B, L, DC, generator=g)
    pos = grid_positions(T, H, W)[None].expand(B, S, 3).clone()
    return x, temb, ctx, pos


def test_parameter_names_and_shapes():
    blk = ReferenceGokuBlock(D, HEADS, FFN, DC)
    shapes = {n: tuple(p.shape) for n, p in blk.named_parameters()}
    assert shapes == {
        "norm1.linear.weight": (6 * D, D), "norm1.linear.bias": (6 * D,),
        "attn1.q_proj.weight": (D, D), "attn1.k_proj.weight": (D, D),
        "attn1.v_proj.weight": (D, D), "attn1.o_proj.weight": (D, D),
        "attn1.q_norm.weight": (D,), "attn1.k_norm.weight": (D,),
        "norm2.weight": (D,),
        "attn2.q_proj.weight": (D, D), "attn2.k_proj.weight": (D, DC),
        "attn2.v_proj.weight": (D, DC), "attn2.o_proj.weight": (D, D),
        "attn2.q_norm.weight": (D,), "attn2.k_norm.weight": (D,),
        "norm3.weight": (D,),
        "mlp.fc1.weight": (FFN, D), "mlp.fc1.bias": (FFN,),
        "mlp.fc2.weight": (D, FFN), "mlp.fc2.bias": (D,),
    }
    # default init is adaLN-Zero; randomize_ makes every parameter non-trivial & deterministic
    assert blk.norm1.linear.weight.abs().sum() == 0 and blk.norm1.linear.bias.abs().sum() == 0
    a, b = _block(3), _block(3)
    for (n, p), (_, q) in zip(a.named_parameters(), b.named_parameters()):
        assert torch.equal(p, q), n
        assert p.abs().sum() > 0, n
        if n.endswith("norm.weight") or n in ("norm2.weight", "norm3.weight"):
            assert (p - 1).abs().max() > 0 and (p - 1).abs().mean() < 0.5, n


def test_grid_positions_row_major():
    pos = grid_positions(2, 3, 4)
    assert pos.dtype == torch.long and pos.shape == (24, 3)
    assert pos[0].tolist() == [0, 0, 0]
    assert pos[1].tolist() == [0, 0, 1]
    assert pos[4].tolist() == [0, 1, 0]
    assert pos[12].tolist() == [1, 0, 0]
    assert pos[23].tolist() == [1, 2, 3]


def test_rope_pair_split_and_axis_assignment():
    assert rope_pair_split(16) == (2, 3, 3)
    assert rope_pair_split(64) == (8, 12, 12)
    assert rope_pair_split(72) == (9, 13, 14)
    # only t -> only the first n_t pairs have non-zero angles, etc.
    ang = rope_angles(torch.tensor([[5, 0, 0], [0, 5, 0], [0, 0, 5]]), 16)
    assert (ang[0, :2] != 0).all() and (ang[0, 2:] == 0).all()
    assert (ang[1, 2:5] != 0).all() and (ang[1, :2] == 0).all() and (ang[1, 5:] == 0).all()
    assert (ang[2, 5:] != 0).all() and (ang[2, :5] == 0).all()
    # freq_j = theta ** (-j / n): first pair of each axis has frequency 1
    assert torch.allclose(ang[0, :2], torch.tensor([5.0, 5.0 / 10000 ** 0.5]))
    assert torch.allclose(ang[1, 2:5], 5.0 / 10000 ** (torch.arange(3) / 3.0))


def test_rope_interleaved_rotation_formula():
    x = torch.randn(1, 1, 1, 16)
    pos = torch.tensor([[[0, 1, 0]]])  # h = 1: pair 2 rotates by angle 1 (freq 1)
    y = apply_rope_3d(x, pos)
    a, b = x[..., 4], x[..., 5]
    assert_close_to_scale(y[..., 4], a * math.cos(1) - b * math.sin(1), ulps=8)
    assert_close_to_scale(y[..., 5], a * math.sin(1) + b * math.cos(1), ulps=8)
    assert torch.equal(y[..., :4], x[..., :4])  # t pairs untouched at t = 0


def test_rope_identity_at_zero_and_norm_preserving():
    x = torch.randn(2, 5, 3, 16)
    zero = torch.zeros(2, 5, 3, dtype=torch.long)
    assert torch.allclose(apply_rope_3d(x, zero), x, atol=0, rtol=0)
    pos = torch.randint(0, 50, (2, 5, 3))
    y = apply_rope_3d(x, pos)
    assert not torch.allclose(y, x)
    assert_close_to_scale(y.norm(dim=-1), x.norm(dim=-1), ulps=16)
    # each interleaved pair keeps its own norm
    assert_close_to_scale(y.view(2, 5, 3, 8, 2).norm(dim=-1), x.view(2, 5, 3, 8, 2).norm(dim=-1), ulps=16)


def test_rope_is_relative():
    g = torch.Generator().manual_seed(0)
    q = torch.randn(1, 6, 1, 16, generator=g)
    k = torch.randn(1, 6, 1, 16, generator=g)
    pq = torch.randint(0, 20, (1, 6, 3), generator=g)
    pk = torch.randint(0, 20, (1, 6, 3), generator=g)
    shift = torch.tensor([3, 7, 11])
    dots = torch.einsum("bshd,bthd->bst", apply_rope_3d(q, pq), apply_rope_3d(k, pk))
    dots_shift = torch.einsum("bshd,bthd->bst", apply_rope_3d(q, pq + shift),
                              apply_rope_3d(k, pk + shift))
    assert_close_to_scale(dots, dots_shift, ulps=256)  # angles of positions up to ~30: cos/sin rounding
    # and it does depend on the relative offset
    dots_other = torch.einsum("bshd,bthd->bst", apply_rope_3d(q, pq + shift), apply_rope_3d(k, pk))
    assert not torch.allclose(dots, dots_other, atol=1e-3)


def test_packed_equals_separate_unpacked():
    blk = _block(0)
    g = torch.Generator().manual_seed(5)
    x1, x2 = torch.randn(1, 12, D, generator=g), torch.randn(1, 2 * 2 * 2, D, generator=g)
    c1, c2 = torch.randn(1, 5, DC, generator=g), torch.randn(1, 9, DC, generator=g)
    temb = torch.randn(2, D, generator=g)
    p1, p2 = grid_positions(1, 3, 4)[None], grid_positions(2, 2, 2)[None]
    with torch.no_grad():
        ref1 = blk(x1, temb[0:1], c1, p1)
        ref2 = blk(x2, temb[1:2], c2, p2)
        packed = blk.forward_packed(torch.cat([x1, x2], 1), temb, [12, 8],
                                    torch.cat([c1, c2], 1), [5, 9], torch.cat([p1, p2], 1))
    assert packed.shape == (1, 20, D)
    assert_close_to_scale(packed[:, :12], ref1, ulps=64)
    assert_close_to_scale(packed[:, 12:], ref2, ulps=64)
    # sanity: the packed result is not what one shared timestep would give
    with torch.no_grad():
        wrong = blk(x2, temb[0:1], c2, p2)
    assert not torch.allclose(packed[:, 12:], wrong, atol=1e-3)


def test_zero_adaln_leaves_only_cross_attention_residual():
    blk = _block(0).zero_adaln_()
    x, temb, ctx, pos = _inputs()
    with torch.no_grad():
        out = blk(x, temb, ctx, pos)
        # independent cross-attention computation from the raw weights
        a = blk.attn2
        h = x * torch.rsqrt(x.pow(2).mean(-1, keepdim=True) + 1e-6) * blk.norm2.weight
        q = h @ a.q_proj.weight.T
        q = q * torch.rsqrt(q.pow(2).mean(-1, keepdim=True) + 1e-6) * a.q_norm.weight
        k = ctx @ a.k_proj.weight.T
        k = k * torch.rsqrt(k.pow(2).mean(-1, keepdim=True) + 1e-6) * a.k_norm.weight
        v = ctx @ a.v_proj.weight.T
        B, S, L, hd = x.shape[0], x.shape[1], ctx.shape[1], D // HEADS
        q = apply_rope_3d(q.view(B, S, HEADS, hd), pos).transpose(1, 2)
        k = k.view(B, L, HEADS, hd).transpose(1, 2)
        v = v.view(B, L, HEADS, hd).transpose(1, 2)
        o = F.scaled_dot_product_attention(q, k, v).transpose(1, 2).reshape(B, S, D)
        expected = x + o @ a.o_proj.weight.T
    assert not torch.allclose(out, x, atol=1e-3)
    assert_close_to_scale(out, expected, ulps=64)


def test_masked_context_token_has_no_effect():
    blk = _block(0)
    x, temb, ctx, pos = _inputs(L=7)
    mask = torch.ones(2, 7, dtype=torch.bool)
    mask[0, 5:] = False
    mask[1, 2] = False
    ctx2 = ctx.clone()
    ctx2[0, 5:] = 100 * torch.randn(2, DC)
    ctx2[1, 2] = -50 * torch.randn(DC)
    with torch.no_grad():
        out = blk(x, temb, ctx, pos, context_mask=mask)
        out2 = blk(x, temb, ctx2, pos, context_mask=mask)
        # masking = dropping the tokens
        trunc0 = blk(x[:1], temb[:1], ctx[:1, :5], pos[:1])
        trunc1 = blk(x[1:], temb[1:], ctx[1:, [0, 1, 3, 4, 5, 6]], pos[1:])
        unmasked = blk(x, temb, ctx2, pos)
    assert_close_to_scale(out, out2, ulps=64)
    assert_close_to_scale(out[:1], trunc0, ulps=64)
    assert_close_to_scale(out[1:], trunc1, ulps=64)
    assert not torch.allclose(out, unmasked, atol=1e-3)


def test_cross_attn_rope_q_switch():
    x, temb, ctx, pos = _inputs()
    shift = torch.tensor([4, 9, 2])
    with torch.no_grad():
        # RoPE on Q only in cross-attention breaks shift invariance; without it the whole
        # block depends only on relative positions.
        on = _block(0)
        assert not torch.allclose(on(x, temb, ctx, pos), on(x, temb, ctx, pos + shift), atol=1e-4)
        off = _block(0, cross_attn_rope_q=False)
        assert_close_to_scale(off(x, temb, ctx, pos), off(x, temb, ctx, pos + shift), ulps=256)


def test_self_attention_matches_sdpa_and_is_bidirectional():
    blk = _block(0)
    x, temb, ctx, pos = _inputs(B=1)
    a = blk.attn1
    with torch.no_grad():
        out = a(x, pos)
        q = a.q_norm(x @ a.q_proj.weight.T).view(1, -1, HEADS, D // HEADS)
        k = a.k_norm(x @ a.k_proj.weight.T).view(1, -1, HEADS, D // HEADS)
        v = (x @ a.v_proj.weight.T).view(1, -1, HEADS, D // HEADS)
        q, k = apply_rope_3d(q, pos), apply_rope_3d(k, pos)
        o = F.scaled_dot_product_attention(q.transpose(1, 2), k.transpose(1, 2),
                                           v.transpose(1, 2), is_causal=False)
        expected = o.transpose(1, 2).reshape(1, -1, D) @ a.o_proj.weight.T
        assert_close_to_scale(out, expected, ulps=64)
        # bidirectional: changing the last token changes the first token's output
        x2 = x.clone()
        x2[:, -1] += 1.0
        assert not torch.allclose(a(x2, pos)[:, 0], out[:, 0], atol=1e-5)


def test_block_matches_step_by_step_formula():
    blk = _block(0)
    x, temb, ctx, pos = _inputs()
    with torch.no_grad():
        mod = F.linear(F.silu(temb), blk.norm1.linear.weight, blk.norm1.linear.bias)
        sh1, sc1, g1, sh2, sc2, g2 = (m[:, None] for m in mod.chunk(6, -1))
        h = F.layer_norm(x, (D,), eps=1e-6) * (1 + sc1) + sh1
        y = x + g1 * blk.attn1(h, pos)
        y = y + blk.attn2(blk.norm2(y), pos, context=ctx, rope_k=False)
        h = blk.norm3(y) * (1 + sc2) + sh2
        h = blk.mlp.fc2(F.gelu(blk.mlp.fc1(h), approximate="tanh"))
        y = y + g2 * h
        out = blk(x, temb, ctx, pos)
    assert_close_to_scale(out, y, ulps=64)


@pytest.mark.parametrize("dtype", [torch.bfloat16])
def test_low_precision_runs_and_tracks_fp32(dtype):
    blk = _block(0)
    x, temb, ctx, pos = _inputs()
    with torch.no_grad():
        ref = blk(x, temb, ctx, pos)
        low = blk.to(dtype)(x.to(dtype), temb.to(dtype), ctx.to(dtype), pos)
    assert low.dtype == dtype
    assert torch.allclose(low.float(), ref, atol=0.1, rtol=0.05)
