"""Independent plain-PyTorch reference of ONE Goku transformer block (test fixture).

This module uses torch / torch.nn only (no megatron) and follows the Goku paper's block
(arXiv 2502.04896), written out in order below. It is meant to be compared against the
Megatron-Core implementation with copied weights, so it favours clarity over speed.

Conventions (batch-first):
    x            [B, S, D]    video/image tokens
    context      [B, L, Dc]   text tokens (Dc = ``context_dim``)
    temb         [B, D]       timestep embedding (already computed)
    pos          [B, S, 3]    integer (t, h, w) patch-grid coordinates of every token
    context_mask [B, L] bool  True = valid text token (optional)

Block, in order:
    mod = norm1.linear(SiLU(temb)) -> shift_msa, scale_msa, gate_msa, shift_mlp, scale_mlp, gate_mlp
    h = LayerNorm(x, no affine, eps) * (1 + scale_msa) + shift_msa
    x = x + gate_msa * attn1(h)                    (QK RMSNorm over full D, 3D RoPE on Q and K)
    x = x + attn2(norm2(x), context)               (QK RMSNorm, RoPE on Q only by default, no gate)
    h = norm3(x) * (1 + scale_mlp) + shift_mlp
    x = x + gate_mlp * fc2(GELU_tanh(fc1(h)))

Parameter names (checkpoint interop):
    norm1.linear.{weight,bias}; attn1.{q,k,v,o}_proj.weight; attn1.{q,k}_norm.weight;
    norm2.weight; attn2.{q,k,v,o}_proj.weight; attn2.{q,k}_norm.weight; norm3.weight;
    mlp.fc1.{weight,bias}; mlp.fc2.{weight,bias}
"""
from __future__ import annotations

import math
from typing import List, Optional, Sequence, Tuple

import torch
import torch.nn as nn
import torch.nn.functional as F

__all__ = [
    "RMSNorm",
    "AdaLNZero",
    "Attention",
    "MLP",
    "ReferenceGokuBlock",
    "rope_pair_split",
    "rope_angles",
    "apply_rope_3d",
    "grid_positions",
]


def _wide(x: torch.Tensor) -> torch.Tensor:
    """x in the block's compute precision: float32 for bf16/fp16/fp32 inputs, as the Goku block
    computes norms, modulation, RoPE and softmax; float64 stays float64, so the whole block can run
    in float64 as the exact reference that fp32 implementations are measured against."""
    return x if x.dtype == torch.float64 else x.float()


# --------------------------------------------------------------------------------------------
# 3D RoPE
# --------------------------------------------------------------------------------------------
def rope_pair_split(head_dim: int) -> Tuple[int, int, int]:
    """Number of rotary pairs given to the (t, h, w) axes, in that order.

    P = head_dim // 2; n_t = P // 4; n_h = (P - n_t) // 2; n_w = P - n_t - n_h.
    """
    if head_dim % 2 != 0:
        raise ValueError(f"head_dim must be even for RoPE, got {head_dim}")
    p = head_dim // 2
    n_t = p // 4
    n_h = (p - n_t) // 2
    n_w = p - n_t - n_h
    return n_t, n_h, n_w


def rope_angles(pos: torch.Tensor, head_dim: int, theta: float = 10000.0,
                dtype: torch.dtype = torch.float32) -> torch.Tensor:
    """Rotation angle of every rotary pair: pos [..., 3] (t, h, w) -> angles [..., head_dim // 2].

    Pairs 0..n_t-1 use the t coordinate, the next n_h pairs h, the last n_w pairs w. For an axis
    with n pairs, freq_j = 1 / theta ** (j / n), j = 0..n-1, and angle = pos_axis * freq_j.
    Computed in float64 and returned as ``dtype`` (float32 unless a float64 run asks for more).
    """
    if pos.shape[-1] != 3:
        raise ValueError(f"pos must end in 3 (t, h, w) coordinates, got shape {tuple(pos.shape)}")
    pieces = []
    for axis, n in enumerate(rope_pair_split(head_dim)):
        if n == 0:
            continue
        j = torch.arange(n, dtype=torch.float64, device=pos.device)
        freqs = 1.0 / (theta ** (j / n))  # [n]
        pieces.append(pos[..., axis : axis + 1].to(torch.float64) * freqs)  # [..., n]
    return torch.cat(pieces, dim=-1).to(dtype)


