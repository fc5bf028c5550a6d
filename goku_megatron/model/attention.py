"""Core attention (softmax(QK^T)V) backends, for unpacked batches and packed (THD) sequences.

Inputs follow megatron's [s, b, heads, head_dim] layout. Packing is described by megatron's
``PackedSeqParams`` (cu_seqlens of queries and keys on the device) with the same lengths as host
ints (``PackedSegments``): attention never crosses sample boundaries.

- ``SDPAAttention``: torch's scaled_dot_product_attention; runs everywhere (CPU included). Packed
  sequences (``PackedSegments``, whose host lengths it reads) are attended segment by segment on
  views, consecutive segments of equal lengths in one batched call, so memory stays O(sum of
  squared sample lengths) and a pack of equal clips is one call.
- ``FlashAttention``: flash-attn's varlen kernel on GPU, imported lazily.

Self-attention under context parallelism (goku_megatron.model.context_parallel) goes through one of:

- ``UlyssesAttention``: wraps a local backend above; all-to-all from this rank's tokens with all
  heads to all tokens with this rank's heads, local attention, and back.
- ``TECoreAttention``: Transformer Engine's attention (megatron's ``TEDotProductAttention``), which
  does context parallelism itself (p2p ring, a2a, a2a+p2p) on TE's zigzag token layout.
"""

from __future__ import annotations

import math
from typing import Any

import torch
import torch.nn.functional as F
from megatron.core import parallel_state
from megatron.core.transformer.enums import AttnMaskType
from megatron.core.transformer.spec_utils import ModuleSpec, build_module
from megatron.core.transformer.transformer_config import TransformerConfig

from goku_megatron.model.context_parallel import PackedSegments, equal_runs, heads_to_sequence, sequence_to_heads


class CoreAttention(torch.nn.Module):
    """What every attention core computes: q [sq, b, h, d] and k/v [skv, b, h, d] -> [sq, b, h, d],
    either dense (``key_mask`` [b, skv], True = attend, or None) or over the THD segments of a pack
    (b = 1, ``packed``); a backend implements the two cases."""

    def forward(self, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, key_mask: torch.Tensor | None = None,
                packed: PackedSegments | None = None) -> torch.Tensor:
        if packed is not None:
            return self.packed(q, k, v, packed)
        return self.dense(q, k, v, key_mask)

    def dense(self, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, key_mask: torch.Tensor | None) -> torch.Tensor:
        raise NotImplementedError

    def packed(self, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, packed: PackedSegments) -> torch.Tensor:
        raise NotImplementedError


class SDPAAttention(CoreAttention):
    """Bidirectional attention through torch.nn.functional.scaled_dot_product_attention."""

    def dense(self, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, key_mask: torch.Tensor | None) -> torch.Tensor:
        mask = None if key_mask is None else key_mask[:, None, None, :]
        out = F.scaled_dot_product_attention(
            q.permute(1, 2, 0, 3), k.permute(1, 2, 0, 3), v.permute(1, 2, 0, 3), attn_mask=mask
        )
        return out.permute(2, 0, 1, 3)

    def packed(self, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, packed: PackedSegments) -> torch.Tensor:
        """Segment by segment, from the segments' host lengths: consecutive segments of equal query
        and key lengths are one batched call on views of q, k and v (a toy pack of B same-size
        clips is one call, as a dense batch of B was). No segment is copied or masked, so SDPA
        keeps its fused kernels. The padding's queries join the last sample's segment (they attend
        its keys; no real token attends theirs): their output is never read, and the sample and its
        padding are one call whose output needs no concatenation."""
        lengths_q, lengths_kv = list(packed.lengths_q), list(packed.lengths_kv)
        if packed.padding:
            pad = lengths_q.pop()
            lengths_kv.pop()
            if not lengths_q:  # a CP share of padding alone
                return torch.zeros_like(q)
            lengths_q[-1] += pad
        outputs: list[torch.Tensor] = []
        start_q = start_kv = 0
        for _, n, (lq, lkv) in equal_runs(list(zip(lengths_q, lengths_kv))):
            qs, ks, vs = (_batch(_rows(t, start, n * length), n) for t, start, length in
                          ((q, start_q, lq), (k, start_kv, lkv), (v, start_kv, lkv)))
            out = F.scaled_dot_product_attention(qs, ks, vs)  # [n, h, lq, d]
            outputs.append(out.permute(2, 0, 1, 3) if n == 1 else
                           out.transpose(1, 2).reshape(n * lq, 1, *q.shape[2:]))
            start_q, start_kv = start_q + n * lq, start_kv + n * lkv
        return torch.cat(outputs) if len(outputs) > 1 else outputs[0]


