"""Data curation: Goku's raw-video filters (paper Table 3), its per-stage tiers (Table 4), the
optical-flow motion score that both the stage tiers and the captions use, and ``curate_folder``,
which turns a folder of captioned clips and images into raw shards (``goku-data prepare-shards`` is
its command line). The thresholds live here as data so that a recipe, a test or a different corpus
can override them without touching code.

What we can and cannot enforce. Table 4 also filters on DINO similarity, an aesthetic score and an
OCR text-area ratio; computing those needs models this package does not ship. They are enforced
only when the sample's metadata json (``<stem>.json`` beside the media file) carries them (keys in
``SCORE_KEYS``), so a corpus scored elsewhere is filtered exactly, and an unscored one is filtered
on resolution and motion only.

The input folder: media files (``VIDEO_SUFFIXES``, ``IMAGE_SUFFIXES``, any depth, any case), each
with its caption in ``<stem>.txt`` beside it and optional scores in ``<stem>.json``; other files are
ignored. Media bytes are copied into the shards as they are (never re-encoded).
"""
from __future__ import annotations

import io
import json
import os
import re
from collections import Counter
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any, Mapping

import cv2
import numpy as np
from PIL import Image

from goku_megatron.data.decode import VideoInfo, decode_video_pyav, probe_video
from goku_megatron.data.shards import ShardWriter

# The motion score's reference frame: frames are resized to this short side and sampled at this
# rate before the flow is measured, so the score of a clip does not depend on its resolution or
# frame rate. The score is expressed per MOTION_UNIT_S seconds. Goku does not say how it measures
# motion; its Table 4 ranges (0.3 .. 20) are of the order of the common open recipe's (Open-Sora's
# flow score: mean flow in pixels between frames about 0.5 s apart, resized to 320x576), whose
# scale these values follow (assumed). Frames are sampled twice per unit rather than once because
# OpenCV's Farneback pyramid stops before a level gets under 32 px (at 1/8 scale on a 320-px frame;
# more levels change nothing) and then loses track beyond ~25 px per frame pair: half-unit steps
# keep scores up to ~50 measurable (measured on panned textures), well past Table 4's ranges.
MOTION_SHORT_SIDE = 320
MOTION_FPS = 4.0
MOTION_UNIT_S = 0.5
# Goku's clips are at most 10 s long; scoring the first 10 s bounds the decoding cost of long
# raw videos.
MOTION_MAX_FRAMES = 40

_FARNEBACK = dict(pyr_scale=0.5, levels=3, winsize=15, iterations=3, poly_n=5, poly_sigma=1.2,
                  flags=0)

# Optional per-sample scores read from the sample's metadata json (computed by other tools):
# key -> "min" (the score must be >= the tier's bound) or "max" (<= the bound).
SCORE_KEYS = {"dino_similarity": "min", "aesthetic": "min", "ocr": "max"}

# Every reason a sample can be dropped for, in pipeline order.
DROP_REASONS = (
    "missing_caption",  # no sibling .txt, or an empty one
    "unreadable",  # the file does not open, probe or decode as a video / image
    "duration",  # Table 3
    "resolution",  # Table 3 (short side); images without a stage tier are held to it too
    "bitrate",  # Table 3
    "fps",  # Table 3
    "stage_resolution",  # Table 4 tier
    *SCORE_KEYS,  # Table 4 tier, only when the metadata json has the score
    "motion_low",  # Table 4 tier
    "motion_high",  # Table 4 tier
)


