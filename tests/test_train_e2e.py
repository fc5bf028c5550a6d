"""The toy run, shortened: the loss falls, and metrics.jsonl, TensorBoard events, samples, periodic
evaluations and a loadable checkpoint are written; goku-eval on its checkpoint reports colour above
chance. Also a checkpoint save/load round trip."""

from __future__ import annotations

import json
import os
import subprocess
import sys

import pytest
import torch
import yaml
from conftest import REPO, build_stage

from goku_megatron.checkpoint import latest_checkpoint, load_model_weights, save_checkpoint
from goku_megatron.config import load_config, validate
from goku_megatron.evaluation import CHANCE
from goku_megatron.cli.eval import main as eval_main

# One run serves every test here: long enough to learn colour (goku-eval below), with a checkpoint,
# samples and an evaluation half way and at the end.
STEPS, HALF = 120, 60


@pytest.fixture(scope="module")
def toy_run(tmp_path_factory):
    tmp = tmp_path_factory.mktemp("toy")
    cmd = [sys.executable, "-m", "goku_megatron.cli.train", f"train.steps={STEPS}", f"train.run_dir={tmp / 'run'}",
           f"data.path={tmp / 'data'}", "data.toy_clips=96", "train.global_batch_size=16",
           "train.micro_batch_size=8", "train.log_interval=1", "optim.warmup_steps=4", f"train.save_interval={HALF}",
           f"train.sample_interval={HALF}", "train.sample_prompts=[a red square moving right, a blue circle]",
           f"train.eval_interval={HALF}", "flow.sample_steps=4"]
    proc = subprocess.run(cmd, cwd=REPO, capture_output=True, text=True, timeout=600,
                          env={**os.environ, "PYTHONWARNINGS": "ignore"})
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    return tmp / "run", proc.stdout


def test_toy_run_lowers_loss_and_writes_metrics(toy_run):
    run_dir, stdout = toy_run
    records = [json.loads(line) for line in (run_dir / "metrics.jsonl").read_text().splitlines()]
    assert [r["step"] for r in records] == list(range(1, STEPS + 1))
    for r in records:
        assert {"step", "loss", "lr", "grad_norm", "samples_per_s", "elapsed_s", "tokens_per_s",
                "tflops_per_gpu", "max_rss_gib"} <= r.keys()
        assert "mfu" not in r  # no GPU peak to divide by on CPU
        # 16 clips of 4 x 8 x 8 tokens per step
        assert r["tokens_per_s"] == pytest.approx(16 * 256 * r["samples_per_s"] / 16)
        assert r["tflops_per_gpu"] > 0 and r["max_rss_gib"] > 0.1
    losses = [r["loss"] for r in records]
    first, last = sum(losses[:4]) / 4, sum(losses[-4:]) / 4
    assert last < first - 0.1, losses
    assert records[0]["lr"] < records[5]["lr"]  # warmup
    assert f"step {STEPS}/{STEPS} | loss" in stdout and "ETA" in stdout
    assert "attention=sdpa" in stdout and "linear=local" in stdout


def test_toy_run_writes_tensorboard_events(toy_run):
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    run_dir, _ = toy_run
    acc = EventAccumulator(str(run_dir / "tensorboard"))
    acc.Reload()
    assert len(acc.Scalars("train/loss")) == STEPS
    assert {"train/lr", "train/grad_norm", "train/samples_per_s", "train/tokens_per_s",
            "train/tflops_per_gpu"} <= set(acc.Tags()["scalars"])


def test_toy_run_writes_samples(toy_run):
    """Samples half way and at the end: MP4 files, and animated GIFs of all 8 frames in TensorBoard."""
    import io

    from PIL import Image
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    run_dir, _ = toy_run
    for step in (HALF, STEPS):
        names = sorted(p.name for p in (run_dir / "samples" / f"step_{step:07d}").iterdir())
        assert names == ["000_a_red_square_moving_right.mp4", "001_a_blue_circle.mp4"]
    acc = EventAccumulator(str(run_dir / "tensorboard"), size_guidance={"images": 0})
    acc.Reload()
    events = acc.Images("samples/000_a_red_square_moving_right")
    assert [e.step for e in events] == [HALF, STEPS]
    gif = Image.open(io.BytesIO(events[-1].encoded_image_string))
    assert gif.format == "GIF" and gif.n_frames == 8 and gif.size == (16, 16)


