"""The megatron Goku layer equals the independent plain-PyTorch reference block (tests/reference_goku.py):
its fp32 output is as close to the reference block's float64 run as the reference's own fp32 run is.
Compiled (model.compile), it is one graph with the eager layer's numbers."""

from __future__ import annotations

import copy

import pytest
import torch
import torch.nn.functional as F
from conftest import backward_nodes, build_stage
from megatron.core.transformer.spec_utils import build_module
from megatron.core.transformer.transformer_config import TransformerConfig
from numerics import assert_as_accurate, assert_close_to_scale
from reference_goku import ReferenceGokuBlock, grid_positions

from goku_megatron.batch import PackSample, build_pack
from goku_megatron.config import load_config
from goku_megatron.flow import flow_loss
from goku_megatron.model.context_parallel import RowRuns, packed_segments
from goku_megatron.model.layer import LayerInputs
from goku_megatron.model.rope import rope_angles, rope_rotation
from goku_megatron.model.specs import local_layer_spec

D, HEADS, FFN = 64, 4, 160


def _pair(megatron_world, cross_attn_rope_q: bool = True):
    config = TransformerConfig(num_layers=1, hidden_size=D, num_attention_heads=HEADS, ffn_hidden_size=FFN,
                               use_cpu_initialization=True, perform_initialization=True,
                               layernorm_epsilon=1e-6)
    ours = build_module(local_layer_spec("sdpa"), config=config, cross_attn_rope_q=cross_attn_rope_q)
    ref = ReferenceGokuBlock(D, HEADS, FFN, context_dim=D, cross_attn_rope_q=cross_attn_rope_q).randomize_(3)
    missing, unexpected = ours.load_state_dict(ref.state_dict(), strict=False)
    assert not unexpected and all(k.endswith("_extra_state") for k in missing), (missing, unexpected)
    return ours, ref


def _float64(*tensors: torch.Tensor) -> list[torch.Tensor]:
    return [t.double() for t in tensors]


@pytest.mark.parametrize("cross_attn_rope_q", [True, False])
def test_layer_matches_reference(megatron_world, cross_attn_rope_q):
    ours, ref = _pair(megatron_world, cross_attn_rope_q)
    g = torch.Generator().manual_seed(0)
    b, (t, h, w), l = 2, (2, 3, 4), 5
    x = torch.randn(b, t * h * w, D, generator=g)
    temb = torch.randn(b, D, generator=g)
    context = torch.randn(b, l, D, generator=g)
    mask = torch.ones(b, l, dtype=torch.bool)
    mask[1, 3:] = False
    pos = grid_positions(t, h, w).unsqueeze(0).expand(b, -1, -1)

    expected = ref(x, temb, context, pos, context_mask=mask)
    exact = copy.deepcopy(ref).double()(*_float64(x, temb, context), pos, context_mask=mask)
    inputs = LayerInputs(context=context.transpose(0, 1), rope=rope_rotation(rope_angles(pos[0], D // HEADS).unsqueeze(1)),
                         context_mask=mask)
    got = ours(x.transpose(0, 1), inputs, F.silu(temb)).transpose(0, 1)
    assert_as_accurate(got, expected, exact)


def test_layer_packed_per_sample_timesteps_match_reference(megatron_world):
    """A pack of three samples of different sizes, timesteps and caption lengths."""
    ours, ref = _pair(megatron_world)
    g = torch.Generator().manual_seed(1)
    grids = [(1, 4, 4), (2, 2, 3), (3, 2, 2)]
    lens = [t * h * w for t, h, w in grids]
    ctx_lens = [3, 6, 2]
    x = torch.randn(1, sum(lens), D, generator=g)
    temb = torch.randn(len(lens), D, generator=g)
    context = torch.randn(1, sum(ctx_lens), D, generator=g)
    pos = torch.cat([grid_positions(*grid) for grid in grids]).unsqueeze(0)

    expected = ref.forward_packed(x, temb, lens, context, ctx_lens, pos)
    x64, temb64, context64 = _float64(x, temb, context)
    exact = copy.deepcopy(ref).double().forward_packed(x64, temb64, lens, context64, ctx_lens, pos)

    inputs = LayerInputs(context=context.transpose(0, 1), rope=rope_rotation(rope_angles(pos[0], D // HEADS).unsqueeze(1)),
                         rows=RowRuns(tuple(enumerate(lens))),
                         packed_self=packed_segments(lens), packed_cross=packed_segments(lens, ctx_lens))
    got = ours(x.transpose(0, 1), inputs, F.silu(temb)).transpose(0, 1)
    assert_as_accurate(got, expected, exact)
    # Each sample's modulation (norm1.linear's rows) broadcasts over its tokens: the backward holds
    # no scatter.
    assert not backward_nodes(got, "Index")
    # The per-sample modulation matters: one shared timestep gives a different result.
    shared = ours(x.transpose(0, 1), inputs, F.silu(temb[:1].expand(len(lens), -1))).transpose(0, 1)
    assert not torch.allclose(shared, expected, atol=1e-3)


def test_compiled_layers_are_whole_graphs_with_eager_numbers(megatron_world):
    """model.compile: every layer is torch.compile'd in place with fullgraph=True (a graph break
    raises), forward and backward, on a mixed pack (several samples, padding: the block and segment
    loops); parameter names, outputs and gradients are the eager model's. aot_eager traces the same
    graphs and their backward as inductor without generating kernels (inductor takes minutes on two
    CPU cores; benchmarks/throughput.py --compile times it)."""
    base = ["model.zero_init=false", "model.in_channels=4", "model.num_layers=2"]
    eager = build_stage(load_config(None, base))
    compiled = build_stage(load_config(None, [*base, "model.compile=true", "model.compile_backend=aot_eager"]))
    assert compiled.state_dict().keys() == eager.state_dict().keys()
    g = torch.Generator().manual_seed(2)
    samples = [PackSample(noisy=torch.randn(4, *shape, generator=g), target=torch.randn(4, *shape, generator=g),
                          timestep=0.3 * (i + 1), text=torch.randn(5, 32, generator=g), text_mask=torch.arange(5) < 2 + i)
               for i, shape in enumerate([(2, 4, 4), (1, 4, 4), (1, 2, 6)])]
    pack = build_pack(samples, 24, (1, 2, 2))  # 8 + 4 + 3 tokens and padding: three blocks of rows
    results = []
    for model in (eager, compiled):
        out = model(pack)
        flow_loss(out, pack).backward()
        results.append((out.detach(), {n: p.grad for n, p in model.named_parameters()}))
    (out_eager, grads_eager), (out_compiled, grads_compiled) = results
    assert all(layer._compiled_call_impl is not None for layer in compiled.layers)
    assert_close_to_scale(out_compiled, out_eager, ulps=16)  # the same ops, decomposed by AOTAutograd
    for name, grad in grads_eager.items():
        assert_close_to_scale(grads_compiled[name], grad, ulps=64, msg=name)
