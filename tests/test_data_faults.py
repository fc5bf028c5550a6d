"""Data faults fail loudly and count honestly: a data path without a usable sample stops in one
line (no endless retry), a stop request ends a data wait with the source rolled back to the start
of the step, bad samples are counted once each (across streams, epochs and a resume), their log
lines are rate-limited, and unreadable metadata is counted while the sample is kept."""

from __future__ import annotations

import json
import logging
import shutil
import time
from pathlib import Path

import pytest
import torch
from tiny_models import tensor_bytes, write_latent_shards

from goku_megatron.config import ConfigError, load_config, validate
from goku_megatron.data.decode import decode_sample
from goku_megatron.data.frames import FrameSpec
from goku_megatron.data.encoders import PixelSpace
from goku_megatron.data.loader import SampleStream
from goku_megatron.data.pipeline import DataWaitStopped, PackedBatches, encode_raw_sample, read_latent_sample
from goku_megatron.data.shards import LOG_EVERY, LOG_FIRST, BadSamples, ShardWriter, find_shards
from goku_megatron.data.text_encoder import HashTextEncoder
from goku_megatron.data.toy import ToySample, encode_webm

SIZES = [(1, 4, 4), (3, 4, 4)]


def _latent_cfg(path, *extra):
    cfg = load_config(None, ["data.kind=latent", f"data.path={path}", "model.in_channels=4", "model.text_dim=32",
                             "model.patch_size=[1,2,2]", "train.micro_batch_size=1", "train.global_batch_size=2",
                             "train.steps=40", "data.stages=[{steps: 40, token_budget: 32}]", *extra])
    validate(cfg, 1)
    return cfg


def _latent_source(cfg, bad=None):
    bad = bad or BadSamples()
    streams = {cfg.data.path: {"any": SampleStream(find_shards(cfg.data.path), dp_rank=0, dp_size=1,
                                                   seed=cfg.train.seed, bad=bad)}}
    return PackedBatches(cfg, streams, read_latent_sample(bad), HashTextEncoder(dim=32, max_tokens=16), bad,
                         buffer_size=6)