def test_toy_run_checkpoint_loads(toy_run, megatron_world):
    run_dir, _ = toy_run
    latest = latest_checkpoint(run_dir)
    assert latest is not None and latest.name == f"iter_{STEPS:07d}"
    assert (run_dir / "checkpoints" / f"iter_{HALF:07d}").is_dir()
    cfg = load_config(str(run_dir / "config.yaml"))
    validate(cfg, 1)
    model = build_stage(cfg)
    fresh = {k: v.clone() for k, v in model.state_dict().items() if isinstance(v, torch.Tensor)}
    info = load_model_weights(latest, [model])
    assert info["step"] == STEPS
    assert info["config"]["model"] == yaml.safe_load((run_dir / "config.yaml").read_text())["model"]
    changed = [k for k, v in model.state_dict().items() if k in fresh and not torch.equal(v, fresh[k])]
    assert "layers.0.attn1.q_proj.weight" in changed  # trained weights, not the init


def test_checkpoint_round_trip(tmp_path, megatron_world):
    cfg = load_config(None, ["model.zero_init=false"])
    validate(cfg, 1)
    saved = build_stage(cfg)
    save_checkpoint(tmp_path, 7, [saved], cfg.to_dict())
    cfg.train.seed += 1
    other = build_stage(cfg)
    assert not torch.equal(other.layers[0].attn1.q_proj.weight, saved.layers[0].attn1.q_proj.weight)
    info = load_model_weights(latest_checkpoint(tmp_path), [other])
    assert info["step"] == 7
    for (name, a), (_, b) in zip(saved.state_dict().items(), other.state_dict().items()):
        if isinstance(a, torch.Tensor):
            assert torch.equal(a, b), name


def test_toy_run_evaluates_periodically(toy_run):
    """ShapesBench and the validation loss every train.eval_interval steps, in metrics.jsonl,
    TensorBoard (eval/*) and the log."""
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    run_dir, stdout = toy_run
    records = {r["step"]: r for r in map(json.loads, (run_dir / "metrics.jsonl").read_text().splitlines())}
    evaluated = [step for step, r in records.items() if "eval/val_loss" in r]
    assert evaluated == [HALF, STEPS]
    for step in evaluated:
        r = records[step]
        for split in ("seen", "held_out"):
            for name in ("color", "shape", "direction", "all"):
                assert 0 <= r[f"eval/{name}_{split}"] <= 1
        assert r["eval/val_loss"] > 0 and {"eval/val_loss_t0.10", "eval/val_loss_held_out"} <= r.keys()
    assert records[STEPS]["eval/val_loss"] < records[HALF]["eval/val_loss"]  # it learns
    acc = EventAccumulator(str(run_dir / "tensorboard"))
    acc.Reload()
    assert {"eval/color_held_out", "eval/val_loss"} <= set(acc.Tags()["scalars"])
    assert f"step {STEPS} eval | seen color" in stdout


def test_goku_eval_on_the_run_is_above_chance_on_seen_prompts(toy_run, tmp_path, megatron_world):
    """goku-eval on the run's checkpoint: the report's structure, and colour (the factor learnt
    first) well above chance on the seen prompts."""
    run_dir, _ = toy_run
    out = tmp_path / "report.json"
    assert eval_main(["shapes", "--checkpoint", str(run_dir), "--out", str(out), "--samples-per-prompt", "1",
                      "--steps", "10"]) == 0
    report = json.loads(out.read_text())
    assert report["step"] == STEPS and len(report["samples"]) == 32
    assert report["seen"]["clips"] == 28 and report["held_out"]["clips"] == 4
    assert report["seen"]["accuracy"]["color"] >= CHANCE["color"] + 0.25, report["seen"]["accuracy"]