def apply_rope_3d(x: torch.Tensor, pos: torch.Tensor, theta: float = 10000.0) -> torch.Tensor:
    """Rotate interleaved pairs of x [B, S, H, head_dim] by the 3D RoPE angles of pos [B, S, 3].

    Pair j is (x[..., 2j], x[..., 2j+1]) and rotates as (a, b) -> (a cos - b sin, a sin + b cos).
    Math in float32 (float64 for float64 x), result cast back to x.dtype.
    """
    head_dim = x.shape[-1]
    xf = _wide(x)
    angles = rope_angles(pos, head_dim, theta, xf.dtype)[:, :, None, :]  # [B, S, 1, P]
    cos, sin = angles.cos(), angles.sin()
    a = xf[..., 0::2]
    b = xf[..., 1::2]
    out = torch.stack((a * cos - b * sin, a * sin + b * cos), dim=-1)  # [B, S, H, P, 2]
    return out.flatten(-2).to(x.dtype)


def grid_positions(T: int, H: int, W: int) -> torch.Tensor:
    """LongTensor [T*H*W, 3] of (t, h, w) coordinates in row-major (t, h, w) order."""
    t, h, w = torch.meshgrid(
        torch.arange(T), torch.arange(H), torch.arange(W), indexing="ij"
    )
    return torch.stack((t, h, w), dim=-1).reshape(T * H * W, 3).long()


# --------------------------------------------------------------------------------------------
# Building blocks
# --------------------------------------------------------------------------------------------
class RMSNorm(nn.Module):
    """x * rsqrt(mean(x^2, -1) + eps) * weight, computed in float32, cast back to x.dtype."""

    def __init__(self, dim: int, eps: float = 1e-6):
        super().__init__()
        self.eps = eps
        self.weight = nn.Parameter(torch.ones(dim))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        xf = _wide(x)
        y = xf * torch.rsqrt(xf.pow(2).mean(dim=-1, keepdim=True) + self.eps)
        return (y * _wide(self.weight)).to(x.dtype)


class AdaLNZero(nn.Module):
    """norm1: SiLU -> Linear(D, 6D, bias) on temb, in float32.

    Returns the six [B, D] float32 tensors
    (shift_msa, scale_msa, gate_msa, shift_mlp, scale_mlp, gate_mlp), in that order.
    """

    def __init__(self, hidden_size: int):
        super().__init__()
        self.linear = nn.Linear(hidden_size, 6 * hidden_size, bias=True)

    def forward(self, temb: torch.Tensor) -> Tuple[torch.Tensor, ...]:
        mod = F.linear(F.silu(_wide(temb)), _wide(self.linear.weight), _wide(self.linear.bias))
        return tuple(mod.chunk(6, dim=-1))


class Attention(nn.Module):
    """Multi-head attention with bias-free Q/K/V/O and QK-RMSNorm over the full inner dim.

    Self-attention when ``context`` is None (RoPE on Q and K); cross-attention otherwise
    (K/V from ``context`` of width ``kv_dim``; RoPE on Q only if ``rope_q``, never on K).
    """

    def __init__(
        self,
        hidden_size: int,
        num_heads: int,
        kv_dim: Optional[int] = None,
        eps: float = 1e-6,
        rope_theta: float = 10000.0,
    ):
        super().__init__()
        if hidden_size % num_heads != 0:
            raise ValueError("hidden_size must be divisible by num_heads")
        kv_dim = hidden_size if kv_dim is None else kv_dim
        self.num_heads = num_heads
        self.head_dim = hidden_size // num_heads
        self.rope_theta = rope_theta
        self.q_proj = nn.Linear(hidden_size, hidden_size, bias=False)
        self.k_proj = nn.Linear(kv_dim, hidden_size, bias=False)
        self.v_proj = nn.Linear(kv_dim, hidden_size, bias=False)
        self.o_proj = nn.Linear(hidden_size, hidden_size, bias=False)
        self.q_norm = RMSNorm(hidden_size, eps)
        self.k_norm = RMSNorm(hidden_size, eps)

    def _heads(self, t: torch.Tensor) -> torch.Tensor:
        b, s, _ = t.shape
        return t.view(b, s, self.num_heads, self.head_dim)  # [B, S, H, hd]

    def forward(
        self,
        x: torch.Tensor,
        pos: Optional[torch.Tensor],
        context: Optional[torch.Tensor] = None,
        context_mask: Optional[torch.Tensor] = None,
        rope_q: bool = True,
        rope_k: bool = True,
    ) -> torch.Tensor:
        kv_src = x if context is None else context
        q = self._heads(self.q_norm(self.q_proj(x)))  # norm over full D, then split heads
        k = self._heads(self.k_norm(self.k_proj(kv_src)))
        v = self._heads(self.v_proj(kv_src))
        if rope_q:
            q = apply_rope_3d(q, pos, self.rope_theta)
        if rope_k:
            k = apply_rope_3d(k, pos, self.rope_theta)

        # [B, H, S, hd] / [B, H, L, hd]; explicit softmax attention in float32.
        qh, kh, vh = (_wide(t.transpose(1, 2)) for t in (q, k, v))
        scores = torch.matmul(qh, kh.transpose(-1, -2)) / math.sqrt(self.head_dim)  # [B,H,S,L]
        if context_mask is not None:
            valid = context_mask.to(torch.bool)[:, None, None, :]  # [B, 1, 1, L]
            scores = scores.masked_fill(~valid, float("-inf"))
        probs = torch.softmax(scores, dim=-1)
        if context_mask is not None:
            # A query with no valid key at all gets zero output instead of NaN.
            probs = torch.nan_to_num(probs, nan=0.0)
        out = torch.matmul(probs, vh)  # [B, H, S, hd]
        out = out.transpose(1, 2).reshape(x.shape[0], x.shape[1], -1).to(x.dtype)
        return self.o_proj(out)


