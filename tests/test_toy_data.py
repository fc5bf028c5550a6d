"""Toy dataset: writer, codec round trip, held-out combinations, validation split, DP-aware
resumable loader, hash text encoder."""
from __future__ import annotations

import gc
import hashlib
import itertools
import json
import os
import subprocess
import sys
import warnings
from pathlib import Path

import numpy as np
import pytest
import torch
import webdataset as wds

from goku_megatron.batch import unpack
from goku_megatron.config import TOY_COLORS, load_config, validate
from goku_megatron.data.decode import decode_sample
from goku_megatron.data.frames import FrameSpec
from goku_megatron.data.encoders import PixelSpace
from goku_megatron.data.loader import SampleStream
from goku_megatron.data.pipeline import PackedBatches, Prepared, build_data_source, ensure_toy_data, noised_pack
from goku_megatron.data.shards import BadSamples, find_shards
from goku_megatron.data.text_encoder import NULL_TOKEN, HashTextEncoder
from goku_megatron.data.toy import (
    BACKGROUND,
    COLORS,
    FPS,
    HELD_OUT,
    MANIFEST,
    TRIPLES,
    VAL_DIR,
    ToyDatasetSpec,
    ToySample,
    caption_for,
    ensure_toy_dataset,
    iter_raw_samples,
    make_toy_dataset,
    read_manifest,
    read_validation,
    validation_samples,
)

CLIPS, IMAGES, SIZE, FRAMES, VAL_CLIPS = 24, 8, 16, 8, 64
# (dy, dx) per frame, written out again rather than imported, so the test checks the writer.
STEP = {"left": (0, -1), "right": (0, 1), "up": (-1, 0), "down": (1, 0)}
PALETTE = {**COLORS, "background": BACKGROUND}


@pytest.fixture(scope="module")
def toy_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    out = tmp_path_factory.mktemp("toy")
    make_toy_dataset(out, clips=CLIPS, images=IMAGES, size=SIZE, frames=FRAMES, shard_size=10,
                     seed=0)
    return out


SPEC = FrameSpec(fps=FPS, frames=FRAMES, height=SIZE, width=SIZE)


def _decode(raw: dict) -> dict:
    """One raw toy sample through the training path's decoder."""
    sample = decode_sample(raw, SPEC, BadSamples(), backend="pyav")
    return {"key": sample.key, "pixels": sample.pixels, "caption": sample.caption, "meta": sample.meta}


@pytest.fixture(scope="module")
def decoded(toy_dir: Path) -> dict[str, dict]:
    return {s["key"]: s for s in map(_decode, _raw_samples(toy_dir))}


def _raw_samples(shard_dir: Path) -> list[dict]:
    return list(iter_raw_samples(shard_dir))


def _nearest_colour(rgb: np.ndarray) -> np.ndarray:
    """Name of the nearest palette colour for each pixel of a (..., 3) array in [0, 255]."""
    names = list(PALETTE)
    ref = np.array([PALETTE[n] for n in names], dtype=np.float32)
    dist = ((rgb[..., None, :] - ref) ** 2).sum(-1)
    return np.array(names)[dist.argmin(-1)]


def _to_rgb(pixels: torch.Tensor) -> np.ndarray:
    """(3, T, H, W) in [-1, 1] -> (T, H, W, 3) in [0, 255]."""
    return ((pixels.permute(1, 2, 3, 0).numpy() + 1.0) * 127.5).astype(np.float32)


def _cfg(shard_dir: Path, *overrides: str):
    cfg = load_config("toy", [f"data.path={shard_dir}", "data.create_if_missing=false", "data.image_ratio=0.3",
                              "train.global_batch_size=4", "train.micro_batch_size=4", "train.seed=0", *overrides])
    validate(cfg, 1)
    return cfg


