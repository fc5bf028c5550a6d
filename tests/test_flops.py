"""The FLOP formula against torch's own count of the model's matrix multiplies."""

from __future__ import annotations

import math

import pytest
import torch
from conftest import build_stage, one_process_world
from torch.nn.attention import SDPBackend, sdpa_kernel
from torch.utils.flop_counter import FlopCounterMode

from goku_megatron.config import load_config, validate
from goku_megatron.batch import PackSample, build_pack, pack_batch
from goku_megatron.flops import (forward_flops, gpu_peak_flops, layer_attention_core_flops, layer_forward_flops, mfu,
                                 pack_tokens, training_flops)


@pytest.fixture(scope="module")
def setup():
    one_process_world()
    cfg = load_config(None, ["model.zero_init=false", "model.in_channels=4", "model.patch_size=[1,2,2]"])
    validate(cfg, 1)
    return cfg, build_stage(cfg)


def _counted(fn) -> int:
    """torch's count; SDPA's math backend spells attention as matmuls so they are counted too."""
    with FlopCounterMode(display=False) as counter, torch.no_grad(), sdpa_kernel(SDPBackend.MATH):
        fn()
    return counter.get_total_flops()


def test_equal_clips_forward_matches_torch_count(setup, megatron_world):
    cfg, model = setup
    b, t, h, w, length = 2, 3, 8, 6, 5
    s = t * (h // 2) * (w // 2)
    pack = pack_batch(torch.randn(b, 4, t, h, w), torch.rand(b), torch.randn(b, length, cfg.model.text_dim),
                      torch.ones(b, length, dtype=torch.bool), cfg.model.patch_size)
    counted = _counted(lambda: model(pack))
    assert counted == forward_flops(cfg.model, [s] * b, [length] * b)


def test_packed_forward_matches_torch_count(setup, megatron_world):
    cfg, model = setup
    # Samples of equal size attend their captions in one batch, keys padded to the longest caption:
    # equal caption lengths there, so that no padded key adds FLOPs the formula does not count.
    shapes, lengths = [(3, 4, 4), (1, 6, 8), (2, 2, 2)], [3, 3, 1]
    samples = [PackSample(noisy=torch.randn(4, *shape), target=torch.zeros(4, *shape), timestep=0.5,
                          text=torch.randn(n, cfg.model.text_dim), text_mask=torch.ones(n, dtype=torch.bool))
               for shape, n in zip(shapes, lengths)]
    tokens = [t * (h // 2) * (w // 2) for t, h, w in shapes]
    pack = build_pack(samples, sum(tokens), (1, 2, 2))  # no padding segment: every token is real
    counted = _counted(lambda: model(pack))
    assert counted == forward_flops(cfg.model, tokens, lengths)
    # What the trainer counts for a step's FLOPs: each sample's tokens, read back from its packs.
    assert pack_tokens([pack]) == (tokens, lengths)
    padded = build_pack(samples, sum(tokens) + 10, (1, 2, 2))  # padding is not a sample's work
    assert pack_tokens([pack, padded]) == (tokens * 2, lengths * 2)


def test_hand_count_of_one_layer():
    cfg = load_config(None, ["model.num_layers=1", "model.hidden_size=8", "model.ffn_hidden_size=16",
                             "model.num_heads=2", "model.in_channels=1", "model.patch_size=[1,1,1]",
                             "model.text_dim=4", "model.timestep_freq_dim=2"])
    s, length, d, f = 10, 3, 8, 16
    layer = 8 * s * d * d + 4 * s * s * d + 4 * s * d * d + 4 * length * d * d + 4 * s * length * d \
        + 4 * s * d * f + 12 * d * d
    around = 2 * s * 1 * d * 2 + 4 * d * d + 2 * length * (4 * d + d * d) + 2 * (2 * d + d * d)
    assert layer_forward_flops(cfg.model, s, length) == layer
    assert forward_flops(cfg.model, [s], [length]) == layer + around
    assert training_flops(cfg.model, [s], [length]) == 3 * (layer + around)


def test_layer_flops_by_hand_at_goku_8b_720p():
    """One goku-8b layer on a 720p clip (9 x 45 x 80 = 32400 tokens) with a 128-token caption,
    counted matrix multiply by matrix multiply (2 FLOPs per multiply-add)."""
    m = load_config(None, ["model.preset=goku-8b"]).model
    s, length, d, f = 32400, 128, 3072, 12288
    qkvo = 4 * (2 * s * d * d)                       # self-attention projections
    scores_and_sum = 2 * (2 * s * s * d)             # QK^T and PV over all heads
    cross = 2 * (2 * s * d * d) + 2 * (2 * length * d * d) + 2 * (2 * s * length * d)
    mlp = 2 * s * d * f + 2 * s * f * d
    adaln = 2 * d * (6 * d)
    assert layer_forward_flops(m, s, length) == qkvo + scores_and_sum + cross + mlp + adaln
    # At 720p attention's S^2 term is most of a layer (~60%): MFU hinges on the attention kernel.
    assert 0.55 < scores_and_sum / layer_forward_flops(m, s, length) < 0.65
    assert forward_flops(m, [s], [length]) > m.num_layers * layer_forward_flops(m, s, length)


@pytest.mark.parametrize("lora", [False, True])
def test_a_training_step_matches_torch_count(lora, megatron_world):
    """Forward and backward: 3F, and with LoRA's frozen base 3F less the weight gradients (2F +
    attention's). torch counts a little less: autograd also skips the input gradients of linears
    whose inputs need none (patch embedding, embedders; with LoRA adaLN and cross-attention's K
    and V too). Rank 1 keeps the adapters' own FLOPs, left out of the formula, out of the way."""
    overrides = ["lora.rank=1", "lora.base=seed"] if lora else []
    cfg = load_config(None, ["model.zero_init=false", "model.in_channels=4", "model.patch_size=[1,2,2]", *overrides])
    validate(cfg, 1)
    model = build_stage(cfg)
    b, t, h, w, length = 2, 3, 8, 6, 5
    video, text = [t * (h // 2) * (w // 2)] * b, [length] * b
    pack = pack_batch(torch.randn(b, 4, t, h, w), torch.rand(b), torch.randn(b, length, cfg.model.text_dim),
                      torch.ones(b, length, dtype=torch.bool), cfg.model.patch_size)
    with FlopCounterMode(display=False) as counter, sdpa_kernel(SDPBackend.MATH):
        model(pack).sum().backward()
    formula = training_flops(cfg.model, video, text, frozen_base=lora)
    if lora:
        core = cfg.model.num_layers * sum(layer_attention_core_flops(cfg.model, s, n) for s, n in zip(video, text))
        assert formula == pytest.approx(2 * forward_flops(cfg.model, video, text) + core)
    assert 0.98 * formula < counter.get_total_flops() <= formula


def test_mfu():
    assert gpu_peak_flops("NVIDIA H100 80GB HBM3") == 989e12
    assert gpu_peak_flops("cpu") is None
    assert math.isclose(mfu(989e12 * 8 * 0.5, 1.0, 8, 989e12), 0.5)
    assert mfu(1e12, 1.0, 1, None) is None
