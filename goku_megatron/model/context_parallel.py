"""Context parallelism (CP): each CP rank holds a share of a micro-batch's token sequence.

Conditioning is never split: every CP rank embeds all captions and all per-sample timesteps. What
is split is the video tokens and everything attached to a token: its input, its RoPE position, its
sample index (which picks its adaLN modulation) and its loss target and weight. The data path is
unchanged: all CP peers of a DP rank receive the same whole pack, and ``shard_pack`` picks this
rank's tokens inside the model and the loss.

Where the tokens go depends on the self-attention backend (its ``cp_layout``):

- ``"contiguous"`` (Ulysses, around any local attention backend): rank r holds tokens
  [r*S/cp, (r+1)*S/cp) of the pack's budget. Before core
  attention an all-to-all turns [S/cp, heads] into [S, heads/cp]; the whole sequence is attended
  with the pack's own cu_seqlens; a second all-to-all turns the output back.
- ``"zigzag"`` (Transformer Engine's CP attention: p2p, a2a, a2a+p2p): TE splits every sequence
  into 2*cp chunks and rank r holds chunks r and 2*cp-1-r (TE's load-balanced layout,
  ``thd_get_partitioned_indices``). A packed sequence is laid out first with every sample padded
  to a multiple of 2*cp (TE's ``cu_seqlens_padded``); the inserted filler tokens are zero, take no
  part in self-attention (TE's actual ``cu_seqlens``) and carry no loss.

Cross-attention needs no communication in either layout: a query's output depends only on that
query and its own sample's caption, so each rank attends its local queries, grouped by sample,
to those samples' caption segments (the cu_seqlens ``shard_pack`` works out for the rank).

Loss: each rank sums its tokens' weighted errors with the weights of the whole micro-batch (one
normalisation for the pack), so the CP ranks' losses add up to the CP=1 loss. megatron's schedule
multiplies a 2-output loss_func's loss by cp and DDP averages gradients over the dp x cp group, so
the gradients are the CP=1 gradients; train.forward_step reports the sum over CP ranks.
"""

from __future__ import annotations

import bisect
from dataclasses import dataclass, replace
from typing import Literal, Sequence, TypeVar

import torch
from megatron.core import parallel_state
from megatron.core.packed_seq_params import PackedSeqParams
from torch import Tensor

from goku_megatron.batch import Pack, segment_offsets, to_device

Layout = Literal["contiguous", "zigzag"]


def cp_world() -> tuple[int, int]:
    """(size, rank) of this process's context-parallel group."""
    return parallel_state.get_context_parallel_world_size(), parallel_state.get_context_parallel_rank()


