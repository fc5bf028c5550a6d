"""Image-to-video (model.i2v): the first-frame condition in the model, one clip and packed, the
finetune from a text-to-video checkpoint (checkpoint.init_from) and goku-sample --image."""

from __future__ import annotations

import json
import os
import subprocess
import sys

import av
import numpy as np
import pytest
import torch
from conftest import REPO, build_stage
from numerics import assert_close_to_scale
from PIL import Image

from goku_megatron import flow
from goku_megatron.checkpoint import latest_checkpoint, load_model_weights
from goku_megatron.config import ConfigError, load_config, validate
from goku_megatron.batch import PackSample, build_pack, pack_batch
from goku_megatron.cli.sample import main as sample_main

C, L, TEXT_DIM = 4, 5, 32


def _cfg(*overrides: str):
    return load_config(None, ["model.zero_init=false", f"model.in_channels={C}", f"model.text_dim={TEXT_DIM}",
                              "model.patch_size=[1,2,2]", *overrides])


def _clip(seed: int, t: int = 3, h: int = 4, w: int = 6) -> tuple[torch.Tensor, ...]:
    g = torch.Generator().manual_seed(seed)
    x1 = torch.randn(1, C, t, h, w, generator=g)
    text = torch.randn(1, L, TEXT_DIM, generator=g)
    return x1, torch.randn(1, C, t, h, w, generator=g), text, torch.ones(1, L, dtype=torch.bool)


def _one(noisy, t, text, mask, cond=None, target=None):
    """A batch as the model takes it: one pack."""
    return pack_batch(noisy, t, text, mask, (1, 2, 2), cond=cond, target=target)


def _perturbed_i2v_model():
    model = build_stage(_cfg("model.i2v=true"))
    with torch.no_grad():  # leave the identity start, so the condition matters
        model.image_cond.weight.add_(0.1 * torch.randn(model.image_cond.weight.shape,
                                                       generator=torch.Generator().manual_seed(3)))
    return model


def test_first_frame_condition_broadcasts_frame_zero():
    x = torch.arange(2 * 3 * 4 * 2 * 2, dtype=torch.float32).reshape(2, 3, 4, 2, 2)
    cond = flow.first_frame_condition(x)
    assert cond.shape == x.shape
    for t in range(4):
        assert torch.equal(cond[:, :, t], x[:, :, 0])
    assert torch.equal(flow.first_frame_condition(x[0]), cond[0])  # [C, T, H, W] too


def test_i2v_model_starts_as_the_text_to_video_model(megatron_world):
    t2v, i2v = build_stage(_cfg()), build_stage(_cfg("model.i2v=true"))
    x1, noisy, text, mask = _clip(0)
    t = torch.tensor([0.4])
    with torch.no_grad():
        reference = t2v(_one(noisy, t, text, mask))
        conditioned = i2v(_one(noisy, t, text, mask, flow.first_frame_condition(x1)))
        other_frame = i2v(_one(noisy, t, text, mask, torch.randn_like(x1)))
    # [I | 0] adds exact zeros to exact copies: bitwise on any kernel
    torch.testing.assert_close(conditioned, reference, rtol=0, atol=0)
    torch.testing.assert_close(other_frame, reference, rtol=0, atol=0)


def test_i2v_condition_is_used_and_trained(megatron_world):
    model = _perturbed_i2v_model()
    x1, noisy, text, mask = _clip(1)
    t = torch.tensor([0.4])
    pack = _one(noisy, t, text, mask, flow.first_frame_condition(x1), target=x1 - noisy)
    out = model(pack)
    with torch.no_grad():
        other = model(_one(noisy, t, text, mask, flow.first_frame_condition(torch.randn_like(x1))))
    assert (out - other).abs().mean() > 1e-3
    flow.flow_loss(out, pack).backward()
    patch_dim = C * 4
    cond_grad = model.image_cond.weight.grad[:, patch_dim:]
    assert cond_grad.abs().sum() > 0  # the first-frame half of the mapping learns


def test_i2v_without_condition_is_refused(megatron_world):
    model = build_stage(_cfg("model.i2v=true"))
    _, noisy, text, mask = _clip(2)
    with pytest.raises(ValueError, match="first-frame condition"):
        model(_one(noisy, torch.tensor([0.5]), text, mask))


def test_packed_i2v_matches_each_sample_alone(megatron_world):
    model = _perturbed_i2v_model()
    clips = [_clip(10, 3, 4, 6), _clip(11, 2, 6, 4)]
    samples = [PackSample(noisy=n[0], target=torch.zeros_like(n[0]), timestep=0.3 + 0.2 * i, text=e[0],
                          text_mask=m[0], key=f"s{i}", cond=flow.first_frame_condition(x1[0]))
               for i, (x1, n, e, m) in enumerate(clips)]
    pack = build_pack(samples, budget=3 * 2 * 3 + 2 * 3 * 2 + 4, patch=(1, 2, 2))
    assert pack.cond is not None and pack.cond.shape == pack.noisy.shape
    with torch.no_grad():
        out = model(pack)
        cu = pack.cu_seqlens.tolist()
        for i, (x1, n, e, m) in enumerate(clips):
            alone = model(_one(n, torch.tensor([0.3 + 0.2 * i]), e, m, flow.first_frame_condition(x1)))
            assert_close_to_scale(out[cu[i]:cu[i + 1]], alone, ulps=64)


