"""goku-plan: its parameter count, its activation estimate against measured CPU peaks, its ranking."""

from __future__ import annotations

import pytest
import torch
from conftest import build_stage
from torch.distributed._tools.mem_tracker import MemTracker

from goku_megatron.config import MODEL_PRESETS, ModelConfig, load_config
from goku_megatron.batch import PackSample, build_pack, pack_batch
from goku_megatron.model.goku import count_parameters
from goku_megatron.cli.plan import main
from goku_megatron.planner import (Hardware, Layout, Workload, activation_elements, embedder_params, estimate,
                                   layer_params, plan, tokens_for)


@pytest.mark.parametrize("preset", sorted(MODEL_PRESETS))
def test_parameter_count_matches_the_model(preset):
    model = ModelConfig(preset=preset, **MODEL_PRESETS[preset])
    split, replicated = layer_params(model)
    assert (split + replicated) * model.num_layers + embedder_params(model) == count_parameters(model)


def _measured_activation_bytes(overrides: list[str], shape: tuple[int, int, int]) -> tuple[float, ModelConfig, int]:
    cfg = load_config(None, ["model.in_channels=4", "model.patch_size=[1,2,2]", "model.zero_init=false", *overrides])
    model = build_stage(cfg)
    t, h, w = shape
    pack = pack_batch(torch.randn(1, 4, t, h, w), torch.rand(1), torch.randn(1, 16, cfg.model.text_dim),
                      torch.ones(1, 16, dtype=torch.bool), cfg.model.patch_size)
    tracker = MemTracker()
    tracker.track_external(model)
    with tracker:
        out = model(pack)
        snap = tracker.get_tracker_snapshot("current")[torch.device("cpu")]
        measured = sum(v for k, v in snap.items() if "ACT" in str(k) or "TEMP" in str(k))
        out.sum().backward()
    return measured, cfg.model, t * (h // 2) * (w // 2)


@pytest.mark.parametrize("overrides, shape", [
    (["model.hidden_size=64", "model.ffn_hidden_size=256", "model.num_layers=2"], (4, 16, 16)),
    (["model.hidden_size=128", "model.ffn_hidden_size=1024", "model.num_layers=3"], (2, 16, 24)),
    (["model.hidden_size=96", "model.ffn_hidden_size=192", "model.num_layers=2", "model.num_heads=3"], (5, 8, 16)),
])
def test_activation_estimate_bounds_a_one_clip_pack(megatron_world, overrides, shape):
    """A pack of one clip (or of equal clips) broadcasts its modulation instead of gathering it per
    token (LayerInputs.segment_length), so it saves less than the estimate, which is the mixed
    packs' figure (measured below): the estimate bounds it, within a quarter."""
    measured, model, tokens = _measured_activation_bytes(overrides, shape)
    estimated = model.num_layers * tokens * activation_elements(model, tp=1, recompute=False) * 4
    assert 0.75 * estimated < measured <= estimated  # fp32: 4 bytes per element


@pytest.mark.parametrize("hidden, ffn, shapes, budget", [
    (128, 512, [(3, 8, 8), (1, 16, 16), (4, 8, 12)], 256),
    (64, 128, [(5, 8, 8), (2, 12, 8)], 128),
    (192, 768, [(1, 16, 24)], 100),  # padding: the per-token gather path
])
def test_packed_activation_estimate_matches_measured_peak(megatron_world, hidden, ffn, shapes, budget):
    cfg = load_config(None, ["model.in_channels=4", "model.patch_size=[1,2,2]", "model.zero_init=false",
                             f"model.hidden_size={hidden}", f"model.ffn_hidden_size={ffn}", "model.num_layers=2"])
    model = build_stage(cfg)
    samples = [PackSample(noisy=torch.randn(4, *s), target=torch.zeros(4, *s), timestep=0.3,
                          text=torch.randn(8, cfg.model.text_dim), text_mask=torch.ones(8, dtype=torch.bool))
               for s in shapes]
    pack = build_pack(samples, budget, (1, 2, 2))
    tracker = MemTracker()
    tracker.track_external(model)
    with tracker:
        out = model(pack)
        snap = tracker.get_tracker_snapshot("current")[torch.device("cpu")]
        measured = sum(v for k, v in snap.items() if "ACT" in str(k) or "TEMP" in str(k))
        out.sum().backward()
    estimated = cfg.model.num_layers * pack.budget * activation_elements(cfg.model, tp=1, recompute=False) * 4
    assert estimated == pytest.approx(measured, rel=0.05)


def test_recompute_estimate_matches_measured_peak(megatron_world):
    measured, model, tokens = _measured_activation_bytes(
        ["model.hidden_size=128", "model.ffn_hidden_size=512", "model.num_layers=4", "model.recompute=true"],
        (4, 16, 16))
    estimated = model.num_layers * tokens * activation_elements(model, tp=1, recompute=True) * 4
    assert estimated == pytest.approx(measured, rel=0.1)


def test_tokens_for_720p():
    model = ModelConfig(preset="goku-8b", **MODEL_PRESETS["goku-8b"])
    assert tokens_for(model, 33, 720, 1280) == 9 * 45 * 80
    assert tokens_for(model, 241, 720, 1280) == 219_600  # docs/model.md, "Latents and patches": 10 s of 720p


def test_ranking_and_recommendation():
    model = ModelConfig(preset="goku-8b", **MODEL_PRESETS["goku-8b"])
    work = Workload(tokens=32400, global_packs=256)
    ranked = plan(model, work, Hardware(gpus=256))
    fitting = [e for e, fits in ranked if fits]
    assert fitting and ranked[0][1]
    assert [e.step_time_s for e in fitting] == sorted(e.step_time_s for e in fitting)
    for est, _ in ranked:
        lay = est.layout
        assert lay.tp * lay.cp * lay.pp * lay.dp == 256 and model.num_heads % lay.tp == 0
    # more GPUs for the same work: the step gets faster
    faster = plan(model, work, Hardware(gpus=1024))
    assert faster[0][0].step_time_s < ranked[0][0].step_time_s
    # memory grows with tokens and shrinks with recompute, TP, CP
    base = estimate(model, work, Hardware(gpus=256), Layout(1, 1, 1, 256, False))
    assert estimate(model, Workload(tokens=64800), Hardware(gpus=256), Layout(1, 1, 1, 256, False)).activation_bytes \
        == pytest.approx(2 * base.activation_bytes)
    for lay in (Layout(1, 1, 1, 256, True), Layout(2, 1, 1, 128, False), Layout(1, 2, 1, 128, False)):
        assert estimate(model, work, Hardware(gpus=256), lay).activation_bytes < base.activation_bytes


def test_cli(capsys):
    assert main(["--preset", "goku-2b", "--gpus", "64", "--tokens", "16384", "--top", "3"]) == 0
    out = capsys.readouterr().out.splitlines()
    assert out[-1].startswith("recommendation: parallel.tp=") and len(out) == 6
    assert main(["--preset", "goku-8b", "--gpus", "8", "--gpu-memory-gb", "1", "--tokens", "65536"]) == 1
    assert "none fits" in capsys.readouterr().out
