"""Context parallelism: token layouts, a pack's per-rank share, cross-attention and loss per share,
and (torchrun, 4 processes) the Ulysses all-to-all and attention.

Whole-model equivalence of CP layouts with one process (mixed packs and equal-clip packs, with TP, PP and DP)
is in test_parallel_equivalence.py.
"""

from __future__ import annotations

import dataclasses
import sys
from pathlib import Path

import pytest
import torch
import torch.nn.functional as F
from conftest import run_torchrun
from numerics import assert_close_to_scale

from goku_megatron.batch import PackSample, build_pack
from goku_megatron.flow import flow_loss
from goku_megatron.model import context_parallel
from goku_megatron.model.attention import SDPAAttention
from goku_megatron.model.context_parallel import (
    PackedSegments,
    align_packs,
    contiguous_chunks,
    packed_segments,
    shard_pack,
    zigzag_chunks,
    zigzag_length,
)

C, TEXT_DIM, L = 4, 8, 5
# (T, H, W) with patch 1x2x2 -> 12, 6 and 1 tokens; caption tokens 3, 5, 2.
SAMPLES = [((3, 2, 8), 3), ((1, 4, 6), 5), ((1, 2, 2), 2)]


def _pack(budget: int = 24, seed: int = 0):
    g = torch.Generator().manual_seed(seed)
    samples = [PackSample(noisy=torch.randn(C, *shape, generator=g), target=torch.randn(C, *shape, generator=g),
                          timestep=0.1 * (i + 1), text=torch.randn(L, TEXT_DIM, generator=g),
                          text_mask=torch.arange(L) < n_text, key=f"s{i}")
               for i, (shape, n_text) in enumerate(SAMPLES)]
    return build_pack(samples, budget, (1, 2, 2))


def chunk_index(chunks: list[tuple[int, int]]) -> torch.Tensor:
    """The positions a rank's layout chunks hold, in order."""
    return torch.cat([torch.arange(start, start + length) for start, length in chunks])


def _row_index(shard: context_parallel.PackShard) -> torch.Tensor:
    """The sample whose modulation each of the shard's tokens takes, from its host runs."""
    return torch.cat([torch.full((n,), row) for row, n in shard.rows.runs])


def _shards(pack, layout: str, cp: int) -> list[context_parallel.PackShard]:
    return [shard_pack(pack, layout, cp, rank) for rank in range(cp)]


# ------------------------------------------------------------------------------------------------
# Layouts


def test_contiguous_index_splits_in_rank_order():
    assert [chunk_index(contiguous_chunks(12, 3, r)).tolist() for r in range(3)] == [[0, 1, 2, 3], [4, 5, 6, 7], [8, 9, 10, 11]]
    with pytest.raises(ValueError, match="13 tokens does not split over 2"):
        contiguous_chunks(13, 2, 0)


def test_zigzag_index_is_te_load_balanced_layout():
    """Each sequence in 2*cp chunks; rank r holds chunks r and 2*cp-1-r of every sequence."""
    assert chunk_index(zigzag_chunks([8, 4], 2, 0)).tolist() == [0, 1, 6, 7, 8, 11]
    assert chunk_index(zigzag_chunks([8, 4], 2, 1)).tolist() == [2, 3, 4, 5, 9, 10]
    assert chunk_index(zigzag_chunks([12], 3, 1)).tolist() == [2, 3, 8, 9]
    with pytest.raises(ValueError, match="6 tokens does not split into 2\\*cp=4 chunks"):
        zigzag_chunks([6], 2, 0)


# ------------------------------------------------------------------------------------------------
# A pack's share per CP rank


@pytest.mark.parametrize("cp", [1, 2, 3, 4])
def test_contiguous_shards_cover_the_pack_in_order(cp):
    pack = _pack()
    shards = _shards(pack, "contiguous", cp)
    source = torch.cat([s.source for s in shards])
    assert source.tolist() == list(range(pack.budget))
    for s in shards:
        assert torch.equal(_row_index(s), pack.sample_index[s.source])
        assert torch.equal(s.positions, pack.positions[s.source])
        # Ulysses attends the whole pack after its all-to-all: the pack's own segments.
        assert torch.equal(s.packed_self.cu_seqlens_q, pack.cu_seqlens)
        assert s.packed_self.max_seqlen_q == pack.max_seqlen
        assert torch.equal(s.gather(pack.noisy), pack.noisy[s.source])


