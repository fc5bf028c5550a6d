"""Decoding raw clips and images into training pixels: the one home of decoding.

Two backends decode video: PyAV (FFmpeg's software decoders: every codec, CPU) and DALI
(``goku_megatron.data.dali``: on CPU only VP8/VP9/MJPEG, on GPU through NVDEC every codec it takes).
``decode_sample`` picks one per codec, selects frames at the training frame rate, resizes and
centre-crops to the stage's shape, and returns pixels in [-1, 1]. It never raises on bad bytes:
the sample is skipped and counted by kind in ``BadSamples``, with one log line naming shard and key.

Clips shorter than the requested frame count are padded by repeating their last frame (what DALI's
``pad_mode="edge"`` does on the reader path) rather than skipped: the curation filters (duration
>= 4 s) keep such clips rare, and a clip that is a frame or two short after resampling still
teaches the model more than nothing; batches stay dense either way.
"""
from __future__ import annotations

import io
import json
import logging
import math
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import av
import numpy as np
import torch
import torch.nn.functional as F
from PIL import Image

from goku_megatron.config import DECODERS
from goku_megatron.data import dali
from goku_megatron.data.frames import FrameSpec, resize_geometry, sample_frame_indices
from goku_megatron.data.shards import CAPTION_EXT, IMAGE_EXTS, META_EXT, VIDEO_EXTS, BadSamples
from goku_megatron.platform import has_cuda

log = logging.getLogger(__name__)

# The codecs DALI's CPU video decoder takes (FFmpeg names); the rest need NVDEC ("mixed") or PyAV.
DALI_CPU_CODECS = frozenset({"vp8", "vp9", "mjpeg"})


# ------------------------------------------------------------------------------------- probing


@dataclass(frozen=True)
class VideoInfo:
    """What a clip's container and video stream say, without decoding a frame; curation filters
    (duration, resolution, bit rate, frame rate) and backend choice read these."""

    codec: str  # FFmpeg's codec name: "h264", "hevc", "vp9", "av1", "mjpeg", ...
    width: int
    height: int
    fps: float
    frames: int  # packets in the video stream (one frame each)
    duration: float  # seconds
    bitrate: int  # bits/s


class NoVideoStream(ValueError):
    """The bytes open as a media container but hold no video stream (e.g. audio only)."""


def _open(source: bytes | Path) -> av.container.InputContainer:
    if isinstance(source, (bytes, bytearray, memoryview)):
        return av.open(io.BytesIO(source))
    return av.open(str(source))


def _nbytes(source: bytes | Path) -> int:
    if isinstance(source, (bytes, bytearray, memoryview)):
        return len(source)
    return Path(source).stat().st_size


def one_line(e: BaseException) -> str:
    """An error's message on one line (its type's name when it has none), for the bad-sample log."""
    return " ".join(str(e).split()) or type(e).__name__


def probe_video(source: bytes | Path) -> VideoInfo:
    """Reads a clip's headers and demuxes its packets (no decoding) into a ``VideoInfo``.

    Frames are counted from the packets rather than taken from the header: WebM stores no count,
    and a clip cut short keeps its header's count while losing frames, which DALI would then pad
    with black. The bit rate is the stream's, else the container's, else bytes * 8 / duration, so
    curation thresholds (>= 500 kbps) always see a number. Raises ``NoVideoStream`` (a ValueError)
    for a container without video and ValueError, one line, for bytes that are no container.
    """
    try:
        with _open(source) as container:
            if not container.streams.video:
                raise NoVideoStream("no video stream")
            stream = container.streams.video[0]
            rate = stream.average_rate or stream.guessed_rate or stream.base_rate
            fps = float(rate) if rate else 0.0
            if stream.duration is not None and stream.time_base is not None:
                duration = float(stream.duration * stream.time_base)
            elif container.duration is not None:
                duration = container.duration / av.time_base
            else:
                duration = 0.0
            frames = sum(1 for packet in container.demux(stream) if packet.size)
            if duration == 0.0 and fps:
                duration = frames / fps
            bitrate = int(stream.bit_rate or container.bit_rate or 0)
            if not bitrate and duration > 0:
                bitrate = int(_nbytes(source) * 8 / duration)
            return VideoInfo(codec=stream.codec_context.name, width=stream.width,
                             height=stream.height, fps=fps, frames=frames, duration=duration,
                             bitrate=bitrate)
    except NoVideoStream:
        raise
    except (av.FFmpegError, ValueError, OSError) as e:
        raise ValueError(f"not a readable video: {one_line(e)}") from e


