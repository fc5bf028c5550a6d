"""Read-ahead (data.workers): the same packs, states and bad-sample counts as the inline data path
for any number of workers; the loader state is the one of the steps handed out; a stop ends a wait
at once; an error in the thread is raised at its step; nothing waits without end."""

from __future__ import annotations

import threading
import time

import pytest
import torch
from tiny_models import write_latent_shards

from goku_megatron.config import ConfigError, load_config, validate
from goku_megatron.data import decode
from goku_megatron.data.loader import SampleStream
from goku_megatron.data.pipeline import (DataWaitStopped, PackedBatches, ReadAhead, data_workers,
                                         load_latent_sample, read_latent_sample)
from goku_megatron.data.shards import BadSamples, find_shards
from goku_megatron.data.text_encoder import HashTextEncoder

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
