"""goku-eval shapes: from a checkpoint to a ShapesBench report (accuracy seen vs held out, and the
fixed-noise validation loss), with one-line errors for what it cannot evaluate."""

from __future__ import annotations

import json
import math

import pytest
from conftest import build_stage, one_process_world
from numerics import EPS32

from goku_megatron.checkpoint import save_checkpoint
from goku_megatron.config import load_config, validate
from goku_megatron.data.toy import make_toy_dataset, read_validation
from goku_megatron.cli.eval import main
from goku_megatron.evaluation import VAL_TIMESTEPS, validation_loss
from goku_megatron.sample import Sampler

SIZE, FRAMES = 8, 4


@pytest.fixture(scope="module")
def run_dir(tmp_path_factory):
    """A toy checkpoint of 8x8x4 clips whose config names its dataset (val/ holds 32 clips)."""
    one_process_world()
    tmp = tmp_path_factory.mktemp("eval")
    make_toy_dataset(tmp / "data", clips=1, images=0, size=SIZE, frames=FRAMES, val_clips=32)
    cfg = load_config("toy", ["model.zero_init=false", f"data.toy_size={SIZE}", f"data.toy_frames={FRAMES}",
                              f"data.path={tmp / 'data'}"])
    validate(cfg, 1)
    save_checkpoint(tmp / "run", 3, [build_stage(cfg)], cfg.to_dict())
    return tmp / "run"


def test_shapes_writes_the_report(run_dir, tmp_path, capsys, megatron_world):
    out = tmp_path / "reports" / "shapes.json"
    assert main(["shapes", "--checkpoint", str(run_dir), "--out", str(out), "--samples-per-prompt", "2",
                 "--steps", "2", "--cfg-scale", "3", "--seed", "4"]) == 0
    report = json.loads(out.read_text())
    assert list(report) == ["checkpoint", "step", "sampling", "validation", "chance", "seen", "held_out", "colors",
                            "samples"]
    assert report["step"] == 3
    assert report["sampling"] == {"samples_per_prompt": 2, "steps": 2, "cfg_scale": 3.0, "seed": 4,
                                  "colors": ["red", "green", "blue", "yellow"]}
    assert (report["seen"]["clips"], report["held_out"]["clips"], len(report["samples"])) == (56, 8, 64)
    for summary in (report["seen"], report["held_out"], *report["colors"].values()):
        assert set(summary["accuracy"]) == {"color", "shape", "direction", "all"}
    assert [(c, s["clips"], sum(s["detected"].values())) for c, s in report["colors"].items()] == [
        (c, 16, 16) for c in ("red", "green", "blue", "yellow")]
    assert set(report["samples"][0]) == {"prompt", "held_out", "detected", "correct"}

    val = report["validation"]
    assert (val["clips"], val["held_out_clips"], val["timesteps"]) == (32, 4, list(VAL_TIMESTEPS))
    losses = {k: v for k, v in val.items() if k.startswith("val_loss")}
    assert len(losses) == 3 + len(VAL_TIMESTEPS) and all(math.isfinite(v) and v > 0 for v in losses.values())
    # The same numbers as the library function on the run's dataset (the default --data).
    sampler = Sampler(run_dir)
    data = read_validation(sampler.cfg.data.path)
    text, mask = sampler.text_encoder(data.captions)
    direct = validation_loss(sampler.velocity, data.pixels, text, mask, data.keys, sampler.cfg.model.patch_size,
                             held_out=data.held_out)
    assert losses == pytest.approx(direct, rel=64 * EPS32)  # means of squares: relative to themselves

    printed = capsys.readouterr().out
    assert "held-out" in printed and "val_loss" in printed and f"wrote {out}" in printed
    assert "detected colours" in printed and "\nyellow " in printed


def test_shapes_colors_samples_only_those_prompts(run_dir, tmp_path, capsys, megatron_world):
    out = tmp_path / "yellow.json"
    assert main(["shapes", "--checkpoint", str(run_dir), "--out", str(out), "--steps", "1",
                 "--samples-per-prompt", "1", "--colors", "yellow"]) == 0
    report = json.loads(out.read_text())
    assert report["sampling"]["colors"] == ["yellow"] and list(report["colors"]) == ["yellow"]
    assert [s["prompt"] for s in report["samples"]] == [
        f"a yellow {shape} moving {d}" for shape in ("square", "diamond") for d in ("left", "right", "up", "down")]
    assert report["validation"]["clips"] == 32  # the loss stays on the whole split
    assert "1 samples x 8 prompts" in capsys.readouterr().out


def test_shapes_errors_are_one_line(run_dir, tmp_path, capsys, megatron_world):
    def error(*args: str) -> str:
        assert main(["shapes", *args]) == 2
        err = capsys.readouterr().err.strip()
        assert err.count("\n") == 0 and err.startswith("goku-eval: error: ")
        return err

    missing = tmp_path / "no-such-run"
    assert f"{missing}: not a goku-train checkpoint" in error("--checkpoint", str(missing))
    assert "goku-data make-toy --out" in error("--checkpoint", str(run_dir), "--data", str(tmp_path))
    make_toy_dataset(tmp_path / "16px", clips=1, images=0, val_clips=1)  # 16x16x8: not the run's clips
    assert "pass --data with the run's toy dataset" in error("--checkpoint", str(run_dir), "--data",
                                                              str(tmp_path / "16px"))
    with pytest.raises(SystemExit) as exit_:
        main(["shapes", "--checkpoint", str(run_dir), "--colors", "yellow,purple"])
    assert exit_.value.code == 2
    assert "argument --colors: unknown toy colour(s) purple; choose from red, green, blue, yellow" in \
        capsys.readouterr().err