def _round_up(n: int, multiple: int) -> int:
    return -(-n // multiple) * multiple


# ------------------------------------------------------------------------------------------------
# Ulysses all-to-all


def _all_to_all(x: Tensor, group: torch.distributed.ProcessGroup, scatter_dim: int, gather_dim: int) -> Tensor:
    """Chunk ``x`` along scatter_dim, send chunk j to rank j, concatenate what arrives along
    gather_dim in rank order."""
    world = group.size()
    send = torch.stack(x.chunk(world, dim=scatter_dim)).contiguous()
    recv = torch.empty_like(send)
    torch.distributed.all_to_all_single(recv, send, group=group)
    return torch.cat(recv.unbind(0), dim=gather_dim)


class _AllToAll(torch.autograd.Function):
    """The all-to-all is a permutation of elements across ranks; its adjoint is the inverse
    all-to-all (scatter and gather dims swapped)."""

    @staticmethod
    def forward(ctx, x: Tensor, group: torch.distributed.ProcessGroup, scatter_dim: int,  # type: ignore[override]
                gather_dim: int) -> Tensor:
        ctx.group, ctx.scatter_dim, ctx.gather_dim = group, scatter_dim, gather_dim
        return _all_to_all(x, group, scatter_dim, gather_dim)

    @staticmethod
    def backward(ctx, grad: Tensor) -> tuple[Tensor, None, None, None]:  # type: ignore[override]
        return _all_to_all(grad.contiguous(), ctx.group, ctx.gather_dim, ctx.scatter_dim), None, None, None


def all_to_all(x: Tensor, group: torch.distributed.ProcessGroup, scatter_dim: int, gather_dim: int) -> Tensor:
    """Differentiable all-to-all over ``group``: the identity for a group of one."""
    if group.size() == 1:
        return x
    return _AllToAll.apply(x, group, scatter_dim, gather_dim)


def sequence_to_heads(x: Tensor, group: torch.distributed.ProcessGroup) -> Tensor:
    """[..., S/cp, b, heads, d] (this rank's tokens, all heads) -> [..., S, b, heads/cp, d]."""
    return all_to_all(x, group, scatter_dim=x.dim() - 2, gather_dim=x.dim() - 4)


def heads_to_sequence(x: Tensor, group: torch.distributed.ProcessGroup) -> Tensor:
    """Inverse of ``sequence_to_heads``: [..., S, b, heads/cp, d] -> [..., S/cp, b, heads, d]."""
    return all_to_all(x, group, scatter_dim=x.dim() - 4, gather_dim=x.dim() - 2)


# ------------------------------------------------------------------------------------------------
# Token layouts


Chunks = list[tuple[int, int]]  # (start, length) ranges of a laid-out sequence, in a rank's order


def contiguous_chunks(length: int, cp: int, rank: int) -> Chunks:
    """Rank ``rank``'s tokens [rank*length/cp, (rank+1)*length/cp) of a sequence."""
    if length % cp:
        raise ValueError(f"a sequence of {length} tokens does not split over {cp} context-parallel ranks")
    share = length // cp
    return [(rank * share, share)]


def zigzag_chunks(segments: Sequence[int], cp: int, rank: int) -> Chunks:
    """TE's load-balanced CP layout of back-to-back sequences of the given (padded) lengths: each
    split into 2*cp equal chunks, rank r holding chunks r and 2*cp-1-r of every sequence, in order."""
    chunks, offset = [], 0
    for n in segments:
        if n % (2 * cp):
            raise ValueError(f"a sequence of {n} tokens does not split into 2*cp={2 * cp} chunks")
        chunk = n // (2 * cp)
        chunks += [(offset + c * chunk, chunk) for c in (rank, 2 * cp - 1 - rank)]
        offset += n
    return chunks


def zigzag_length(pack: Pack, cp: int) -> int:
    """Tokens of a pack laid out for TE's CP attention: each sample padded to a multiple of 2*cp,
    then at least the budget (the rest is one padding segment), a multiple of 2*cp."""
    multiple = 2 * cp
    samples = pack.segment_lengths[: pack.num_samples]
    return _round_up(max(pack.budget, sum(_round_up(n, multiple) for n in samples)), multiple)


def align_packs(packs: list[Pack], layout: Layout) -> tuple[list[Pack], int]:
    """The packs of one step with the sequence length every pipeline stage exchanges.

    Contiguous: the budget. Zigzag with CP: the longest pack's laid-out length, recorded in each
    pack's ``layout_length`` so all micro-batches of the step share one pipeline shape.
    """
    cp, _ = cp_world()
    if layout == "contiguous" or cp == 1:
        return packs, packs[0].budget
    length = max(zigzag_length(p, cp) for p in packs)
    return [replace(p, layout_length=length) for p in packs], length


@dataclass
class PackedSegments(PackedSeqParams):
    """megatron's PackedSeqParams (cu_seqlens on the device, for flash-attn's and TE's varlen
    kernels) with the same segments' lengths as host ints, so that a backend that works segment by
    segment (SDPA) never reads cu_seqlens back from the device: that read is a host sync."""

    lengths_q: tuple[int, ...] = ()
    lengths_kv: tuple[int, ...] = ()
    # The last segment is the pack's padding: what attention gives its queries is never read (it
    # reaches no real token and no loss), so a backend may leave it zero instead of computing it.
    padding: bool = False


def packed_segments(lengths_q: Sequence[int], lengths_kv: Sequence[int] | None = None,
                    device: torch.device | str = "cpu", padded: Sequence[int] | None = None,
                    padding: bool = False) -> PackedSegments:
    """Segments of queries (and of keys, by default the same) given as host ints; ``padded``: TE's
    laid-out segment lengths (``cu_seqlens_*_padded``, which also set the max lengths); ``padding``:
    the last segment is the pack's padding."""
    lengths_kv = lengths_q if lengths_kv is None else lengths_kv
    cu_q, cu_kv = segment_offsets(lengths_q, device), segment_offsets(lengths_kv, device)
    params = PackedSegments(qkv_format="thd", cu_seqlens_q=cu_q, cu_seqlens_kv=cu_kv,
                            max_seqlen_q=max(padded or lengths_q), max_seqlen_kv=max(padded or lengths_kv),
                            lengths_q=tuple(lengths_q), lengths_kv=tuple(lengths_kv), padding=padding)
    if padded is not None:
        cu_padded = segment_offsets(padded, device)
        params = replace(params, cu_seqlens_q_padded=cu_padded, cu_seqlens_kv_padded=cu_padded)
    return params


K = TypeVar("K")


def equal_runs(keys: Sequence[K]) -> list[tuple[int, int, K]]:
    """Maximal runs of consecutive equal ``keys`` as (start, count, key): the one grouping of
    equal neighbours behind attention's batched equal segments (SDPAAttention), the per-sample
    blocks of modulation rows (RowRuns.blocks) and a CP shard's merged pieces (shard_pack). A
    plain loop: it runs inside compiled layers (model.compile), and dynamo traces no
    itertools.groupby over tuple keys."""
    runs: list[tuple[int, int, K]] = []
    for i, key in enumerate(keys):
        if runs and runs[-1][2] == key:
            start, count, _ = runs[-1]
            runs[-1] = (start, count + 1, key)
        else:
            runs.append((i, 1, key))
    return runs


Block = tuple[int, int, int]  # (first row r0, rows k, tokens per row L)


@dataclass(frozen=True)
class RowRuns:
    """Which per-sample row (adaLN modulation) each of a shard's tokens takes, as host ints.

    ``runs``: (row, tokens) for consecutive tokens taking the same row, merged (the padding takes
    the last sample's row, so one clip and its padding are one run). ``blocks``: the runs grouped
    into maximal blocks of consecutive rows r0, r0+1, ..., r0+k-1 of L tokens each: a block's
    tokens view as [k, L, F] and rows[r0:r0+k] broadcast over them, as over a dense batch. A pack
    of equal clips, one clip and its padding, or a CP share inside one sample is one block; equal
    clips then padding, two.
    """

    runs: tuple[tuple[int, int], ...]

    @property
    def blocks(self) -> tuple[Block, ...]:
        # Runs r0, r0+1, ... of L tokens each share the key (row - index, L).
        keys = [(row - i, length) for i, (row, length) in enumerate(self.runs)]
        return tuple((self.runs[start][0], count, length) for start, count, (_, length) in equal_runs(keys))


@dataclass
class PackShard:
    """This CP rank's share of a pack, and the attention segments for it, worked out on the host
    from the pack's host ints (``Pack.segment_lengths``): building one asks nothing of the device,
    and its tensors reach the pack's device by asynchronous copies (batch.to_device).

    ``source`` maps each local token to its pack token (-1: a filler the layout inserted). The
    self-attention segments are those of the whole laid-out sequence (Ulysses attends it whole after
    its all-to-all; TE takes global cu_seqlens); the cross-attention segments are local: the local
    queries grouped by segment, each against its caption's tokens in ``context[text_range]``, where
    the context is the valid caption tokens of the pack followed by one zero (null) token that the
    padding segment attends to.
    """

    source: Tensor  # [S_local] long
    positions: Tensor  # [S_local, 3] long, zero on fillers
    packed_self: PackedSegments
    packed_cross: PackedSegments
    text_range: tuple[int, int]
    rows: RowRuns
    whole: bool = False  # the shard is the whole pack in order (cp = 1): source is the identity

    def gather(self, tokens: Tensor) -> Tensor:
        """Pack tokens [budget, ...] -> this rank's tokens [S_local, ...], zero on fillers."""
        if self.whole:
            return tokens
        keep = (self.source >= 0).view(-1, *[1] * (tokens.dim() - 1))
        return torch.where(keep, tokens[self.source.clamp_min(0)], torch.zeros((), dtype=tokens.dtype,
                                                                                device=tokens.device))


def _pieces(chunks: Sequence[tuple[int, int]], padded: Sequence[int]) -> list[tuple[int, int, int]]:
    """Laid-out token ranges (start, length), in order, cut at segment boundaries: (segment, offset
    in the segment, tokens) for each piece."""
    starts = [0]
    for n in padded:
        starts.append(starts[-1] + n)
    pieces = []
    for start, length in chunks:
        end = start + length
        segment = bisect.bisect_right(starts, start) - 1
        while start < end:
            stop = min(end, starts[segment + 1])
            if stop > start:
                pieces.append((segment, start - starts[segment], stop - start))
            start, segment = stop, segment + 1
    return pieces


def shard_pack(pack: Pack, layout: Layout, cp: int, rank: int) -> PackShard:
    """Rank ``rank`` of ``cp``'s share of ``pack`` (cp=1: the whole pack, in pack order).

    Segments are the pack's samples plus, when there is one, a padding segment. In the zigzag
    layout each sample's segment is padded to a multiple of 2*cp and the padding segment takes the
    rest of the laid-out length (its tokens are all fillers). A rank's tokens cover a consecutive
    run of segments in order (contiguous: one slice of the sequence; zigzag: two chunks of every
    segment), which is what makes its cross-attention segments a slice of the caption tokens.
    Everything is host arithmetic on ``pack.segment_lengths``; only ``positions`` is gathered on the
    pack's device.
    """
    if cp == 1:  # one rank holds the pack in order; padding samples to 2*cp only serves the split
        layout = "contiguous"
    device = pack.noisy.device
    n = pack.num_samples
    real = list(pack.segment_lengths)
    starts_in_pack = [sum(real[:j]) for j in range(len(real))]
    if layout == "contiguous":
        padded, attended = real, real
        chunks = contiguous_chunks(pack.budget, cp, rank)
    elif layout == "zigzag":
        length = pack.layout_length or zigzag_length(pack, cp)
        padded = [_round_up(m, 2 * cp) for m in real[:n]]
        tail = length - sum(padded)
        if tail < 0 or tail % (2 * cp):
            raise ValueError(f"layout length {length} cannot hold the pack's samples padded to "
                             f"multiples of 2*cp (at least {sum(padded)}); use align_packs")
        attended = real[:n] + [tail] * (tail > 0)  # TE's actual cu_seqlens: fillers of a sample excluded
        real = real[:n] + [0] * (tail > 0)  # the padding segment holds only fillers
        starts_in_pack = starts_in_pack[:n] + [0] * (tail > 0)
        padded = padded + [tail] * (tail > 0)
        chunks = zigzag_chunks(padded, cp, rank)
    else:
        raise ValueError(f"unknown context-parallel layout {layout!r}")

    # Per piece of the local tokens: the pack tokens it holds (-1: fillers).
    pieces = _pieces(chunks, padded)
    source: list[Tensor] = []
    for segment, offset, count in pieces:
        held = max(0, min(count, real[segment] - offset))
        source += [torch.arange(starts_in_pack[segment] + offset, starts_in_pack[segment] + offset + held),
                   torch.full((count - held,), -1)]
    counts = [count for _, _, count in pieces]

    def tokens_per_run(keys: list[int]) -> list[tuple[int, int]]:
        """(key, local tokens) of the pieces' consecutive equal keys, merged."""
        return [(key, sum(counts[start:start + k])) for start, k, key in equal_runs(keys)]

    whole = cp == 1
    source_t = to_device(torch.cat(source), device)
    # Each piece's sample's modulation row; the padding segment takes the last sample's.
    rows = RowRuns(tuple(tokens_per_run([min(segment, n - 1) for segment, _, _ in pieces])))
    positions = pack.positions if whole else torch.where(
        (source_t >= 0)[:, None], pack.positions[source_t.clamp_min(0)], 0)

    # Cross-attention: local queries, grouped by segment, against their caption tokens.
    text_lengths = list(pack.text_lengths) + [1]  # segment n (padding) -> the null token
    present = tokens_per_run([segment for segment, _, _ in pieces])  # (segment, local tokens)
    first, last = present[0][0], present[-1][0]
    text_start = sum(text_lengths[:first])
    kv_lengths = [text_lengths[min(j, n)] for j in range(first, last + 1)]
    packed_cross = packed_segments([count for _, count in present], kv_lengths, device, padding=last == n)
    packed_self = packed_segments(attended, device=device, padded=padded if layout == "zigzag" else None,
                                  padding=len(attended) > n)
    return PackShard(source=source_t, positions=positions, packed_self=packed_self,
                     packed_cross=packed_cross, text_range=(text_start, text_start + sum(kv_lengths)), rows=rows,
                     whole=whole)


def gather_pack(local: Tensor, shard: PackShard, budget: int) -> Tensor:
    """Every CP rank's output tokens [S_local, ...] (its ``shard`` of a pack) -> the pack's
    [budget, ...] tokens on every rank, fillers dropped; forward only (sampling), no gradient."""
    group = parallel_state.get_context_parallel_group()
    cp = torch.distributed.get_world_size(group)
    if cp == 1:  # the shard is the whole pack, in pack order
        return local
    parts = [torch.empty_like(local) for _ in range(cp)]
    torch.distributed.all_gather(parts, local.contiguous(), group=group)
    sources = [torch.empty_like(shard.source) for _ in range(cp)]
    torch.distributed.all_gather(sources, shard.source.contiguous(), group=group)
    source, tokens = torch.cat(sources), torch.cat(parts)
    whole = local.new_zeros(budget, *local.shape[1:])
    whole[source[source >= 0]] = tokens[source >= 0]
    return whole