def _looks_like_video(data: bytes) -> bool:
    """Whether the bytes start like a video container (Matroska/WebM, MP4/MOV, AVI): telling a
    damaged clip (corrupt_video) from something that never was one (not_a_video)."""
    return (data[:4] == b"\x1a\x45\xdf\xa3" or data[4:8] == b"ftyp"
            or (data[:4] == b"RIFF" and data[8:12] == b"AVI "))


# --------------------------------------------------------------------------- PyAV and sampling


def decode_video_pyav(source: bytes | Path, *, fps: float | None = None,
                      max_frames: int | None = None, start: float = 0.0) -> np.ndarray:
    """Decodes a clip with PyAV into uint8 RGB frames [T, H, W, 3].

    Times count from the stream's first frame. ``fps=None`` keeps every frame shown at or after
    ``start`` seconds. With ``fps`` the clip is resampled: target time ``start + k / fps`` takes the
    source frame with the nearest timestamp (ties to the earlier one), so frames are repeated or
    dropped, never blended (blending would smear motion); targets stop at the end of the last
    frame's display time. At most ``max_frames`` frames are returned and decoding stops once they
    are known; only the frames kept are converted to RGB. Raises ValueError (``NoVideoStream``
    for a container without video) when the bytes do not decode or yield no frame.
    """
    if fps is not None and fps <= 0:
        raise ValueError(f"fps must be > 0, got {fps}")
    try:
        frames = _decode_pyav(source, fps, max_frames, start)
    except (av.FFmpegError, OSError) as e:  # some (EOFError) are no ValueError
        raise ValueError(one_line(e)) from e
    if not frames:
        raise ValueError("no frames decoded")
    return np.stack(frames)


def _decode_pyav(source: bytes | Path, fps: float | None, max_frames: int | None,
                 start: float) -> list[np.ndarray]:
    limit = math.inf if max_frames is None else max_frames
    out: list[np.ndarray] = []
    with _open(source) as container:
        if not container.streams.video:
            raise NoVideoStream("no video stream")
        stream = container.streams.video[0]
        origin = float(stream.start_time * stream.time_base) if stream.start_time else 0.0
        if start > 0:  # jump to the last keyframe at or before start, then drop what precedes it
            container.seek(int((origin + start) / stream.time_base), stream=stream, backward=True)
        # The previous frame, [time, frame, rgb once converted]: targets up to the midpoint
        # between it and the current frame are nearer to it.
        held: list[Any] | None = None
        for frame in container.decode(stream):
            t = (float(frame.time) if frame.time is not None else 0.0) - origin
            if fps is None:
                if t >= start - 1e-6:
                    out.append(_rgb(frame))
            else:
                while (held is not None and len(out) < limit
                       and start + len(out) / fps <= (held[0] + t) / 2 + 1e-9):
                    out.append(_held_rgb(held))
                held = [t, frame, None]
            if len(out) >= limit:
                break
        if fps is not None and held is not None:  # the last frame shows until t + 1 / rate
            rate = stream.average_rate or stream.guessed_rate
            end = held[0] + (1.0 / float(rate) if rate else 0.0)
            while len(out) < limit and start + len(out) / fps < end - 1e-9:
                out.append(_held_rgb(held))
    return out


def _rgb(frame: av.VideoFrame) -> np.ndarray:
    # threads=1: the default (auto) sets up a scaler thread pool per frame, which costs 4x the
    # whole decode of a tiny clip.
    return frame.reformat(format="rgb24", threads=1).to_ndarray()


def _held_rgb(held: list[Any]) -> np.ndarray:
    if held[2] is None:
        held[2] = _rgb(held[1])
    return held[2]


# ------------------------------------------------------------------------------------ geometry


