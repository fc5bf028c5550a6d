"""Decoding: probing, frame sampling, geometry, the DALI CPU and PyAV paths against the encoded
pixels, the DALI WebDataset reader's DP split, and one test per bad-sample kind."""
from __future__ import annotations

import io
import json
import logging
import sys
from pathlib import Path

import av
import numpy as np
import pytest
import torch
from PIL import Image

from goku_megatron.data import dali, decode
from goku_megatron.data.dali import WebDatasetClipReader
from goku_megatron.data.decode import decode_sample, decode_video_pyav, probe_video, to_pixels
from goku_megatron.data.frames import FrameSpec, resize_geometry, sample_frame_indices
from goku_megatron.data.shards import BadSamples, ShardWriter, list_samples, read_sample

# Without DALI, backend "auto" decodes with PyAV and every test but these two still runs.
needs_dali = pytest.mark.skipif(not dali.available(), reason=f"needs {dali.PIP_PACKAGE}")

FPS, FRAMES, H, W = 8, 24, 48, 64
# (codec, container, extension, stream options): lossless 4:4:4 VP9 round-trips RGB within a
# level or two; H.264 is encoded as it usually is (lossy 4:2:0), so it is checked with a tolerance.
CODECS = {
    "vp9": ("libvpx-vp9", "webm", "webm", {"lossless": "1"}, "yuv444p"),
    "h264": ("libx264", "mp4", "mp4", {"crf": "18"}, "yuv420p"),
}


def encode_clip(frames: np.ndarray, codec: str, fps: int = FPS) -> bytes:
    name, container_format, _, options, pix_fmt = CODECS[codec]
    buf = io.BytesIO()
    with av.open(buf, "w", format=container_format) as container:
        stream = container.add_stream(name, rate=fps, options=options)
        stream.height, stream.width = frames.shape[1:3]
        stream.pix_fmt = pix_fmt
        for frame in frames:
            container.mux(stream.encode(av.VideoFrame.from_ndarray(frame, format="rgb24")))
        container.mux(stream.encode())
    return buf.getvalue()


def index_frames(count: int = FRAMES, height: int = H, width: int = W) -> np.ndarray:
    """Frame i is uniformly grey at 10 * i: its index survives any codec and any resize."""
    return np.repeat(np.arange(count, dtype=np.uint8)[:, None, None, None] * 10, 3, -1) * np.ones(
        (1, height, width, 1), np.uint8)


def indices_of(pixels: torch.Tensor) -> list[int]:
    """Frame indices of decoded index_frames pixels [3, T, H, W] in [-1, 1]."""
    grey = (pixels.mean(dim=(0, 2, 3)) + 1.0) * 127.5
    return (grey / 10).round().int().tolist()


def content_frames(count: int = 8) -> np.ndarray:
    """Smooth colour gradients that move one pixel per frame: content worth comparing."""
    yy, xx = np.mgrid[:H, :W]
    return np.stack([np.stack([(xx + t) * 3 % 256, yy * 5, (xx + yy + 2 * t) * 2 % 256], -1)
                     for t in range(count)]).astype(np.uint8)


def rgb255(pixels: torch.Tensor) -> np.ndarray:
    """[3, T, H, W] in [-1, 1] -> [T, H, W, 3] float in [0, 255]."""
    return ((pixels.permute(1, 2, 3, 0).numpy() + 1.0) * 127.5).astype(np.float64)


def image_bytes(image: np.ndarray, fmt: str) -> bytes:
    buf = io.BytesIO()
    Image.fromarray(image).save(buf, format=fmt, **({"quality": 95} if fmt == "JPEG" else {}))
    return buf.getvalue()