def test_contiguous_cross_attention_segments_per_rank():
    """Pack: samples of 12, 6, 1 tokens + 5 padding; captions of 3, 5, 2 tokens + the null token.
    cp=3 (8 tokens each): rank 0 holds sample 0's tokens 0-7; rank 1 sample 0's last 4 and sample
    1's first 4; rank 2 sample 1's last 2, sample 2 and the padding."""
    pack = _pack()
    assert pack.cu_seqlens.tolist() == [0, 12, 18, 19, 24]
    assert pack.cu_seqlens_text.tolist() == [0, 3, 8, 10, 11]
    shards = _shards(pack, "contiguous", 3)
    assert [s.packed_cross.cu_seqlens_q.tolist() for s in shards] == [[0, 8], [0, 4, 8], [0, 2, 3, 8]]
    assert [s.text_range for s in shards] == [(0, 3), (0, 8), (3, 11)]
    assert [s.packed_cross.cu_seqlens_kv.tolist() for s in shards] == [[0, 3], [0, 3, 8], [0, 5, 7, 8]]
    assert [s.packed_cross.max_seqlen_kv for s in shards] == [3, 5, 5]
    assert _row_index(shards[2]).tolist() == [1, 1, 2, 2, 2, 2, 2, 2]  # padding: the last sample's
    assert [s.rows.runs for s in shards] == [((0, 8),), ((0, 4), (1, 4)), ((1, 2), (2, 6))]
    assert [s.rows.blocks for s in shards] == [((0, 1, 8),), ((0, 2, 4),), ((1, 1, 2), (2, 1, 6))]


def test_zigzag_shard_pads_each_sample_to_2cp():
    """cp=2: samples of 12, 6, 1 tokens become segments of 12, 8, 4 (TE's cu_seqlens_padded), the
    rest of the 28-token layout is a padding segment; fillers carry source -1 and position 0."""
    pack = _pack(budget=28)
    assert zigzag_length(pack, 2) == 28
    shards = _shards(pack, "zigzag", 2)
    for s in shards:
        assert s.packed_self.cu_seqlens_q_padded.tolist() == [0, 12, 20, 24, 28]
        assert s.packed_self.cu_seqlens_q.tolist() == [0, 12, 18, 19, 23]  # actual lengths; padding 4
        assert s.packed_cross.cu_seqlens_q.tolist() == [0, 6, 10, 12, 14]  # every segment on every rank
        assert s.text_range == (0, 11)
    # Rank 0: chunks 0 and 3 of every segment (chunk = segment / 4).
    assert shards[0].source.tolist() == [0, 1, 2, 9, 10, 11, 12, 13, -1, -1, 18, -1, -1, -1]
    assert shards[1].source.tolist() == [3, 4, 5, 6, 7, 8, 14, 15, 16, 17, -1, -1, -1, -1]
    assert _row_index(shards[0]).tolist() == [0] * 6 + [1] * 4 + [2] * 4
    assert shards[0].packed_self.lengths_q == (12, 6, 1, 4)  # the host copy of cu_seqlens_q
    real = torch.cat([s.source for s in shards])
    assert sorted(real[real >= 0].tolist()) == list(range(19))
    for s in shards:
        keep = s.source >= 0
        assert torch.equal(s.positions[keep], pack.positions[s.source[keep]])
        assert not s.positions[~keep].any() and not s.gather(pack.noisy)[~keep].any()


def test_zigzag_without_cp_is_the_pack_itself(megatron_world):
    """TE attention at cp=1 asks for the zigzag layout; one rank needs no 2*cp padding, so its
    sequence is the pack in order and has the budget's length, the shape align_packs gives the
    pipeline (odd-sized samples once made it longer)."""
    pack = _pack(budget=25)  # samples of 12, 6 and 1 tokens: odd sizes, padded to 2 they would be 26
    zigzag, contiguous = shard_pack(pack, "zigzag", 1, 0), shard_pack(pack, "contiguous", 1, 0)
    assert zigzag.source.tolist() == list(range(25)) and align_packs([pack], "zigzag")[1] == 25
    assert zigzag.packed_self.cu_seqlens_q.tolist() == contiguous.packed_self.cu_seqlens_q.tolist()
    assert zigzag.packed_self.cu_seqlens_q_padded is None