def _batch(t: torch.Tensor, n: int) -> torch.Tensor:
    """Tokens t [n * L, 1, h, d] of n segments of L tokens as SDPA's [n, h, L, d] (views)."""
    if n == 1:
        return t.permute(1, 2, 0, 3)
    return t.reshape(n, t.shape[0] // n, *t.shape[2:]).transpose(1, 2)


def _rows(t: torch.Tensor, start: int, length: int) -> torch.Tensor:
    """Rows [start, start + length) of t: t itself when they are all of it (no slicing op)."""
    return t if (start, length) == (0, t.shape[0]) else t[start:start + length]


class FlashAttention(CoreAttention):
    """flash-attn kernels (GPU). Key-padding masks go through the varlen kernel per sample."""

    def __init__(self) -> None:
        super().__init__()
        from flash_attn import flash_attn_func, flash_attn_varlen_func

        self._dense = flash_attn_func
        self._varlen = flash_attn_varlen_func

    def dense(self, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, key_mask: torch.Tensor | None) -> torch.Tensor:
        sq, b, h, d = q.shape
        scale = 1.0 / math.sqrt(d)
        if key_mask is None:
            out = self._dense(q.transpose(0, 1), k.transpose(0, 1), v.transpose(0, 1), softmax_scale=scale)
            return out.transpose(0, 1)
        # Right-padded keys (captions): per-sample lengths become a varlen problem.
        lens = key_mask.sum(dim=1, dtype=torch.int32)
        cu_kv = F.pad(lens.cumsum(0, dtype=torch.int32), (1, 0))
        cu_q = torch.arange(0, (b + 1) * sq, sq, dtype=torch.int32, device=q.device)
        kk = torch.cat([k[: int(n), i] for i, n in enumerate(lens)])
        vv = torch.cat([v[: int(n), i] for i, n in enumerate(lens)])
        out = self._varlen(q.transpose(0, 1).reshape(b * sq, h, d), kk, vv, cu_q, cu_kv,
                           sq, int(lens.max()), softmax_scale=scale)
        return out.reshape(b, sq, h, d).transpose(0, 1)

    def packed(self, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, packed: PackedSegments) -> torch.Tensor:
        out = self._varlen(
            q.squeeze(1), k.squeeze(1), v.squeeze(1),
            packed.cu_seqlens_q.int(), packed.cu_seqlens_kv.int(),
            packed.max_seqlen_q, packed.max_seqlen_kv, softmax_scale=1.0 / math.sqrt(q.shape[-1]),
        )
        return out.unsqueeze(1)


class UlyssesAttention(CoreAttention):
    """Ulysses sequence parallelism around a local attention backend (``submodules``).

    Each CP rank holds a contiguous slice of the sequence (``cp_layout``). One all-to-all sends q,
    k and v together from [S/cp, b, heads, d] to [S, b, heads/cp, d]: every rank then attends the
    whole sequence for its share of the heads, with the micro-batch's own segments (cu_seqlens of
    the whole pack), and a second all-to-all brings the output back to [S/cp, b, heads, d]. Without
    CP it is the wrapped backend.
    """

    cp_layout = "contiguous"

    def __init__(self, config: TransformerConfig, submodules: type | ModuleSpec) -> None:
        super().__init__()
        self.core = build_module(submodules)
        self.cp = parallel_state.get_context_parallel_world_size()
        heads = config.num_attention_heads // parallel_state.get_tensor_model_parallel_world_size()
        if heads % self.cp:
            raise ValueError(f"Ulysses attention splits the {heads} heads of a tensor-parallel rank over "
                             f"{self.cp} context-parallel ranks; choose a cp that divides {heads}")

    def dense(self, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, key_mask: torch.Tensor | None) -> torch.Tensor:
        return self._all_heads(q, k, v, key_mask=key_mask)

    def packed(self, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, packed: PackedSegments) -> torch.Tensor:
        return self._all_heads(q, k, v, packed=packed)

    def _all_heads(self, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, **segments: Any) -> torch.Tensor:
        """q/k/v [S/cp, b, heads, d] (this rank's tokens) -> [S/cp, b, heads, d]."""
        if self.cp == 1:
            return self.core(q, k, v, **segments)
        group = parallel_state.get_context_parallel_group()
        q, k, v = sequence_to_heads(torch.stack((q, k, v)), group).unbind(0)
        return heads_to_sequence(self.core(q, k, v, **segments), group)


class TECoreAttention(CoreAttention):
    """Transformer Engine's fused attention (GPU), context parallel over megatron's CP group.

    TE expects this rank's tokens in its zigzag layout (``cp_layout``) and, for packs, the global
    cu_seqlens with every sample padded to a multiple of 2*cp (``cu_seqlens_*_padded``); the TE
    communication pattern is the TransformerConfig's ``cp_comm_type`` (parallel.cp_comm_type). Not
    exercised by the CPU test suite.
    """

    cp_layout = "zigzag"

    def __init__(self, config: TransformerConfig) -> None:
        super().__init__()
        from megatron.core.extensions.transformer_engine import TEDotProductAttention

        # layer_number only matters to TE's query-key layer scaling, which Goku does not use;
        # cp_comm_type None is p2p.
        self.attn = TEDotProductAttention(config, layer_number=1, attn_mask_type=AttnMaskType.no_mask,
                                          attention_type="self", cp_comm_type=config.cp_comm_type)

    def dense(self, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, key_mask: torch.Tensor | None) -> torch.Tensor:
        if key_mask is not None:
            raise ValueError("TECoreAttention is the self-attention backend; it takes no key mask")
        return self.attn(q, k, v, None, AttnMaskType.no_mask).reshape(q.shape)

    def packed(self, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, packed: PackedSegments) -> torch.Tensor:
        out = self.attn(q.squeeze(1), k.squeeze(1), v.squeeze(1), None, AttnMaskType.padding,
                        packed_seq_params=packed)
        return out.reshape(q.shape)