@pytest.fixture(scope="module")
def damaged_latents(tmp_path_factory):
    """20 good latent samples, 3 whose latent.pth is damaged and 1 without a caption."""
    root = write_latent_shards(tmp_path_factory.mktemp("damaged"), SIZES, count=20, samples_per_shard=6)
    good = tensor_bytes(torch.zeros(4, 1, 4, 4))
    with ShardWriter(root, prefix="extra", samples_per_shard=10) as writer:
        for i in range(3):
            writer.write(f"broken{i}", {"latent.pth": good[: len(good) // 2], "txt": b"half a tensor"})
        writer.write("nocaption", {"latent.pth": good})
    return root


@pytest.fixture(scope="module")
def only_bad_latents(tmp_path_factory):
    root = tmp_path_factory.mktemp("only_bad")
    with ShardWriter(root, samples_per_shard=4) as writer:
        for i in range(8):
            writer.write(f"broken{i}", {"latent.pth": b"\x00" * 64, "txt": b"nothing to load"})
    return root


def test_bad_samples_count_once_each_over_epochs_and_a_resume(damaged_latents):
    cfg = _latent_cfg(damaged_latents)
    source = _latent_source(cfg)
    prepared = []
    real = source.prepare
    source.prepare = lambda raw, stage: prepared.append(raw["__key__"]) or real(raw, stage)
    for step in range(1, 31):  # 23 listed samples, about 5 per step: several epochs
        source.next_step(step)
    assert source.streams[cfg.data.path]["any"].state.epoch >= 3
    truth = {"bad/unreadable_latent": 3, "bad/missing_caption": 1}
    got = source.bad.as_metrics()
    assert {k: got[k] for k in truth} == truth and sum(got.values()) == 4
    # every epoch met the damaged samples again: they were neither recounted nor decoded again
    assert sorted(k for k in prepared if k.startswith("broken")) == ["broken0", "broken1", "broken2"]

    first = _latent_source(cfg)
    for step in range(1, 12):
        first.next_step(step)
    state = json.loads(json.dumps(first.state_dict()))
    resumed = _latent_source(cfg)
    resumed.load_state_dict(state)
    for step in range(12, 31):
        resumed.next_step(step)
    assert resumed.bad.as_metrics() == got


def test_two_streams_listing_one_shard_count_its_bad_sample_once(tmp_path):
    with ShardWriter(tmp_path, samples_per_shard=10) as writer:
        writer.write("clip", {"webm": b"clip bytes", "txt": b"a clip"})
        writer.write("still", {"png": b"png bytes", "txt": b"a still"})
        writer.write("nocaption", {"webm": b"clip bytes"})
    bad = BadSamples()
    for kind in ("video", "image"):
        SampleStream(find_shards(tmp_path), dp_rank=0, dp_size=1, seed=0, bad=bad, kind=kind).epoch_order(0)
    assert bad.as_metrics()["bad/missing_caption"] == 1


def test_few_shards_over_dp_ranks_count_a_listing_bad_sample_once(tmp_path):
    """One shard, two DP ranks: both list it, their counts (summed over DP by the trainer) hold
    its sample without caption once."""
    with ShardWriter(tmp_path, samples_per_shard=10) as writer:
        for i in range(4):
            writer.write(f"clip{i}", {"webm": b"clip bytes", "txt": b"a clip"})
        writer.write("nocaption", {"webm": b"clip bytes"})
    counters = [BadSamples(), BadSamples()]
    for rank, bad in enumerate(counters):
        stream = SampleStream(find_shards(tmp_path), dp_rank=rank, dp_size=2, seed=0, bad=bad)
        assert len(stream.epoch_order(0)) == 2
    assert sum(bad.as_metrics()["bad/missing_caption"] for bad in counters) == 1


def test_skips_are_logged_one_by_one_then_in_summaries(caplog):
    bad = BadSamples()
    with caplog.at_level(logging.WARNING, logger="goku_megatron"):
        for i in range(3 * LOG_EVERY):
            bad.record("corrupt_video", "shard-0.tar", f"k{i % 7}")
    assert len(caplog.records) == LOG_FIRST + 3
    assert caplog.records[-1].getMessage().startswith(
        f"bad samples: {3 * LOG_EVERY} skips so far, distinct by kind corrupt_video=7;")
    assert bad.counts["corrupt_video"] == 7


def test_unreadable_json_is_counted_and_the_sample_kept():
    pixels = ToySample.draw(0, still=False, size=16, frames=8, seed=0).render(16, 8)
    raw = {"__key__": "k", "__url__": "s.tar", "webm": encode_webm(pixels, 8), "txt": b"a clip", "json": b"{oops"}
    bad = BadSamples()
    sample = decode_sample(raw, FrameSpec(fps=8.0, frames=8, height=16, width=16), bad, backend="pyav")
    assert sample is not None and sample.meta == {}
    assert bad.as_metrics()["bad/unreadable_json"] == 1 and not bad.is_bad("s.tar", "k")


def test_a_data_path_of_only_bad_samples_stops_in_one_line(only_bad_latents):
    cfg = _latent_cfg(only_bad_latents)
    source = _latent_source(cfg)
    start = time.perf_counter()
    with pytest.raises(ConfigError) as err:
        source.next_step(1)
    assert time.perf_counter() - start < 10
    message = str(err.value)
    assert "\n" not in message
    assert message.startswith(f"stage 0 (unnamed): none of the 8 samples of dp rank 0 in {only_bad_latents} "
                              "could be used (distinct bad samples so far: unreadable_latent=8); repair or replace")


def test_max_bad_in_a_row_bounds_a_draw(damaged_latents, only_bad_latents):
    cfg = _latent_cfg(only_bad_latents, "data.max_bad_in_a_row=3")
    with pytest.raises(ConfigError, match=r"^stage 0 \(unnamed\): 3 samples in a row of dp rank 0 in "):
        _latent_source(cfg).next_step(1)
    _latent_source(_latent_cfg(damaged_latents, "data.max_bad_in_a_row=3")).next_step(1)  # scattered: fine


def test_an_image_stage_whose_only_image_is_bad_stops_at_once(toy_data, tmp_path):
    """Good clips, one corrupt still, image_ratio 1: the image stream's one pass finds nothing."""
    cfg = load_config("toy", [f"data.path={toy_data}", "data.toy_images=0", "data.image_ratio=1.0"])
    validate(cfg, 1)
    (stage,) = cfg.data.stages
    shard_dir = tmp_path / "mixed"
    with ShardWriter(shard_dir, samples_per_shard=8) as writer:
        for i in range(6):
            pixels = ToySample.draw(i, still=False, size=16, frames=8, seed=0).render(16, 8)
            writer.write(f"clip{i}", {"webm": encode_webm(pixels, 8), "txt": b"a red square moving left"})
        writer.write("still", {"png": b"not a png at all", "txt": b"a blue diamond"})
    cfg.data.path = str(shard_dir)
    bad = BadSamples()
    streams = {str(shard_dir): {kind: SampleStream(find_shards(shard_dir), dp_rank=0, dp_size=1, seed=0, bad=bad,
                                                   kind=kind) for kind in ("video", "image")}}
    source = PackedBatches(cfg, streams, encode_raw_sample("pyav", PixelSpace(), bad),
                           HashTextEncoder(dim=cfg.model.text_dim, max_tokens=16), bad)
    with pytest.raises(ConfigError) as err:
        source.next_step(1)
    assert str(err.value) == (
        f"stage 0 ({stage.name}): none of the 1 image samples of dp rank 0 in {shard_dir} could be used "
        "(distinct bad samples so far: unreadable_image=1); repair or replace those shards "
        "(goku-data prepare-shards leaves bad samples out), or set the stage's image_ratio to 0")


def test_a_stop_request_ends_a_data_wait_and_rolls_the_step_back(damaged_latents):
    cfg = _latent_cfg(damaged_latents)
    reference = _latent_source(cfg)
    want = [[p.keys for p in reference.next_step(step)] for step in range(1, 7)]

    source = _latent_source(cfg)
    for step in range(1, 4):
        source.next_step(step)
    before = json.dumps(source.state_dict())
    draws = []
    source.stop_requested = lambda: len(draws) >= 2  # set while the step's samples are drawn
    real = source.prepare
    source.prepare = lambda raw, stage: draws.append(raw["__key__"]) or real(raw, stage)
    with pytest.raises(DataWaitStopped):
        source.next_step(4)
    assert len(draws) == 2 and json.dumps(source.state_dict()) == before
    source.stop_requested = lambda: 0
    got = [[p.keys for p in source.next_step(step)] for step in range(4, 7)]
    assert got == want[3:]


def test_a_missing_validation_split_fails_in_one_line_before_the_model(toy_data, tmp_path, megatron_world):
    from conftest import TOY_CHECKPOINT_RUN

    from goku_megatron.train import run

    shutil.copytree(toy_data, tmp_path / "toy")
    shutil.rmtree(tmp_path / "toy" / "val")
    cfg = load_config("toy", [*TOY_CHECKPOINT_RUN, f"data.path={tmp_path / 'toy'}", "train.eval_interval=2",
                              f"train.run_dir={tmp_path / 'run'}", "data.create_if_missing=false"])
    validate(cfg, 1)
    with pytest.raises(ConfigError) as err:
        run(cfg)
    assert str(err.value).startswith(f"train.eval_interval=2 evaluates on the toy validation split: "
                                     f"{tmp_path / 'toy' / 'val' / 'manifest.json'} missing")
    assert "\n" not in str(err.value) and not (tmp_path / "run").exists()  # nothing set up


# ------------------------------------------------------------------------------------------------
# Shards that cannot be read while the run reads them (data/shards.py: with_retries)


@pytest.fixture
def sleeps(monkeypatch):
    """The back-off of shard retries, recorded instead of slept."""
    slept: list[float] = []
    monkeypatch.setattr(time, "sleep", slept.append)
    return slept


def _spoil(shard, how: str) -> None:
    if how == "deleted":
        shard.unlink()
    elif how == "replaced_by_a_directory":  # tests run as root: chmod 000 would not stop a read
        shard.unlink()
        shard.mkdir()
    else:  # cut short: members its listing found lie past the new end
        shard.write_bytes(shard.read_bytes()[:1024])


@pytest.mark.parametrize("how", ["deleted", "replaced_by_a_directory", "cut_short"])
def test_a_shard_that_goes_bad_mid_run_is_retried_then_skipped_and_counted(tmp_path, sleeps, caplog, how):
    root = write_latent_shards(tmp_path / "latents", SIZES, count=24, samples_per_shard=6)
    cfg = _latent_cfg(root)
    source = _latent_source(cfg)
    source.next_step(1)
    shard = find_shards(root)[2]
    _spoil(shard, how)
    with caplog.at_level(logging.WARNING, logger="goku_megatron"):
        for step in range(2, 20):  # several epochs: every sample of the shard is drawn again
            source.next_step(step)
    skipped = source.bad.seen["unreadable_shard"]
    assert {s for s, _ in skipped} == {str(shard)} and len(skipped) >= (6 if how != "cut_short" else 5)
    assert source.bad.as_metrics()["bad/unreadable_shard"] == len(skipped)
    lines = [r.getMessage() for r in caplog.records]
    assert len(lines) == 1 and lines[0].startswith(f"shard {shard} cannot be read (")
    assert lines[0].endswith("3 tries over 1.5 s): its samples are skipped and counted as bad/unreadable_shard")
    assert sleeps == [0.5, 1.0]  # retried once with a back-off; its later samples are skipped at once


def test_a_shard_read_that_fails_briefly_is_retried_and_the_sample_kept(tmp_path, sleeps, monkeypatch):
    from goku_megatron.data import shards

    root = write_latent_shards(tmp_path / "latents", SIZES, count=12, samples_per_shard=6)
    cfg = _latent_cfg(root)
    reference = _latent_source(cfg)
    want = [[p.keys for p in reference.next_step(step)] for step in (1, 2)]
    failures = [OSError(5, "Input/output error")] * 2  # a file server's hiccup

    def flaky_open(path, *args, **kwargs):
        if failures:
            raise failures.pop()
        return open(path, *args, **kwargs)

    source = _latent_source(cfg)
    source.next_step(1)
    monkeypatch.setattr(shards, "open", flaky_open, raising=False)
    assert [p.keys for p in source.next_step(2)] == want[1]
    assert sleeps == [0.5, 1.0] and not source.bad.counts


def test_a_data_path_whose_shards_all_vanish_stops_in_one_line(tmp_path, sleeps):
    root = write_latent_shards(tmp_path / "latents", SIZES, count=12, samples_per_shard=6)
    source = _latent_source(_latent_cfg(root))
    source.next_step(1)
    for shard in find_shards(root):
        shard.unlink()
    with pytest.raises(ConfigError) as err:
        for step in range(2, 10):
            source.next_step(step)
    assert "\n" not in str(err.value)
    assert str(err.value).startswith(f"stage 0 (unnamed): none of the 12 samples of dp rank 0 in {root} could be "
                                     "used (distinct bad samples so far: unreadable_shard=")
    assert len(sleeps) == 2 * 2  # each shard retried once


def test_a_resume_whose_buffered_samples_lie_in_a_vanished_shard_goes_on(tmp_path, sleeps):
    """The loader state names the shards of the samples waiting in the packing buffer; one of them
    gone must not stop the resume (every restart would meet it again)."""
    root = write_latent_shards(tmp_path / "latents", SIZES, count=24, samples_per_shard=6)
    cfg = _latent_cfg(root)
    source = _latent_source(cfg)
    for step in range(1, 4):
        source.next_step(step)
    state = json.loads(json.dumps(source.state_dict()))
    gone = state["buffer"][0]["shard"]
    Path(gone).unlink()
    resumed = _latent_source(cfg)
    resumed.load_state_dict(state)
    for step in range(4, 8):
        resumed.next_step(step)
    assert {s for s, _ in resumed.bad.seen["unreadable_shard"]} == {gone}


def test_a_shard_that_cannot_even_be_listed_is_counted_once(tmp_path, sleeps):
    """A restart finds a directory where a shard was (or an unreachable file): its listing is
    retried, then the shard counts as one unreadable_shard entry (key "*") and the others train."""
    root = write_latent_shards(tmp_path / "latents", SIZES, count=12, samples_per_shard=6)
    (root / "shard-00002.tar").mkdir()
    source = _latent_source(_latent_cfg(root))
    source.next_step(1)
    assert source.bad.seen == {"unreadable_shard": {(str(root / "shard-00002.tar"), "*")}}
    assert sleeps == [0.5, 1.0]