def test_zigzag_length_grows_when_sample_padding_exceeds_the_pack_padding():
    pack = _pack(budget=20)  # 19 real tokens; padded to 12 + 8 + 4 = 24 > 20
    assert zigzag_length(pack, 2) == 24
    assert zigzag_length(pack, 3) == 12 + 6 + 6  # multiples of 6


def test_align_packs_gives_every_pack_the_longest_layout(monkeypatch):
    monkeypatch.setattr(context_parallel, "cp_world", lambda: (2, 0))
    packs = [_pack(budget=20), _pack(budget=20, seed=1)]
    packs[1] = build_pack([PackSample(torch.zeros(C, 1, 2, 2), torch.zeros(C, 1, 2, 2), 0.5,
                                      torch.zeros(L, TEXT_DIM), torch.ones(L, dtype=torch.bool))], 20, (1, 2, 2))
    aligned, length = align_packs(packs, "zigzag")
    assert length == 24 and [p.layout_length for p in aligned] == [24, 24]
    assert shard_pack(aligned[1], "zigzag", 2, 1).packed_self.cu_seqlens_q_padded.tolist() == [0, 4, 24]
    assert align_packs(packs, "contiguous") == (packs, 20)


# ------------------------------------------------------------------------------------------------
# Cross-attention and loss on a share equal the whole pack's


def _cross_reference(pack, q, context):
    """Cross-attention of the whole pack: every token against its own sample's caption."""
    packed = packed_segments(pack.segment_lengths, pack.text_segment_lengths)
    return SDPAAttention()(q, context, context, packed=packed)


@pytest.mark.parametrize("layout, cp, budget", [("contiguous", 2, 24), ("contiguous", 3, 24), ("contiguous", 4, 24),
                                                ("zigzag", 2, 28), ("zigzag", 3, 24)])
def test_cross_attention_on_a_share_equals_the_whole_pack(layout, cp, budget):
    """Each rank's queries, with the rank's cu_seqlens against its slice of the caption tokens,
    get exactly the outputs those tokens get in the whole pack: a query sees its own caption only.
    (Real tokens: what the padding's queries get is never read, and SDPA does not compute it.)"""
    pack = _pack(budget)
    g = torch.Generator().manual_seed(3)
    q = torch.randn(pack.budget, 1, 2, 4, generator=g)
    n_text = int(pack.text_mask.sum())
    context = torch.cat([torch.randn(n_text, 1, 2, 4, generator=g), torch.zeros(1, 1, 2, 4)])  # + null token
    whole = _cross_reference(pack, q, context)
    for s in _shards(pack, layout, cp):
        kv = context[s.text_range[0]:s.text_range[1]]
        local = SDPAAttention()(s.gather(q), kv, kv, packed=s.packed_cross)
        keep = (s.source >= 0) & pack.loss_mask[s.source.clamp_min(0)]
        assert_close_to_scale(local[keep], whole[s.source[keep]], ulps=16)  # softmax over another key count
    # A query attending another sample's caption would change: the reference is not trivial.
    other = SDPAAttention()(q[:12], context[3:8], context[3:8])
    assert not torch.allclose(other, whole[:12], atol=1e-3)


def _te_semantics_attention(q, k, v, cu_actual, cu_padded):
    """What TE's THD attention computes on the laid-out sequence: each segment's first `actual`
    tokens attend each other; fillers after them take no part (their output is not used)."""
    out = torch.zeros_like(q)
    for a, n, start in zip(cu_actual[:-1], cu_actual[1:], cu_padded[:-1]):
        span = slice(start, start + (n - a))
        out[span] = F.scaled_dot_product_attention(q[span].transpose(0, 1), k[span].transpose(0, 1),
                                                   v[span].transpose(0, 1)).transpose(0, 1)
    return out


