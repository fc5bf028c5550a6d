"""goku-sample: from a checkpoint to playable MP4/PNG files, deterministic per prompt and seed."""

from __future__ import annotations

import subprocess
import sys

import av
import numpy as np
import pytest
import torch
from conftest import build_stage, one_process_world
from numerics import assert_close_to_scale

from goku_megatron.checkpoint import save_checkpoint
from goku_megatron.config import load_config, validate
from goku_megatron.cli.sample import main
from goku_megatron.media import to_uint8, write_media
from goku_megatron.sample import SampleSpec, Sampler, config_for_one_process


@pytest.fixture(scope="module")
def run_dir(tmp_path_factory):
    one_process_world()
    out = tmp_path_factory.mktemp("run")
    cfg = load_config("toy", ["model.zero_init=false", "data.toy_size=8", "data.toy_frames=4"])
    validate(cfg, 1)
    save_checkpoint(out, 3, [build_stage(cfg)], cfg.to_dict())
    return out


def test_sampler_reloads_the_saved_weights(run_dir, megatron_world):
    sampler = Sampler(run_dir)
    assert sampler.step == 3 and sampler.cfg.data.toy_size == 8
    reference = build_stage(sampler.cfg)
    for (name, a), (_, b) in zip(sampler.model.state_dict().items(), reference.state_dict().items()):
        if isinstance(a, torch.Tensor):
            assert torch.equal(a, b), name


def test_samples_are_deterministic_and_independent_of_other_prompts(run_dir, megatron_world):
    sampler = Sampler(run_dir)
    spec = SampleSpec(frames=4, height=8, width=8, steps=3, cfg_scale=3.0, seed=7)
    both = sampler.sample(["a red square moving left", "a blue circle moving up"], spec)
    alone = sampler.sample(["a red square moving left"], spec)
    assert both.shape == (2, 3, 4, 8, 8) and both.abs().max() <= 1
    assert_close_to_scale(both[:1], alone, ulps=256)  # batch of 2 vs 1: other kernels, 3 steps, CFG 3
    other_seed = sampler.sample(["a red square moving left"], SampleSpec(4, 8, 8, steps=3, seed=8))
    assert not torch.equal(other_seed, alone)


def test_mp4_plays_back(tmp_path):
    t, y, x = torch.meshgrid(torch.arange(5.0), torch.arange(16.0), torch.arange(24.0), indexing="ij")
    pixels = torch.stack([x / 24, y / 16, t / 5]) * 2 - 1  # smooth ramps: what 4:2:0 keeps
    path = write_media(pixels, tmp_path / "clip", fps=8)
    assert path.suffix == ".mp4"
    with av.open(str(path)) as container:
        frames = np.stack([f.to_ndarray(format="rgb24") for f in container.decode(video=0)])
    assert frames.shape == (5, 16, 24, 3)
    # H.264 at crf 18, 4:2:0, limited-range YUV: within a few levels of what went in
    assert np.abs(frames.astype(float) - to_uint8(pixels).astype(float)).mean() < 8


def test_png_for_one_frame(tmp_path):
    path = write_media(torch.zeros(3, 1, 8, 8), tmp_path / "still")
    assert path.suffix == ".png" and path.is_file()


def test_cli_writes_one_file_per_prompt(run_dir, tmp_path, capsys, megatron_world):
    prompts = tmp_path / "prompts.txt"
    prompts.write_text("a green square moving right\n\na yellow circle moving down\n")
    assert main(["--checkpoint", str(run_dir), "--prompts-file", str(prompts), "--prompt", "a red circle",
                 "--out", str(tmp_path / "out"), "--steps", "2"]) == 0
    names = sorted(p.name for p in (tmp_path / "out").iterdir())
    assert names == ["000_a_red_circle.mp4", "001_a_green_square_moving_right.mp4",
                     "002_a_yellow_circle_moving_down.mp4"]


