"""Curation (Goku Tables 3 and 4, motion score) and goku-data prepare-shards, on tiny PyAV clips."""
from __future__ import annotations

import io
import json
import subprocess
import sys
from dataclasses import replace
from pathlib import Path

import av
import cv2
import numpy as np
import pytest
from PIL import Image

from goku_megatron.cli import data as goku_data
from goku_megatron.data.curation import (
    DROP_REASONS,
    MOTION_SHORT_SIDE,
    STAGES,
    RawFilter,
    StageTier,
    caption_with_motion,
    clip_motion_score,
    curate_folder,
    motion_score,
    sample_key,
)
from goku_megatron.data.decode import VideoInfo, probe_video
from goku_megatron.data.shards import BadSamples, list_samples, read_sample
from goku_megatron.resilience import EXIT_CONFIG_ERROR

REPO = Path(__file__).resolve().parents[1]
H, W, FPS = 48, 64, 16
# Table 3 scaled down to what 64x48 clips of 1.5 s can pass or fail.
TINY_RAW = RawFilter(min_duration=1.0, min_short_side=48, min_bitrate=50_000, min_fps=12.0)


# ---------------------------------------------------------------------------------------------
# clip and image makers


def encode(frames: np.ndarray, fps: int = FPS, codec: str = "libx264", fmt: str = "mp4") -> bytes:
    buf = io.BytesIO()
    with av.open(buf, "w", format=fmt) as container:
        stream = container.add_stream(codec, rate=fps)
        stream.width, stream.height, stream.pix_fmt = frames.shape[2], frames.shape[1], "yuv420p"
        for frame in frames:
            container.mux(stream.encode(av.VideoFrame.from_ndarray(frame, format="rgb24")))
        container.mux(stream.encode())
    return buf.getvalue()


def noise(n: int, h: int = H, w: int = W, seed: int = 0) -> np.ndarray:
    """Fresh noise every frame: a high bit rate even at 64x48 (the motion is meaningless)."""
    return np.random.default_rng(seed).integers(0, 256, (n, h, w, 3), dtype=np.uint8)


def flat(n: int, h: int = H, w: int = W) -> np.ndarray:
    return np.full((n, h, w, 3), 100, np.uint8)


def moving_square(n: int, speed: float, fps: int = FPS, h: int = H, w: int = W, side: int = 16,
                  seed: int = 1) -> np.ndarray:
    """A textured square moving right at ``speed`` source px/s over a flat background."""
    cells = np.random.default_rng(seed).integers(0, 256, (4, 4, 3), dtype=np.uint8)
    texture = cv2.resize(cells, (side, side), interpolation=cv2.INTER_NEAREST)
    out = flat(n, h, w)
    for t in range(n):
        x = 4 + round(speed * t / fps)
        out[t, 16:16 + side, x:x + side] = texture
    return out


def image_bytes(h: int, w: int, fmt: str) -> bytes:
    buf = io.BytesIO()
    Image.fromarray(noise(1, h, w)[0]).save(buf, format=fmt)
    return buf.getvalue()


def add(root: Path, name: str, data: bytes, caption: str | None = "a caption",
        meta: dict | None = None) -> None:
    path = root / name
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_bytes(data)
    if caption is not None:
        path.with_suffix(".txt").write_text(caption)
    if meta is not None:
        path.with_suffix(".json").write_text(json.dumps(meta))


def read_output(out: Path) -> dict[str, dict]:
    bad = BadSamples()
    samples = {}
    for shard in sorted(out.glob("*.tar")):
        for ref in list_samples(shard, bad):
            samples[ref.key] = read_sample(ref)
    assert not bad.counts
    return samples


def report(out: Path) -> dict:
    return json.loads((out / "report.json").read_text())


# ---------------------------------------------------------------------------------------------
# Table 3 on VideoInfo, default thresholds, boundary values

GOOD = VideoInfo(codec="h264", width=1280, height=720, fps=30.0, frames=300, duration=10.0,
                 bitrate=2_000_000)


def test_raw_filter_defaults_are_table3() -> None:
    assert RawFilter() == RawFilter(min_duration=4.0, min_short_side=480, min_bitrate=500_000,
                                    min_fps=23.976)
    assert RawFilter().check(GOOD) == []