def to_pixels(frames: np.ndarray, size: tuple[int, int] | None = None) -> torch.Tensor:
    """uint8 RGB frames [T, H, W, 3] -> float32 [3, T, H, W] in [-1, 1], optionally resized
    (bilinear, antialiased when shrinking) and centre-cropped to ``size = (height, width)``.

    Crops in uint8 and converts once into a fresh contiguous tensor: at 256x256 the float passes
    cost as much as decoding the clip."""
    x = torch.from_numpy(np.ascontiguousarray(frames))  # T, H, W, C
    if size is not None:
        rh, rw, top, left = resize_geometry(x.shape[1], x.shape[2], *size)
        if (rh, rw) != tuple(x.shape[1:3]):
            x = F.interpolate(x.permute(0, 3, 1, 2).float(), size=(rh, rw), mode="bilinear",
                              align_corners=False, antialias=True).clamp_(0.0, 255.0)
            x = x.permute(0, 2, 3, 1)  # back to T, H, W, C (a view)
        x = x[:, top : top + size[0], left : left + size[1]]
    out = torch.empty((3, *x.shape[:3]), dtype=torch.float32)
    out.copy_(x.permute(3, 0, 1, 2))
    return out.div_(127.5).sub_(1.0)


def decode_image(data: bytes) -> np.ndarray:
    """PIL-decoded image as uint8 RGB [1, H, W, 3]: an image is a one-frame video. Raises
    ValueError, one line, for unreadable bytes."""
    try:
        with Image.open(io.BytesIO(data)) as img:
            return np.array(img.convert("RGB"))[None]
    # PIL raises OSError (UnidentifiedImageError, truncated data), SyntaxError (broken PNG
    # chunks) and DecompressionBombError (an Exception) for bad files.
    except (OSError, SyntaxError, ValueError, Image.DecompressionBombError) as e:
        raise ValueError(f"unreadable image: {one_line(e)}") from e


# ------------------------------------------------------------------------------ decode_sample


@dataclass
class DecodedSample:
    """One sample ready for the VAE: pixels float32 [3, T, H, W] in [-1, 1] (T=1 for images),
    always on the CPU whichever backend decoded it, so samples batch together; the GPU path that
    keeps pixels on the device is ``dali.WebDatasetClipReader``."""

    key: str
    pixels: torch.Tensor
    caption: str
    meta: dict[str, Any]


_logged_routes: set[tuple[str, str]] = set()


def _route(codec: str, backend: str) -> str:
    """Who decodes ``codec`` ("image" for stills) for data.decoder ``backend``: "pyav", "pil",
    "dali-cpu" or "dali-gpu". Logs each new pairing once, so a run's log says which backend decoded
    which codec."""
    image = codec == "image"
    if backend == "pyav":
        chosen, why = ("pil" if image else "pyav"), "backend=pyav"
    elif not dali.available():
        chosen, why = ("pil" if image else "pyav"), f"DALI missing (pip install {dali.PIP_PACKAGE})"
    elif has_cuda():
        chosen, why = "dali-gpu", "CUDA available: DALI mixed (NVDEC / nvJPEG)"
    elif image:
        chosen, why = "pil", "no GPU: images decode with PIL"
    elif backend == "auto":  # docs/data.md, "Decode throughput": DALI CPU is 0.49-1.06x PyAV per sample
        chosen, why = "pyav", "no GPU: PyAV is faster than DALI's CPU decoder (docs/data.md)"
    elif codec in DALI_CPU_CODECS:
        chosen, why = "dali-cpu", "data.decoder=dali: DALI's CPU decoder takes VP8/VP9/MJPEG"
    else:
        chosen, why = "pyav", "DALI's CPU decoder takes only VP8/VP9/MJPEG"
    if (codec, chosen) not in _logged_routes:
        _logged_routes.add((codec, chosen))
        log.info("decode: %s -> %s (%s)", codec, chosen, why)
    return chosen


