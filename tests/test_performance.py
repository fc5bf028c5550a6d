"""Performance features that run without CUDA: activation recompute (full and selective) leaves the
loss and gradients unchanged; FP8 settings reach megatron (TransformerConfig, DDP, the per-layer FP8
context) and are refused where they cannot run; benchmarks/throughput.py prints its table and its
plain PyTorch block is the Goku layer. FP8 numerics, TE's checkpoint and every timing need a GPU
(docs/performance.md)."""

from __future__ import annotations

import contextlib
import math
import os
import subprocess
import sys

import pytest
import torch
import torch.nn.functional as F
from conftest import REPO, build_stage, script_module
from numerics import assert_as_accurate, assert_close_to_scale
from reference_goku import ReferenceGokuBlock

from goku_megatron.config import FP8_RECIPES, Config, ConfigError, fp8_align_size, load_config, validate
from goku_megatron.batch import PackSample, build_pack, pack_batch
from goku_megatron.platform import check_fp8_recipe, choose_backends

BENCHMARK = REPO / "benchmarks" / "throughput.py"


# --------------------------------------------------------------------------------------------
# Activation recompute


def _batches(cfg):
    """A pack of two equal clips (the toy's fast paths) and a pack of three samples (with a
    padding segment)."""
    gen = torch.Generator().manual_seed(5)
    c, text_dim = cfg.model.in_channels, cfg.model.text_dim
    equal = pack_batch(torch.randn(2, c, 2, 4, 6, generator=gen), torch.rand(2, generator=gen),
                       torch.randn(2, 5, text_dim, generator=gen), torch.ones(2, 5, dtype=torch.bool),
                       cfg.model.patch_size)
    samples = [PackSample(noisy=torch.randn(c, *shape, generator=gen), target=torch.zeros(c, *shape),
                          timestep=0.3 * (i + 1), text=torch.randn(n, text_dim, generator=gen),
                          text_mask=torch.ones(n, dtype=torch.bool))
               for i, (shape, n) in enumerate([((2, 4, 4), 3), ((1, 6, 4), 6), ((1, 2, 2), 2)])]
    return equal, build_pack(samples, 24, (1, 2, 2))


def _loss_and_grads(stage, batch) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
    stage.zero_grad(set_to_none=True)
    out = stage(batch)
    loss = out.pow(2).mean()
    loss.backward()
    return loss.detach(), {n: p.grad.clone() for n, p in stage.named_parameters()}


def _count_calls(stage) -> dict[str, int]:
    """Forward calls of each layer's attention cores and MLPs (a recomputation calls them again)."""
    calls = {"core": 0, "mlp": 0}
    for layer in stage.layers:
        for name, module in (("core", layer.attn1.core), ("core", layer.attn2.core), ("mlp", layer.mlp)):
            module.register_forward_hook(lambda *_, key=name: calls.__setitem__(key, calls[key] + 1))
    return calls


@pytest.mark.parametrize("mixed", [False, True], ids=["equal_clips", "mixed"])
@pytest.mark.parametrize("granularity", ["full", "selective"])
def test_recompute_matches_no_recompute(megatron_world, granularity, mixed):
    base = ["model.zero_init=false", "model.in_channels=4"]
    cfg = load_config(None, base)
    recompute_cfg = load_config(None, [*base, "model.recompute=true", f"model.recompute_granularity={granularity}"])
    validate(cfg, 1)
    validate(recompute_cfg, 1)
    batch = _batches(cfg)[mixed]
    plain, recomputed = build_stage(cfg), build_stage(recompute_cfg)
    assert recomputed.config.recompute_granularity == granularity
    calls = _count_calls(recomputed)
    loss, grads = _loss_and_grads(plain, batch)
    loss_r, grads_r = _loss_and_grads(recomputed, batch)
    torch.testing.assert_close(loss_r, loss, rtol=0, atol=0)
    assert grads_r.keys() == grads.keys()
    for name, grad in grads.items():
        # the same kernels on the same shapes; a shared parameter's gradient contributions may be
        # summed in another order when layers run again in the backward pass
        assert_close_to_scale(grads_r[name], grad, ulps=16, msg=name)
    layers = len(recomputed.layers)
    # Each attention core ran again in the backward pass; the MLPs only under full recompute.
    assert calls == {"core": 2 * 2 * layers, "mlp": (2 if granularity == "full" else 1) * layers}