def test_pack_refuses_mixed_conditions():
    x = torch.zeros(C, 1, 2, 2)
    with_cond = PackSample(x, x, 0.5, torch.zeros(L, TEXT_DIM), torch.ones(L, dtype=torch.bool), "a", cond=x)
    without = PackSample(x, x, 0.5, torch.zeros(L, TEXT_DIM), torch.ones(L, dtype=torch.bool), "b")
    with pytest.raises(ValueError, match="some samples carry an I2V"):
        build_pack([with_cond, without], budget=4, patch=(1, 2, 2))


def test_config_rules():
    with pytest.raises(ConfigError, match="image_ratio"):
        validate(load_config("toy", ["model.i2v=true", "data.image_ratio=0.5", "train.sample_interval=0"]), 1)
    with pytest.raises(ConfigError, match="in-training samples are text-to-video"):
        validate(load_config("toy", ["model.i2v=true"]), 1)
    validate(load_config("toy", ["model.i2v=true", "train.sample_interval=0"]), 1)


# ------------------------------------------------------------------------------------------------
# End to end: T2V run -> I2V finetune from its weights -> goku-sample --image


def _train(tmp, name: str, *overrides: str) -> subprocess.CompletedProcess:
    cmd = [sys.executable, "-m", "goku_megatron.cli.train", "train.steps=3", f"train.run_dir={tmp / name}",
           f"data.path={tmp / 'data'}", "data.toy_clips=32", "data.toy_size=8", "data.toy_frames=4",
           "model.num_layers=2", "model.hidden_size=64", "model.ffn_hidden_size=128",
           "train.global_batch_size=8", "train.micro_batch_size=8", "train.log_interval=1",
           "optim.warmup_steps=1", "checkpoint.async_save=false", "train.sample_interval=0", *overrides]
    proc = subprocess.run(cmd, cwd=REPO, capture_output=True, text=True, timeout=600,
                          env={**os.environ, "PYTHONWARNINGS": "ignore"})
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    return proc


@pytest.fixture(scope="module")
def finetune(tmp_path_factory):
    tmp = tmp_path_factory.mktemp("i2v")
    _train(tmp, "t2v")
    proc = _train(tmp, "i2v", "model.i2v=true", f"checkpoint.init_from={tmp / 't2v'}", "optim.lr=1e-12",
                  "optim.min_lr=0", "checkpoint.ema_decay=0")
    return tmp, proc.stdout


def test_finetune_starts_from_the_text_to_video_weights(finetune, megatron_world):
    tmp, stdout = finetune
    assert "finetuning: trained weights from" in stdout
    t2v_cfg = load_config("toy", ["model.num_layers=2", "model.hidden_size=64", "model.ffn_hidden_size=128"])
    t2v = build_stage(t2v_cfg)
    load_model_weights(latest_checkpoint(tmp / "t2v"), [t2v])
    i2v = build_stage(load_config("toy", ["model.num_layers=2", "model.hidden_size=64",
                                          "model.ffn_hidden_size=128", "model.i2v=true"]))
    load_model_weights(latest_checkpoint(tmp / "i2v"), [i2v])
    t2v_weights = t2v.state_dict()
    for name, value in i2v.state_dict().items():
        if name.startswith("image_cond.") or name.endswith("_extra_state"):
            continue
        # lr 1e-12: three finetuning steps move nothing measurably
        torch.testing.assert_close(value, t2v_weights[name], rtol=0, atol=1e-9, msg=name)
    patch_dim = 3 * 8
    weight = i2v.image_cond.weight
    torch.testing.assert_close(weight[:, :patch_dim], torch.eye(patch_dim), rtol=0, atol=1e-9)
    records = [json.loads(line) for line in (tmp / "i2v" / "metrics.jsonl").read_text().splitlines()]
    assert [r["step"] for r in records] == [1, 2, 3]


def test_sample_from_a_first_frame(finetune, tmp_path, capsys, megatron_world):
    tmp, _ = finetune
    frame = np.zeros((8, 8, 3), dtype=np.uint8)
    frame[2:6, 2:6] = (255, 0, 0)
    Image.fromarray(frame).save(tmp_path / "first.png")
    assert sample_main(["--checkpoint", str(tmp / "i2v"), "--prompt", "a red square moving left",
                        "--image", str(tmp_path / "first.png"), "--out", str(tmp_path / "out"),
                        "--steps", "2"]) == 0
    (video,) = (tmp_path / "out").iterdir()
    with av.open(str(video)) as container:
        frames = [f.to_ndarray(format="rgb24") for f in container.decode(video=0)]
    assert len(frames) == 4 and frames[0].shape == (8, 8, 3)
    assert sample_main(["--checkpoint", str(tmp / "i2v"), "--prompt", "x"]) == 2
    assert "pass the first frame with --image" in capsys.readouterr().err
    assert sample_main(["--checkpoint", str(tmp / "t2v"), "--prompt", "x",
                        "--image", str(tmp_path / "first.png")]) == 2
    assert "not an image-to-video model" in capsys.readouterr().err


def test_checkpoints_from_before_i2v_resume_as_text_to_video(tmp_path):
    """A checkpoint whose config predates model.i2v is a T2V model: it resumes a T2V run and is
    refused by an I2V one (which starts from it with checkpoint.init_from instead)."""
    from goku_megatron.checkpoint import check_compatible

    cfg = load_config("toy", [])
    saved = {k: v for k, v in cfg.to_dict()["model"].items() if k != "i2v"}
    check_compatible({"config": {"model": saved}}, cfg, tmp_path)
    with pytest.raises(ConfigError, match=r"saved for another model: model.i2v False \(checkpoint\) vs True"):
        check_compatible({"config": {"model": saved}}, load_config("toy", ["model.i2v=true"]), tmp_path)
