"""goku-plan: its parameter count, its activation estimate against measured CPU peaks, its ranking,
its FSDP memory against what the ranks of a CPU FSDP run hold."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch
from conftest import build_stage, run_torchrun
from torch.distributed._tools.mem_tracker import MemTracker

from goku_megatron.config import (LORA_TARGETS, MODEL_PRESETS, ConfigError, LoraConfig, ModelConfig, load_config,
                                  validate)
from goku_megatron.batch import PackSample, build_pack, pack_batch
from goku_megatron.flops import forward_flops, weight_gradient_flops
from goku_megatron.model.goku import count_parameters, iter_stage_models
from goku_megatron.model.lora import TARGET_MODULES, adapter_params, base_features, is_adapter
from goku_megatron.cli.plan import main
from goku_megatron.planner import (GIB, Hardware, Layout, Workload, activation_elements, embedder_params, estimate,
                                   fsdp_comm_s, fsdp_memory, layer_params, lora_on, plan, planned_stage, recommend,
                                   resolve_layout, stage_adapter_params, stage_params, stage_workload, tokens_for,
                                   trainable_params)

GOKU_8B = ModelConfig(preset="goku-8b", **MODEL_PRESETS["goku-8b"])
ALL_TARGETS = f"lora.targets=[{','.join(LORA_TARGETS)}]"
LORA_64 = LoraConfig(rank=64)  # the default targets: the ten attention and MLP projections


@pytest.mark.parametrize("preset", sorted(MODEL_PRESETS))
@pytest.mark.parametrize("i2v", [False, True])
def test_parameter_count_matches_the_model(preset, i2v):
    model = ModelConfig(preset=preset, i2v=i2v, **MODEL_PRESETS[preset])
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
    """A pack of one clip saves somewhat less than the estimate, which is the mixed packs' figure
    (measured below): the estimate bounds it, within a quarter."""
    measured, model, tokens = _measured_activation_bytes(overrides, shape)
    estimated = model.num_layers * tokens * activation_elements(model, tp=1, recompute=False) * 4
    assert 0.75 * estimated < measured <= estimated  # fp32: 4 bytes per element


@pytest.mark.parametrize("hidden, ffn, shapes, budget", [
    (128, 512, [(3, 8, 8), (1, 16, 16), (4, 8, 12)], 256),
    (64, 128, [(5, 8, 8), (2, 12, 8)], 128),
    (192, 768, [(1, 8, 24), (1, 8, 20)], 100),  # and padding
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
    assert out[1].split()[:6] == ["tp", "cp", "pp", "dp", "fsdp", "recompute"]
    assert {line.split()[4] for line in out[2:5]} <= {"-", "all"} | {str(n) for n in range(2, 65)}
    assert main(["--preset", "goku-8b", "--gpus", "8", "--gpu-memory-gb", "1", "--tokens", "65536"]) == 1
    assert "none fits" in capsys.readouterr().out


def _fsdp(tp: int, cp: int, dp: int, shard: int, recompute: bool = False, reshard: bool = True) -> Layout:
    return Layout(tp, cp, 1, dp, recompute, distributed_optimizer=False, fsdp_shard=shard,
                  reshard_after_forward=reshard)


def test_fsdp_memory_divides_by_the_shard_group():
    split, replicated = layer_params(GOKU_8B)
    layer, root = split / 2 + replicated, embedder_params(GOKU_8B)
    full, hybrid = _fsdp(2, 4, 8, 32), _fsdp(2, 4, 8, 4)  # 64 GPUs: all 32 DP x CP ranks, or 8 replicas of 4
    assert (full.fsdp_replicas, full.fsdp_shard_size, hybrid.fsdp_replicas, hybrid.fsdp_shard_size) == (1, 0, 8, 4)
    sharded, gathered = fsdp_memory(GOKU_8B, full, "bf16")
    # bf16 weights and gradients (2 + 2 bytes), fp32 main weights and Adam moments (12), over 32 ranks
    assert sharded == pytest.approx(stage_params(GOKU_8B, 2, 1) * 16 / 32)
    assert gathered == pytest.approx(2 * (root + 4 * layer))
    hybrid_sharded, hybrid_gathered = fsdp_memory(GOKU_8B, hybrid, "bf16")
    assert hybrid_sharded == pytest.approx(8 * sharded) and hybrid_gathered == gathered  # replicas hold copies
    assert fsdp_memory(GOKU_8B, full, "fp32")[0] == pytest.approx(sharded)  # 4 + 4 + 8 bytes: the same 16
    kept = fsdp_memory(GOKU_8B, _fsdp(2, 4, 8, 32, reshard=False), "bf16")[1]
    assert kept == pytest.approx(2 * (root + (GOKU_8B.num_layers + 2) * layer))
    # FSDP holds less than megatron DDP with the distributed optimizer (fp32 grads, replicated weights)
    work, hw = Workload(tokens=32400), Hardware(gpus=64)
    ddp = estimate(GOKU_8B, work, hw, Layout(2, 4, 1, 8, False))
    assert estimate(GOKU_8B, work, hw, full).weights_bytes == pytest.approx(sharded + gathered)
    assert sharded + gathered < ddp.weights_bytes / 5
    assert estimate(GOKU_8B, work, hw, full).activation_bytes == ddp.activation_bytes


def test_fsdp_communication_per_micro_batch():
    hw = Hardware(gpus=64)
    weights = stage_params(GOKU_8B, 1, 1) * 2  # bf16 bytes of one GPU's (TP=1) parameters
    full = _fsdp(1, 1, 64, 64)
    # all-gather forward and backward, reduce-scatter: 3 x (N-1)/N of the weights' bytes over the network
    assert fsdp_comm_s(GOKU_8B, hw, full) == pytest.approx(3 * weights * 63 / 64 / hw.network_bytes_per_s)
    assert fsdp_comm_s(GOKU_8B, hw, _fsdp(1, 1, 64, 64, reshard=False)) == pytest.approx(
        2 * weights * 63 / 64 / hw.network_bytes_per_s)
    # hybrid: the shard group is one node (NVLink), plus the all-reduce of 1/8 of the bytes over 8 replicas
    hybrid = fsdp_comm_s(GOKU_8B, hw, _fsdp(1, 1, 64, 8))
    assert hybrid == pytest.approx(3 * weights * 7 / 8 / hw.nvlink_bytes_per_s
                                   + 2 * 7 / 8 * weights / 8 / hw.network_bytes_per_s)
    assert hybrid < fsdp_comm_s(GOKU_8B, hw, full) / 5
    # one node of 8 GPUs: NVLink only
    assert fsdp_comm_s(GOKU_8B, Hardware(gpus=8), _fsdp(1, 1, 8, 8)) == pytest.approx(
        3 * weights * 7 / 8 / hw.nvlink_bytes_per_s)


def test_fsdp_step_time_hides_its_communication_behind_compute():
    """A micro-batch costs max(compute, FSDP communication): long packs hide it, short ones do not."""
    hw = Hardware(gpus=64)
    for tokens, hidden in ((65536, True), (256, False)):
        work = Workload(tokens=tokens, global_packs=64)
        ddp = estimate(GOKU_8B, work, hw, Layout(1, 1, 1, 64, True))
        fsdp = estimate(GOKU_8B, work, hw, _fsdp(1, 1, 64, 64, recompute=True))
        if hidden:
            assert fsdp.step_time_s == pytest.approx(ddp.step_time_s)
        else:
            assert fsdp.step_time_s == pytest.approx(fsdp_comm_s(GOKU_8B, hw, fsdp.layout))
            assert fsdp.step_time_s > ddp.step_time_s


def test_ranking_picks_fsdp_where_only_fsdp_fits():
    """goku-8b with 65536-token packs: on one node of 40 GiB GPUs nothing fits without FSDP (at TP=1
    nor at any other TP); with FSDP a TP=1 layout fits and is recommended. On 64 x 80 GiB, TP=1 CP=16
    fits without pipeline stages only with FSDP, which beats megatron DDP's two stages (the bubble)."""
    work = Workload(tokens=65536, global_packs=256)
    one_node = Hardware(gpus=8, memory_bytes=40 * GIB)
    assert not any(fits for _, fits in plan(GOKU_8B, work, one_node, fsdp=False))
    best, fits = plan(GOKU_8B, work, one_node)[0]
    assert fits and best.layout.tp == 1 and best.layout.fsdp_shard == 8 and not best.layout.distributed_optimizer
    assert all(est.layout.fsdp_shard for est, fits in plan(GOKU_8B, work, one_node) if fits)

    hw = Hardware(gpus=64)
    ddp = estimate(GOKU_8B, work, hw, Layout(1, 16, 1, 4, False))
    assert ddp.memory_bytes > 0.9 * hw.memory_bytes  # PP=1 without FSDP does not fit
    ranked = plan(GOKU_8B, work, hw)
    best = ranked[0][0]
    assert ranked[0][1] and (best.layout.tp, best.layout.cp, best.layout.pp, best.layout.fsdp_shard) == (1, 16, 1, 8)
    best_ddp = next(est for est, fits in ranked if fits and not est.layout.fsdp_shard)
    assert best_ddp.layout.pp > 1 and best.step_time_s < best_ddp.step_time_s
    # candidates: FSDP only at PP=1; hybrid (one node's GPUs / TP) only where DP x CP leaves the node
    for est, _ in ranked:
        lay = est.layout
        if lay.fsdp_shard:
            assert lay.pp == 1 and lay.fsdp_shard in (lay.dp * lay.cp, 8 // lay.tp)
            assert (lay.dp * lay.cp) % lay.fsdp_shard == 0


def test_resolve_layout_writes_fsdp():
    cfg = load_config("goku-8b")
    layout = recommend(cfg, 64)
    assert layout.fsdp_shard and layout.fsdp_replicas > 1  # hybrid: docs/recipes.md
    resolve_layout(cfg, 64)
    assert (cfg.parallel.fsdp, cfg.parallel.fsdp_shard_size, cfg.optim.distributed_optimizer) == \
        (True, layout.fsdp_shard, False)
    validate(cfg, 64, has_cuda=True)
    # a layout without FSDP leaves the FSDP and optimizer fields as they were
    cfg = load_config("goku-2b-t2i")
    assert not recommend(cfg, 1024).fsdp_shard
    resolve_layout(cfg, 1024)
    assert (cfg.parallel.fsdp, cfg.parallel.fsdp_shard_size, cfg.optim.distributed_optimizer) == (False, 0, True)
    # the distributed optimizer's own overlap rules FSDP out; FSDP given by hand is the planner's to choose
    cfg = load_config("goku-8b", ["optim.overlap_grad_reduce=true"])
    resolve_layout(cfg, 256)
    assert not cfg.parallel.fsdp and cfg.optim.distributed_optimizer
    validate(cfg, 256, has_cuda=True)
    with pytest.raises(ConfigError, match=r"parallel.auto decides FSDP itself \(given fsdp=true"):
        resolve_layout(load_config("goku-8b", ["parallel.fsdp=true"]), 256)


@pytest.mark.slow
@pytest.mark.parametrize("nproc, overrides, layout", [
    (2, ["train.global_batch_size=4"], Layout(1, 1, 1, 2, False, False, fsdp_shard=2)),
    (4, ["train.global_batch_size=8", "parallel.fsdp_shard_size=2"], Layout(1, 1, 1, 4, False, False, fsdp_shard=2)),
    (2, ["train.global_batch_size=4", "lora.rank=4", "lora.base=seed", ALL_TARGETS],
     Layout(1, 1, 1, 2, False, False, fsdp_shard=2)),
], ids=["fsdp-over-2", "hybrid-2x2", "lora-fsdp-over-2"])
def test_fsdp_memory_matches_what_the_ranks_hold(tmp_path, nproc, overrides, layout):
    """Every rank of a CPU FSDP run (fp32) holds P_gpu x (4 + 4 + 8) / N bytes of weight, gradient
    and Adam shards, whatever the replicas; FSDP2's peak of unsharded weights, gradients and their
    buffers is the gathered estimate, the root and four layers' worth of a six-layer model. With
    LoRA the frozen base's shards cost 4 bytes a parameter, and the gradients are the adapters'."""
    run_torchrun(nproc, ["tests/fsdp_memory_worker.py", str(tmp_path), "model.num_layers=6", *overrides])
    cfg = load_config(None, ["model.preset=tiny", "model.in_channels=3", "model.num_layers=6", *overrides])
    model = cfg.model
    sharded, gathered = fsdp_memory(model, layout, "fp32", lora_on(cfg.lora))
    assert gathered < 0.75 * count_parameters(model) * 4  # not the whole model at once
    for rank in range(nproc):
        held = json.loads(Path(tmp_path, f"rank{rank}.json").read_text())
        assert held["dtensors"]
        assert held["params"] + held["grads"] + held["optimizer"] == pytest.approx(sharded, rel=0.02), rank
        assert held["gathered"] == pytest.approx(gathered, rel=0.02), rank


# ----------------------------------------------------------------------------------------------
# LoRA: frozen base weights cost their bytes only; the adapters (and image_cond) train


@pytest.mark.parametrize("overrides", [
    ["lora.rank=4"],
    ["lora.rank=3", ALL_TARGETS, "model.i2v=true", "data.image_ratio=0"],
    ["lora.rank=8", "lora.targets=[self_attn.o,mlp.fc1,final]", "model.num_layers=3"],
], ids=["default-targets", "all-targets-i2v", "some-targets"])
def test_adapter_count_is_the_lora_models(megatron_world, overrides):
    """The planner's adapters and trained parameters at TP=1 are those of the model goku-train
    builds; the base shapes it counts from are the built linears'."""
    cfg = load_config(None, ["model.preset=tiny", "model.in_channels=3", "lora.base=seed", *overrides])
    validate(cfg, 1)
    stage = next(iter_stage_models([build_stage(cfg)]))
    params = dict(stage.named_parameters())
    assert stage_adapter_params(cfg.model, 1, 1, cfg.lora) == sum(p.numel() for n, p in params.items()
                                                                  if is_adapter(n))
    assert trainable_params(cfg.model, 1, 1, cfg.lora) == sum(p.numel() for p in params.values() if p.requires_grad)
    assert stage_params(cfg.model, 1, 1) == sum(p.numel() for n, p in params.items() if not is_adapter(n))
    modules = dict(stage.named_modules())
    for pattern, (n_in, n_out) in base_features(cfg.model).items():
        name = pattern.replace("*", "0")
        assert tuple(modules[name].weight.shape) == (n_out, n_in), pattern
    assert {pattern for patterns in TARGET_MODULES.values() for pattern, _ in patterns} == set(base_features(cfg.model))


def test_adapters_per_tp_rank():
    """At TP=2 each rank holds a column-parallel base's adapter as A [r, in] + B [out/2, r], a
    row-parallel one's as A [r, in/2] + B [out, r], the final layer's whole (model/lora.py)."""
    model = ModelConfig(preset="tiny", **MODEL_PRESETS["tiny"])
    d, f, r = model.hidden_size, model.ffn_hidden_size, 8
    patch = model.in_channels * model.patch_volume
    lora = LoraConfig(rank=r, targets=["self_attn.q", "cross_attn.o", "mlp.fc1", "mlp.fc2", "adaln", "final"])
    per_layer = r * ((d + d // 2) + (d // 2 + d) + (d + f // 2) + (f // 2 + d) + (d + 6 * d // 2))
    final = r * ((d + 2 * d) + (d + patch))
    assert adapter_params(model, lora, 2) == (per_layer, final)
    assert stage_adapter_params(model, 2, 2, lora) == per_layer * model.num_layers / 2 + final
    whole = adapter_params(model, lora, 1)
    assert whole[0] == r * ((d + d) * 2 + (d + f) * 2 + (d + 6 * d)) and whole[1] == final


def test_lora_memory_counts_frozen_weights_at_their_bytes():
    """Megatron DDP: frozen weights cost w bytes (no fp32 gradient, Adam moments or main copy); the
    adapters cost what trained weights do. Activations stay the full finetune's upper bound."""
    work, hw = Workload(tokens=65536, samples_per_pack=2), Hardware(gpus=64)
    layout = Layout(1, 8, 1, 8, True)
    full, lora = estimate(GOKU_8B, work, hw, layout), estimate(GOKU_8B, work, hw, layout, LORA_64)
    base, adapters = stage_params(GOKU_8B, 1, 1), stage_adapter_params(GOKU_8B, 1, 1, LORA_64)
    assert adapters == GOKU_8B.num_layers * 64 * (8 * 2 * 3072 + 2 * (3072 + 12288))
    trained = 4 + 12 / 64  # fp32 gradient + (fp32 main, 2 moments) / DP x CP, bytes per parameter
    assert full.weights_bytes == pytest.approx(base * (2 + trained))
    assert lora.weights_bytes == pytest.approx((base + adapters) * 2 + adapters * trained)
    assert full.weights_bytes - lora.weights_bytes == pytest.approx((base - adapters) * trained - adapters * 2)
    assert lora.weights_bytes < full.weights_bytes / 2
    assert lora.activation_bytes == full.activation_bytes
    assert estimate(GOKU_8B, work, hw, layout, LoraConfig(rank=0)) == full  # rank 0: no LoRA
    # model.i2v's image_cond trains in full beside the adapters
    i2v = ModelConfig(preset="goku-8b", i2v=True, in_channels=16, patch_size=[1, 2, 2], **MODEL_PRESETS["goku-8b"])
    assert trainable_params(i2v, 1, 1, LORA_64) == adapters + 2 * 64 * 64 + 64


def test_lora_step_skips_the_frozen_weight_gradients():
    """A LoRA step costs 2F + attention's weightless FLOPs instead of 3F (+F with recompute): with
    no communication to add (one GPU), the step times are in that ratio."""
    work, hw = Workload(tokens=65536, samples_per_pack=2), Hardware(gpus=1)
    video, text = [32768, 32768], [256, 256]
    forward, weight_grads = forward_flops(GOKU_8B, video, text), weight_gradient_flops(GOKU_8B, video, text)
    for recompute, full_flops in ((False, 3 * forward), (True, 4 * forward)):
        layout = Layout(1, 1, 1, 1, recompute)
        full, lora = estimate(GOKU_8B, work, hw, layout), estimate(GOKU_8B, work, hw, layout, LORA_64)
        assert lora.step_time_s / full.step_time_s == pytest.approx((full_flops - weight_grads) / full_flops)
    assert 0.8 < (3 * forward - weight_grads) / (3 * forward) < 0.9  # attention is most of a 720p layer


def test_fsdp_lora_memory_and_communication():
    """FSDP shards frozen weights too (w / N) and gathers them for compute; gradients, their
    buffers and optimizer state are the adapters' only, and only they are reduce-scattered."""
    layout, hw = _fsdp(1, 1, 64, 64), Hardware(gpus=64)
    base, adapters = stage_params(GOKU_8B, 1, 1), stage_adapter_params(GOKU_8B, 1, 1, LORA_64)
    sharded, gathered = fsdp_memory(GOKU_8B, layout, "bf16", LORA_64)
    assert sharded == pytest.approx(((base + adapters) * 2 + adapters * (2 + 12)) / 64)
    split, replicated = layer_params(GOKU_8B)
    layer_adapters = adapters / GOKU_8B.num_layers
    assert gathered == pytest.approx(2 * (embedder_params(GOKU_8B) + 2 * (split + replicated + layer_adapters)
                                          + 2 * layer_adapters))
    assert gathered < fsdp_memory(GOKU_8B, layout, "bf16")[1]  # two layers of gradients fewer
    weights = (base + adapters) * 2
    assert fsdp_comm_s(GOKU_8B, hw, layout, LORA_64) == pytest.approx(
        (2 * weights + adapters * 2) * 63 / 64 / hw.network_bytes_per_s)
    assert fsdp_comm_s(GOKU_8B, hw, layout, LORA_64) < 0.7 * fsdp_comm_s(GOKU_8B, hw, layout)  # 2 of 3 collectives
    hybrid = _fsdp(1, 1, 64, 8)  # replicas all-reduce the adapters' gradient shards only
    assert fsdp_comm_s(GOKU_8B, hw, hybrid, LORA_64) == pytest.approx(
        (2 * weights + adapters * 2) * 7 / 8 / hw.nvlink_bytes_per_s
        + 2 * 7 / 8 * adapters * 2 / 8 / hw.network_bytes_per_s)


def test_recommend_plans_the_recipes_lora():
    """parallel.auto plans a recipe's LoRA finetune: goku-8b-lora-t2v gets another layout than the
    full finetune it shares its packs with (goku-8b-ft-t2v)."""
    lora, full = load_config("goku-8b-lora-t2v"), load_config("goku-8b-ft-t2v")
    work, hw = stage_workload(lora, planned_stage(lora)), Hardware(gpus=64)
    assert work == stage_workload(full, planned_stage(full))
    assert recommend(lora, 64) == plan(lora.model, work, hw, lora=lora.lora)[0][0].layout
    assert recommend(full, 64) == plan(full.model, work, hw)[0][0].layout != recommend(lora, 64)


def _saved_activation_bytes(overrides: list[str]) -> tuple[int, float]:
    """(bytes of the tensors a forward saves for backward, parameters aside; the full finetune's
    estimate) for one 256-token clip. MemTracker cannot measure a LoRA model (it hooks every
    parameter's gradient, and frozen ones have none), so this counts the saved tensors' storages."""
    cfg = load_config(None, ["model.in_channels=4", "model.patch_size=[1,2,2]", "model.zero_init=false",
                             "model.hidden_size=128", "model.ffn_hidden_size=512", "model.num_layers=2", *overrides])
    model = build_stage(cfg)
    pack = pack_batch(torch.randn(1, 4, 4, 16, 16), torch.rand(1), torch.randn(1, 16, cfg.model.text_dim),
                      torch.ones(1, 16, dtype=torch.bool), cfg.model.patch_size)
    params = {p.untyped_storage().data_ptr() for p in model.parameters()}
    saved: dict[int, int] = {}

    def keep(tensor: torch.Tensor) -> torch.Tensor:
        storage = tensor.untyped_storage()
        if storage.data_ptr() not in params:
            saved[storage.data_ptr()] = storage.nbytes()
        return tensor

    with torch.autograd.graph.saved_tensors_hooks(keep, lambda tensor: tensor):
        model(pack).sum().backward()
    return sum(saved.values()), cfg.model.num_layers * 256 * activation_elements(cfg.model, 1, False) * 4


def test_lora_saves_less_than_the_full_finetunes_activation_estimate(megatron_world):
    """The planner keeps the full finetune's activations for LoRA: an upper bound, since a frozen
    linear saves nothing for a weight gradient and an adapter's A saves the input its base would."""
    full, estimate_bytes = _saved_activation_bytes([])
    lora, _ = _saved_activation_bytes(["lora.rank=16", "lora.base=seed"])
    every, _ = _saved_activation_bytes(["lora.rank=16", "lora.base=seed", ALL_TARGETS])
    tracked, _, _ = _measured_activation_bytes(["model.hidden_size=128", "model.ffn_hidden_size=512",
                                                "model.num_layers=2"], (4, 16, 16))
    assert full == pytest.approx(tracked, rel=0.01)  # the two measures agree on the full finetune
    assert lora < every < full <= estimate_bytes


def test_cli_lora(capsys):
    args = ["--preset", "goku-8b", "--gpus", "64", "--tokens", "65536", "--samples-per-pack", "2", "--top", "3"]
    assert main(args) == 0
    full = capsys.readouterr().out.splitlines()
    assert main([*args, "--lora-rank", "64"]) == 0
    out = capsys.readouterr().out.splitlines()
    trained = trainable_params(GOKU_8B, 1, 1, LORA_64)
    assert out[1] == f"# LoRA rank 64 on {','.join(LORA_64.targets)}: {trained:,.0f} trained parameters (TP=1), " \
                     f"the base frozen"
    assert out[2] == full[1] and len(out) == len(full) + 1
    lora_rows = [line.split() for line in out[3:6]]
    best = plan(GOKU_8B, Workload(tokens=65536, samples_per_pack=2), Hardware(gpus=64), lora=LORA_64)[0][0]
    assert float(lora_rows[0][-2]) == pytest.approx(best.step_time_s, abs=0.005)
    assert float(lora_rows[0][-2]) < float(full[2].split()[-2])  # faster than the full finetune's best
    assert main([*args, "--lora-rank", "8", "--lora-targets", "mlp.fc1", "final"]) == 0
    assert "# LoRA rank 8 on mlp.fc1,final: " in capsys.readouterr().out
    assert main(["--config", "goku-8b", "--gpus", "64", "--lora-rank", "8"]) == 2
    assert "with --config the recipe's lora section is planned" in capsys.readouterr().err
    assert main([*args, "--lora-targets", "mlp.fc1"]) == 2
    assert "--lora-targets needs --lora-rank" in capsys.readouterr().err
