"""The packed data path of raw/latent runs: stages, packing from the buffer, image/video mixing,
DP split, and a resume from the saved loader state that continues with the same samples."""

from __future__ import annotations

import json
import math

import pytest
import torch
from tiny_models import tensor_bytes, write_latent_shards

from goku_megatron.config import load_config, validate
from goku_megatron.data.loader import SampleStream
from goku_megatron.data.pipeline import PackedBatches, Prepared, load_latent_sample
from goku_megatron.data.shards import BadSamples, find_shards
from goku_megatron.data.text_encoder import HashTextEncoder

SIZES = [(1, 4, 4), (3, 4, 4), (3, 6, 4), (1, 8, 8), (5, 4, 6)]  # latent (T, H, W)


@pytest.fixture(scope="module")
def latent_shards(tmp_path_factory):
    return write_latent_shards(tmp_path_factory.mktemp("latents"), SIZES, count=40, samples_per_shard=10,
                               t5_every=4)  # some samples carry precomputed text tokens


def _cfg(path, *extra):
    cfg = load_config(None, [
        "data.kind=latent", f"data.path={path}", "model.in_channels=4", "model.text_dim=32",
        "model.patch_size=[1,2,2]", "train.micro_batch_size=1", "train.global_batch_size=2",
        "train.steps=6", "data.stages=[{steps: 3, token_budget: 32}, {steps: 3, token_budget: 48}]",
        *extra,
    ])
    validate(cfg, 1)
    return cfg


def _source(cfg, dp_rank=0, dp_size=1):
    bad = BadSamples()
    streams = {cfg.data.path: {"any": SampleStream(find_shards(cfg.data.path), dp_rank=dp_rank,
                                                   dp_size=dp_size, seed=cfg.train.seed, bad=bad)}}
    encoder = HashTextEncoder(dim=cfg.model.text_dim, max_tokens=cfg.data.max_text_tokens)
    return PackedBatches(cfg, streams, load_latent_sample, encoder, bad, buffer_size=6)


def _step_keys(source, step):
    return [p.keys for p in source.next_step(step)]


def test_packs_follow_the_stage_budget(latent_shards):
    cfg = _cfg(latent_shards)
    source = _source(cfg)
    for step in range(1, 7):
        packs = source.next_step(step)
        assert len(packs) == 2  # global batch 2 packs, dp 1
        budget = 32 if step <= 3 else 48
        for pack in packs:
            assert pack.budget == budget and pack.noisy.shape == (budget, 4 * 4)
            real = sum(math.prod(g) for g in pack.grids)
            assert 0 < real <= budget and int(pack.loss_mask.sum()) == real
    assert source.buffer  # leftovers wait for the next pack


def test_no_sample_lost_or_repeated_within_an_epoch(latent_shards):
    source = _source(_cfg(latent_shards, "data.stages=[{steps: 6, token_budget: 400}]"))
    seen = [k for step in range(1, 7) for keys in _step_keys(source, step) for k in keys]
    assert set(seen) == {f"k{i:03d}" for i in range(40)}
    # packing reorders at most the buffer (6 samples), so the epoch boundary blurs by that much
    assert len(set(seen[:40 - 6])) == 40 - 6


def test_stored_text_tokens_are_used(latent_shards):
    cfg = _cfg(latent_shards, "flow.caption_dropout=0")
    source = _source(cfg)
    pack = source.next_step(1)[0]
    for i, key in enumerate(pack.keys):
        n = int(pack.text_mask[i].sum())
        if int(key[1:]) % 4 == 0:
            assert n == 3  # the stored [3, 32] tokens, not the hash encoding of the caption
        else:
            emb, mask = HashTextEncoder(dim=32, max_tokens=cfg.data.max_text_tokens)([f"sample {int(key[1:])}"])
            assert torch.equal(pack.text[i, :n], emb[0, mask[0]])  # copied word vectors


def test_resume_continues_with_the_same_samples(latent_shards):
    cfg = _cfg(latent_shards)
    reference = _source(cfg)
    expected = [_step_keys(reference, s) for s in range(1, 7)]
    first = _source(cfg)
    got = [_step_keys(first, s) for s in range(1, 3)]
    state = json.loads(json.dumps(first.state_dict()))  # as written beside a checkpoint
    resumed = _source(cfg)
    resumed.load_state_dict(state)
    got += [_step_keys(resumed, s) for s in range(3, 7)]
    assert got == expected
    # and the tensors too, not only the keys
    again = _source(cfg)
    again.load_state_dict(state)
    p1, p2 = again.next_step(3)[0], _source_at(cfg, 3)[0]
    assert torch.equal(p1.noisy, p2.noisy)  # noise seeded per sample: bitwise after a resume


def _source_at(cfg, step):
    source = _source(cfg)
    for s in range(1, step):
        source.next_step(s)
    return source.next_step(step)


def test_dp_ranks_get_disjoint_samples(latent_shards):
    cfg = _cfg(latent_shards, "data.stages=[{steps: 6, token_budget: 400}]")
    keys = []
    for rank in range(2):
        source = _source(cfg, rank, 2)
        keys.append({k for keys in _step_keys(source, 1) for k in keys})
    assert keys[0] and keys[1] and not keys[0] & keys[1]


def test_oversized_sample_names_the_fix(latent_shards):
    source = _source(_cfg(latent_shards, "data.stages=[{steps: 6, token_budget: 8}]"))
    with pytest.raises(ValueError, match=r"over data.stages\[0\].token_budget=8; raise the budget"):
        for step in range(1, 7):
            source.next_step(step)


def test_image_ratio_mixes_streams(latent_shards):
    cfg = _cfg(latent_shards, "data.stages=[{steps: 6, token_budget: 400, image_ratio: 0.5}]")
    picked = {"image": 0, "video": 0}

    def stream(kind):
        s = SampleStream(find_shards(cfg.data.path), dp_rank=0, dp_size=1, seed=0, bad=BadSamples())
        real = s.next_ref

        def next_ref():
            picked[kind] += 1
            return real()
        s.next_ref = next_ref
        return s

    source = PackedBatches(cfg, {cfg.data.path: {"video": stream("video"), "image": stream("image")}}, load_latent_sample,
                           HashTextEncoder(dim=32, max_tokens=16), BadSamples(), buffer_size=6)
    for step in range(1, 7):
        source.next_step(step)
    total = picked["image"] + picked["video"]
    assert total >= 20 and 0.25 < picked["image"] / total < 0.75


def test_bad_samples_are_skipped(latent_shards):
    cfg = _cfg(latent_shards)
    calls = []

    def flaky(raw, stage):
        calls.append(raw["__key__"])
        return None if len(calls) % 3 == 0 else load_latent_sample(raw, stage)

    bad = BadSamples()
    stream = SampleStream(find_shards(cfg.data.path), dp_rank=0, dp_size=1, seed=0, bad=bad)
    source = PackedBatches(cfg, {cfg.data.path: {"any": stream}}, flaky, HashTextEncoder(dim=32, max_tokens=16), bad)
    packs = source.next_step(1)
    used = {k for p in packs for k in p.keys}
    skipped = {k for i, k in enumerate(calls, 1) if i % 3 == 0}
    assert used and not used & skipped
    assert isinstance(load_latent_sample({"latent.pth": tensor_bytes(torch.zeros(1)), "txt": b"a"}, None), Prepared)