@pytest.fixture(scope="module")
def shards(tmp_path_factory: pytest.TempPathFactory) -> dict[str, dict]:
    """Raw samples read back from shards: clips (index and content) per codec, PNG and JPEG."""
    out = tmp_path_factory.mktemp("decode")
    image = content_frames(1)[0]
    samples = {}
    for codec, (_, _, ext, _, _) in CODECS.items():
        samples[f"{codec}-index"] = {ext: encode_clip(index_frames(), codec)}
        samples[f"{codec}-content"] = {ext: encode_clip(content_frames(), codec)}
    samples["png-content"] = {"png": image_bytes(image, "PNG")}
    samples["jpg-content"] = {"jpg": image_bytes(image, "JPEG")}
    with ShardWriter(out, samples_per_shard=3) as writer:
        for key, media in samples.items():
            meta = json.dumps({"kind": key}).encode()
            writer.write(key, {**media, "txt": f"caption of {key}".encode(), "json": meta})
    bad = BadSamples()
    raws = {r.key: read_sample(r) for shard in writer.written for r in list_samples(shard, bad)}
    assert not bad.counts and set(raws) == set(samples)
    return raws


# ----------------------------------------------------------------------------- probe and sampling


@pytest.mark.parametrize("codec", CODECS)
def test_probe_video(shards: dict, codec: str) -> None:
    ext = CODECS[codec][2]
    info = probe_video(shards[f"{codec}-index"][ext])
    assert (info.codec, info.width, info.height) == (codec, W, H)
    assert (info.fps, info.frames) == (FPS, FRAMES)
    assert info.duration == pytest.approx(FRAMES / FPS, abs=1 / FPS)
    assert info.bitrate > 0
    with pytest.raises(ValueError, match="not a readable video") as e:
        probe_video(b"plain text, not a clip\n" * 20)
    assert "\n" not in str(e.value)


def test_sample_frame_indices() -> None:
    assert sample_frame_indices(24, 8, 4, 5).tolist() == [0, 2, 4, 6, 8]
    assert sample_frame_indices(24, 8, 16, 5).tolist() == [0, 0, 1, 1, 2]
    # 30 -> 24 fps: target k lies at source 1.25 k; 2.5 ties to the earlier frame
    assert sample_frame_indices(100, 30, 24, 6).tolist() == [0, 1, 2, 4, 5, 6]
    assert sample_frame_indices(24, 8, 3, 4, start=0.5).tolist() == [4, 7, 9, 12]
    assert sample_frame_indices(24, 8, None, 3, start=0.5).tolist() == [4, 5, 6]
    # short clips repeat the last frame sampled
    assert sample_frame_indices(5, 8, 8, 7).tolist() == [0, 1, 2, 3, 4, 4, 4]
    assert sample_frame_indices(7, 8, 4, 6).tolist() == [0, 2, 4, 6, 6, 6]
    assert sample_frame_indices(8, 8, 4, 6).tolist() == [0, 2, 4, 6, 6, 6]


@pytest.mark.parametrize("codec", CODECS)
def test_pyav_resampling_matches_the_index_rule(shards: dict, codec: str) -> None:
    data = shards[f"{codec}-index"][CODECS[codec][2]]

    def picked(**kwargs: float) -> list[int]:
        frames = decode_video_pyav(data, **kwargs)
        return (frames.reshape(len(frames), -1).mean(1) / 10).round().astype(int).tolist()

    assert picked() == list(range(FRAMES))
    assert picked(start=1.0, max_frames=3) == [8, 9, 10]
    for fps, count, start in [(4, 6, 0.0), (16, 9, 0.0), (3, 5, 0.5), (6, 10, 0.25)]:
        expected = sample_frame_indices(FRAMES, FPS, fps, count, start).tolist()
        assert picked(fps=fps, max_frames=count, start=start) == expected, (fps, count, start)
    # without max_frames, targets run to the end of the last frame's display time
    assert picked(fps=4) == list(range(0, FRAMES, 2))


