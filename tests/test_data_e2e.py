"""goku-train on real-format data: raw shards decoded and VAE-encoded online, and latent shards
from goku-data precompute-latents, both through stages, packing and the bad-sample counters."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
from conftest import REPO

from goku_megatron.checkpoint import latest_checkpoint, load_loader_state
from goku_megatron.data.shards import LOG_FIRST, ShardWriter
from goku_megatron.data.toy import ToySample, encode_png, encode_webm
from tiny_models import make_tiny_vae

SIZE = 32  # 4x4 latents with the tiny VAE (8x), 2x2 tokens per latent frame with patch 1x2x2


def _sample(index: int, still: bool) -> dict[str, bytes]:
    sample = ToySample.draw(index, still=still, size=SIZE, frames=9, seed=0)
    pixels = sample.render(SIZE, 9)
    media = {"png": encode_png(pixels[0])} if still else {"webm": encode_webm(pixels, 8)}
    return {**media, "txt": sample.caption.encode(), "json": json.dumps({"index": index}).encode()}


@pytest.fixture(scope="module")
def data(tmp_path_factory):
    root = tmp_path_factory.mktemp("data")
    with ShardWriter(root / "raw", samples_per_shard=6) as writer:
        for i in range(12):
            writer.write(f"{i:04d}", _sample(i, still=i % 4 == 3))
        writer.write("bad0", {"webm": b"this is not a video" * 20, "txt": b"oops"})
        writer.write("bad1", {"webm": b"this is not a video" * 20, "txt": b"oops"})
    return root, make_tiny_vae(root / "vae")


def _train(tmp_path, *overrides: str) -> Path:
    run_dir = tmp_path / "run"
    cmd = [sys.executable, "-m", "goku_megatron.cli.train", "model.preset=tiny", "model.in_channels=4",
           "model.patch_size=[1,2,2]", "train.micro_batch_size=1", "train.global_batch_size=2",
           "train.log_interval=1", f"train.run_dir={run_dir}", "optim.warmup_steps=0", *overrides]
    env = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONWARNINGS": "ignore"}
    proc = subprocess.run(cmd, cwd=REPO, capture_output=True, text=True, timeout=600, env=env)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    return run_dir


def _metrics(run_dir: Path) -> list[dict]:
    return [json.loads(line) for line in (run_dir / "metrics.jsonl").read_text().splitlines()]


def test_raw_run_moves_through_stages_and_counts_bad_samples(data, tmp_path):
    root, vae = data
    stages = ("[{name: small, steps: 3, height: 16, width: 16, frames: 5, token_budget: 16, image_ratio: 0.25},"
              " {name: big, steps: 3, height: 32, width: 32, frames: 9, token_budget: 32, image_ratio: 0.25}]")
    run_dir = _train(tmp_path, "data.kind=raw", f"data.path={root / 'raw'}", f"data.vae_path={vae}",
                     f"data.stages={stages}", "train.steps=6", "data.decoder=auto")
    rows = _metrics(run_dir)
    assert [r["stage"] for r in rows] == [0, 0, 0, 1, 1, 1]
    # the toy recipe's in-training samples, decoded by the VAE at the last stage's 32x32, 9 frames
    samples = sorted((run_dir / "samples" / "step_0000006").iterdir())
    assert len(samples) == 4 and all(p.suffix == ".mp4" for p in samples)
    assert all(r["loss"] == r["loss"] and r["loss"] > 0 for r in rows)  # finite, not NaN
    # distinct samples: each of the two bad clips counts once, however often it is drawn
    assert 1 <= rows[-1]["bad/not_a_video"] <= 2 and rows[-1]["bad/corrupt_video"] == 0
    assert all(rows[i]["bad/not_a_video"] <= rows[i + 1]["bad/not_a_video"] for i in range(5))  # cumulative
    state = load_loader_state(latest_checkpoint(run_dir), 0)
    assert state["stage"] == 1 and len(state["bad"]["not_a_video"]) == rows[-1]["bad/not_a_video"]


def test_latent_run_from_precomputed_shards(data, tmp_path):
    root, vae = data
    latents = tmp_path / "latents"
    subprocess.run([sys.executable, "-m", "goku_megatron.cli.data", "precompute-latents",
                    "--input", str(root / "raw"), "--output", str(latents), "--vae", str(vae), "--fps", "8",
                    "--frames", "9", "--height", "32", "--width", "32"],
                   cwd=REPO, check=True, capture_output=True, timeout=600)
    run_dir = _train(tmp_path, "data.kind=latent", f"data.path={latents}", "train.steps=3",
                     "data.stages=[{steps: 3, token_budget: 40}]", "train.sample_interval=0")
    rows = _metrics(run_dir)
    assert len(rows) == 3 and rows[0]["samples_per_s"] > 0
    assert sum(rows[-1][k] for k in rows[-1] if k.startswith("bad/")) == 0  # precompute dropped them


def _fails(*overrides: str, before_model: bool = True) -> subprocess.CompletedProcess:
    """goku-train with ``overrides``, expected to stop with exit 2 (``before_model``: before the
    model is built)."""
    cmd = [sys.executable, "-m", "goku_megatron.cli.train", "model.preset=tiny", "model.in_channels=4",
           "model.patch_size=[1,2,2]", "train.micro_batch_size=1", "train.steps=2", "train.sample_interval=0",
           *overrides]
    env = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONWARNINGS": "ignore"}
    proc = subprocess.run(cmd, cwd=REPO, capture_output=True, text=True, timeout=300, env=env)
    assert proc.returncode == 2, proc.stdout[-3000:] + proc.stderr[-3000:]
    assert ("backends:" in proc.stdout) is not before_model  # logged once the model is set up
    return proc


@pytest.mark.parametrize("kind", ["latent", "raw"])
def test_missing_shards_fail_in_one_line_before_the_model(data, tmp_path, kind):
    vae = [f"data.vae_path={data[1]}"] if kind == "raw" else []
    proc = _fails(f"data.kind={kind}", f"data.path={tmp_path}", "data.stages=[{steps: 2}]", *vae)
    assert proc.stderr.strip().splitlines()[-1] == (
        f"goku-train: error: data.stages[0]: no *.tar shards in {tmp_path}; build them with "
        "goku-data prepare-shards")


@pytest.mark.parametrize("field", ["data.vae_path", "data.text_encoder_path"])
def test_missing_encoder_weights_fail_in_one_line_before_the_model(data, tmp_path, field):
    missing = tmp_path / "nowhere"
    weights = {"data.vae_path": [f"data.vae_path={missing}"],
               "data.text_encoder_path": [f"data.vae_path={data[1]}", "data.text_encoder=t5",
                                          f"data.text_encoder_path={missing}"]}[field]
    proc = _fails("data.kind=raw", f"data.path={data[0] / 'raw'}", "data.stages=[{steps: 2}]", *weights)
    (line,) = proc.stderr.strip().splitlines()[-1:]
    assert line.startswith(f"goku-train: error: {field}: {missing}: no model there")
    assert "Traceback" not in proc.stderr


def test_a_data_path_of_only_bad_samples_stops_in_one_line(tmp_path):
    with ShardWriter(tmp_path / "bad", samples_per_shard=50) as writer:
        for i in range(100):
            writer.write(f"bad{i}", {"webm": b"this is not a video" * 20, "txt": b"oops"})
    vae = make_tiny_vae(tmp_path / "vae")
    proc = _fails("data.kind=raw", f"data.path={tmp_path / 'bad'}", f"data.vae_path={vae}",
                  "data.stages=[{steps: 2, height: 16, width: 16, frames: 5, token_budget: 16}]", before_model=False)
    assert proc.stderr.strip().splitlines()[-1] == (
        f"goku-train: error: stage 0 (unnamed): none of the 100 video samples of dp rank 0 in {tmp_path / 'bad'} "
        "could be used (distinct bad samples so far: not_a_video=100); repair or replace those shards "
        "(goku-data prepare-shards leaves bad samples out)")
    skipped = [line for line in proc.stdout.splitlines() if "bad sample" in line]
    assert len(skipped) <= LOG_FIRST  # rate-limited