def test_no_recompute_in_eval(megatron_world):
    cfg = load_config(None, ["model.in_channels=4", "model.recompute=true", "model.recompute_granularity=selective"])
    stage = build_stage(cfg).eval()
    calls = _count_calls(stage)
    with torch.no_grad():
        stage(_batches(cfg)[0])
    assert calls == {"core": 2 * len(stage.layers), "mlp": len(stage.layers)}


# --------------------------------------------------------------------------------------------
# FP8 and overlap settings reach megatron


def test_transformer_config_mapping():
    from megatron.core.fp8_utils import is_first_last_bf16_layer

    from goku_megatron.model.build import build_transformer_config

    cfg = load_config(None, ["model.num_layers=6", "model.fp8=hybrid", "model.fp8_recipe=tensorwise",
                             "model.fp8_bf16_layers=2", "model.recompute=true",
                             "model.recompute_granularity=selective"])
    cpu = choose_backends(Config())
    tc = build_transformer_config(cfg, cpu)
    assert (tc.fp8, tc.fp8_recipe, tc.fp8_param) == ("hybrid", "tensorwise", False)
    assert (tc.recompute_granularity, tc.recompute_modules) == ("selective", ["core_attn"])
    # megatron's own rule picks the layers that stay in bf16: the first and last two.
    assert [is_first_last_bf16_layer(tc, i) for i in range(6)] == [True, True, False, False, True, True]

    full = build_transformer_config(load_config(None, ["model.recompute=true"]), cpu)
    assert (full.recompute_granularity, full.recompute_method, full.recompute_num_layers) == ("full", "uniform", 1)
    off = build_transformer_config(load_config(None, []), cpu)
    assert (off.fp8, off.recompute_granularity, off.first_last_layers_bf16) == (None, None, False)


def test_ddp_and_optimizer_config_mapping(megatron_world):
    from goku_megatron.model.build import build_model
    from goku_megatron.optim import build_optimizer

    cfg = load_config(None, ["optim.overlap_grad_reduce=true", "optim.overlap_param_gather=true",
                             "optim.ddp_bucket_size=5000", "checkpoint.ema_decay=0"])
    validate(cfg, 1)
    model, tc = build_model(cfg, choose_backends(cfg))
    ddp = model[0].ddp_config
    assert (ddp.overlap_grad_reduce, ddp.overlap_param_gather, ddp.bucket_size) == (True, True, 5000)
    assert ddp.use_distributed_optimizer and not ddp.fp8_param_gather
    assert len(model[0].bucket_groups) > 1  # small buckets: several reductions to overlap
    optimizer, _ = build_optimizer(cfg, model, tc)
    assert optimizer.config.overlap_param_gather and optimizer.config.fp8_recipe is None


def _recording_fp8_context(monkeypatch) -> list[int]:
    """Records the layer numbers GokuModel enters megatron's fp8 context with (goku.py imports
    get_fp8_context at its top, so the name is replaced there)."""
    import goku_megatron.model.goku

    entered: list[int] = []

    def get_fp8_context(config, layer_no: int = -1, is_init: bool = False):
        entered.append(layer_no)
        return contextlib.nullcontext()

    monkeypatch.setattr(goku_megatron.model.goku, "get_fp8_context", get_fp8_context)
    return entered


@pytest.mark.parametrize("recipe, expected", [
    ("tensorwise", [0, 1, 2, 3]),  # one context per layer, by global layer index
    ("delayed", [-1]),  # one context around all layers, as megatron's TransformerBlock does
])
def test_fp8_context_around_layers(megatron_world, monkeypatch, recipe, expected):
    """GokuModel runs its own layer loop, so it enters megatron's FP8 context itself."""
    cfg = load_config(None, ["model.in_channels=4"])
    stage = build_stage(cfg)
    stage.config.fp8, stage.config.fp8_recipe = "e4m3", recipe  # the layers share this config
    entered = _recording_fp8_context(monkeypatch)
    with torch.no_grad():
        stage(_batches(cfg)[0])
    assert entered == expected


@pytest.mark.parametrize("fp8", ["", "e4m3"], ids=["bf16", "fp8-eval"])
def test_no_fp8_context(megatron_world, monkeypatch, fp8):
    """None without model.fp8, and none in eval mode (sampling runs in bf16)."""
    cfg = load_config(None, ["model.in_channels=4"])
    stage = build_stage(cfg)
    stage.config.fp8 = fp8 or None
    if fp8:
        stage.eval()
    entered = _recording_fp8_context(monkeypatch)
    with torch.no_grad():
        stage(_batches(cfg)[0])
    assert entered == []