def _source(shard_dir: Path, *overrides: str) -> PackedBatches:
    """The toy run's own data source (training's one data path), for one process."""
    return build_data_source(_cfg(shard_dir, *overrides), 0, 1, torch.device("cpu"))


def _keys(source: PackedBatches, steps: range) -> list[list[str]]:
    return [[key for pack in source.next_step(step) for key in pack.keys] for step in steps]


def test_shards_and_manifest(toy_dir: Path) -> None:
    manifest = read_manifest(toy_dir)
    shards = sorted(toy_dir.glob("toy-*.tar"))
    assert [p.name for p in shards] == [s["name"] for s in manifest["shards"]]
    assert len(shards) == 4 and manifest["samples"] == CLIPS + IMAGES
    assert (manifest["clips"], manifest["images"]) == (CLIPS, IMAGES)
    raws = _raw_samples(toy_dir)
    assert [r["__key__"] for r in raws] == [f"{i:08d}" for i in range(CLIPS + IMAGES)]
    # The standard reader opens the shards too; webdataset 1.0.2 leaves its file handles to gc.
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", ResourceWarning)
        reader = wds.WebDataset([str(p) for p in shards], shardshuffle=False)
        standard = [r["__key__"] for r in reader]
        gc.collect()
    assert standard == [r["__key__"] for r in raws]
    for raw in raws:
        media = "webm" if int(raw["__key__"]) < CLIPS else "png"
        assert {media, "txt", "json"} <= raw.keys()
        meta = json.loads(raw["json"])
        assert (meta["width"], meta["height"]) == (SIZE, SIZE)
        assert meta["frames"] == (FRAMES if media == "webm" else 1)


def test_clip_round_trip_matches_caption(decoded: dict[str, dict]) -> None:
    for key, sample in decoded.items():
        if int(key) >= CLIPS:
            continue
        meta = sample["meta"]
        assert sample["pixels"].shape == (3, FRAMES, SIZE, SIZE)
        assert sample["pixels"].dtype == torch.float32
        assert -1.0 <= sample["pixels"].min() and sample["pixels"].max() <= 1.0
        assert sample["caption"] == f"a {meta['color']} {meta['shape']} moving {meta['direction']}"
        assert meta["fps"] * meta["duration"] == FRAMES
        rgb = _to_rgb(sample["pixels"])
        dy, dx = STEP[meta["direction"]]
        centre = meta["shape_size"] // 2
        for t in range(FRAMES):
            y, x = meta["top"] + dy * t + centre, meta["left"] + dx * t + centre
            assert _nearest_colour(rgb[t, y, x]) == meta["color"], (key, t)
            # 4:2:0 chroma bleeds across the outline, but the centre stays within a few levels.
            assert np.abs(rgb[t, y, x] - COLORS[meta["color"]]).max() < 8, (key, t)
        # The shape's centroid moves (frames - 1) px in the captioned direction.
        centroids = [np.argwhere(_nearest_colour(rgb[t]) == meta["color"]).mean(0) for t in (0, -1)]
        shift = centroids[1] - centroids[0]
        assert np.allclose(shift, [dy * (FRAMES - 1), dx * (FRAMES - 1)], atol=1.0), (key, shift)


def test_images_are_single_frames(decoded: dict[str, dict]) -> None:
    images = [s for k, s in decoded.items() if int(k) >= CLIPS]
    assert len(images) == IMAGES
    for sample in images:
        meta = sample["meta"]
        assert sample["pixels"].shape == (3, 1, SIZE, SIZE)
        assert sample["caption"] == f"a {meta['color']} {meta['shape']}"
        rgb = _to_rgb(sample["pixels"])[0]
        c = meta["shape_size"] // 2
        assert np.abs(rgb[meta["top"] + c, meta["left"] + c] - COLORS[meta["color"]]).max() < 1.0
        assert np.abs(rgb[_nearest_colour(rgb) == "background"] - BACKGROUND).max() < 1.0


