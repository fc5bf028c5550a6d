"""bf16, the precision of every GPU run, through the GPU's code on CPU: megatron's Float16Module
around the model, its mixed-precision optimizer with fp32 main weights (Float16OptimizerWithFloat16Params,
or the distributed optimizer's fp32 shards), bf16 checkpoints, bf16 sampling.

- TP=2, PP=2, CP=2, DP=2 with the distributed optimizer and FSDP over 2 ranks, each in bf16, match
  the one-process bf16 run to bf16 rounding: each is as close to the fp32 run as the one-process
  bf16 run is (tests/numerics.py, ``assert_within_bf16_rounding``).
- The sampler's model (goku-sample, goku-eval, conversion) is built as training builds it: the same
  parameter names, dtypes and outputs, and nothing initialised that the checkpoint overwrites.
- A bf16 toy run learns, writes bf16 weights beside fp32 main weights and in-training samples, is
  resumed bitwise after kill -9, and goku-sample draws from its checkpoint.
"""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import time

import pytest
import torch
from checkpoint_utils import assert_same_tensors, checkpoint_tensors, losses, metrics
from conftest import BF16, BF16_TOY_SAVE, BF16_TOY_STEPS, FSDP, QUIET_ENV, REPO, bf16_toy_cmd, layout_runner
from numerics import assert_within_bf16_rounding

from goku_megatron.batch import pack_batch
from goku_megatron.checkpoint import checkpoint_dir, load_model_weights, save_checkpoint
from goku_megatron.config import load_config, validate
from goku_megatron.model.build import build_model, build_unsharded_model
from goku_megatron.model.goku import GokuModel
from goku_megatron.platform import choose_backends
from goku_megatron.sample import config_for_one_process, unsharded_model

LAYOUTS = {  # tests/dist_equivalence.py: two optimizer steps of the tiny model at lr 1e-3
    "fp32": (1, []),
    "bf16": (1, [BF16]),
    "tp2": (2, [BF16, "parallel.tp=2"]),
    "pp2": (2, [BF16, "parallel.pp=2"]),
    "cp2": (2, [BF16, "parallel.cp=2"]),
    "dp2_distributed_optimizer": (2, [BF16, "optim.distributed_optimizer=true"]),
    "fsdp2": (2, [BF16, *FSDP]),
}
# Adam's first steps move a weight by about the learning rate whatever the size of its gradient
# (m / sqrt(v) is +-1 at step 1), so a gradient within bf16 rounding of zero, which another layout
# rounds across zero, moves its weight lr the other way. The gradients themselves carry no such term.
ADAM_SIGN_FLIP = 2 * 1e-3


@pytest.fixture(scope="module")
def equivalence_run(tmp_path_factory):
    return layout_runner(tmp_path_factory, LAYOUTS, prefix="bf16-")


@pytest.mark.slow
def test_the_one_process_bf16_run_computes_in_bf16_and_keeps_fp32_gradients(equivalence_run):
    bf16, fp32 = equivalence_run("bf16"), equivalence_run("fp32")
    assert {w.dtype for w in bf16["weights"].values()} == {torch.bfloat16}
    assert {g.dtype for g in bf16["grads1"].values()} == {torch.float32}  # megatron's fp32 main grads
    assert bf16["record"]["loss"][0] != fp32["record"]["loss"][0]  # bf16 rounding shows in the loss
    assert bf16["record"]["loss"][1] != bf16["record"]["loss"][0]


@pytest.mark.slow
@pytest.mark.parametrize("layout", [name for name in LAYOUTS if name not in ("fp32", "bf16")])
def test_a_bf16_layout_matches_one_process_to_bf16_rounding(equivalence_run, layout):
    got, one, fp32 = equivalence_run(layout), equivalence_run("bf16"), equivalence_run("fp32")
    for key in ("loss", "grad_norm"):
        for step, (value, bf16_value, expected) in enumerate(zip(got["record"][key], one["record"][key],
                                                                 fp32["record"][key]), 1):
            assert_within_bf16_rounding(torch.tensor(value), torch.tensor(bf16_value), torch.tensor(expected),
                                        msg=f"{key} of step {step}")
    for kind in ("grads1", "grads2", "weights"):
        assert got[kind].keys() == fp32[kind].keys(), kind
        for name, expected in fp32[kind].items():
            assert_within_bf16_rounding(got[kind][name], one[kind][name], expected, msg=f"{kind} {name}",
                                        slack=ADAM_SIGN_FLIP if kind == "weights" else 0.0)
    assert {w.dtype for w in got["weights"].values()} == {torch.bfloat16}


# ----------------------------------------------------------------------------------------------
# One model builder


def _tiny(precision: str):
    cfg = load_config(None, ["model.preset=tiny", "model.zero_init=false", "model.in_channels=3",
                             f"train.precision={precision}"])
    validate(cfg, 1)
    return cfg


def _pack(cfg):
    gen = torch.Generator().manual_seed(5)
    x = torch.randn(2, 3, 2, 8, 8, generator=gen)
    text = torch.randn(2, 4, cfg.model.text_dim, generator=gen)
    return pack_batch(x, torch.tensor([0.3, 0.8]), text, torch.ones(2, 4, dtype=torch.bool), cfg.model.patch_size)