@dataclass(frozen=True)
class RawFilter:
    """Goku's Table 3 filters on raw videos; the defaults are the paper's values.

    Boundaries pass (a clip of exactly 4.0 s is kept). Duration and frame rate are compared with
    a small tolerance because containers store them rounded: timestamps often in milliseconds,
    and 24000/1001 fps is written 23.976.
    """

    min_duration: float = 4.0  # seconds
    min_short_side: int = 480  # pixels, min(height, width)
    min_bitrate: int = 500_000  # bits per second
    min_fps: float = 23.976

    def check(self, info: VideoInfo) -> list[str]:
        """The names of the filters the clip fails (empty when it passes them all)."""
        failed = []
        if info.duration < self.min_duration - 1e-3:
            failed.append("duration")
        if min(info.width, info.height) < self.min_short_side:
            failed.append("resolution")
        if info.bitrate < self.min_bitrate:
            failed.append("bitrate")
        if info.fps < self.min_fps - 1e-3:
            failed.append("fps")
        return failed


@dataclass(frozen=True)
class StageTier:
    """One row of Goku's Table 4: what a sample needs to train at that stage.

    The resolution is compared orientation-free (short side >= ``min_height``, long side >=
    ``min_width``), so a portrait clip qualifies like its landscape twin; Goku trains on mixed
    aspect ratios. The motion range is inclusive.
    """

    name: str
    min_height: int
    min_width: int
    min_dino_similarity: float
    min_aesthetic: float
    max_ocr: float
    min_motion: float
    max_motion: float

    def check(self, width: int, height: int, scores: Mapping[str, Any]) -> list[str]:
        """Failed checks among resolution and whichever ``SCORE_KEYS`` ``scores`` holds (the
        checks that need no decoding, so a sample failing them is never decoded)."""
        failed = []
        if min(width, height) < self.min_height or max(width, height) < self.min_width:
            failed.append("stage_resolution")
        for key, sense in SCORE_KEYS.items():
            if scores.get(key) is None:
                continue
            bound = getattr(self, f"{sense}_{key}")
            value = float(scores[key])
            if (value < bound) if sense == "min" else (value > bound):
                failed.append(key)
        return failed

    def check_motion(self, motion: float) -> list[str]:
        """``["motion_low"]``, ``["motion_high"]`` or ``[]`` for a clip's ``motion_score``."""
        if motion < self.min_motion:
            return ["motion_low"]
        if motion > self.max_motion:
            return ["motion_high"]
        return []


STAGES: dict[str, StageTier] = {
    tier.name: tier for tier in (
        StageTier("480p", 480, 864, 0.85, 4.3, 0.02, 0.3, 20.0),
        StageTier("720p", 720, 1280, 0.90, 4.5, 0.01, 0.5, 15.0),
        StageTier("1080p", 1080, 1920, 0.90, 4.5, 0.01, 0.5, 8.0),
    )
}


def _reference_gray(frame: np.ndarray) -> np.ndarray:
    """One RGB frame as grayscale at the reference short side (aspect ratio kept)."""
    h, w = frame.shape[:2]
    scale = MOTION_SHORT_SIDE / min(h, w)
    size = (max(1, round(w * scale)), max(1, round(h * scale)))
    interpolation = cv2.INTER_AREA if scale < 1 else cv2.INTER_LINEAR
    return cv2.cvtColor(cv2.resize(frame, size, interpolation=interpolation), cv2.COLOR_RGB2GRAY)


def motion_score(frames: np.ndarray) -> float:
    """Mean optical-flow speed of a clip, in pixels per ``MOTION_UNIT_S`` (0.5 s) at the reference
    scale (short side ``MOTION_SHORT_SIDE`` = 320 px).

    ``frames`` (uint8 [T, H, W, 3], RGB) must be sampled at ``MOTION_FPS``, as
    ``clip_motion_score`` decodes them. Each is resized to the reference short side and turned
    grayscale; OpenCV's Farneback flow between consecutive frames gives a magnitude per pixel,
    averaged over all pixels and frame pairs and converted from per-pair to per-unit (x2). So a
    score of 4 means the content moves on average 4 px every half second on a 320-px-high frame,
    whatever the source's size and rate. A static clip (or a single frame) scores 0.
    """
    if frames.ndim != 4 or frames.shape[-1] != 3:
        raise ValueError(f"expected frames [T, H, W, 3], got shape {frames.shape}")
    grays = [_reference_gray(f) for f in frames]
    magnitudes = []
    for prev, cur in zip(grays, grays[1:]):
        flow = cv2.calcOpticalFlowFarneback(prev, cur, None, **_FARNEBACK)
        magnitudes.append(float(np.linalg.norm(flow, axis=-1).mean()))
    per_pair = float(np.mean(magnitudes)) if magnitudes else 0.0
    return per_pair * MOTION_FPS * MOTION_UNIT_S


