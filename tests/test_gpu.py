"""What only a GPU shows. Every test here skips without CUDA, saying why; ``pytest -m gpu`` selects
them, and ``tools/gpu_check.py run`` runs them on a GPU machine beside the benchmarks (docs/gpu.md).

- A bf16 toy run trains on the GPU, its first async save blocks training for at most a second,
  a run started from its step-6 checkpoint resumes exactly, and goku-sample draws from it.
- FSDP on one GPU gives megatron DDP's losses, gradients and weights.
- A training step's forward and backward never wait for the GPU (torch's sync debug mode).
- The peak memory of a goku-2b step is within 15% of what goku-plan predicts.
- The Transformer Engine spec computes the local spec's function, and each FP8 recipe runs forward
  and backward close to bf16 (MXFP8 is refused before Blackwell); skipped where Transformer Engine
  does not import.

A test prints ``gpu-figure name=value`` lines; gpu_check collects them into its report.
"""

from __future__ import annotations

import importlib
import re
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from checkpoint_utils import checkpoint_tensors, losses, metrics
from conftest import (
    BF16_TOY_SAVE,
    BF16_TOY_STEPS,
    FSDP,
    QUIET_ENV,
    REPO,
    assert_same_run,
    bf16_toy_cmd,
    build_stage,
    run_equivalence,
)
from numerics import assert_within_bf16_rounding

from goku_megatron import flow
from goku_megatron.batch import Pack, PackSample, build_pack, pack_batch
from goku_megatron.checkpoint import checkpoint_dir
from goku_megatron.config import FP8_RECIPES, ConfigError, fp8_align_size, load_config
from goku_megatron.model.goku import iter_stage_models
from goku_megatron.model.lora import is_adapter
from goku_megatron.platform import check_fp8_recipe

pytestmark = [pytest.mark.gpu,
              pytest.mark.skipif(not torch.cuda.is_available(),
                                 reason="needs a CUDA GPU: tools/gpu_check.py run runs these on a GPU machine")]

# The goku-2b step whose peak memory is checked: 4 of its 28 layers (an H100 holds them without
# recompute) on one 480p clip, 9 x 30 x 54 = 14580 tokens (latent grid 9 x 60 x 108, patch 1x2x2).
PLAN_CHECK = ["model.preset=goku-2b", "model.num_layers=4", "train.global_batch_size=1",
              "train.micro_batch_size=1", "--grid", "9", "60", "108", "--warmup", "1", "--steps", "2"]
PLAN_TOLERANCE = 0.15
# What the first async save may block training for: the snapshot of the rank's tensors.
FIRST_SAVE_BLOCKING_S = 1.0


def figure(name: str, value: object) -> None:
    """One figure for tools/gpu_check.py's report (it reads the test's captured output)."""
    print(f"gpu-figure {name}={value}")


def te_import_error() -> str:
    """Why Transformer Engine does not import here ('' when it does)."""
    try:
        importlib.import_module("transformer_engine.pytorch")
    except Exception as err:  # noqa: BLE001  an ImportError, or TE's own error about CUDA/cuDNN
        return f"{type(err).__name__}: {err}".splitlines()[0]
    return ""


TE_ERROR = te_import_error()
needs_te = pytest.mark.skipif(bool(TE_ERROR), reason=f"Transformer Engine does not import: {TE_ERROR}")


# ----------------------------------------------------------------------------------------------
# The bf16 toy run on the GPU


@pytest.fixture(scope="module")
def gpu_toy_run(toy_data, tmp_path_factory) -> Path:
    run_dir = tmp_path_factory.mktemp("gpu-toy") / "run"
    proc = subprocess.run(bf16_toy_cmd(toy_data, run_dir), cwd=REPO, capture_output=True, text=True,
                          timeout=300, env=QUIET_ENV)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    assert "device=cuda" in proc.stdout and "precision=bf16" in proc.stdout, proc.stdout[-3000:]
    return run_dir