@pytest.mark.parametrize("precision", ["fp32", "bf16"])
def test_the_samplers_model_is_the_training_model(precision, tmp_path, megatron_world):
    """Parameter names, dtypes and outputs: goku-sample's model (through the checkpoint) against
    the model training built, in eval mode on the same pack."""
    cfg = _tiny(precision)
    model, _ = build_model(cfg, choose_backends(cfg))
    path = save_checkpoint(tmp_path / "run", 1, model, cfg.to_dict())
    sampler, _ = unsharded_model(config_for_one_process(cfg.to_dict()))
    load_model_weights(path, [sampler])
    trained = model[0].module  # inside megatron DDP: Float16Module(GokuModel) in bf16, GokuModel in fp32
    assert type(sampler) is type(trained)
    assert [(n, p.dtype) for n, p in sampler.named_parameters()] == \
        [(n, p.dtype) for n, p in trained.named_parameters()]
    expected_dtype = torch.bfloat16 if precision == "bf16" else torch.float32
    assert {p.dtype for n, p in trained.named_parameters() if n.endswith("fc1.weight")} == {expected_dtype}
    pack = _pack(cfg)
    model[0].eval(), sampler.eval()
    with torch.no_grad():
        want, got = model[0](pack), sampler(pack)
    assert got.dtype == want.dtype == torch.float32  # Float16Module hands fp32 out of the last stage
    assert torch.equal(got, want)


def test_a_model_whose_weights_are_loaded_next_initialises_none(monkeypatch, megatron_world):
    """Neither megatron's initialisation of its linears (which on GPU needs its CUDA RNG tracker:
    goku-sample crashed there) nor GokuModel.init_weights runs for the sampler's model."""
    from megatron.core.tensor_parallel import layers

    def refuse(*args, **kwargs):
        raise AssertionError("a weight was initialised")

    monkeypatch.setattr(layers, "_initialize_affine_weight_cpu", refuse)
    monkeypatch.setattr(layers, "_initialize_affine_weight_gpu", refuse)
    monkeypatch.setattr(GokuModel, "init_weights", refuse)
    cfg = _tiny("bf16")
    model = build_unsharded_model(cfg, choose_backends(cfg))
    assert {p.dtype for n, p in model.named_parameters() if ".layers." in n} == {torch.bfloat16}
    with pytest.raises(AssertionError, match="initialised"):
        build_model(cfg, choose_backends(cfg))  # the check above can fail: training initialises


# ----------------------------------------------------------------------------------------------
# A bf16 toy run end to end

STEPS, SAVE = BF16_TOY_STEPS, BF16_TOY_SAVE


@pytest.fixture(scope="module")
def bf16_run(toy_data, tmp_path_factory):
    run_dir = tmp_path_factory.mktemp("bf16-toy") / "run"
    proc = subprocess.run(bf16_toy_cmd(toy_data, run_dir), cwd=REPO, capture_output=True, text=True, timeout=600,
                          env=QUIET_ENV)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    assert "precision=bf16" in proc.stdout
    return run_dir


@pytest.mark.slow
def test_a_bf16_toy_run_learns_and_saves_bf16_weights_with_fp32_main_weights(bf16_run, megatron_world):
    steps = losses(bf16_run)
    assert list(steps) == list(range(1, STEPS + 1))
    first, last = sum(list(steps.values())[:4]) / 4, sum(list(steps.values())[-4:]) / 4
    assert last < first - 0.1, steps
    tensors = checkpoint_tensors(checkpoint_dir(bf16_run, STEPS))
    weights = {k: v.dtype for k, v in tensors.items() if k.startswith("model.") and k.endswith("fc1.weight")}
    main = {k: v.dtype for k, v in tensors.items() if k.startswith("optimizer.state.param.")}
    assert weights and set(weights.values()) == {torch.bfloat16}
    assert main and set(main.values()) == {torch.float32}
    assert len(list((bf16_run / "samples" / f"step_{STEPS:07d}").glob("*.mp4"))) == 1


@pytest.mark.slow
def test_a_bf16_run_killed_after_a_checkpoint_resumes_bitwise(toy_data, bf16_run, tmp_path, megatron_world):
    run_dir = tmp_path / "run"
    proc = subprocess.Popen(bf16_toy_cmd(toy_data, run_dir), cwd=REPO, stdout=subprocess.DEVNULL,
                            stderr=subprocess.DEVNULL, env=QUIET_ENV)
    deadline = time.monotonic() + 300
    while not (run_dir / "checkpoints" / "latest").is_file():
        assert proc.poll() is None and time.monotonic() < deadline, "the run ended before its first checkpoint"
        time.sleep(0.02)
    proc.send_signal(signal.SIGKILL)
    assert proc.wait(timeout=60) == -signal.SIGKILL
    assert max(r["step"] for r in metrics(run_dir)) < STEPS  # killed part way
    done = subprocess.run(bf16_toy_cmd(toy_data, run_dir), cwd=REPO, capture_output=True, text=True, timeout=600,
                          env=QUIET_ENV)
    assert done.returncode == 0, done.stdout[-3000:] + done.stderr[-3000:]
    assert f"iter_{SAVE:07d}" in done.stdout  # it resumed from the checkpoint, not from scratch
    assert losses(run_dir) == losses(bf16_run)
    assert_same_tensors(checkpoint_tensors(checkpoint_dir(run_dir, STEPS)),
                        checkpoint_tensors(checkpoint_dir(bf16_run, STEPS)))


@pytest.mark.slow
def test_goku_sample_draws_from_a_bf16_checkpoint(bf16_run, tmp_path):
    proc = subprocess.run([sys.executable, "-m", "goku_megatron.cli.sample", "--checkpoint", str(bf16_run),
                           "--prompt", "a blue diamond moving up", "--steps", "2", "--out", str(tmp_path)],
                          cwd=REPO, capture_output=True, text=True, timeout=300,
                          env={**os.environ, "OMP_NUM_THREADS": "1"})
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    assert len(list(tmp_path.glob("*.mp4"))) == 1
    assert "Warning" not in proc.stdout + proc.stderr