def test_dataset_is_deterministic_and_rebuilt_when_incomplete(tmp_path: Path) -> None:
    def build(name: str, seed: int) -> list[bytes]:
        shards = ensure_toy_dataset(tmp_path / name, clips=3, images=1, shard_size=2, seed=seed)
        return [p.read_bytes() for p in shards]

    first = build("a", 0)
    assert build("b", 0) == first
    assert build("c", 1) != first
    (tmp_path / "a" / "toy-00001.tar").write_bytes(b"half written")
    assert build("a", 0)[1] != first[1]  # manifest present and params equal: reused as is
    (tmp_path / "a" / MANIFEST).unlink()  # what an interrupted build leaves behind
    assert build("a", 0) == first
    assert build("a", 1) == build("c", 1)  # other parameters: rebuilt


def test_held_out_combinations_leave_every_value_and_pair_in_training() -> None:
    assert len(HELD_OUT) == 4 and set(HELD_OUT) < set(TRIPLES) and len(TRIPLES) == 32
    trained = set(TRIPLES) - set(HELD_OUT)
    singles_and_pairs = itertools.chain(itertools.combinations(range(3), 1), itertools.combinations(range(3), 2))
    for factors in singles_and_pairs:
        in_training = {tuple(t[i] for i in factors) for t in trained}
        assert in_training == {tuple(t[i] for i in factors) for t in TRIPLES}, factors


def test_training_clips_never_show_a_held_out_combination(decoded: dict[str, dict]) -> None:
    drawn = [ToySample.draw(i, still=False, size=SIZE, frames=FRAMES, seed=5) for i in range(2000)]
    assert {(s.color, s.shape, s.direction) for s in drawn} == set(TRIPLES) - set(HELD_OUT)
    metas = [s["meta"] for k, s in decoded.items() if int(k) < CLIPS]
    assert all((m["color"], m["shape"], m["direction"]) not in HELD_OUT for m in metas)


# The factors of samples 0..1023 (768 clips, then stills) of seed 3 as the writer drew them before
# data.toy_colors existed: sha256 of their repr, and a few written out.
EARLIER_DRAWS_SHA256 = "7e0111d41872a5a625784c9c1747fd61995347f47ec26099cd20f83761e4c112"
EARLIER_DRAWS = {0: ("yellow", "square", "left", 2, 7), 3: ("green", "square", "right", 3, 2),
                 768: ("yellow", "square", None, 7, 10), 769: ("yellow", "diamond", None, 1, 5)}
# The manifest's params before data.toy_colors existed: an all-colour dataset keeps them, so the
# datasets already on disk are reused, not rebuilt.
EARLIER_PARAMS = ["clips", "images", "size", "frames", "shard_size", "seed", "pix_fmt", "val_clips"]


def _factors(sample: ToySample) -> tuple:
    return sample.color, sample.shape, sample.direction, sample.top, sample.left


def test_every_colour_draws_the_samples_earlier_versions_drew() -> None:
    for colors in ((), tuple(COLORS), ("yellow", "blue", "green", "red")):
        spec = ToyDatasetSpec(colors=colors)
        assert spec.colors == () and list(spec.params()) == EARLIER_PARAMS
        draws = [_factors(ToySample.draw(i, still=i >= 768, size=SIZE, frames=FRAMES, seed=3,
                                         colors=spec.training_colors)) for i in range(1024)]
        assert hashlib.sha256(repr(draws).encode()).hexdigest() == EARLIER_DRAWS_SHA256
        assert {i: draws[i] for i in EARLIER_DRAWS} == EARLIER_DRAWS