def test_a_bf16_toy_run_trains_on_the_gpu_and_its_async_saves_barely_block(gpu_toy_run):
    records = metrics(gpu_toy_run)
    steps = losses(gpu_toy_run)
    assert list(steps) == list(range(1, BF16_TOY_STEPS + 1))
    first, last = sum(list(steps.values())[:4]) / 4, sum(list(steps.values())[-4:]) / 4
    assert last < first - 0.1, steps
    assert all("gpu_mem_peak_gib" in r for r in records)
    blocking = {r["step"]: r["checkpoint_blocking_s"] for r in records if "checkpoint_blocking_s" in r}
    assert list(blocking) == [BF16_TOY_SAVE, BF16_TOY_STEPS]
    figure("toy_step_time_s_median", sorted(r["step_time_s"] for r in records)[len(records) // 2])
    figure("first_async_save_blocking_s", blocking[BF16_TOY_SAVE])
    figure("last_save_blocking_s_sync", blocking[BF16_TOY_STEPS])
    assert blocking[BF16_TOY_SAVE] <= FIRST_SAVE_BLOCKING_S  # the last save is synchronous: not bounded
    assert len(list((gpu_toy_run / "samples" / f"step_{BF16_TOY_STEPS:07d}").glob("*.mp4"))) == 1


def test_a_gpu_run_resumes_exactly_from_another_runs_checkpoint(gpu_toy_run, toy_data, tmp_path):
    """The step after the checkpoint repeats the uninterrupted run's loss bit for bit (weights,
    optimizer, RNG and data position restored exactly). Later steps are only close: CUDA's
    backward kernels (index_put's atomics, attention) are not deterministic, so the two runs'
    gradients, and from then on their weights, differ in the last bits."""
    resumed = tmp_path / "resumed"
    start = checkpoint_dir(gpu_toy_run, BF16_TOY_SAVE)
    proc = subprocess.run(bf16_toy_cmd(toy_data, resumed, f"checkpoint.resume={start}"), cwd=REPO,
                          capture_output=True, text=True, timeout=300, env=QUIET_ENV)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    assert re.search(rf"resumed from \S*{start.name}: step {BF16_TOY_SAVE}\b", proc.stdout + proc.stderr)
    got, want = losses(resumed), losses(gpu_toy_run)
    assert list(got) == list(range(BF16_TOY_SAVE + 1, BF16_TOY_STEPS + 1))
    assert got[BF16_TOY_SAVE + 1] == want[BF16_TOY_SAVE + 1]
    assert got == pytest.approx({s: want[s] for s in got}, rel=1e-2)
    figure("resumed_first_loss", got[BF16_TOY_SAVE + 1])


def test_goku_sample_draws_from_a_gpu_checkpoint(gpu_toy_run, tmp_path):
    proc = subprocess.run([sys.executable, "-m", "goku_megatron.cli.sample", "--checkpoint", str(gpu_toy_run),
                           "--prompt", "a blue diamond moving up", "--steps", "2", "--out", str(tmp_path)],
                          cwd=REPO, capture_output=True, text=True, timeout=300, env=QUIET_ENV)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    assert len(list(tmp_path.glob("*.mp4"))) == 1
    final = checkpoint_tensors(checkpoint_dir(gpu_toy_run, BF16_TOY_STEPS))
    assert {v.dtype for k, v in final.items() if k.startswith("model.") and k.endswith("fc1.weight")} == {torch.bfloat16}


# ----------------------------------------------------------------------------------------------
# FSDP on one GPU


def test_fsdp_on_one_gpu_matches_megatron_ddp(tmp_path_factory):
    """tests/dist_equivalence.py's two steps under torchrun on one GPU, fp32 (bf16's gradients
    differ between the two by design: FSDP2 keeps them in bf16, DDP in fp32)."""
    ddp = run_equivalence(tmp_path_factory, "gpu-ddp", 1, ["train.precision=fp32"])
    fsdp = run_equivalence(tmp_path_factory, "gpu-fsdp", 1, ["train.precision=fp32", *FSDP])
    assert all(t.is_cuda for t in ddp["weights"].values())
    assert_same_run(fsdp["record"], ddp["record"], fsdp, ddp)
    figure("fsdp_losses", fsdp["record"]["loss"])


# ----------------------------------------------------------------------------------------------
# A training step without host synchronisation


def _pack(cfg, mixed: bool, tokens_multiple: int = 1) -> Pack:
    """Two equal clips (a toy step's pack), or two clips of different sizes with a padding segment."""
    gen = torch.Generator().manual_seed(3)
    c, d = cfg.model.in_channels, cfg.model.text_dim
    text, mask = torch.randn(2, 6, d, generator=gen), torch.ones(2, 6, dtype=torch.bool)
    if not mixed:
        return pack_batch(torch.randn(2, c, 2, 8, 8, generator=gen), torch.rand(2, generator=gen), text, mask,
                          cfg.model.patch_size, target=torch.randn(2, c, 2, 8, 8, generator=gen))
    samples = [PackSample(noisy=torch.randn(c, *shape, generator=gen), target=torch.randn(c, *shape, generator=gen),
                          timestep=0.4, text=text[i], text_mask=mask[i])
               for i, shape in enumerate([(2, 8, 8), (1, 4, 8)])]  # 32 + 8 tokens, then padding
    budget = -(-48 // tokens_multiple) * tokens_multiple
    return build_pack(samples, budget, tuple(cfg.model.patch_size))


def _loss(stage, pack: Pack) -> torch.Tensor:
    """What forward_step computes for one pack: the model's output and the rectified-flow loss."""
    (model,) = iter_stage_models([stage])
    return flow.flow_loss(stage(pack), pack, tokens=model.pack_shard(pack).source)


@pytest.mark.parametrize("mixed", [False, True], ids=["equal_clips", "mixed_pack"])
def test_a_training_steps_forward_and_backward_never_wait_for_the_gpu(megatron_world, mixed):
    """Any host synchronisation (a .tolist() or .item() of a CUDA tensor, a blocking copy) raises
    in sync debug mode "error". The pack is on the GPU first, as the loader's read-ahead puts it."""
    cfg = load_config(None, ["model.zero_init=false", "train.precision=bf16"])
    stage = build_stage(cfg)
    pack = _pack(cfg, mixed).to("cuda")
    torch.cuda.synchronize()
    torch.cuda.set_sync_debug_mode("error")
    try:
        _loss(stage, pack).backward()
    finally:
        torch.cuda.set_sync_debug_mode("default")


# ----------------------------------------------------------------------------------------------
# Peak memory against the planner


def test_a_goku_2b_steps_peak_memory_is_within_15_percent_of_the_plan():
    proc = subprocess.run([sys.executable, str(REPO / "benchmarks" / "step_time.py"), *PLAN_CHECK], cwd=REPO,
                          capture_output=True, text=True, timeout=300, env=QUIET_ENV)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    found = re.search(r"memory_gib peak=([\d.]+) planned=([\d.]+)", proc.stdout)
    assert found, proc.stdout
    peak, planned = map(float, found.groups())
    figure("goku2b_4_layers_14580_tokens_peak_gib", peak)
    figure("goku2b_4_layers_14580_tokens_planned_gib", planned)
    assert abs(peak - planned) <= PLAN_TOLERANCE * planned


# ----------------------------------------------------------------------------------------------
# Transformer Engine


@needs_te
def test_the_transformer_engine_spec_computes_the_local_spec_within_bf16_rounding(megatron_world):
    base = ["model.zero_init=false", "model.attention_backend=sdpa"]  # only the linear layers differ
    local32 = build_stage(load_config(None, [*base, "model.linear_backend=local", "train.precision=fp32"]))
    local16 = build_stage(load_config(None, [*base, "model.linear_backend=local", "train.precision=bf16"]))
    te16 = build_stage(load_config(None, [*base, "model.linear_backend=te", "train.precision=bf16"]))
    pack = _pack(load_config(None, base), mixed=True).to("cuda")
    with torch.no_grad():
        outs = [m.eval()(pack) for m in (te16, local16, local32)]
    assert_within_bf16_rounding(*outs, msg="TE spec")


@needs_te
@pytest.mark.parametrize("recipe", FP8_RECIPES)
def test_each_fp8_recipe_runs_forward_and_backward_or_is_refused(megatron_world, recipe):
    """Three forward and backward passes in FP8 give finite gradients, then an output within 15%
    (relative L2) of the same weights in bf16: e4m3 keeps 3 mantissa bits, so one rounding moves a
    value by up to 6% and errors of independent products average down (after the delayed recipe's
    amax history has filled); a wrong scale is off by orders of magnitude."""
    capability, name = torch.cuda.get_device_capability(), torch.cuda.get_device_name()
    if recipe == "mxfp8" and capability < (10, 0):
        with pytest.raises(ConfigError, match="model.fp8_recipe=mxfp8 needs compute capability >= 10.0"):
            check_fp8_recipe(recipe, capability, name)
        return
    base = ["model.zero_init=false", "model.linear_backend=te", "model.attention_backend=sdpa",
            "train.precision=bf16"]
    bf16 = build_stage(load_config(None, base))
    fp8 = build_stage(load_config(None, [*base, "model.fp8=hybrid", f"model.fp8_recipe={recipe}"]))
    pack = _pack(load_config(None, base), mixed=True, tokens_multiple=fp8_align_size(recipe))
    pack = pack.to("cuda")
    for _ in range(3):
        loss = _loss(fp8, pack)
        loss.backward()
    assert torch.isfinite(loss)
    assert all(torch.isfinite(p.grad).all() for p in fp8.parameters() if p.grad is not None)
    want, got = bf16(pack).float(), fp8(pack).float()
    error = (got - want).norm() / want.norm()
    figure(f"fp8_{recipe}_relative_error", f"{error:.4f}")
    assert error < 0.15


@needs_te
def test_lora_adapters_train_in_bf16_on_an_fp8_base(megatron_world):
    """LoRA on Transformer Engine linears running FP8: the adapters are megatron's local linears in
    bf16 (never FP8), get gradients, and the frozen base gets none (docs/recipes.md, "LoRA
    finetuning")."""
    recipe = "tensorwise"
    cfg = load_config(None, ["model.zero_init=false", "model.linear_backend=te", "model.attention_backend=sdpa",
                             "train.precision=bf16", "model.fp8=hybrid", f"model.fp8_recipe={recipe}",
                             "lora.rank=4", "lora.base=seed"])
    stage = build_stage(cfg)
    pack = _pack(cfg, mixed=True, tokens_multiple=fp8_align_size(recipe)).to("cuda")
    for _ in range(2):
        loss = _loss(stage, pack)
        loss.backward()
    assert torch.isfinite(loss)
    params = dict(stage.named_parameters())
    adapters = {n: p for n, p in params.items() if is_adapter(n)}
    assert adapters and all(p.dtype == torch.bfloat16 and type(p) is torch.nn.Parameter for p in adapters.values())
    assert all(p.grad is not None or getattr(p, "main_grad", None) is not None for p in adapters.values())
    assert all(p.grad is None for n, p in params.items() if not is_adapter(n))
