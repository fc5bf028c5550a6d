"""Toy text-to-video data: one coloured shape moving on a plain background.

The task is small enough for a tiny model to learn on a laptop CPU, yet it exercises the real data
path: WebDataset tar shards holding VP9 clips (.webm) and PNG stills with .txt captions and .json
metadata, exactly the layout the production reader consumes. Colour, shape and motion direction
are independent factors named in the caption, so a sampled clip can be checked against its prompt.

Writing: ``make_toy_dataset`` (or ``ensure_toy_dataset``, which reuses a complete dataset).
Reading: ``iter_raw_samples`` and ``decode_sample`` for single samples, ``ToyClipLoader`` for
resumable DP-aware batches.
"""
from __future__ import annotations

import io
import json
import os
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any, Iterator

import av
import numpy as np
import torch
import webdataset as wds
from PIL import Image
from webdataset.tariterators import group_by_keys, tar_file_iterator

from goku_megatron.data.decode import decode_image, decode_video_pyav, to_pixels

FORMAT = "goku-toy-v1"
MANIFEST = "manifest.json"
SHARD_PATTERN = "toy-{:05d}.tar"
FPS = 8
SPEED = 1  # pixels per frame
BACKGROUND = (48, 48, 48)
COLORS: dict[str, tuple[int, int, int]] = {
    "red": (255, 0, 0),
    "green": (0, 255, 0),
    "blue": (0, 0, 255),
    "yellow": (255, 255, 0),
}
# A triangle is left out on purpose: at 6 px it is ~20 pixels of stair steps, and shape is already
# the factor a tiny model learns last (after colour) at 16x16.
SHAPES = ("square", "circle")
DIRECTIONS: dict[str, tuple[int, int]] = {  # (dy, dx) per frame
    "left": (0, -1),
    "right": (0, 1),
    "up": (-1, 0),
    "down": (1, 0),
}
VIDEO_CODEC = "libvpx-vp9"
# Lossless VP9 is lossless in YUV, not in RGB. In 4:2:0 (profile 0, which every VP9 decoder takes;
# NVDEC takes no other) chroma is stored per 2x2 block, so colour bleeds about a pixel across the
# shape's outline (errors up to ~170/255 there) while luma stays exact. 4:4:4 (profile 1) round
# trips within 1/255 but needs a software decoder.
VIDEO_OPTIONS = {"lossless": "1"}
PIX_FMTS = ("yuv420p", "yuv444p")
VIDEO_EXTS = ("webm", "mp4")
IMAGE_EXTS = ("png", "jpg", "jpeg")


def shape_size(size: int) -> int:
    """Side of the shape's bounding box: 6 px in a 16 px frame, scaled with the frame."""
    return max(3, round(size * 3 / 8))


def shape_mask(shape: str, side: int) -> np.ndarray:
    """Boolean (side, side) mask of a shape."""
    if shape == "square":
        return np.ones((side, side), dtype=bool)
    if shape == "circle":
        c = (side - 1) / 2
        yy, xx = np.mgrid[:side, :side]
        return (yy - c) ** 2 + (xx - c) ** 2 <= (side / 2) ** 2
    raise ValueError(f"unknown shape {shape!r}; expected one of {SHAPES}")


@dataclass(frozen=True)
class ToySample:
    """The factors of one sample; everything else (pixels, caption) is derived from them."""

    index: int
    color: str
    shape: str
    direction: str | None  # None for a still image
    top: int  # position of the shape's bounding box in the first frame
    left: int

    @property
    def key(self) -> str:
        return f"{self.index:08d}"

    @property
    def caption(self) -> str:
        words = f"a {self.color} {self.shape}"
        return words if self.direction is None else f"{words} moving {self.direction}"

    @classmethod
    def draw(cls, index: int, *, still: bool, size: int, frames: int, seed: int) -> ToySample:
        """Draws the factors from an RNG keyed by (seed, index), so a sample never depends on
        how many others are made or how they are sharded."""
        rng = np.random.default_rng([seed, index])
        color = list(COLORS)[rng.integers(len(COLORS))]
        shape = SHAPES[rng.integers(len(SHAPES))]
        free = size - shape_size(size)  # largest top-left coordinate that keeps the shape inside
        if still:
            top, left = (int(v) for v in rng.integers(0, free + 1, size=2))
            return cls(index, color, shape, None, top, left)
        direction = list(DIRECTIONS)[rng.integers(len(DIRECTIONS))]
        dy, dx = DIRECTIONS[direction]
        travel = SPEED * (frames - 1)

        def start(d: int) -> int:
            # Moving towards smaller coordinates needs room behind the start, and vice versa.
            if d < 0:
                return int(rng.integers(travel, free + 1))
            if d > 0:
                return int(rng.integers(0, free - travel + 1))
            return int(rng.integers(0, free + 1))

        return cls(index, color, shape, direction, start(dy), start(dx))

    def render(self, size: int, frames: int) -> np.ndarray:
        """uint8 frames (T, H, W, 3); T is 1 for a still image."""
        side = shape_size(size)
        mask = shape_mask(self.shape, side)
        dy, dx = DIRECTIONS[self.direction] if self.direction else (0, 0)
        count = 1 if self.direction is None else frames
        out = np.empty((count, size, size, 3), dtype=np.uint8)
        out[:] = BACKGROUND
        for t in range(count):
            y, x = self.top + SPEED * dy * t, self.left + SPEED * dx * t
            out[t, y : y + side, x : x + side][mask] = COLORS[self.color]
        return out