def test_cli_errors_are_one_line(tmp_path, capsys):
    assert main(["--checkpoint", str(tmp_path), "--prompt", "x"]) == 2
    err = capsys.readouterr().err.strip()
    assert err.count("\n") == 0 and "not a goku-train checkpoint" in err
    assert main(["--checkpoint", str(tmp_path)]) == 2
    assert "no prompt" in capsys.readouterr().err


def test_one_process_config_whatever_layout_trained():
    saved = load_config(None, ["parallel.tp=2", "parallel.cp=2", "parallel.dp=2", "parallel.fsdp=true",
                               "parallel.fsdp_shard_size=2", "parallel.distributed_backend=gloo"]).to_dict()
    p = config_for_one_process(saved).parallel
    assert (p.tp, p.pp, p.cp, p.dp, p.fsdp, p.fsdp_shard_size, p.distributed_backend) == (1, 1, 1, 1, False, 0, "auto")


@pytest.mark.parametrize("section, key, value, named", [
    ("model", "fp8_margin", 0, "unknown key 'model.fp8_margin', a field this version does not have"),
    ("train", "steps", "3", "train.steps must be an integer, got '3'"),
], ids=["unknown_key", "string_for_int"])
def test_a_checkpoint_whose_config_no_longer_loads_is_one_line(tmp_path, capsys, megatron_world, section, key,
                                                                value, named):
    """A checkpoint saved by another version (a key this one lacks, a value of another type) is
    refused in one line naming the checkpoint, the field and what to do, not half-loaded."""
    cfg = load_config("toy", ["data.toy_size=8", "data.toy_frames=4"])
    validate(cfg, 1)
    saved = cfg.to_dict()
    saved[section][key] = value
    save_checkpoint(tmp_path, 3, [build_stage(cfg)], saved)
    assert main(["--checkpoint", str(tmp_path), "--prompt", "x", "--out", str(tmp_path / "out")]) == 2
    err = capsys.readouterr().err
    assert err == (f"goku-sample: error: {tmp_path / 'checkpoints' / 'iter_0000003'}: saved config: {named}; "
                   "another version of goku-megatron saved it (or it was edited): load it with the version that "
                   "saved it\n")


@pytest.mark.slow
@pytest.mark.parametrize("layout", [
    ["parallel.pp=2", "parallel.cp=2"],
    ["parallel.cp=2", "parallel.fsdp=true", "parallel.fsdp_shard_size=2", "optim.distributed_optimizer=false",
     "train.micro_batch_size=8"],
], ids=["pp2_cp2", "fsdp_cp2"])
def test_in_training_samples_equal_goku_sample_in_any_layout(tmp_path, megatron_world, layout):
    """LiveSampler under PP=2 x CP=2 (pipeline broadcast, CP gather), and under hybrid FSDP over
    DP=2 x CP=2 (each forward all-gathers the layers' weights), gives goku-sample's pixels; and
    goku-sample, in a process of its own, samples from either layout's checkpoint."""
    from conftest import REPO, run_torchrun
    from live_sample_worker import PROMPTS, SPEC

    run_torchrun(4, [str(REPO / "tests" / "live_sample_worker.py"), str(tmp_path), *layout])
    live = torch.load(tmp_path / "pixels.pt")
    reference = Sampler(tmp_path).sample(PROMPTS, SampleSpec(**SPEC))
    assert live.shape == (2, 3, 4, 8, 8) and live.std() > 0.05
    assert_close_to_scale(live, reference, ulps=1024)  # split sums over CP/PP ranks, 3 Euler steps with CFG
    proc = subprocess.run([sys.executable, "-m", "goku_megatron.cli.sample", "--checkpoint", str(tmp_path),
                           "--prompt", PROMPTS[0], "--frames", "4", "--height", "8", "--width", "8", "--steps", "1",
                           "--out", str(tmp_path / "out")], cwd=REPO, capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stderr[-2000:]
    assert len(list((tmp_path / "out").iterdir())) == 1
    # megatron-core's loader calls torch's deprecated load_state_dict; logs.py folds that notice
    assert "Warning" not in proc.stdout + proc.stderr, (proc.stdout + proc.stderr)[-2000:]