def clip_motion_score(source: bytes | Path) -> float:
    """``motion_score`` of a clip's first ``MOTION_MAX_FRAMES`` frames at ``MOTION_FPS``.

    Raises ValueError when the clip does not decode.
    """
    return motion_score(decode_video_pyav(source, fps=MOTION_FPS, max_frames=MOTION_MAX_FRAMES))


@dataclass
class CurationReport:
    """Kept samples per modality and dropped samples per reason, for report.json and the log.

    A dropped sample counts once in ``dropped`` and once under each reason it failed (the
    reasons of the first pipeline step that failed it), so the reason counts may add up to more
    than ``dropped``.
    """

    kept: Counter = field(default_factory=Counter)  # "video" / "image" -> count
    reasons: Counter = field(default_factory=Counter)  # drop reason -> count
    dropped_samples: list[tuple[str, list[str]]] = field(default_factory=list)

    def keep(self, modality: str) -> None:
        self.kept[modality] += 1

    def drop(self, source: str, reasons: list[str]) -> None:
        unknown = set(reasons) - set(DROP_REASONS)
        if not reasons or unknown:
            raise ValueError(f"drop reasons {reasons} must be non-empty and among {DROP_REASONS}")
        self.reasons.update(reasons)
        self.dropped_samples.append((source, list(reasons)))

    @property
    def kept_total(self) -> int:
        return sum(self.kept.values())

    @property
    def dropped(self) -> int:
        return len(self.dropped_samples)

    def to_dict(self) -> dict[str, Any]:
        """JSON-ready: totals, kept per modality, every reason (0 when unused), dropped files."""
        return {
            "seen": self.kept_total + self.dropped,
            "kept": self.kept_total,
            "kept_by_modality": {m: self.kept[m] for m in ("video", "image")},
            "dropped": self.dropped,
            "dropped_by_reason": {r: self.reasons[r] for r in DROP_REASONS},
            "dropped_samples": [{"source": s, "reasons": r} for s, r in self.dropped_samples],
        }

    def table(self) -> str:
        """A plain-text table of the counts (reasons that dropped nothing left out)."""
        d = self.to_dict()
        rows = [("seen", d["seen"]), ("kept", d["kept"])]
        rows += [(f"  {m}", n) for m, n in d["kept_by_modality"].items()]
        rows.append(("dropped", d["dropped"]))
        rows += [(f"  {r}", n) for r, n in d["dropped_by_reason"].items() if n]
        width = max(len(name) for name, _ in rows)
        return "\n".join(f"{name:<{width}}  {n:>8}" for name, n in rows)


# Input suffix -> shard member extension. The readers know mp4/webm/jpg/png; QuickTime (.mov) is
# the ISO-BMFF family of MP4 and WebM a profile of Matroska (.mkv), and FFmpeg's demuxers read
# either from the bytes, so the member name tells the container family; the codec is in the json.
VIDEO_SUFFIXES = {".mp4": "mp4", ".mov": "mp4", ".webm": "webm", ".mkv": "webm"}
IMAGE_SUFFIXES = {".jpg": "jpg", ".jpeg": "jpg", ".png": "png"}
# An image's member extension comes from its decoded format, not its name: a PNG named .jpg
# would otherwise reach the JPEG decoder.
_IMAGE_FORMATS = {"JPEG": "jpg", "PNG": "png"}
REPORT_NAME = "report.json"
# USTAR member names hold 100 characters: index + "_" + this + ".json" stays below.
_KEY_STEM_CHARS = 80