@pytest.mark.parametrize("cp, budget", [(2, 28), (2, 20), (3, 24)])
def test_zigzag_self_attention_segments_match_the_pack(cp, budget):
    """The laid-out sequence (every rank's tokens put back at their layout positions) attended with
    TE's actual/padded cu_seqlens gives each real token its whole-pack self-attention output."""
    pack = _pack(budget)
    length = zigzag_length(pack, cp)
    pack = dataclasses.replace(pack, layout_length=length)
    g = torch.Generator().manual_seed(4)
    qkv = torch.randn(3, pack.budget, 2, 4, generator=g)
    shards = _shards(pack, "zigzag", cp)
    params = shards[0].packed_self
    padded = params.cu_seqlens_q_padded.diff().tolist()
    laid = torch.zeros(3, length, 2, 4)
    for rank, s in enumerate(shards):
        laid[:, chunk_index(zigzag_chunks(padded, cp, rank))] = s.gather(qkv.transpose(0, 1)).transpose(0, 1)
    got = _te_semantics_attention(*laid, params.cu_seqlens_q.tolist(), params.cu_seqlens_q_padded.tolist())
    whole = SDPAAttention()(*qkv[:, :, None], packed=packed_segments(pack.segment_lengths))[:, 0]
    for rank, s in enumerate(shards):
        index = chunk_index(zigzag_chunks(padded, cp, rank))
        keep = (s.source >= 0) & (s.source < pack.budget - pack.padding)
        assert_close_to_scale(got[index][keep], whole[s.source[keep]], ulps=16)


@pytest.mark.parametrize("weighting", ["token", "sample"])
@pytest.mark.parametrize("layout, cp, budget", [("contiguous", 2, 24), ("contiguous", 3, 24), ("zigzag", 2, 28)])
def test_shard_losses_add_up_to_the_pack_loss(layout, cp, budget, weighting):
    """Loss mask and weights are the whole pack's: padding and fillers add nothing, and the ranks'
    losses sum to the CP=1 loss, gradients included."""
    pack = _pack(budget)
    g = torch.Generator().manual_seed(5)
    pred = torch.randn(pack.budget, 1, pack.noisy.shape[1], generator=g, requires_grad=True)
    whole = flow_loss(pred, pack, weighting)
    (grad_whole,) = torch.autograd.grad(whole, pred)
    shards = _shards(pack, layout, cp)
    parts = [flow_loss(s.gather(pred), pack, weighting, tokens=s.source) for s in shards]
    (grad_parts,) = torch.autograd.grad(sum(parts), pred)
    # the same terms summed per rank, then over ranks
    assert_close_to_scale(sum(parts), whole, ulps=16)
    assert_close_to_scale(grad_parts, grad_whole, ulps=16)
    assert all(p > 0 for p in parts)
    pad = ~pack.loss_mask
    assert not grad_parts[pad].any()


# ------------------------------------------------------------------------------------------------
# Backend selection


def test_self_attention_layout_follows_the_backend():
    from goku_megatron.model.specs import cp_layout, local_layer_spec

    assert cp_layout(local_layer_spec("sdpa")) == "contiguous"
    assert cp_layout(local_layer_spec("te")) == "zigzag"


@pytest.mark.parametrize("cp, te, expected", [(2, True, "te"), (1, True, "sdpa"), (2, False, "sdpa")])
def test_auto_attention_takes_transformer_engine_for_context_parallel(monkeypatch, cp, te, expected):
    import goku_megatron.platform as platform
    from goku_megatron.config import load_config

    monkeypatch.setattr(platform, "has_transformer_engine", lambda: te)
    monkeypatch.setattr(platform, "has_flash_attn", lambda: False)
    assert platform.choose_backends(load_config(None, [f"parallel.cp={cp}"])).attention == expected


# ------------------------------------------------------------------------------------------------
# Ulysses all-to-all and attention (torchrun, CP=4): this file doubles as the worker

CP, S, HEADS, HEAD_DIM = 4, 16, 4, 8
CU_PACK = [0, 5, 12, 13, 16]  # segments crossing the 4-token shards


def _attention_inputs() -> dict[str, torch.Tensor]:
    """The same q/k/v/output-weights on every process (and in the test process)."""
    g = torch.Generator().manual_seed(7)
    return {name: torch.randn(S, 2 if name.endswith("_unpacked") else 1, HEADS, HEAD_DIM, generator=g)
            for name in ("q", "k", "v", "w", "q_unpacked", "k_unpacked", "v_unpacked", "w_unpacked")}


def _packed_params() -> PackedSegments:
    return packed_segments([b - a for a, b in zip(CU_PACK[:-1], CU_PACK[1:])])