@pytest.mark.parametrize("field_values, passes", [
    ({"duration": 4.0}, True), ({"duration": 3.9}, False),
    ({"width": 854, "height": 480}, True), ({"width": 480, "height": 854}, True),
    ({"width": 854, "height": 479}, False), ({"width": 479, "height": 854}, False),
    ({"fps": 23.976}, True), ({"fps": 24000 / 1001}, True), ({"fps": 23.9}, False),
    ({"bitrate": 500_000}, True), ({"bitrate": 499_999}, False),
])
def test_raw_filter_boundaries(field_values: dict, passes: bool) -> None:
    reason = {"duration": "duration", "width": "resolution", "fps": "fps",
              "bitrate": "bitrate"}[next(iter(field_values))]
    assert RawFilter().check(replace(GOOD, **field_values)) == ([] if passes else [reason])


def test_raw_filter_lists_every_failure() -> None:
    bad = VideoInfo(codec="h264", width=320, height=240, fps=15.0, frames=30, duration=2.0,
                    bitrate=100_000)
    assert RawFilter().check(bad) == ["duration", "resolution", "bitrate", "fps"]


# ---------------------------------------------------------------------------------------------
# Table 4 tiers


def test_stage_tiers_are_table4() -> None:
    rows = {name: (t.min_height, t.min_width, t.min_dino_similarity, t.min_aesthetic, t.max_ocr,
                   t.min_motion, t.max_motion) for name, t in STAGES.items()}
    assert rows == {"480p": (480, 864, 0.85, 4.3, 0.02, 0.3, 20.0),
                    "720p": (720, 1280, 0.90, 4.5, 0.01, 0.5, 15.0),
                    "1080p": (1080, 1920, 0.90, 4.5, 0.01, 0.5, 8.0)}


def test_stage_resolution_is_orientation_free() -> None:
    tier = STAGES["480p"]
    assert tier.check(864, 480, {}) == [] and tier.check(480, 864, {}) == []
    assert tier.check(863, 480, {}) == ["stage_resolution"]
    assert tier.check(864, 479, {}) == ["stage_resolution"]
    assert STAGES["1080p"].check(1280, 720, {}) == ["stage_resolution"]


def test_stage_scores_are_checked_only_when_present() -> None:
    tier = STAGES["720p"]
    assert tier.check(1280, 720, {}) == []
    assert tier.check(1280, 720, {"dino_similarity": 0.90, "aesthetic": 4.5, "ocr": 0.01}) == []
    assert tier.check(1280, 720, {"dino_similarity": 0.89, "aesthetic": 4.4, "ocr": 0.011}) == [
        "dino_similarity", "aesthetic", "ocr"]
    assert tier.check(1280, 720, {"aesthetic": 4.4}) == ["aesthetic"]


def test_stage_motion_range_is_inclusive() -> None:
    tier = STAGES["480p"]
    assert tier.check_motion(0.3) == [] and tier.check_motion(20.0) == []
    assert tier.check_motion(0.29) == ["motion_low"]
    assert tier.check_motion(20.01) == ["motion_high"]


# ---------------------------------------------------------------------------------------------
# motion score


def square_at_reference(per_pair: float, scale: float = 1.0, pairs: int = 3) -> np.ndarray:
    """Frames at the reference scale times ``scale``, a textured square moving ``per_pair``
    reference pixels between consecutive frames."""
    h, w = round(MOTION_SHORT_SIDE * scale), round(MOTION_SHORT_SIDE * 4 / 3 * scale)
    side = round(96 * scale)
    cells = np.random.default_rng(0).integers(0, 256, (6, 6, 3), dtype=np.uint8)
    texture = cv2.resize(cells, (side, side), interpolation=cv2.INTER_LINEAR)
    out = np.full((pairs + 1, h, w, 3), 90, np.uint8)
    for t in range(pairs + 1):
        x, y = round((20 + per_pair * t) * scale), round(110 * scale)
        out[t, y:y + side, x:x + side] = texture
    return out


def test_motion_score_is_zero_for_a_static_clip() -> None:
    still = square_at_reference(0.0)
    assert motion_score(still) == 0.0
    assert motion_score(still[:1]) == 0.0  # one frame: nothing moves


def test_motion_score_grows_in_proportion_to_speed() -> None:
    # 4 px per pair at 4 fps = 8 px per 0.5 s; the square covers 96^2 / (320*427) = 6.7% of the
    # frame, and the flow field spreads a little past its edges.
    scores = [motion_score(square_at_reference(d)) for d in (2.0, 4.0, 8.0, 16.0)]
    area = 96 * 96 / (320 * 427)
    assert 1.0 <= scores[1] / (2 * 4.0 * area) <= 1.4
    for slower, faster in zip(scores, scores[1:]):
        assert 1.7 <= faster / slower <= 2.3


