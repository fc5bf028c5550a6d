"""Shards: byte-identical writing with DALI index files, the bad samples found while listing a shard
(truncated tar, missing caption, missing media), and the DP-sharded, seeded, resumable stream."""

from __future__ import annotations

import logging
from pathlib import Path

import pytest

from goku_megatron.data.loader import SampleStream
from goku_megatron.data.shards import BadSamples, ShardWriter, find_shards, list_samples, read_sample


def _write(out: Path, n: int, per_shard: int, drop: dict[int, str] | None = None) -> list[Path]:
    drop = drop or {}
    with ShardWriter(out, samples_per_shard=per_shard) as writer:
        for i in range(n):
            members = {"mp4" if i % 3 else "png": f"media {i}".encode(), "txt": f"caption {i}".encode(),
                       "json": b"{}"}
            members.pop(drop.get(i, ""), None)
            writer.write(f"s{i:04d}", members)
    return writer.written


def test_writer_is_deterministic_and_indexed(tmp_path):
    a = _write(tmp_path / "a", 7, 3)
    b = _write(tmp_path / "b", 7, 3)
    assert [p.name for p in a] == ["shard-00000.tar", "shard-00001.tar", "shard-00002.tar"]
    assert [p.read_bytes() for p in a] == [p.read_bytes() for p in b]
    index = a[0].with_suffix(".idx").read_text().splitlines()
    assert index[0] == "v1.2 3"  # DALI's webdataset index: version and sample count
    assert index[1].split()[3::4] == ["s0000.json", "s0000.png", "s0000.txt"]
    assert not list((tmp_path / "a").glob("*.tmp*"))


def test_failed_writer_leaves_no_partial_shard(tmp_path):
    with pytest.raises(RuntimeError), ShardWriter(tmp_path, samples_per_shard=10) as writer:
        writer.write("k0", {"txt": b"x", "png": b"y"})
        raise RuntimeError("crash")
    assert list(tmp_path.iterdir()) == []


def test_read_sample_returns_member_bytes(tmp_path):
    (shard,) = _write(tmp_path, 2, 10)
    refs = list_samples(shard, BadSamples())
    sample = read_sample(refs[1])
    assert sample == {"__key__": "s0001", "__url__": str(shard), "mp4": b"media 1",
                      "txt": b"caption 1", "json": b"{}"}


@pytest.mark.parametrize("kind, drop", [("missing_caption", "txt"), ("missing_media", "mp4")])
def test_incomplete_sample_is_skipped_and_counted(tmp_path, caplog, kind, drop):
    (shard,) = _write(tmp_path, 4, 10, drop={2: drop})
    bad = BadSamples()
    with caplog.at_level(logging.WARNING, logger="goku_megatron"):
        keys = [r.key for r in list_samples(shard, bad)]
    assert keys == ["s0000", "s0001", "s0003"]
    assert bad.as_metrics()[f"bad/{kind}"] == 1 and sum(bad.counts.values()) == 1
    assert [r.getMessage() for r in caplog.records] == [
        f"skipped bad sample ({kind}): shard {shard} key s0002" + (": members ['json', 'txt']" if kind == "missing_media" else "")
    ]


# 4 samples x 3 members x (512-byte header + 512-byte data block) = 12288 bytes before the
# end-of-archive zero blocks: cut in a header, in data, and right after the last member.
@pytest.mark.parametrize("cut", [0, 100, 700, 12288 - 1500, 12288 - 600, 12288])
def test_truncated_tar_keeps_complete_samples(tmp_path, caplog, cut):
    (shard,) = _write(tmp_path, 4, 10)
    shard.write_bytes(shard.read_bytes()[:cut])
    bad = BadSamples()
    with caplog.at_level(logging.WARNING, logger="goku_megatron"):
        keys = [r.key for r in list_samples(shard, bad)]
    assert bad.counts == {"truncated_tar": 1}
    assert len(caplog.records) == 1 and str(shard) in caplog.records[0].getMessage()
    full = ["s0000", "s0001", "s0002", "s0003"]
    assert keys == full[:len(keys)] and len(keys) < 4  # a prefix; the cut sample is gone
    for ref in list_samples(shard, BadSamples()):
        assert read_sample(ref)["txt"] == f"caption {int(ref.key[1:])}".encode()


def test_find_shards_errors_name_the_path(tmp_path):
    with pytest.raises(FileNotFoundError, match="goku-data prepare-shards"):
        find_shards(tmp_path)
    with pytest.raises(FileNotFoundError, match="data.path"):
        find_shards(tmp_path / "nope")


def _keys(stream: SampleStream, n: int) -> list[str]:
    return [stream.next_ref().key for _ in range(n)]


@pytest.mark.parametrize("n_shards", [1, 8])
def test_dp_ranks_split_the_data(tmp_path, n_shards):
    shards = _write(tmp_path, 40, 40 // n_shards)
    per_rank = [SampleStream(shards, dp_rank=r, dp_size=4, seed=3, bad=BadSamples()) for r in range(4)]
    epochs = [set(_keys(s, len(s.epoch_order(0)))) for s in per_rank]
    assert sum(map(len, epochs)) == 40 and set().union(*epochs) == {f"s{i:04d}" for i in range(40)}
    # a TP/PP peer of DP rank 1 builds the same stream
    peer = SampleStream(shards, dp_rank=1, dp_size=4, seed=3, bad=BadSamples())
    assert _keys(peer, 25) == _keys(SampleStream(shards, dp_rank=1, dp_size=4, seed=3, bad=BadSamples()), 25)


def test_epochs_reshuffle_with_the_seed(tmp_path):
    shards = _write(tmp_path, 24, 4)
    stream = SampleStream(shards, dp_rank=0, dp_size=1, seed=0, bad=BadSamples())
    first, second = _keys(stream, 24), _keys(stream, 24)
    assert sorted(first) == sorted(second) and first != second
    other = SampleStream(shards, dp_rank=0, dp_size=1, seed=1, bad=BadSamples())
    assert _keys(other, 24) != first


def test_resume_yields_the_uninterrupted_sequence(tmp_path):
    shards = _write(tmp_path, 30, 4)
    reference = SampleStream(shards, dp_rank=1, dp_size=2, seed=5, bad=BadSamples())
    expected = _keys(reference, 50)  # more than one epoch (15 samples per rank)
    first = SampleStream(shards, dp_rank=1, dp_size=2, seed=5, bad=BadSamples())
    head = _keys(first, 22)
    resumed = SampleStream(shards, dp_rank=1, dp_size=2, seed=5, bad=BadSamples())
    resumed.load_state_dict(first.state_dict())
    per_epoch = len(reference.epoch_order(0))  # 14: rank 1 owns shards 1, 3, 5, 7 (4+4+4+2)
    assert first.state_dict() == {"epoch": 1, "position": 22 - per_epoch}
    assert head + _keys(resumed, 28) == expected


def test_kind_filter(tmp_path):
    shards = _write(tmp_path, 12, 4)
    images = SampleStream(shards, dp_rank=0, dp_size=1, seed=0, bad=BadSamples(), kind="image")
    videos = SampleStream(shards, dp_rank=0, dp_size=1, seed=0, bad=BadSamples(), kind="video")
    assert sorted(_keys(images, 4)) == [f"s{i:04d}" for i in range(0, 12, 3)]
    assert len(set(_keys(videos, 8))) == 8 and not set(_keys(videos, 8)) & set(_keys(images, 4))