def test_resize_crop_geometry() -> None:
    assert resize_geometry(48, 64, 32, 32) == (32, 43, 0, 6)  # odd margin 11: DALI cuts 6 left
    assert resize_geometry(64, 48, 32, 32) == (43, 32, 6, 0)
    assert resize_geometry(48, 64, 24, 40) == (30, 40, 3, 0)
    assert resize_geometry(50, 70, 100, 90) == (100, 140, 0, 25)  # upscale to cover
    assert resize_geometry(48, 64, 48, 64) == (48, 64, 0, 0)
    columns = np.broadcast_to(np.arange(64, dtype=np.uint8)[None, None, :, None] * 4,
                              (2, 32, 64, 3))
    cropped = rgb255(to_pixels(columns, (32, 32)))  # no scaling needed: a pure centre crop
    assert cropped.shape == (2, 32, 32, 3)
    np.testing.assert_allclose(cropped[0, 0, :, 0], np.arange(16, 48) * 4, atol=1e-3)
    assert to_pixels(columns).shape == (3, 2, 32, 64)


# ------------------------------------------------------------------------ decode_sample: good


@pytest.mark.parametrize("backend", ["auto", "pyav"])
@pytest.mark.parametrize("codec", CODECS)
def test_clips_match_what_was_encoded(shards: dict, codec: str, backend: str) -> None:
    raw = shards[f"{codec}-content"]
    sample = decode_sample(raw, FrameSpec(fps=None, frames=8, height=H, width=W), BadSamples(),
                           backend)
    assert sample is not None and sample.key == f"{codec}-content"
    assert sample.caption == f"caption of {codec}-content" and sample.meta == {"kind": sample.key}
    assert sample.pixels.shape == (3, 8, H, W) and sample.pixels.dtype == torch.float32
    assert -1.0 <= sample.pixels.min() and sample.pixels.max() <= 1.0
    error = np.abs(rgb255(sample.pixels) - content_frames())
    if codec == "vp9":  # lossless 4:4:4: only the YUV <-> RGB rounding remains
        assert error.max() < 2.01, error.max()
    else:
        assert error.mean() < 3.0 and np.percentile(error, 99) < 24, error.mean()


@needs_dali
@pytest.mark.parametrize("codec", CODECS)
def test_dali_and_pyav_agree_after_resize(shards: dict, codec: str,
                                          monkeypatch: pytest.MonkeyPatch,
                                          caplog: pytest.LogCaptureFixture) -> None:
    monkeypatch.setattr(decode, "_logged_routes", set())
    spec = FrameSpec(fps=4, frames=4, height=32, width=32)  # covers 32x43, cuts 6 px left
    raw = shards[f"{codec}-content"]
    with caplog.at_level(logging.INFO, logger="goku_megatron"):
        dali_cpu = decode_sample(raw, spec, BadSamples(), backend="dali")
        decode_sample(raw, spec, BadSamples(), backend="dali")  # the route is logged once per codec
    pyav = decode_sample(raw, spec, BadSamples(), backend="pyav")
    assert dali_cpu is not None and pyav is not None and dali_cpu.pixels.shape == (3, 4, 32, 32)
    routes = [r.getMessage() for r in caplog.records if "decode:" in r.getMessage()]
    assert len(routes) == 1
    assert routes[0].startswith(f"decode: {codec} -> {'dali-cpu' if codec == 'vp9' else 'pyav'} (")
    difference = np.abs(rgb255(dali_cpu.pixels) - rgb255(pyav.pixels))
    assert difference.mean() < 1.0 and difference.max() < 4.0  # two resamplers, same geometry


@pytest.mark.parametrize("backend", ["auto", "pyav"])
@pytest.mark.parametrize("codec", CODECS)
def test_frame_sampling_picks_the_expected_frames(shards: dict, codec: str, backend: str) -> None:
    raw = shards[f"{codec}-index"]

    def picked(fps: float | None, frames: int) -> list[int]:
        sample = decode_sample(raw, FrameSpec(fps, frames, 24, 32), BadSamples(), backend)
        assert sample is not None and sample.pixels.shape == (3, frames, 24, 32)
        return indices_of(sample.pixels)

    assert picked(4, 6) == [0, 2, 4, 6, 8, 10]
    assert picked(12, 6) == [0, 1, 1, 2, 3, 3]  # 1.5x: 0, .67, 1.33, 2, 2.67, 3.33
    assert picked(None, 5) == [0, 1, 2, 3, 4]
    assert picked(4, 14) == list(range(0, FRAMES, 2)) + [22, 22]  # short: the last frame repeats