def decode_sample(raw: dict[str, Any], spec: FrameSpec, bad: BadSamples,
                  backend: str = "auto") -> DecodedSample | None:
    """Decodes one raw WebDataset sample ({"__key__", "__url__", ext: bytes}) to ``spec``.

    Returns None, after recording the kind in ``bad`` (one log line naming shard and key), for a
    sample without media or caption, bytes that are no video (not_a_video), a damaged clip
    (corrupt_video), a clip without frames (zero_frames) or an image that does not decode
    (unreadable_image); never raises on bad bytes. ``backend``: "auto" (DALI where it takes the
    codec, else PyAV; see ``_route``) or "pyav".
    """
    if backend not in DECODERS:
        raise ValueError(f"backend must be one of {DECODERS} (config.DECODERS), got {backend!r}")
    key = str(raw.get("__key__", "?"))
    shard = str(raw.get("__url__", "?"))
    video_ext = next((e for e in VIDEO_EXTS if e in raw), None)
    image_ext = next((e for e in IMAGE_EXTS if e in raw), None)
    if video_ext is None and image_ext is None:
        members = sorted(k for k in raw if not k.startswith("__"))
        bad.record("missing_media", shard, key, f"members {members}")
        return None
    if CAPTION_EXT not in raw:
        bad.record("missing_caption", shard, key)
        return None
    caption = raw[CAPTION_EXT].decode("utf-8", errors="replace").strip()
    try:
        meta = json.loads(raw[META_EXT]) if META_EXT in raw else {}
    except ValueError as e:  # metadata is advisory: the pixels and caption are still good
        bad.record("unreadable_json", shard, key, one_line(e))
        meta = {}
    if video_ext is not None:
        pixels = _decode_clip(raw[video_ext], spec, backend, shard, key, bad)
    else:
        pixels = _decode_still(raw[image_ext], spec, backend, shard, key, bad)
    return None if pixels is None else DecodedSample(key, pixels, caption, meta)


def _decode_clip(data: bytes, spec: FrameSpec, backend: str, shard: str, key: str,
                 bad: BadSamples) -> torch.Tensor | None:
    try:
        info = probe_video(data)
    except NoVideoStream as e:
        bad.record("not_a_video", shard, key, str(e))
        return None
    except ValueError as e:
        kind = "corrupt_video" if _looks_like_video(data) else "not_a_video"
        bad.record(kind, shard, key, str(e))
        return None
    if info.frames == 0:
        bad.record("zero_frames", shard, key, f"{info.codec} stream without frames")
        return None
    declared = info.duration * info.fps
    if info.frames < 0.9 * declared - 1:
        # Cut short or damaged mid-stream: the demuxer stops early. Decoders would return the
        # frames before the damage (DALI padding the rest), passing a broken clip as a short one.
        bad.record("corrupt_video", shard, key, f"{info.frames} frames where {info.duration:.2f} s"
                   f" at {info.fps:g} fps need {declared:.0f}")
        return None
    route = _route(info.codec, backend)
    dali_error = ""
    if route != "pyav":
        indices = sample_frame_indices(info.frames, info.fps or spec.fps or 1.0, spec.fps,
                                       spec.frames)
        decoder = dali.sample_decoder(spec.height, spec.width, route.removeprefix("dali-"))
        try:
            return decoder.decode_videos([data], [indices])[0].cpu()
        except ValueError as e:
            # NVDEC refuses some streams that are fine (4:4:4 VP9, 10-bit H.264): PyAV decides.
            dali_error = one_line(e)
    try:
        frames = decode_video_pyav(data, fps=spec.fps, max_frames=spec.frames)
    except ValueError as e:  # a container that opens but whose packets do not decode
        bad.record("corrupt_video", shard, key, f"{info.codec}: {one_line(e)}")
        return None
    if dali_error:
        log.warning("DALI failed on shard %s key %s (%s), PyAV decoded it: %s", shard, key,
                    info.codec, dali_error)
    if len(frames) < spec.frames:  # short clip: repeat the last frame
        frames = np.concatenate([frames, np.repeat(frames[-1:], spec.frames - len(frames), 0)])
    return to_pixels(frames, (spec.height, spec.width))


def _decode_still(data: bytes, spec: FrameSpec, backend: str, shard: str, key: str,
                  bad: BadSamples) -> torch.Tensor | None:
    try:
        if _route("image", backend) == "pil":
            return to_pixels(decode_image(data), (spec.height, spec.width))
        return dali.sample_decoder(spec.height, spec.width, "gpu").decode_images([data])[0].cpu()
    except ValueError as e:  # decode_image's and SampleDecoder's errors
        bad.record("unreadable_image", shard, key, one_line(e))
        return None