def _worker(out_dir: Path) -> None:
    from megatron.core import parallel_state
    from megatron.core.transformer.transformer_config import TransformerConfig

    from goku_megatron import cpu_compat
    from goku_megatron.model.attention import UlyssesAttention
    from goku_megatron.model.context_parallel import heads_to_sequence, sequence_to_heads

    cpu_compat.apply()
    torch.distributed.init_process_group("gloo")
    parallel_state.initialize_model_parallel(context_parallel_size=CP)
    group = parallel_state.get_context_parallel_group()
    rank = parallel_state.get_context_parallel_rank()
    mine = chunk_index(contiguous_chunks(S, CP, rank))
    heads = slice(rank * HEADS // CP, (rank + 1) * HEADS // CP)
    data = _attention_inputs()
    result: dict = {}

    # All-to-all: [S/cp, heads] -> [S, heads/cp] -> back; its backward is the inverse all-to-all.
    local = data["q"][mine].clone().requires_grad_()
    spread = sequence_to_heads(local, group)
    result["spread"] = spread.detach()
    result["round_trip"] = heads_to_sequence(spread, group).detach()
    (spread * data["w"][:, :, heads]).sum().backward()
    result["spread_grad"] = local.grad

    config = TransformerConfig(num_layers=1, hidden_size=HEADS * HEAD_DIM, num_attention_heads=HEADS,
                               use_cpu_initialization=True, context_parallel_size=CP)
    attention = UlyssesAttention(config, SDPAAttention)
    for kind, packed in (("packed", _packed_params()), ("unpacked", None)):
        suffix = "" if packed is not None else "_unpacked"
        qkv = [data[n + suffix][mine].clone().requires_grad_() for n in "qkv"]
        out = attention(*qkv, packed=packed)
        (out * data["w" + suffix][mine]).sum().backward()
        result[kind] = (out.detach(), [t.grad for t in qkv])
    torch.save(result, out_dir / f"rank{rank}.pt")
    torch.distributed.destroy_process_group()


@pytest.fixture(scope="module")
def ulysses_ranks(tmp_path_factory) -> list[dict]:
    out = tmp_path_factory.mktemp("ulysses")
    run_torchrun(CP, [__file__, str(out)])
    return [torch.load(out / f"rank{r}.pt") for r in range(CP)]


@pytest.mark.slow
def test_all_to_all_moves_heads_and_round_trips(ulysses_ranks):
    data = _attention_inputs()
    for rank, got in enumerate(ulysses_ranks):
        heads = slice(rank * HEADS // CP, (rank + 1) * HEADS // CP)
        assert torch.equal(got["spread"], data["q"][:, :, heads])  # whole sequence, this rank's heads
        assert torch.equal(got["round_trip"], data["q"][chunk_index(contiguous_chunks(S, CP, rank))])
        # d/d(local) of sum(w[:, my heads] * spread) over all ranks is w at my tokens, all heads.
        assert torch.equal(got["spread_grad"], data["w"][chunk_index(contiguous_chunks(S, CP, rank))])


@pytest.mark.slow
@pytest.mark.parametrize("kind", ["packed", "unpacked"])
def test_ulysses_attention_equals_whole_sequence_attention(ulysses_ranks, kind):
    data = _attention_inputs()
    suffix = "" if kind == "packed" else "_unpacked"
    qkv = [data[n + suffix].clone().requires_grad_() for n in "qkv"]
    packed = _packed_params() if kind == "packed" else None
    whole = SDPAAttention()(*qkv, packed=packed)
    (whole * data["w" + suffix]).sum().backward()
    if kind == "packed":  # the segments matter: one sequence attention would differ
        assert not torch.allclose(SDPAAttention()(*qkv), whole, atol=1e-3)
    for rank, got in enumerate(ulysses_ranks):
        mine = chunk_index(contiguous_chunks(S, CP, rank))
        out, grads = got[kind]
        # the rank attends its heads over the whole sequence: the same sums, on other shapes
        assert_close_to_scale(out, whole.detach()[mine], ulps=16)
        for grad, ref in zip(grads, qkv):
            assert_close_to_scale(grad, ref.grad[mine], ulps=16)


if __name__ == "__main__":
    _worker(Path(sys.argv[1]))