def test_left_out_colours_are_redrawn_from_the_same_rng() -> None:
    """Without yellow, a sample whose first draw was not yellow is the all-colour sample; the others
    are drawn again, so every sample is still a function of (seed, index)."""
    allowed = ("red", "green", "blue")
    for still in (False, True):
        every = [ToySample.draw(i, still=still, size=SIZE, frames=FRAMES, seed=1) for i in range(2000)]
        some = [ToySample.draw(i, still=still, size=SIZE, frames=FRAMES, seed=1, colors=allowed)
                for i in range(2000)]
        assert {s.color for s in some} == set(allowed)
        kept = [i for i, s in enumerate(every) if s.color != "yellow"]
        assert 0 < len(kept) < 2000 and all(some[i] == every[i] for i in kept)
        if not still:  # every trainable combination of the allowed colours still occurs
            assert {(s.color, s.shape, s.direction) for s in some} == {
                t for t in TRIPLES if t[0] in allowed and t not in HELD_OUT}


def test_colour_names_are_checked_and_normalised() -> None:
    assert TOY_COLORS == tuple(COLORS)  # config.py checks data.toy_colors against its own copy
    assert ToyDatasetSpec(colors=["blue", "red", "blue"]).colors == ("red", "blue")
    with pytest.raises(ValueError, match="unknown toy colour.* purple; choose from red, green, blue, yellow"):
        ToyDatasetSpec(colors=("red", "purple"))


def test_a_dataset_without_a_colour_trains_on_the_others_and_validates_on_all(toy_dir: Path,
                                                                             tmp_path: Path) -> None:
    shards = ensure_toy_dataset(tmp_path, clips=CLIPS, images=IMAGES, size=SIZE, frames=FRAMES, shard_size=10,
                                seed=0, colors=["green", "red", "blue"])
    manifest = read_manifest(tmp_path)
    assert manifest["params"]["colors"] == ["red", "green", "blue"]
    metas = [json.loads(raw["json"]) for raw in iter_raw_samples(tmp_path)]
    assert len(metas) == CLIPS + IMAGES and {m["color"] for m in metas} == {"red", "green", "blue"}
    assert read_validation(tmp_path).captions == read_validation(toy_dir).captions  # all 32 combinations
    assert ensure_toy_dataset(tmp_path, clips=CLIPS, images=IMAGES, size=SIZE, frames=FRAMES, shard_size=10,
                              seed=0, colors=["red", "green", "blue"]) == shards  # reused
    # Every colour again: rebuilt, and then the default dataset, byte for byte.
    ensure_toy_dataset(tmp_path, clips=CLIPS, images=IMAGES, size=SIZE, frames=FRAMES, shard_size=10, seed=0,
                       colors=list(COLORS))
    for name in [*(p.name for p in sorted(toy_dir.glob("toy-*.tar"))), MANIFEST]:
        assert (tmp_path / name).read_bytes() == (toy_dir / name).read_bytes(), name
    assert list(read_manifest(toy_dir)["params"]) == EARLIER_PARAMS


@pytest.mark.usefixtures("megatron_world")
def test_a_toy_run_writes_its_data_toy_colors(tmp_path: Path) -> None:
    cfg = _cfg(tmp_path, "data.create_if_missing=true", "data.toy_clips=8", "data.toy_images=0",
               "data.toy_colors=[blue]")
    ensure_toy_data(cfg)
    assert read_manifest(tmp_path)["params"]["colors"] == ["blue"]
    assert {json.loads(raw["json"])["color"] for raw in iter_raw_samples(tmp_path)} == {"blue"}


def test_manifests_list_the_held_out_combinations(toy_dir: Path) -> None:
    for split_dir in (toy_dir, toy_dir / VAL_DIR):
        assert read_manifest(split_dir)["held_out"] == [list(t) for t in HELD_OUT]
    val = read_manifest(toy_dir / VAL_DIR)
    assert (val["split"], val["samples"], val["clips"], val["images"]) == ("val", VAL_CLIPS, VAL_CLIPS, 0)
    assert read_manifest(toy_dir)["val_dir"] == VAL_DIR