def test_motion_score_does_not_depend_on_resolution() -> None:
    # The same scene at 3/4 and at 2x the reference scale (one upscaled, one downscaled).
    small, large = (motion_score(square_at_reference(6.0, scale=s)) for s in (0.75, 2.0))
    assert large == pytest.approx(small, rel=0.1)


def test_motion_score_does_not_depend_on_frame_rate() -> None:
    scores = [clip_motion_score(encode(moving_square(round(1.5 * fps), speed=4, fps=fps), fps))
              for fps in (16, 24, 32)]
    assert scores[0] > 0.5
    assert scores[1] == pytest.approx(scores[0], rel=0.05)
    assert scores[2] == pytest.approx(scores[0], rel=0.05)


def test_caption_with_motion() -> None:
    assert caption_with_motion("a dog runs", 3.14159) == "a dog runs motion score: 3.1"


# ---------------------------------------------------------------------------------------------
# the folder -> shards pipeline


def test_sample_keys_are_dot_free_and_fit_a_tar_header() -> None:
    assert sample_key(7, Path("a dir/clip.v2 (final).mp4")) == "000007_a_dir_clip_v2_final"
    long = sample_key(123456, Path("x" * 300 + ".mp4"))
    assert long == "123456_" + "x" * 80 and len(long + ".json") <= 100

CAPTIONS = {
    "clips/a moving.mp4": "a clip in mp4",
    "clips/b.webm": "a clip in webm",
    "clips/c.mov": "a clip in mov",
    "clips/d.mkv": "a clip in mkv",
    "images/photo.jpeg": "a jpeg photo",
    "images/plot.png": "a png image",
}


@pytest.fixture(scope="module")
def raw_folder(tmp_path_factory: pytest.TempPathFactory) -> Path:
    root = tmp_path_factory.mktemp("raw")
    clip = noise(24)
    add(root, "clips/a moving.mp4", encode(clip), CAPTIONS["clips/a moving.mp4"],
        meta={"aesthetic": 5.5, "unrelated": "kept out"})
    add(root, "clips/b.webm", encode(clip, codec="libvpx-vp9", fmt="webm"),
        CAPTIONS["clips/b.webm"])
    add(root, "clips/c.mov", encode(clip, fmt="mov"), CAPTIONS["clips/c.mov"])
    add(root, "clips/d.mkv", encode(clip, codec="libvpx-vp9", fmt="matroska"),
        CAPTIONS["clips/d.mkv"])
    add(root, "clips/broken.mp4", b"\x00\x00\x00\x18ftypmp42" + bytes(range(256)) * 8)
    add(root, "clips/empty_caption.mp4", encode(clip), caption="  \n")
    add(root, "clips/flat.mp4", encode(flat(24)))  # a static clip encodes to a few kbps
    add(root, "clips/nocap.mp4", encode(clip), caption=None)
    add(root, "clips/short.mp4", encode(noise(8)))  # 0.5 s
    add(root, "clips/slow.mp4", encode(noise(12), fps=8))  # 1.5 s at 8 fps
    add(root, "clips/small.mp4", encode(noise(24, 24, 32)))
    add(root, "clips/small_short.mp4", encode(noise(8, 24, 32)))
    add(root, "images/photo.jpeg", image_bytes(H, W, "JPEG"), CAPTIONS["images/photo.jpeg"])
    add(root, "images/plot.png", image_bytes(H, W, "PNG"), CAPTIONS["images/plot.png"])
    add(root, "images/tiny.png", image_bytes(16, 16, "PNG"))
    add(root, "images/truncated.jpg", image_bytes(H, W, "JPEG")[:300])
    (root / "notes.md").write_text("not a sample")
    # the fixture is only useful if the bit rates straddle the scaled-down threshold
    assert probe_video(root / "clips/flat.mp4").bitrate < TINY_RAW.min_bitrate
    for name in ("clips/short.mp4", "clips/slow.mp4", "clips/small.mp4", *CAPTIONS):
        if name.startswith("clips/"):
            assert probe_video(root / name).bitrate > TINY_RAW.min_bitrate, name
    return root