def encode_webm(frames: np.ndarray, fps: int, pix_fmt: str = "yuv420p") -> bytes:
    """Encodes uint8 (T, H, W, 3) RGB frames as lossless VP9 in a WebM container."""
    buf = io.BytesIO()
    # bitexact: no random segment UID or muxing date, so the same frames give the same bytes.
    with av.open(buf, "w", format="webm", options={"fflags": "+bitexact"}) as container:
        stream = container.add_stream(VIDEO_CODEC, rate=fps)
        stream.width, stream.height = frames.shape[2], frames.shape[1]
        stream.pix_fmt = pix_fmt
        stream.options = dict(VIDEO_OPTIONS)
        for frame in frames:
            container.mux(stream.encode(av.VideoFrame.from_ndarray(frame, format="rgb24")))
        container.mux(stream.encode())
    return buf.getvalue()


def encode_png(image: np.ndarray) -> bytes:
    buf = io.BytesIO()
    Image.fromarray(image).save(buf, format="PNG")
    return buf.getvalue()


def _tar_entry(sample: ToySample, *, size: int, frames: int, pix_fmt: str) -> dict[str, Any]:
    pixels = sample.render(size, frames)
    factors = {"color": sample.color, "shape": sample.shape, "direction": sample.direction}
    place = {"top": sample.top, "left": sample.left, "shape_size": shape_size(size)}
    if sample.direction is None:
        media = {"png": encode_png(pixels[0])}
        timing = {"fps": None, "frames": 1, "duration": 0.0}
    else:
        media = {"webm": encode_webm(pixels, FPS, pix_fmt)}
        timing = {"fps": FPS, "frames": frames, "duration": frames / FPS, "speed": SPEED}
    meta = {"width": size, "height": size, **timing, **factors, **place}
    return {
        "__key__": sample.key,
        **media,
        "txt": sample.caption.encode("utf-8"),
        "json": json.dumps(meta, sort_keys=True).encode("utf-8"),
    }


@dataclass(frozen=True)
class ToyDatasetSpec:
    """Everything that determines the dataset's bytes; stored in the manifest to detect changes."""

    clips: int = 2048
    images: int = 512
    size: int = 16
    frames: int = 8
    shard_size: int = 256
    seed: int = 0
    # 4:4:4 keeps the shapes' colour edges exact (4:2:0 bleeds up to 170/255 into the outline);
    # the toy recipe decodes on CPU, where VP9 profile 1 costs nothing.
    pix_fmt: str = "yuv444p"

    def __post_init__(self) -> None:
        if self.clips < 0 or self.images < 0 or self.clips + self.images == 0:
            raise ValueError(
                f"need at least one sample, got clips={self.clips} images={self.images}"
            )
        if self.shard_size < 1 or self.seed < 0:
            raise ValueError(
                f"need shard_size >= 1 and seed >= 0, got {self.shard_size}, {self.seed}"
            )
        if self.pix_fmt not in PIX_FMTS:
            raise ValueError(f"pix_fmt must be one of {PIX_FMTS}, got {self.pix_fmt!r}")
        side = shape_size(self.size)
        if self.size < side or (self.clips and SPEED * (self.frames - 1) > self.size - side):
            raise ValueError(
                f"a {side} px shape moving {SPEED} px/frame for {self.frames} frames does not fit "
                f"in {self.size} px; use fewer frames or a larger size"
            )