def test_validation_split_shows_every_combination(toy_dir: Path) -> None:
    val = read_validation(toy_dir)
    assert val.pixels.shape == (VAL_CLIPS, 3, FRAMES, SIZE, SIZE) and val.pixels.dtype == torch.float32
    assert -1.0 <= val.pixels.min() and val.pixels.max() <= 1.0
    assert val.keys == [f"{i:08d}" for i in range(VAL_CLIPS)]
    triples = [TRIPLES[i % len(TRIPLES)] for i in range(VAL_CLIPS)]
    assert val.captions == [caption_for(*t) for t in triples]
    assert val.held_out == [t in HELD_OUT for t in triples] and sum(val.held_out) == 8
    for pixels, sample in zip(val.pixels, validation_samples(VAL_CLIPS, size=SIZE, frames=FRAMES)):
        assert np.abs(_to_rgb(pixels) - sample.render(SIZE, FRAMES)).max() <= 1.0, sample


def test_validation_split_is_the_same_for_every_dataset_seed(toy_dir: Path, tmp_path: Path) -> None:
    make_toy_dataset(tmp_path, clips=2, images=0, size=SIZE, frames=FRAMES, shard_size=10, seed=7)
    ours, theirs = (sorted((d / VAL_DIR).glob("toy-*.tar")) for d in (toy_dir, tmp_path))
    assert [p.read_bytes() for p in ours] == [p.read_bytes() for p in theirs]
    first, again = read_validation(toy_dir), read_validation(toy_dir)
    assert torch.equal(first.pixels, again.pixels) and first.captions == again.captions
    # Its own RNG stream: the positions are not those of the training draws of the same index.
    val = validation_samples(32, size=SIZE, frames=FRAMES)
    train = [ToySample.draw(i, still=False, size=SIZE, frames=FRAMES, seed=0) for i in range(32)]
    assert [(s.top, s.left) for s in val] != [(s.top, s.left) for s in train]


def test_older_or_partial_datasets_are_rebuilt(tmp_path: Path) -> None:
    def build() -> list[Path]:
        return ensure_toy_dataset(tmp_path, clips=3, images=0, shard_size=2, val_clips=4)

    build()
    manifest_path = tmp_path / MANIFEST
    for tamper in ({"format": "goku-toy-v1"}, {"held_out": [["red", "square", "left"]]}):
        manifest_path.write_text(json.dumps({**json.loads(manifest_path.read_text()), **tamper}))
        build()
        assert read_manifest(tmp_path)["held_out"] == [list(t) for t in HELD_OUT]
    (tmp_path / VAL_DIR / MANIFEST).unlink()  # a split that was never finished
    build()
    assert len(read_validation(tmp_path).keys) == 4


def test_read_validation_errors_name_the_dataset_and_the_fix(tmp_path: Path) -> None:
    with pytest.raises(FileNotFoundError, match="goku-data make-toy --out"):
        read_validation(tmp_path)
    make_toy_dataset(tmp_path, clips=2, images=0, val_clips=0)
    assert not (tmp_path / VAL_DIR / MANIFEST).exists()
    with pytest.raises(FileNotFoundError, match="val_clips=0.*goku-data make-toy --out"):
        read_validation(tmp_path)