@pytest.fixture(scope="module")
def raw_out(raw_folder: Path, tmp_path_factory: pytest.TempPathFactory) -> Path:
    out = tmp_path_factory.mktemp("shards") / "out"
    curate_folder(raw_folder, out, raw=TINY_RAW, samples_per_shard=4)
    return out


def test_report_counts_every_sample_and_reason(raw_out: Path) -> None:
    r = report(raw_out)
    assert (r["seen"], r["kept"], r["dropped"]) == (16, 6, 10)
    assert r["kept_by_modality"] == {"video": 4, "image": 2}
    assert r["dropped_by_reason"] == {**dict.fromkeys(DROP_REASONS, 0), "missing_caption": 2,
                                      "unreadable": 2, "duration": 2, "resolution": 3,
                                      "bitrate": 1, "fps": 1}
    assert r["dropped_samples"] == [
        {"source": "clips/broken.mp4", "reasons": ["unreadable"]},
        {"source": "clips/empty_caption.mp4", "reasons": ["missing_caption"]},
        {"source": "clips/flat.mp4", "reasons": ["bitrate"]},
        {"source": "clips/nocap.mp4", "reasons": ["missing_caption"]},
        {"source": "clips/short.mp4", "reasons": ["duration"]},
        {"source": "clips/slow.mp4", "reasons": ["fps"]},
        {"source": "clips/small.mp4", "reasons": ["resolution"]},
        {"source": "clips/small_short.mp4", "reasons": ["duration", "resolution"]},
        {"source": "images/tiny.png", "reasons": ["resolution"]},
        {"source": "images/truncated.jpg", "reasons": ["unreadable"]},
    ]
    assert r["filters"]["raw"] == {"min_duration": 1.0, "min_short_side": 48,
                                   "min_bitrate": 50_000, "min_fps": 12.0}
    assert r["filters"]["stage"] is None


def test_shards_hold_the_original_bytes_under_stable_keys(raw_folder: Path, raw_out: Path) -> None:
    samples = read_output(raw_out)
    expected = {  # index in the sorted listing of all 16 media files + sanitised path
        "000000_clips_a_moving": ("clips/a moving.mp4", "mp4"),
        "000001_clips_b": ("clips/b.webm", "webm"),
        "000003_clips_c": ("clips/c.mov", "mp4"),
        "000004_clips_d": ("clips/d.mkv", "webm"),
        "000012_images_photo": ("images/photo.jpeg", "jpg"),
        "000013_images_plot": ("images/plot.png", "png"),
    }
    assert list(samples) == list(expected)  # sorted input order
    for key, (source, ext) in expected.items():
        sample = samples[key]
        assert set(sample) == {"__key__", "__url__", ext, "txt", "json"}
        assert sample[ext] == (raw_folder / source).read_bytes()
        assert sample["txt"].decode() == CAPTIONS[source]
        meta = json.loads(sample["json"])
        assert (meta["source"], meta["width"], meta["height"]) == (source, W, H)
        if ext in ("mp4", "webm"):
            info = probe_video(raw_folder / source)
            assert {k: meta[k] for k in ("codec", "fps", "frames", "duration", "bitrate")} == {
                "codec": info.codec, "fps": info.fps, "frames": info.frames,
                "duration": info.duration, "bitrate": info.bitrate}
            assert meta["motion"] == pytest.approx(clip_motion_score(raw_folder / source))
    assert json.loads(samples["000000_clips_a_moving"]["json"])["aesthetic"] == 5.5
    assert "unrelated" not in json.loads(samples["000000_clips_a_moving"]["json"])


def test_output_is_shards_indexes_and_report(raw_out: Path) -> None:
    names = sorted(p.name for p in raw_out.iterdir())
    assert names == ["report.json", "shard-00000.idx", "shard-00000.tar", "shard-00001.idx",
                     "shard-00001.tar"]
    assert report(raw_out)["shards"] == ["shard-00000.tar", "shard-00001.tar"]
    assert all((raw_out / n).stat().st_size > 0 for n in names)


def test_output_folder_must_be_empty(raw_folder: Path, raw_out: Path) -> None:
    with pytest.raises(FileExistsError, match="not empty"):
        curate_folder(raw_folder, raw_out, raw=TINY_RAW)


