"""Core attention (softmax(QK^T)V) backends, for unpacked batches and packed (THD) sequences.

Inputs follow megatron's [s, b, heads, head_dim] layout. Packing is described by megatron's
``PackedSeqParams`` (cu_seqlens of queries and keys): attention never crosses sample boundaries.

- ``SDPAAttention``: torch's scaled_dot_product_attention; runs everywhere (CPU included). Packed
  sequences are attended sample by sample, so memory stays O(sum of squared sample lengths).
- ``FlashAttention``: flash-attn's varlen kernel on GPU, imported lazily.
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from megatron.core.packed_seq_params import PackedSeqParams


class SDPAAttention(torch.nn.Module):
    """Bidirectional attention through torch.nn.functional.scaled_dot_product_attention."""

    def forward(
        self,
        q: torch.Tensor,
        k: torch.Tensor,
        v: torch.Tensor,
        key_mask: torch.Tensor | None = None,
        packed: PackedSeqParams | None = None,
    ) -> torch.Tensor:
        """q [sq, b, h, d], k/v [skv, b, h, d]; key_mask [b, skv] (True = attend); -> [sq, b, h, d]."""
        if packed is not None:
            return self._packed(q, k, v, packed)
        mask = None if key_mask is None else key_mask[:, None, None, :]
        out = F.scaled_dot_product_attention(
            q.permute(1, 2, 0, 3), k.permute(1, 2, 0, 3), v.permute(1, 2, 0, 3), attn_mask=mask
        )
        return out.permute(2, 0, 1, 3)

    def _packed(self, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, packed: PackedSeqParams) -> torch.Tensor:
        cu_q = packed.cu_seqlens_q.tolist()
        cu_kv = packed.cu_seqlens_kv.tolist()
        outs = []
        for i in range(len(cu_q) - 1):
            qs = q[cu_q[i] : cu_q[i + 1]]
            ks = k[cu_kv[i] : cu_kv[i + 1]]
            vs = v[cu_kv[i] : cu_kv[i + 1]]
            outs.append(self.forward(qs, ks, vs))
        return torch.cat(outs, dim=0)


class FlashAttention(torch.nn.Module):
    """flash-attn kernels (GPU). Key-padding masks go through the varlen kernel per sample."""

    def __init__(self) -> None:
        super().__init__()
        from flash_attn import flash_attn_func, flash_attn_varlen_func

        self._dense = flash_attn_func
        self._varlen = flash_attn_varlen_func

    def forward(
        self,
        q: torch.Tensor,
        k: torch.Tensor,
        v: torch.Tensor,
        key_mask: torch.Tensor | None = None,
        packed: PackedSeqParams | None = None,
    ) -> torch.Tensor:
        sq, b, h, d = q.shape
        scale = 1.0 / math.sqrt(d)
        if packed is None and key_mask is None:
            out = self._dense(q.transpose(0, 1), k.transpose(0, 1), v.transpose(0, 1), softmax_scale=scale)
            return out.transpose(0, 1)
        if packed is None:
            # Right-padded keys (captions): per-sample lengths become a varlen problem.
            lens = key_mask.sum(dim=1, dtype=torch.int32)
            cu_kv = F.pad(lens.cumsum(0, dtype=torch.int32), (1, 0))
            cu_q = torch.arange(0, (b + 1) * sq, sq, dtype=torch.int32, device=q.device)
            kk = torch.cat([k[: int(n), i] for i, n in enumerate(lens)])
            vv = torch.cat([v[: int(n), i] for i, n in enumerate(lens)])
            out = self._varlen(q.transpose(0, 1).reshape(b * sq, h, d), kk, vv, cu_q, cu_kv,
                               sq, int(lens.max()), softmax_scale=scale)
            return out.reshape(b, sq, h, d).transpose(0, 1)
        out = self._varlen(
            q.squeeze(1), k.squeeze(1), v.squeeze(1),
            packed.cu_seqlens_q.int(), packed.cu_seqlens_kv.int(),
            packed.max_seqlen_q, packed.max_seqlen_kv, softmax_scale=scale,
        )
        return out.unsqueeze(1)