@pytest.mark.parametrize("kind", ["png", "jpg"])
def test_images_are_one_frame(shards: dict, kind: str) -> None:
    raw = shards[f"{kind}-content"]
    source = content_frames(1)
    sample = decode_sample(raw, FrameSpec(4, 16, H, W), BadSamples())
    assert sample is not None and sample.pixels.shape == (3, 1, H, W)
    error = np.abs(rgb255(sample.pixels) - source)
    assert error.max() < 1e-3 if kind == "png" else error.mean() < 2.0
    small = decode_sample(raw, FrameSpec(4, 16, 24, 24), BadSamples())
    assert small is not None and small.pixels.shape == (3, 1, 24, 24)


@needs_dali
def test_dali_sample_decoder_recovers_after_a_bad_input(shards: dict) -> None:
    """A DALI pipeline whose operator failed is dead: the decoder must rebuild it."""
    decoder = dali.SampleDecoder(24, 32)
    clip, png = shards["vp9-index"]["webm"], shards["png-content"]["png"]
    for _ in range(2):
        with pytest.raises(ValueError, match="DALI video decode failed"):
            decoder.decode_videos([clip[:100] + b"\0" * 1000], [np.arange(3)])
        (pixels,) = decoder.decode_videos([clip], [np.array([1, 5, 5])])
        assert pixels.shape == (3, 3, 24, 32) and indices_of(pixels) == [1, 5, 5]
        with pytest.raises(ValueError, match="DALI image decode failed"):
            decoder.decode_images([b"not an image"])
        (image,) = decoder.decode_images([png])
        assert image.shape == (3, 1, 24, 32)


def test_without_dali_auto_falls_back_to_pyav(shards: dict, monkeypatch: pytest.MonkeyPatch,
                                              caplog: pytest.LogCaptureFixture) -> None:
    monkeypatch.setattr(decode, "_logged_routes", set())
    monkeypatch.setattr(dali, "available", lambda: False)
    monkeypatch.setitem(sys.modules, "nvidia.dali", None)  # makes `import nvidia.dali` fail
    with caplog.at_level(logging.INFO, logger="goku_megatron"):
        sample = decode_sample(shards["vp9-index"], FrameSpec(4, 3, 24, 32), BadSamples())
    assert sample is not None and indices_of(sample.pixels) == [0, 2, 4]
    assert f"vp9 -> pyav (DALI missing (pip install {dali.PIP_PACKAGE}))" in caplog.text
    with pytest.raises(ImportError, match=f"pip install {dali.PIP_PACKAGE}"):
        dali.SampleDecoder(24, 32).decode_images([b"x"])


# ------------------------------------------------------------------------ DALI webdataset reader