@pytest.mark.parametrize("recipe, rows", [("tensorwise", 16), ("mxfp8", 32)])
def test_fp8_pads_caption_tokens_for_kv_projections(megatron_world, recipe, rows):
    """TE's FP8 GEMMs need a multiple of 16 (MXFP8: 32) rows; a pack's two captions of 5 tokens
    (10 rows) are padded for the K/V projections only, which leaves the layer's output as it was."""
    cfg = load_config(None, ["model.in_channels=4", "model.zero_init=false"])
    stage = build_stage(cfg)
    seen: list[int] = []
    stage.layers[0].attn2.k_proj.register_forward_hook(lambda _, args, __: seen.append(args[0].shape[0]))
    batch = _batches(cfg)[0]
    with torch.no_grad():
        expected = stage(batch)
        stage.config.fp8, stage.config.fp8_recipe = "e4m3", recipe  # no FP8 context on CPU: numerics as bf16
        got = stage(batch)
    assert seen == [10, rows]
    assert_close_to_scale(got, expected, ulps=16)  # BLAS blocks other row counts differently


def test_fp8_alignment_matches_megatron():
    from megatron.core.enums import Fp8Recipe
    from megatron.core.fp8_utils import get_fp8_align_size

    for recipe in FP8_RECIPES:
        assert fp8_align_size(recipe) == get_fp8_align_size(Fp8Recipe(recipe)), recipe


# --------------------------------------------------------------------------------------------
# Runtime refusals (platform)


@pytest.mark.parametrize("recipe, capability, ok", [
    ("mxfp8", (9, 0), False),  # Hopper: no MXFP8 tensor cores
    ("mxfp8", (10, 0), True),
    ("tensorwise", (9, 0), True),
    ("delayed", (8, 9), True),
    ("blockwise", (8, 0), False),  # A100: no FP8 at all
])
def test_check_fp8_recipe(recipe, capability, ok):
    if ok:
        check_fp8_recipe(recipe, capability, "GPU")
        return
    with pytest.raises(ConfigError) as excinfo:
        check_fp8_recipe(recipe, capability, "NVIDIA H100 80GB HBM3")
    message = str(excinfo.value)
    assert "\n" not in message and f"model.fp8_recipe={recipe}" in message and "compute capability" in message


def test_fp8_refused_without_transformer_engine(monkeypatch):
    import goku_megatron.platform

    monkeypatch.setattr(goku_megatron.platform, "has_transformer_engine", lambda: False)
    cfg = load_config(None, ["model.fp8=e4m3"])
    with pytest.raises(ConfigError, match=r"model.fp8=e4m3 runs in Transformer Engine's linears .* set model.fp8=''"):
        choose_backends(cfg)


@pytest.mark.parametrize("package, found", [
    ({"cute/__init__.py": ""}, False),  # flash-attn-4: a namespace package with flash_attn.cute only
    ({"__init__.py": "flash_attn_func = flash_attn_varlen_func = None\n"}, True),  # flash-attn 2
])
def test_flash_attn_means_flash_attn_2s_kernels(tmp_path, monkeypatch, caplog, package, found):
    import goku_megatron.platform

    for name, text in package.items():
        (tmp_path / "flash_attn" / name).parent.mkdir(parents=True, exist_ok=True)
        (tmp_path / "flash_attn" / name).write_text(text)
    monkeypatch.syspath_prepend(str(tmp_path))
    for name in [m for m in sys.modules if m == "flash_attn" or m.startswith("flash_attn.")]:
        monkeypatch.delitem(sys.modules, name)
    monkeypatch.setattr(goku_megatron.platform, "has_cuda", lambda: True)
    with caplog.at_level("WARNING", logger="goku_megatron.platform"):
        assert goku_megatron.platform.has_flash_attn() is found
    assert ("lacks flash-attn 2's kernels" in caplog.text) is not found


# --------------------------------------------------------------------------------------------
# benchmarks/throughput.py


