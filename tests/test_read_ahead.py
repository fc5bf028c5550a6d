"""Read-ahead (data.workers): the same packs, states and bad-sample counts as the inline data path
for any number of workers; the loader state is the one of the steps handed out; a stop ends a wait
at once; an error in the thread is raised at its step; nothing waits without end; the pool's
threads decode each sample into its own caption's frames, on this process's device."""

from __future__ import annotations

import threading
import time

import numpy as np
import pytest
import torch
from tiny_models import write_latent_shards

from goku_megatron import platform
from goku_megatron.config import ConfigError, StageConfig, load_config, validate
from goku_megatron.data import dali, decode
from goku_megatron.data.encoders import PixelSpace
from goku_megatron.data.loader import SampleStream
from goku_megatron.data.pipeline import (DataWaitStopped, PackedBatches, ReadAhead, data_workers,
                                         encode_raw_sample, load_latent_sample, read_latent_sample)
from goku_megatron.data.shards import BadSamples, ShardWriter, find_shards, list_samples
from goku_megatron.data.text_encoder import HashTextEncoder
from goku_megatron.data.toy import encode_webm

SIZES = [(1, 4, 4), (3, 4, 4), (3, 6, 4), (1, 8, 8), (5, 4, 6)]
STEPS = 8


@pytest.fixture(scope="module")
def latent_shards(tmp_path_factory):
    return write_latent_shards(tmp_path_factory.mktemp("latents"), SIZES, count=40, samples_per_shard=10,
                               t5_every=4)


def _cfg(path, *extra):
    cfg = load_config(None, [
        "data.kind=latent", f"data.path={path}", "model.in_channels=4", "model.text_dim=32",
        "model.patch_size=[1,2,2]", "train.micro_batch_size=1", "train.global_batch_size=2",
        f"train.steps={STEPS}", "data.stages=[{steps: 4, token_budget: 32}, {steps: 4, token_budget: 48}]",
        *extra,
    ])
    validate(cfg, 1)
    return cfg


def _inline(cfg, workers=0, make_prepare=read_latent_sample):
    """The inline source; ``make_prepare(bad)`` gives its prepare, counting into its BadSamples."""
    bad = BadSamples(quiet=True)
    streams = {cfg.data.path: {"any": SampleStream(find_shards(cfg.data.path), dp_rank=0, dp_size=1,
                                                   seed=cfg.train.seed, bad=bad)}}
    encoder = HashTextEncoder(dim=cfg.model.text_dim, max_tokens=cfg.data.max_text_tokens)
    return PackedBatches(cfg, streams, make_prepare(bad), encoder, bad, buffer_size=6, workers=workers)


def _read_ahead(cfg, workers=2, depth=2, make_prepare=read_latent_sample):
    return ReadAhead(_inline(cfg, workers, make_prepare), depth, cfg.train.steps, torch.device("cpu"))


def _same_packs(a, b):
    assert len(a) == len(b)
    for x, y in zip(a, b):
        assert x.keys == y.keys
        for field in ("noisy", "target", "timesteps", "text", "text_mask", "loss_mask"):
            assert torch.equal(getattr(x, field), getattr(y, field)), field


@pytest.mark.parametrize("workers", [1, 2, 3])
def test_read_ahead_gives_the_inline_packs_and_states(latent_shards, workers):
    cfg = _cfg(latent_shards)
    inline, ahead = _inline(cfg), _read_ahead(cfg, workers=workers)
    try:
        for step in range(1, STEPS + 1):
            _same_packs(ahead.next_step(step), inline.next_step(step))
            # What a checkpoint after this step records: the inline state, not the read-ahead one.
            assert ahead.state_dict() == inline.state_dict()
            assert ahead.bad.as_metrics() == inline.bad.as_metrics()
    finally:
        ahead.close()


def test_a_pool_without_read_ahead_draws_what_one_at_a_time_draws(latent_shards):
    cfg = _cfg(latent_shards)
    one, pooled = _inline(cfg), _inline(cfg, workers=3)
    try:
        for step in range(1, STEPS + 1):
            _same_packs(pooled.next_step(step), one.next_step(step))
            assert pooled.state_dict() == one.state_dict() and pooled.draws == one.draws
    finally:
        pooled.close()


def test_bad_samples_are_skipped_and_counted_in_the_workers(latent_shards):
    """Every fifth sample does not load: the same draws, buffer and counts as inline."""
    cfg = _cfg(latent_shards)

    def flaky(bad):
        def prepare(raw, stage):
            if int(raw["__key__"][1:]) % 5 == 0:
                bad.record("unreadable_latent", raw["__url__"], raw["__key__"], "test")
                return None
            return load_latent_sample(raw, stage)
        return prepare

    inline, ahead = _inline(cfg, make_prepare=flaky), _read_ahead(cfg, make_prepare=flaky)
    try:
        for step in range(1, STEPS + 1):
            _same_packs(ahead.next_step(step), inline.next_step(step))
            assert ahead.bad.as_metrics() == inline.bad.as_metrics()
        assert inline.bad.as_metrics()["bad/unreadable_latent"] == 8  # k000, k005, ... k035
    finally:
        ahead.close()