def caption_with_motion(caption: str, motion: float) -> str:
    """Goku appends the motion score to the caption; prompts at sampling time need the same."""
    return f"{caption} motion score: {motion:.1f}"


def sample_key(index: int, relative: Path) -> str:
    """A dot-free, slash-free WebDataset key: the file's index in the sorted input listing (which
    keeps keys unique, e.g. for a.mp4 and a.jpg) and its sanitised relative path (which keeps
    them readable)."""
    stem = re.sub(r"[^A-Za-z0-9_-]+", "_", relative.with_suffix("").as_posix()).strip("_")
    return f"{index:06d}_{stem[:_KEY_STEM_CHARS]}"


def find_media(root: Path) -> list[Path]:
    """Every clip and image under ``root``, relative to it, sorted by path: the shard order."""
    suffixes = VIDEO_SUFFIXES.keys() | IMAGE_SUFFIXES.keys()
    found = [p.relative_to(root) for p in root.rglob("*")
             if p.is_file() and p.suffix.lower() in suffixes]
    return sorted(found, key=lambda p: p.as_posix())


def _read_caption(media: Path) -> str | None:
    """The stripped caption beside ``media``; None when absent, empty or not UTF-8."""
    try:
        caption = media.with_suffix(".txt").read_text(encoding="utf-8").strip()
    except (FileNotFoundError, UnicodeDecodeError):
        return None
    return caption or None


def _read_scores(media: Path) -> dict[str, Any]:
    """The ``SCORE_KEYS`` found in the metadata json beside ``media`` (none without one).

    A malformed metadata file stops the run: it means the scoring tool upstream is broken, and
    dropping or keeping its samples silently would hide that.
    """
    path = media.with_suffix(".json")
    if not path.is_file():
        return {}
    try:
        meta = json.loads(path.read_text(encoding="utf-8"))
        return {k: float(meta[k]) for k in SCORE_KEYS if meta.get(k) is not None}
    except (ValueError, TypeError, AttributeError) as e:
        raise ValueError(f"{path}: metadata must be a JSON object with numeric scores ({e})") from e


@dataclass(frozen=True)
class _Outcome:
    """One sample's fate: dropped for ``reasons``, or kept as shard member ``ext`` with ``meta``."""

    reasons: tuple[str, ...] = ()
    ext: str = ""
    meta: dict[str, Any] = field(default_factory=dict)


def _curate_video(data: bytes, ext: str, raw: RawFilter | None, stage: StageTier | None,
                  scores: Mapping[str, Any]) -> _Outcome:
    """Cheap checks first (headers, then scores), decoding for the motion score last."""
    try:
        info = probe_video(data)
    except ValueError:
        return _Outcome(("unreadable",))
    failed = (raw.check(info) if raw else []) or (stage.check(info.width, info.height, scores)
                                                   if stage else [])
    if failed:
        return _Outcome(tuple(failed))
    try:
        motion = clip_motion_score(data)
    except ValueError:
        return _Outcome(("unreadable",))
    failed = stage.check_motion(motion) if stage else []
    if failed:
        return _Outcome(tuple(failed))
    return _Outcome(ext=ext, meta={**asdict(info), "motion": motion})


def _curate_image(data: bytes, raw: RawFilter | None, stage: StageTier | None,
                  scores: Mapping[str, Any]) -> _Outcome:
    """Images have no Table 3 row: they are held to its short side, or to the stage tier's
    resolution when a tier is given."""
    try:
        with Image.open(io.BytesIO(data)) as image:
            image.load()  # decode it all: a truncated file fails here, not in the trainer
            width, height, fmt = image.width, image.height, image.format
    except (OSError, ValueError, Image.DecompressionBombError):
        return _Outcome(("unreadable",))
    if fmt not in _IMAGE_FORMATS:
        return _Outcome(("unreadable",))
    if stage:
        failed = stage.check(width, height, scores)
    else:
        failed = ["resolution"] if raw and min(width, height) < raw.min_short_side else []
    if failed:
        return _Outcome(tuple(failed))
    return _Outcome(ext=_IMAGE_FORMATS[fmt],
                    meta={"width": width, "height": height, "codec": fmt.lower()})