def test_plain_block_is_the_goku_layer(megatron_world):
    """The benchmark's plain PyTorch block computes what our layer computes, with its weights."""
    from megatron.core.transformer.spec_utils import build_module
    from megatron.core.transformer.transformer_config import TransformerConfig

    from goku_megatron.model.layer import LayerInputs
    from goku_megatron.batch import grid_positions
    from goku_megatron.model.rope import rope_angles, rope_rotation
    from goku_megatron.model.specs import local_layer_spec

    d, heads, ffn = 64, 4, 160
    config = TransformerConfig(num_layers=1, hidden_size=d, num_attention_heads=heads, ffn_hidden_size=ffn,
                               use_cpu_initialization=True, layernorm_epsilon=1e-6)
    ours = build_module(local_layer_spec("sdpa"), config=config)
    plain = script_module(BENCHMARK).PlainGokuBlock(d, heads, ffn)
    gen = torch.Generator().manual_seed(0)
    with torch.no_grad():
        for param in ours.parameters():
            param.copy_(torch.randn(param.shape, generator=gen) * 0.2 + (1.0 if param.dim() == 1 else 0.0))
    missing, unexpected = plain.load_state_dict(ours.state_dict(), strict=False)
    assert not missing and all(k.endswith("_extra_state") for k in unexpected), (missing, unexpected)
    b, grid, length = 2, (2, 3, 4), 5
    s = grid[0] * grid[1] * grid[2]
    x, temb = torch.randn(b, s, d, generator=gen), torch.randn(b, d, generator=gen)
    context = torch.randn(b, length, d, generator=gen)
    angles = rope_angles(grid_positions(*grid), d // heads)
    inputs = LayerInputs(context=context.transpose(0, 1), rope=rope_rotation(angles.unsqueeze(1)))
    layer = ours(x.transpose(0, 1), inputs, F.silu(temb)).transpose(0, 1)
    got = plain(x, F.silu(temb), context, rope_rotation(angles.unsqueeze(0)))
    # Both are fp32 implementations of the block whose activations reach ~60 here: each is measured
    # against the independent reference block run in float64, with the same weights.
    reference = ReferenceGokuBlock(d, heads, ffn, context_dim=d)
    reference.load_state_dict(plain.state_dict())
    pos = grid_positions(*grid).unsqueeze(0).expand(b, -1, -1)
    expected = reference(x, temb, context, pos)
    exact = reference.double()(x.double(), temb.double(), context.double(), pos)
    assert_as_accurate(got, expected, exact, msg="plain block")
    assert_as_accurate(layer, expected, exact, msg="goku layer")


def test_throughput_benchmark_prints_table():
    cmd = [sys.executable, str(BENCHMARK), "--preset", "tiny", "--tokens", "64", "--text-tokens", "8",
           "--layers", "1", "--warmup", "1", "--iters", "1", "--precision", "fp32", "fp8"]
    env = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONWARNINGS": "ignore", "CUDA_VISIBLE_DEVICES": ""}
    proc = subprocess.run(cmd, cwd=REPO, capture_output=True, text=True, timeout=300, env=env)
    assert proc.returncode == 0, proc.stderr[-3000:]
    lines = proc.stdout.splitlines()
    header = [line for line in lines if line.startswith("#")]
    assert any(line.startswith("# device: cpu") for line in header), proc.stdout
    assert any(f"torch {torch.__version__}" in line and "transformer-engine not available" in line
               and "flash-attn not available" in line for line in header), proc.stdout
    table = [line for line in lines if line.startswith("|")]
    columns = [c.strip() for c in table[0].strip("|").split("|")]
    assert columns == script_module(BENCHMARK).COLUMNS
    rows = [dict(zip(columns, (c.strip() for c in line.strip("|").split("|")))) for line in table[2:]]
    assert [(r["impl"], r["precision"]) for r in rows] == [("goku (local)", "fp32"), ("plain torch", "fp32")]
    for row in rows:
        # a pack of 64 tokens: a clip of 60 and a padding segment (the data path's packing)
        assert row["tokens"] == "60 (+4 pad)" and row["MFU"] == "n/a" and float(row["TFLOP/s"]) > 0
        assert float(row["ops/layer"]) > 100
    assert float(rows[1]["x plain"]) == 1.0 and float(rows[0]["x plain"]) > 0
    assert "# tiny 64 tokens fp8: skipped, FP8 needs Transformer Engine on a GPU" in lines


def test_benchmark_resolutions():
    """The issue's token counts: 33 frames are 9 latent frames; 480p and 720p in 1x2x2 patches."""
    resolutions = script_module(BENCHMARK).RESOLUTIONS
    assert {name: math.prod(grid) for name, grid in resolutions.items()} == {"480p": 14580, "720p": 32400}