def test_resume_from_a_read_ahead_state_replays_the_same_steps(latent_shards):
    cfg = _cfg(latent_shards)
    first = _read_ahead(cfg)
    try:
        for step in range(1, 4):
            first.next_step(step)
        state = first.state_dict()  # after step 3, while the thread has read steps 4 and 5
        rest = [first.next_step(step) for step in range(4, STEPS + 1)]
    finally:
        first.close()
    resumed = _read_ahead(cfg)
    resumed.load_state_dict(state)
    try:
        for step, packs in zip(range(4, STEPS + 1), rest):
            _same_packs(resumed.next_step(step), packs)
    finally:
        resumed.close()


def test_rollback_hands_the_step_out_again(latent_shards):
    cfg = _cfg(latent_shards)
    ahead = _read_ahead(cfg)
    try:
        ahead.next_step(1)
        mark = ahead.mark()
        packs = ahead.next_step(2)
        after = ahead.state_dict()
        ahead.rollback(mark)
        assert ahead.state_dict() == mark  # a checkpoint now is the one after step 1
        _same_packs(ahead.next_step(2), packs)
        assert ahead.state_dict() == after
    finally:
        ahead.close()


def test_a_stop_ends_the_wait_for_a_step_at_once(latent_shards):
    cfg = _cfg(latent_shards)
    release = threading.Event()

    def stuck(raw, stage):
        release.wait(60)
        return load_latent_sample(raw, stage)

    ahead = _read_ahead(cfg, make_prepare=lambda bad: stuck)
    state = ahead.state_dict()
    ahead.stop_requested = lambda: 15
    start = time.perf_counter()
    with pytest.raises(DataWaitStopped):
        ahead.next_step(1)
    assert time.perf_counter() - start < 5 and ahead.state_dict() == state
    release.set()
    ahead.close()  # the thread finishes its sample and ends


def test_an_error_in_the_thread_is_raised_at_its_step(latent_shards):
    cfg = _cfg(latent_shards, "data.stages=[{steps: 8, token_budget: 8}]")  # (3, 6, 4) latents: 18 tokens
    ahead = _read_ahead(cfg)
    try:
        with pytest.raises(ConfigError, match=r"over data.stages\[0\].token_budget=8; raise the budget"):
            ahead.next_step(1)
    finally:
        ahead.close()


def test_a_thread_that_ends_early_is_an_error_not_a_wait(latent_shards):
    cfg = _cfg(latent_shards, "train.steps=8")
    ahead = ReadAhead(_inline(cfg), 2, last_step=1, device=torch.device("cpu"))  # reads step 1 only
    try:
        ahead.next_step(1)
        with pytest.raises(RuntimeError, match="read-ahead thread ended before step 2"):
            ahead.next_step(2)
    finally:
        ahead.close()


def test_data_workers_from_the_cores(monkeypatch):
    monkeypatch.setattr("os.sched_getaffinity", lambda pid: set(range(16)))
    monkeypatch.setenv("LOCAL_WORLD_SIZE", "8")
    assert data_workers(-1, cuda=True) == 1 and data_workers(0, cuda=True) == 0 and data_workers(3, cuda=True) == 3
    monkeypatch.setenv("LOCAL_WORLD_SIZE", "1")
    assert data_workers(-1, cuda=True) == 8  # capped
    monkeypatch.setattr("os.sched_getaffinity", lambda pid: {0, 1})
    assert data_workers(-1, cuda=True) == 1
    # On CPU the step's threads use every core: inline unless asked for.
    assert data_workers(-1, cuda=False) == 0 and data_workers(2, cuda=False) == 2


def test_auto_decodes_with_pyav_on_cpu_and_dali_on_gpu(monkeypatch):
    """docs/data.md, "Decode throughput": on CPU PyAV beats DALI's CPU decoder; data.decoder=dali
    asks for DALI anyway."""
    monkeypatch.setattr(decode, "_logged_routes", set())
    monkeypatch.setattr(decode.dali, "available", lambda: True)
    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    assert [decode._route(c, "auto") for c in ("vp9", "h264", "image")] == ["pyav", "pyav", "pil"]
    assert [decode._route(c, "dali") for c in ("vp9", "h264")] == ["dali-cpu", "pyav"]
    assert decode._route("vp9", "pyav") == "pyav"
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    assert [decode._route(c, "auto") for c in ("vp9", "h264", "image")] == ["dali-gpu"] * 3