def make_toy_dataset(
    out: Path,
    *,
    clips: int = ToyDatasetSpec.clips,
    images: int = ToyDatasetSpec.images,
    size: int = ToyDatasetSpec.size,
    frames: int = ToyDatasetSpec.frames,
    shard_size: int = ToyDatasetSpec.shard_size,
    seed: int = ToyDatasetSpec.seed,
    pix_fmt: str = ToyDatasetSpec.pix_fmt,
) -> list[Path]:
    """Writes the toy dataset to ``out`` and returns its shard paths.

    Samples 0..clips-1 are clips, the rest stills. The manifest is removed first and written last
    (atomically), so a dataset without one is known to be incomplete. Shards are byte-identical for
    the same parameters. Call from one process only (rank 0) and barrier.
    """
    spec = ToyDatasetSpec(clips, images, size, frames, shard_size, seed, pix_fmt)
    out = Path(out)
    out.mkdir(parents=True, exist_ok=True)
    (out / MANIFEST).unlink(missing_ok=True)
    for stale in out.glob(SHARD_PATTERN.replace("{:05d}", "*")):
        stale.unlink()

    total = spec.clips + spec.images
    shards: list[dict[str, Any]] = []
    for first in range(0, total, spec.shard_size):
        indices = range(first, min(first + spec.shard_size, total))
        path = out / SHARD_PATTERN.format(len(shards))
        with wds.TarWriter(str(path), mtime=0.0) as writer:
            for index in indices:
                sample = ToySample.draw(index, still=index >= spec.clips, size=spec.size,
                                        frames=spec.frames, seed=spec.seed)
                writer.write(_tar_entry(sample, size=spec.size, frames=spec.frames,
                                        pix_fmt=spec.pix_fmt))
        shards.append({"name": path.name, "samples": len(indices),
                       "clips": sum(i < spec.clips for i in indices)})

    manifest = {
        "format": FORMAT,
        "params": asdict(spec),
        "samples": total,
        "clips": spec.clips,
        "images": spec.images,
        "shards": shards,
        "vocabulary": {"colors": list(COLORS), "shapes": list(SHAPES),
                       "directions": list(DIRECTIONS)},
    }
    tmp = out / f".{MANIFEST}.tmp{os.getpid()}"
    tmp.write_text(json.dumps(manifest, indent=2) + "\n")
    os.replace(tmp, out / MANIFEST)
    return [out / s["name"] for s in shards]


def read_manifest(shard_dir: Path) -> dict[str, Any]:
    """The manifest of a complete toy dataset; FileNotFoundError if it was never finished."""
    path = Path(shard_dir) / MANIFEST
    if not path.is_file():
        raise FileNotFoundError(
            f"{path} missing: no toy dataset in {shard_dir}, or an incomplete one"
        )
    manifest = json.loads(path.read_text())
    if manifest.get("format") != FORMAT:
        raise ValueError(f"{path}: format {manifest.get('format')!r}, expected {FORMAT!r}")
    return manifest


def ensure_toy_dataset(out: Path, **params: Any) -> list[Path]:
    """Returns the shards of the dataset in ``out``, (re)building it when it is missing,
    incomplete or was made with parameters other than ``params`` (keyword arguments of
    ``make_toy_dataset``)."""
    out = Path(out)
    wanted = asdict(ToyDatasetSpec(**params))
    try:
        manifest = read_manifest(out)
    except (FileNotFoundError, ValueError):  # json.JSONDecodeError is a ValueError
        manifest = None
    if manifest is not None and manifest.get("params") == wanted:
        paths = [out / s["name"] for s in manifest["shards"]]
        if all(p.is_file() for p in paths):
            return paths
    return make_toy_dataset(out, **wanted)


# --------------------------------------------------------------------------------------- reading


def iter_raw_samples(shard_dir: Path) -> Iterator[dict[str, Any]]:
    """Raw samples ({"__key__", "__url__", ext: bytes}) of a complete toy dataset, in key order.

    Uses webdataset's tar parsing but not wds.WebDataset, whose default node splitter raises under
    torchrun and whose file handles stay open until garbage collection (webdataset 1.0.2).
    """
    for shard in read_manifest(shard_dir)["shards"]:
        url = str(Path(shard_dir) / shard["name"])
        with open(url, "rb") as stream:
            files = ({**f, "__url__": url} for f in tar_file_iterator(stream))
            yield from group_by_keys(files)


def decode_sample(sample: dict[str, Any]) -> dict[str, Any]:
    """Turns one raw WebDataset sample (bytes per extension) into
    {"key", "pixels" float32 (3, T, H, W) in [-1, 1], "caption", "meta"}; stills have T=1.

    Raises ValueError naming the key when the media is missing, undecodable, or disagrees with
    the .json metadata (a truncated clip decodes to fewer frames instead of failing)."""
    key = str(sample.get("__key__", "?"))
    meta = json.loads(sample["json"]) if "json" in sample else {}
    caption = sample["txt"].decode("utf-8").strip() if "txt" in sample else ""
    video_ext = next((e for e in VIDEO_EXTS if e in sample), None)
    image_ext = next((e for e in IMAGE_EXTS if e in sample), None)
    if video_ext is None and image_ext is None:
        media = VIDEO_EXTS + IMAGE_EXTS
        raise ValueError(f"sample {key}: no media (one of {media}) in {sorted(sample)}")
    try:
        if video_ext is not None:
            array = decode_video_pyav(sample[video_ext])
        else:
            array = decode_image(sample[image_ext])
    except (ValueError, OSError) as e:  # av.FFmpegError and PIL's errors derive from these
        raise ValueError(f"sample {key}: cannot decode .{video_ext or image_ext}: {e}") from e
    t, h, w, _ = array.shape
    expected = (meta.get("frames", t), meta.get("height", h), meta.get("width", w))
    if (t, h, w) != expected:
        raise ValueError(f"sample {key}: decoded (T, H, W) = {(t, h, w)}, metadata says {expected}")
    return {"key": key, "pixels": to_pixels(array), "caption": caption, "meta": meta}