def _write_json_atomic(path: Path, obj: Any) -> None:
    tmp = path.with_name(f"{path.name}.tmp{os.getpid()}")
    tmp.write_text(json.dumps(obj, indent=2) + "\n", encoding="utf-8")
    os.replace(tmp, path)


def _filter_settings(raw: RawFilter | None, stage: StageTier | None) -> dict[str, Any]:
    """The thresholds in force, for report.json (None where a filter is off)."""
    return {"raw": asdict(raw) if raw else None, "stage": asdict(stage) if stage else None,
            "motion_reference": {"short_side": MOTION_SHORT_SIDE, "fps": MOTION_FPS,
                                 "unit_s": MOTION_UNIT_S, "max_frames": MOTION_MAX_FRAMES}}


def curate_folder(input_dir: Path, output_dir: Path, *, raw: RawFilter | None = RawFilter(),
                  stage: StageTier | None = None, append_motion: bool = False,
                  samples_per_shard: int = 1000) -> CurationReport:
    """Filters the clips and images under ``input_dir`` and writes the kept ones as raw shards.

    Per kept sample the shard holds ``<key>.<mp4|webm|jpg|png>`` (the original bytes),
    ``<key>.txt`` (the caption, plus ``caption_with_motion``'s suffix for clips when
    ``append_motion``) and ``<key>.json`` (source path, width, height, codec; for clips also fps,
    frames, duration, bitrate and motion; any ``SCORE_KEYS`` from the input metadata). ``raw=None``
    turns Table 3 off; ``stage`` adds a Table 4 tier. ``output_dir`` must be new or empty, so no
    shard of an earlier run is mistaken for this one's; ``report.json`` is written last, atomically:
    its presence marks a complete output.
    """
    input_dir, output_dir = Path(input_dir), Path(output_dir)
    if not input_dir.is_dir():
        raise FileNotFoundError(f"input folder {input_dir} does not exist")
    if output_dir.exists() and any(output_dir.iterdir()):
        raise FileExistsError(f"output folder {output_dir} is not empty; choose a new one")
    report = CurationReport()
    with ShardWriter(output_dir, samples_per_shard=samples_per_shard) as writer:
        for index, relative in enumerate(find_media(input_dir)):
            path = input_dir / relative
            source = relative.as_posix()
            caption = _read_caption(path)
            if caption is None:
                report.drop(source, ["missing_caption"])
                continue
            scores = _read_scores(path)
            data = path.read_bytes()
            video_ext = VIDEO_SUFFIXES.get(path.suffix.lower())
            outcome = (_curate_video(data, video_ext, raw, stage, scores) if video_ext
                       else _curate_image(data, raw, stage, scores))
            if outcome.reasons:
                report.drop(source, list(outcome.reasons))
                continue
            if video_ext and append_motion:
                caption = caption_with_motion(caption, outcome.meta["motion"])
            writer.write(sample_key(index, relative), {
                outcome.ext: data,
                "txt": caption.encode("utf-8"),
                "json": json.dumps({"source": source, **outcome.meta, **scores}).encode("utf-8"),
            })
            report.keep("video" if video_ext else "image")
    shards = writer.written
    _write_json_atomic(output_dir / REPORT_NAME, {
        "input": str(input_dir),
        "filters": _filter_settings(raw, stage),
        "append_motion_to_caption": append_motion,
        "samples_per_shard": samples_per_shard,
        "shards": [s.name for s in shards],
        **report.to_dict(),
    })
    return report