def test_corrupt_clip_is_counted_and_skipped(toy_dir: Path) -> None:
    raw = _raw_samples(toy_dir)[0]
    bad = BadSamples()
    for broken in (b"\x1a\x45\xdf\xa3 not a webm", raw["webm"][: len(raw["webm"]) // 2]):
        assert decode_sample({**raw, "webm": broken}, SPEC, bad, backend="pyav") is None
    assert decode_sample({k: v for k, v in raw.items() if k != "webm"}, SPEC, bad, backend="pyav") is None
    assert sum(bad.counts.values()) == 3 and bad.counts["missing_media"] == 1


def test_dp_split_is_disjoint_and_complete(toy_dir: Path) -> None:
    """The toy's shards split over DP ranks like any shards: every sample on exactly one rank."""
    shards = find_shards(toy_dir)
    ranks = [{ref.key for ref in SampleStream(shards, dp_rank=r, dp_size=3, seed=0, bad=BadSamples()).epoch_order(0)}
             for r in range(3)]
    assert sum(len(k) for k in ranks) == CLIPS + IMAGES
    assert set().union(*ranks) == {f"{i:08d}" for i in range(CLIPS + IMAGES)}


@pytest.mark.usefixtures("megatron_world")
def test_toy_packs_are_the_decoded_clips_noised(toy_dir: Path, decoded: dict[str, dict]) -> None:
    """A toy step is packs of micro_batch_size samples; the "VAE" is the identity, so a pack is the
    pipeline's noised_pack of the decoded pixels, exactly."""
    cfg = _cfg(toy_dir, "data.image_ratio=0")
    source = build_data_source(cfg, 0, 1, torch.device("cpu"))
    (pack,) = source.next_step(1)
    assert pack.num_samples == 4 and pack.padding == 0 and pack.budget == cfg.data.stages[0].token_budget
    samples = [(k, Prepared(decoded[k]["pixels"], decoded[k]["caption"])) for k in pack.keys]
    expected = noised_pack(samples, 1, pack.budget, cfg, HashTextEncoder(dim=cfg.model.text_dim))
    for field in ("noisy", "target", "timesteps", "text", "text_mask", "positions", "cu_seqlens"):
        assert torch.equal(getattr(pack, field), getattr(expected, field)), field
    assert isinstance(PixelSpace().encode(decoded[pack.keys[0]]["pixels"]), torch.Tensor)


@pytest.mark.usefixtures("megatron_world")
def test_toy_packs_mix_clips_and_stills_at_the_image_ratio(toy_dir: Path) -> None:
    source = _source(toy_dir, "data.image_ratio=0.5")
    packs = [pack for step in range(1, 21) for pack in source.next_step(step)]
    frames = {f for pack in packs for f in pack.frames}
    assert frames == {1, FRAMES}  # stills are time-padded to the temporal patch inside the pack
    still = next(pack for pack in packs if 1 in pack.frames)
    index = still.frames.index(1)
    assert unpack(still, still.noisy)[index].shape == (3, 1, SIZE, SIZE)
    only_clips = _source(toy_dir, "data.image_ratio=0")
    assert all(set(p.frames) == {FRAMES} for step in range(1, 11) for p in only_clips.next_step(step))


@pytest.mark.usefixtures("megatron_world")
def test_resume_mid_epoch_replays_the_same_keys(toy_dir: Path) -> None:
    """CLIPS + IMAGES = 32 samples, 4 per step: step 11 is mid-epoch; the loader state (plain JSON,
    as checkpoints store it) continues with the keys the uninterrupted run draws."""
    uninterrupted = _keys(_source(toy_dir), range(1, 31))
    first = _source(toy_dir)
    head = _keys(first, range(1, 12))
    state = json.loads(json.dumps(first.state_dict()))
    resumed = _source(toy_dir)
    resumed.load_state_dict(state)
    assert head + _keys(resumed, range(12, 31)) == uninterrupted
    clips = [k for step in uninterrupted for k in step if int(k) < CLIPS]
    assert len(set(clips)) == CLIPS  # every clip drawn within 30 steps


@pytest.mark.usefixtures("megatron_world")
def test_a_loader_state_of_other_data_starts_over(toy_dir: Path, tmp_path: Path, caplog) -> None:
    other = tmp_path / "other"
    make_toy_dataset(other, clips=CLIPS, images=IMAGES, size=SIZE, frames=FRAMES, shard_size=10, seed=0)
    elsewhere = _source(other)
    _keys(elsewhere, range(1, 6))
    source = _source(toy_dir)
    with caplog.at_level("WARNING", logger="goku_megatron"):
        source.load_state_dict(json.loads(json.dumps(elsewhere.state_dict())))
    assert "the data order starts over" in caplog.text and str(other) in caplog.text
    assert _keys(source, range(1, 6)) == _keys(_source(toy_dir), range(1, 6))


@pytest.mark.usefixtures("megatron_world")
def test_the_prepared_sample_cache_changes_nothing_but_the_work(toy_dir: Path) -> None:
    """32 samples, 4 per step: 20 steps are 2.5 epochs. With data.cache_mb each sample is decoded
    once; the packs are those of the run without a cache (read ahead), bit for bit."""
    plain, cached = _source(toy_dir, "data.cache_mb=0"), _source(toy_dir, "data.cache_mb=16", "data.workers=0")
    calls = []
    prepare = cached.prepare
    cached.prepare = lambda raw, stage: calls.append(raw["__key__"]) or prepare(raw, stage)
    for step in range(1, 21):
        for a, b in zip(plain.next_step(step), cached.next_step(step), strict=True):
            assert a.keys == b.keys and torch.equal(a.noisy, b.noisy) and torch.equal(a.target, b.target)
    assert len(calls) == len(set(calls)) == CLIPS + IMAGES


def test_prepared_cache_keeps_the_most_recent_within_its_limit() -> None:
    from goku_megatron.data.pipeline import PreparedCache

    cache = PreparedCache(limit_bytes=3 * 400)
    samples = {i: Prepared(torch.zeros(100), f"c{i}") for i in range(4)}  # 400 bytes each
    for i in range(3):
        cache.put(("s", str(i), 0), samples[i])
    assert cache.get(("s", "0", 0)) is samples[0]  # now the most recent
    cache.put(("s", "3", 0), samples[3])  # evicts 1, the least recently used
    assert cache.get(("s", "1", 0)) is None and cache.bytes == 1200
    assert all(cache.get(("s", str(i), 0)) is samples[i] for i in (0, 2, 3))
    cache.put(("s", "big", 0), Prepared(torch.zeros(400), "too big"))  # over the limit alone: not kept
    assert cache.get(("s", "big", 0)) is None and cache.bytes == 1200


@pytest.mark.usefixtures("megatron_world")
def test_sequence_depends_on_seed(toy_dir: Path) -> None:
    assert _keys(_source(toy_dir), range(1, 6)) == _keys(_source(toy_dir), range(1, 6))
    assert _keys(_source(toy_dir), range(1, 6)) != _keys(_source(toy_dir, "train.seed=1"), range(1, 6))


def test_hash_text_encoder() -> None:
    encoder = HashTextEncoder(dim=8, max_tokens=4)
    assert not list(encoder.parameters()) and not encoder.state_dict()
    emb, mask = encoder(["a red square moving left", "A red, square!", ""])
    assert emb.shape == (3, 4, 8) and emb.dtype == torch.float32 and mask.dtype == torch.bool
    assert mask.tolist() == [[True] * 4, [True, True, True, False], [True, False, False, False]]
    assert torch.equal(emb[0, :3], emb[1, :3])  # case and punctuation do not matter
    assert torch.count_nonzero(emb[~mask]) == 0
    assert torch.equal(emb[2, 0], encoder.word_embedding(NULL_TOKEN))
    assert not torch.allclose(encoder.word_embedding("left"), encoder.word_embedding("right"))


def test_hash_text_encoder_is_the_same_in_another_process() -> None:
    code = ("from goku_megatron.data.text_encoder import HashTextEncoder; "
            "print(HashTextEncoder(dim=8).word_embedding('red').tolist())")
    env = {**os.environ, "PYTHONHASHSEED": "12345"}
    out = subprocess.run([sys.executable, "-c", code], env=env, capture_output=True, text=True,
                         check=True).stdout
    assert json.loads(out) == HashTextEncoder(dim=8).word_embedding("red").tolist()