@dataclass
class _Pool:
    """One modality's samples on this rank, consumed as a stream of per-epoch permutations."""

    stream_id: int  # separates the shuffle streams of the pools
    samples: list[dict[str, Any]]
    consumed: int = 0
    _perm_epoch: int = field(default=-1, init=False, repr=False)
    _perm: np.ndarray | None = field(default=None, init=False, repr=False)

    def take(self, count: int, seed: int) -> list[dict[str, Any]]:
        n = len(self.samples)
        out = []
        for i in range(self.consumed, self.consumed + count):
            epoch = i // n
            if epoch != self._perm_epoch:
                self._perm = np.random.default_rng([seed + epoch, self.stream_id]).permutation(n)
                self._perm_epoch = epoch
            out.append(self.samples[self._perm[i % n]])
        self.consumed += count
        return out


class ToyClipLoader:
    """Endless, resumable batches of one DP rank's share of a (small) toy dataset, held decoded
    in memory.

    Sample ``index`` belongs to DP rank ``index % dp_size``. Each batch holds one modality (clips
    or stills, whose shapes differ); the modality of step ``s`` comes from an RNG keyed by
    (seed, s), so all DP ranks draw the same modality at the same step and do equal work. Each pool
    is reshuffled per epoch by an RNG seeded with seed + epoch. Batches depend only on
    (seed, dp_rank, dp_size, batch_size, image_ratio) and the state, so TP/PP/CP peers that share a
    dp_rank see identical batches.
    """

    def __init__(
        self,
        shard_dir: Path,
        *,
        batch_size: int,
        dp_rank: int,
        dp_size: int,
        seed: int,
        image_ratio: float,
    ) -> None:
        if batch_size < 1:
            raise ValueError(f"batch_size must be >= 1, got {batch_size}")
        if not 0 <= dp_rank < dp_size:
            raise ValueError(f"need 0 <= dp_rank < dp_size, got {dp_rank} and {dp_size}")
        if not 0.0 <= image_ratio <= 1.0:
            raise ValueError(f"image_ratio must be in [0, 1], got {image_ratio}")
        self.batch_size = batch_size
        self.seed = seed
        self.image_ratio = image_ratio
        self.step = 0

        clips: list[dict[str, Any]] = []
        images: list[dict[str, Any]] = []
        for raw in iter_raw_samples(shard_dir):
            if int(raw["__key__"]) % dp_size != dp_rank:
                continue
            sample = decode_sample(raw)
            (images if sample["pixels"].shape[1] == 1 else clips).append(sample)
        if not clips and not images:
            raise ValueError(f"no samples for dp_rank {dp_rank} of {dp_size} in {shard_dir}")
        self._clips = _Pool(0, clips)
        self._images = _Pool(1, images)

    @property
    def keys(self) -> list[str]:
        """Keys of all samples this rank holds."""
        return [s["key"] for s in self._clips.samples + self._images.samples]

    def _pool_for_step(self, step: int) -> _Pool:
        if not self._images.samples:
            return self._clips
        if not self._clips.samples:
            return self._images
        draw = np.random.default_rng([self.seed, step, 2]).random()
        return self._images if draw < self.image_ratio else self._clips

    def __iter__(self) -> Iterator[dict[str, Any]]:
        return self

    def __next__(self) -> dict[str, Any]:
        pool = self._pool_for_step(self.step)
        samples = pool.take(self.batch_size, self.seed)
        self.step += 1
        return {
            "pixels": torch.stack([s["pixels"] for s in samples]),
            "captions": [s["caption"] for s in samples],
            "keys": [s["key"] for s in samples],
        }

    def state_dict(self) -> dict[str, Any]:
        """Plain ints, the same on every DP rank (unless a rank lacks a modality), so saving it once
        per DP group is enough."""
        return {"step": self.step, "consumed": {"clip": self._clips.consumed,
                                                "image": self._images.consumed}}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        self.step = int(state["step"])
        self._clips.consumed = int(state["consumed"]["clip"])
        self._images.consumed = int(state["consumed"]["image"])