def test_close_does_not_wait_for_a_decode_that_never_ends(latent_shards, monkeypatch, caplog):
    cfg = _cfg(latent_shards)
    never = threading.Event()

    def stuck(raw, stage):
        never.wait(30)
        return load_latent_sample(raw, stage)

    ahead = _read_ahead(cfg, make_prepare=lambda bad: stuck)
    ahead.stop_requested = lambda: 15
    with pytest.raises(DataWaitStopped):
        ahead.next_step(1)
    monkeypatch.setattr(ReadAhead, "CLOSE_S", 0.2)
    start = time.perf_counter()
    with caplog.at_level("WARNING", logger="goku_megatron"):
        ahead.close()
    assert time.perf_counter() - start < 5 and "still decoding" in caplog.text
    never.set()  # let the abandoned decodes end


# ----------------------------------------------------------------------------------------------
# Decoding on the pool's threads

CLIPS = 48  # ids 0..63 fit the colour code below


def _colour_of(clip: int) -> np.ndarray:
    """Clip ``clip``'s one colour: red and green in steps of 32, so codecs and DALI's resize
    cannot move it to a neighbour's."""
    return np.array([32 * (clip % 8) + 16, 32 * (clip // 8) + 16, 128], np.uint8)


def _clip_of(pixels: torch.Tensor) -> int:
    """The clip id of decoded pixels [3, T, H, W] in [-1, 1]."""
    red, green, _ = ((pixels.mean(dim=(1, 2, 3)) + 1.0) * 127.5 - 16.0) / 32.0
    return int(red.round()) + 8 * int(green.round())


@pytest.fixture(scope="module")
def colour_clips(tmp_path_factory):
    """Raw shards of CLIPS lossless VP9 clips (DALI's CPU decoder takes VP9): clip i is one colour
    throughout and its caption names i."""
    with ShardWriter(tmp_path_factory.mktemp("colours"), samples_per_shard=16) as writer:
        for i in range(CLIPS):
            frames = np.broadcast_to(_colour_of(i), (8, 16, 16, 3))
            writer.write(f"clip{i:03d}", {"webm": encode_webm(frames, 8, "yuv444p"), "txt": f"clip {i}".encode()})
    bad = BadSamples()
    return [ref for shard in writer.written for ref in list_samples(shard, bad)]


needs_dali = pytest.mark.skipif(not dali.available(), reason=f"needs {dali.PIP_PACKAGE}")


# A decoder shared by the threads mostly deadlocks inside DALI rather than mixing samples up: the
# timeout (method "thread" ends the process with every thread's stack) makes that a failure too.
@pytest.mark.timeout(60, method="thread")
@pytest.mark.parametrize("decoder", [pytest.param("dali", marks=needs_dali), "pyav"])
def test_pool_threads_decode_every_sample_with_its_own_caption(colour_clips, decoder):
    """Four pool threads prepare rounds of 48 clips as read-ahead does (raw-data path, identity
    VAE), through DALI's CPU decoder (data.decoder=dali) and PyAV: every sample's frames are the
    clip its caption names."""
    cfg = load_config(None, ["data.cache_mb=0"])
    bad = BadSamples(quiet=True)
    source = PackedBatches(cfg, {}, encode_raw_sample(decoder, PixelSpace(), bad), HashTextEncoder(), bad,
                           workers=4)
    stage = StageConfig(fps=8, frames=4, height=16, width=16)
    try:
        rounds = [source._prepare_all(colour_clips, stage) for _ in range(2)]
    finally:
        source.close()
    assert not bad.counts
    for prepared in rounds:
        assert [_clip_of(p.latent) for p in prepared] == [int(p.caption.split()[1]) for p in prepared]
        assert [p.caption for p in prepared] == [f"clip {i}" for i in range(CLIPS)]


def test_pool_threads_work_on_the_local_ranks_gpu(latent_shards, monkeypatch):
    """Each pool thread makes the local rank's GPU (platform.local_device: $LOCAL_RANK) its CUDA
    device before it prepares a sample: a thread left alone would decode on GPU 0 in every rank."""
    monkeypatch.setattr(platform, "has_cuda", lambda: True)
    monkeypatch.setenv("LOCAL_RANK", "3")
    chosen: dict[str, torch.device] = {}
    monkeypatch.setattr(torch.cuda, "set_device",
                        lambda device: chosen.setdefault(threading.current_thread().name, device))
    prepared_on: set[str] = set()

    def recording(bad):
        prepare = read_latent_sample(bad)

        def on_thread(raw, stage):
            prepared_on.add(threading.current_thread().name)
            return prepare(raw, stage)
        return on_thread

    source = _inline(_cfg(latent_shards), workers=3, make_prepare=recording)
    try:
        source.next_step(1)
    finally:
        source.close()
    assert prepared_on and all(name.startswith("goku-data") for name in prepared_on)
    assert prepared_on <= set(chosen) and set(chosen.values()) == {torch.device("cuda", 3)}