@needs_dali
def test_dali_reader_splits_shards_across_dp_ranks(tmp_path: Path) -> None:
    keys = [f"clip{i:02d}" for i in range(7)]
    with ShardWriter(tmp_path, samples_per_shard=3) as writer:
        for i, key in enumerate(keys):
            # clip i starts at grey level 10 * i: its frames tell which clip they came from
            frames = np.roll(index_frames(16, 32, 32), -i, axis=0)[:8]
            clip = encode_clip(frames, "vp9")
            writer.write(key, {"webm": clip, "txt": f"caption {i}".encode()})
    assert all(p.with_suffix(".idx").is_file() for p in writer.written)
    spec = FrameSpec(fps=4, frames=3, height=16, width=16)
    seen: list[list[str]] = []
    for rank in range(2):
        reader = WebDatasetClipReader(writer.written, spec, batch_size=2, source_fps=FPS,
                                      dp_rank=rank, dp_size=2, shuffle=False)
        rank_keys: list[str] = []
        while len(rank_keys) < reader.samples_per_rank:
            batch = next(reader)
            assert batch["pixels"].shape == (2, 3, 3, 16, 16)
            for key, caption, pixels in zip(batch["keys"], batch["captions"], batch["pixels"]):
                i = keys.index(key)
                assert caption == f"caption {i}"
                assert indices_of(pixels) == [i, i + 2, i + 4]  # stride 2: 8 -> 4 fps
            rank_keys += batch["keys"]
        seen.append(rank_keys[: reader.samples_per_rank])
    assert [len(s) for s in seen] == [3, 4]  # DALI's split: [r*N//n, (r+1)*N//n)
    assert not set(seen[0]) & set(seen[1]) and sorted(seen[0] + seen[1]) == keys
    shuffled = WebDatasetClipReader(writer.written, spec, batch_size=2, source_fps=FPS, dp_rank=1,
                                    dp_size=2, seed=3, initial_fill=4)
    assert {k for _ in range(4) for k in next(shuffled)["keys"]} <= set(seen[1])


# --------------------------------------------------------------------- one test per bad kind


def check_skipped(raw: dict, kind: str, caplog: pytest.LogCaptureFixture,
                  spec: FrameSpec = FrameSpec(4, 4, 32, 32)) -> None:
    """decode_sample returns None, counts exactly one ``kind`` and logs one line naming shard
    and key, without raising."""
    bad = BadSamples()
    caplog.clear()
    with caplog.at_level(logging.WARNING, logger="goku_megatron"):
        assert decode_sample(raw, spec, bad) is None
    assert bad.counts == {kind: 1}
    lines = [r.getMessage() for r in caplog.records if r.levelno >= logging.WARNING]
    assert len(lines) == 1 and kind in lines[0], lines
    assert raw["__url__"] in lines[0] and raw["__key__"] in lines[0]


def bad_raw(key: str, **media: bytes) -> dict:
    return {"__key__": key, "__url__": "/data/shard-00007.tar", "txt": b"caption", **media}


@pytest.mark.parametrize("damage", ["header-then-garbage", "cut-in-half"])
@pytest.mark.parametrize("codec", CODECS)
def test_corrupt_clip(shards: dict, codec: str, damage: str,
                      caplog: pytest.LogCaptureFixture) -> None:
    ext = CODECS[codec][2]
    clip = shards[f"{codec}-content"][ext]
    if damage == "header-then-garbage":
        garbage = np.random.default_rng(0).integers(0, 256, len(clip), dtype=np.uint8).tobytes()
        damaged = clip[:64] + garbage
    else:  # a webm keeps the frames before the cut; an mp4 loses its index (moov) at the end
        damaged = clip[: len(clip) // 2]
    check_skipped(bad_raw(f"{codec}-{damage}", **{ext: damaged}), "corrupt_video", caplog)


def test_not_a_video(caplog: pytest.LogCaptureFixture) -> None:
    check_skipped(bad_raw("text", mp4=b"these are subtitles, not a clip\n" * 40), "not_a_video",
                  caplog)


def test_zero_frames(shards: dict, caplog: pytest.LogCaptureFixture) -> None:
    clip = shards["vp9-content"]["webm"]
    # The WebM header (with its VP9 track) followed by one empty cluster: a stream, no frames.
    header = clip[: clip.index(bytes.fromhex("1F43B675"))]
    empty = header + bytes.fromhex("1F43B675 80")
    assert probe_video(empty).frames == 0
    check_skipped(bad_raw("empty", webm=empty), "zero_frames", caplog)


def test_unreadable_image(shards: dict, caplog: pytest.LogCaptureFixture) -> None:
    jpeg = shards["jpg-content"]["jpg"]
    check_skipped(bad_raw("jpeg", jpg=jpeg[:20] + b"\x00" * 200), "unreadable_image", caplog)