def test_stage_tier_filters_resolution_scores_and_motion(tmp_path: Path) -> None:
    tier = StageTier("tiny", min_height=48, min_width=64, min_dino_similarity=0.85,
                     min_aesthetic=4.3, max_ocr=0.02, min_motion=0.3, max_motion=1.5)
    root = tmp_path / "in"
    add(root, "fast.mp4", encode(moving_square(24, speed=8)))  # ~1.9
    add(root, "narrow.mp4", encode(moving_square(24, speed=4, w=48)))
    add(root, "ok.mp4", encode(moving_square(24, speed=4)))  # ~1.0
    add(root, "scored.mp4", encode(moving_square(24, speed=4)),
        meta={"dino_similarity": 0.9, "aesthetic": 5.0, "ocr": 0.0})
    add(root, "still.mp4", encode(flat(24)))  # 0
    add(root, "ugly.mp4", encode(moving_square(24, speed=4)), meta={"aesthetic": 4.0})
    add(root, "wide.png", image_bytes(H, W, "PNG"))
    add(root, "square.png", image_bytes(H, H, "PNG"))
    out = tmp_path / "out"
    curate_folder(root, out, raw=None, stage=tier)
    r = report(out)
    assert {s["source"]: s["reasons"] for s in r["dropped_samples"]} == {
        "fast.mp4": ["motion_high"], "narrow.mp4": ["stage_resolution"],
        "still.mp4": ["motion_low"], "ugly.mp4": ["aesthetic"], "square.png": ["stage_resolution"]}
    assert r["filters"]["stage"]["name"] == "tiny" and r["filters"]["raw"] is None
    samples = read_output(out)
    assert list(samples) == ["000002_ok", "000003_scored", "000007_wide"]
    scored = json.loads(samples["000003_scored"]["json"])
    assert (scored["dino_similarity"], scored["aesthetic"], scored["ocr"]) == (0.9, 5.0, 0.0)
    assert 0.3 <= scored["motion"] <= 1.5


def test_cli_appends_motion_to_captions(tmp_path: Path) -> None:
    root, out = tmp_path / "in", tmp_path / "out"
    add(root, "clip.webm", encode(moving_square(24, speed=4), codec="libvpx-vp9", fmt="webm"),
        "a square slides right")
    add(root, "still.png", image_bytes(H, W, "PNG"), "noise")
    proc = subprocess.run(
        [sys.executable, "-m", "goku_megatron.cli.data", "prepare-shards", "--input", str(root),
         "--output", str(out), "--filters-off", "--append-motion-to-caption", "--samples-per-shard", "1"],
        cwd=REPO, capture_output=True, text=True, timeout=60)
    assert proc.returncode == 0, proc.stderr
    assert "kept" in proc.stdout and "report.json" in proc.stdout
    samples = read_output(out)
    clip = samples["000000_clip"]
    motion = json.loads(clip["json"])["motion"]
    assert motion > 0.3
    assert clip["txt"].decode() == f"a square slides right motion score: {motion:.1f}"
    assert samples["000001_still"]["txt"].decode() == "noise"  # images have no motion
    assert sorted(p.name for p in out.glob("*.idx")) == ["shard-00000.idx", "shard-00001.idx"]
    assert report(out)["append_motion_to_caption"] is True


def test_cli_default_filters_are_table3(tmp_path: Path, capsys: pytest.CaptureFixture) -> None:
    root, out = tmp_path / "in", tmp_path / "out"
    add(root, "clip.mp4", encode(moving_square(24, speed=4)))  # 1.5 s, 64x48, 16 fps, ~7 kbps
    add(root, "image.png", image_bytes(H, W, "PNG"))
    assert goku_data.main(["prepare-shards", "--input", str(root), "--output", str(out)]) == 0
    r = report(out)
    assert r["kept"] == 0 and r["filters"]["raw"] == {
        "min_duration": 4.0, "min_short_side": 480, "min_bitrate": 500_000, "min_fps": 23.976}
    assert r["dropped_samples"] == [
        {"source": "clip.mp4", "reasons": ["duration", "resolution", "bitrate", "fps"]},
        {"source": "image.png", "reasons": ["resolution"]}]
    printed = capsys.readouterr().out
    for line in ("seen", "dropped", "duration", "resolution", "bitrate", "fps"):
        assert line in printed
    assert goku_data.main(["prepare-shards", "--input", str(root), "--output", str(out)]) == EXIT_CONFIG_ERROR
    assert capsys.readouterr().err == f"goku-data: error: output folder {out} is not empty; choose a new one\n"