class MLP(nn.Module):
    """fc1 Linear(D, F, bias) -> GELU(tanh) -> fc2 Linear(F, D, bias)."""

    def __init__(self, hidden_size: int, ffn_hidden_size: int):
        super().__init__()
        self.fc1 = nn.Linear(hidden_size, ffn_hidden_size, bias=True)
        self.fc2 = nn.Linear(ffn_hidden_size, hidden_size, bias=True)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.fc2(F.gelu(self.fc1(x), approximate="tanh"))


# --------------------------------------------------------------------------------------------
# The block
# --------------------------------------------------------------------------------------------
class ReferenceGokuBlock(nn.Module):
    """One Goku transformer block (see the module docstring for the exact math)."""

    def __init__(
        self,
        hidden_size: int,
        num_heads: int,
        ffn_hidden_size: int,
        context_dim: int,
        cross_attn_rope_q: bool = True,
        rope_theta: float = 10000.0,
        eps: float = 1e-6,
    ):
        super().__init__()
        self.hidden_size = hidden_size
        self.num_heads = num_heads
        self.head_dim = hidden_size // num_heads
        self.ffn_hidden_size = ffn_hidden_size
        self.context_dim = context_dim
        self.cross_attn_rope_q = cross_attn_rope_q
        self.rope_theta = rope_theta
        self.eps = eps

        self.norm1 = AdaLNZero(hidden_size)
        self.attn1 = Attention(hidden_size, num_heads, None, eps, rope_theta)
        self.norm2 = RMSNorm(hidden_size, eps)
        self.attn2 = Attention(hidden_size, num_heads, context_dim, eps, rope_theta)
        self.norm3 = RMSNorm(hidden_size, eps)
        self.mlp = MLP(hidden_size, ffn_hidden_size)
        self.zero_adaln_()

    # ---- initialisation ------------------------------------------------------------------
    @torch.no_grad()
    def zero_adaln_(self) -> "ReferenceGokuBlock":
        """adaLN-Zero init: modulation Linear weight and bias set to zero (all gates zero)."""
        self.norm1.linear.weight.zero_()
        self.norm1.linear.bias.zero_()
        return self

    @torch.no_grad()
    def randomize_(self, seed: int = 0) -> "ReferenceGokuBlock":
        """Fill EVERY parameter with seeded random values so that all paths are exercised.

        Linear weights ~ N(0, 1/fan_in), biases ~ N(0, 0.1^2), norm weights ~ 1 + N(0, 0.1^2),
        adaLN Linear weight ~ N(0, 0.5^2/D) and bias ~ N(0, 0.2^2) (non-zero gates/shifts/scales).
        Deterministic given ``seed`` (CPU generator; values are copied to each parameter's device).
        """
        g = torch.Generator().manual_seed(seed)

        def normal_(p: torch.Tensor, mean: float, std: float) -> None:
            p.copy_(torch.randn(p.shape, generator=g, dtype=torch.float32) * std + mean)

        for name, p in self.named_parameters():
            if name.startswith("norm1.linear."):
                if name.endswith("weight"):
                    normal_(p, 0.0, 0.5 / math.sqrt(self.hidden_size))
                else:
                    normal_(p, 0.0, 0.2)
            elif name.endswith("norm.weight") or name in ("norm2.weight", "norm3.weight"):
                normal_(p, 1.0, 0.1)
            elif name.endswith(".weight"):
                normal_(p, 0.0, 1.0 / math.sqrt(p.shape[1]))
            elif name.endswith(".bias"):
                normal_(p, 0.0, 0.1)
            else:  # pragma: no cover - every parameter is covered above
                raise AssertionError(f"unhandled parameter {name}")
        return self

    # ---- forward -------------------------------------------------------------------------
    def forward(
        self,
        x: torch.Tensor,
        temb: torch.Tensor,
        context: torch.Tensor,
        pos: torch.Tensor,
        context_mask: Optional[torch.Tensor] = None,
    ) -> torch.Tensor:
        """Unpacked forward. x [B,S,D], temb [B,D], context [B,L,Dc], pos [B,S,3],
        context_mask [B,L] bool (True = valid) or None. Returns [B, S, D] in x.dtype."""
        dtype = x.dtype
        shift_msa, scale_msa, gate_msa, shift_mlp, scale_mlp, gate_mlp = (
            m[:, None, :] for m in self.norm1(temb)  # each [B, 1, D] float32
        )

        # 1-2. modulated LayerNorm -> self-attention -> gated residual (modulation in fp32).
        h = F.layer_norm(_wide(x), (self.hidden_size,), eps=self.eps)
        h = (h * (1 + scale_msa) + shift_msa).to(dtype)
        attn = self.attn1(h, pos, rope_q=True, rope_k=True)
        x = (_wide(x) + gate_msa * _wide(attn)).to(dtype)

        # 3. cross-attention to the text tokens: plain residual, no gate.
        h = self.norm2(x)
        attn = self.attn2(
            h, pos, context=context, context_mask=context_mask,
            rope_q=self.cross_attn_rope_q, rope_k=False,
        )
        x = x + attn

        # 4. modulated RMSNorm -> MLP -> gated residual.
        h = _wide(self.norm3(x))
        h = (h * (1 + scale_mlp) + shift_mlp).to(dtype)
        x = (_wide(x) + gate_mlp * _wide(self.mlp(h))).to(dtype)
        return x

    def forward_packed(
        self,
        x: torch.Tensor,
        temb: torch.Tensor,
        sample_lens: Sequence[int],
        context: torch.Tensor,
        context_lens: Sequence[int],
        pos: torch.Tensor,
    ) -> torch.Tensor:
        """Packed forward (Patch n' Pack): x [1,S,D] holds N samples of lengths ``sample_lens``
        (sum S), temb [N,D] one row per sample, context [1,L_total,Dc] holds the N samples' text
        of lengths ``context_lens``, pos [1,S,3] per-sample positions. Each sample gets its own
        modulation, self-attention within itself only, cross-attention to its own text only.
        Implemented by running each sample through :meth:`forward` and concatenating."""
        sample_lens = [int(n) for n in sample_lens]
        context_lens = [int(n) for n in context_lens]
        if x.shape[0] != 1 or context.shape[0] != 1 or pos.shape[0] != 1:
            raise ValueError("packed inputs must have batch size 1")
        if len(sample_lens) != temb.shape[0] or len(context_lens) != temb.shape[0]:
            raise ValueError("need one temb row, one sample length and one context length per sample")
        if sum(sample_lens) != x.shape[1] or sum(context_lens) != context.shape[1]:
            raise ValueError("sample_lens / context_lens must sum to the packed lengths")
        xs = torch.split(x, sample_lens, dim=1)
        ps = torch.split(pos, sample_lens, dim=1)
        cs = torch.split(context, context_lens, dim=1)
        outs: List[torch.Tensor] = []
        for i, (xi, pi, ci) in enumerate(zip(xs, ps, cs)):
            outs.append(self.forward(xi, temb[i : i + 1], ci, pi))
        return torch.cat(outs, dim=1)
