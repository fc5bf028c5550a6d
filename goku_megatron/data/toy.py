"""Toy text-to-video data: one coloured shape moving on a plain background.

The task is small enough for a tiny model to learn on a laptop CPU, yet it exercises the real data
path: WebDataset tar shards holding VP9 clips (.webm) and PNG stills with .txt captions and .json
metadata, exactly the layout the production reader consumes. Colour, shape and motion direction
are independent factors named in the caption, so a sampled clip can be checked against its prompt.

ShapesBench (goku_megatron/evaluation.py) tests composition with ``HELD_OUT``: four of the 32
(colour, shape, direction) combinations that training clips never show. A validation split in
``val/`` next to the training shards shows every combination, held-out ones included.
``ToyDatasetSpec.colors`` (config data.toy_colors) leaves whole colours out of training, so that a
base model never sees one and a finetune can teach it (docs/recipes.md); the validation split still
shows all 32 combinations.

Writing: ``make_toy_dataset`` (or ``ensure_toy_dataset``, which reuses a complete dataset).
Reading: training reads the shards like any raw shards (goku_megatron/data/pipeline.py: SampleStream,
decode, and the identity as the VAE); ``iter_raw_samples`` lists a split's raw samples in key order
and ``read_validation`` decodes the validation split as one batch.
"""
from __future__ import annotations

import io
import itertools
import json
import logging
import os
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any, Collection, Iterator, Sequence

import av
import numpy as np
import torch
import webdataset as wds
from PIL import Image
from webdataset.tariterators import group_by_keys, tar_file_iterator

from goku_megatron.config import ConfigError
from goku_megatron.data.decode import decode_sample
from goku_megatron.data.frames import FrameSpec
from goku_megatron.data.shards import BadSamples

log = logging.getLogger(__name__)

# v2: training clips leave out HELD_OUT, and the validation split in VAL_DIR; v3: diamonds, not
# circles.
FORMAT = "goku-toy-v3"
MANIFEST = "manifest.json"
SHARD_PATTERN = "toy-{:05d}.tar"
VAL_DIR = "val"
FPS = 8
SPEED = 1  # pixels per frame
BACKGROUND = (48, 48, 48)
COLORS: dict[str, tuple[int, int, int]] = {
    "red": (255, 0, 0),
    "green": (0, 255, 0),
    "blue": (0, 0, 255),
    "yellow": (255, 255, 0),
}
# Shape is the factor a tiny model learns last (after colour and motion) at 16x16, so the two
# differ by a third of the box: a 6 px diamond is 24 of the square's 36 pixels. A 6 px circle (v1,
# v2) differed by its 4 corner pixels only, and a 4-layer model had not told them apart after 1200
# steps (docs/evaluation.md).
SHAPES = ("square", "diamond")
DIRECTIONS: dict[str, tuple[int, int]] = {  # (dy, dx) per frame
    "left": (0, -1),
    "right": (0, 1),
    "up": (-1, 0),
    "down": (1, 0),
}
# Every (colour, shape, direction) combination, colour-major: the order of ShapesBench's prompts and
# of the validation split.
TRIPLES: tuple[tuple[str, str, str], ...] = tuple(itertools.product(COLORS, SHAPES, DIRECTIONS))
# Combinations no training clip shows, so that sampling them tests composition rather than recall.
# A Latin square: each colour and each direction once, each shape twice. Every single factor value
# and every pair of factors (colour+shape, colour+direction, shape+direction) still occurs in
# training, so a model that composes factors can draw these; one that memorised triples cannot.
# Stills have no direction, so every still is a seen combination.
HELD_OUT: tuple[tuple[str, str, str], ...] = (
    ("red", "diamond", "up"),
    ("green", "square", "down"),
    ("blue", "diamond", "left"),
    ("yellow", "square", "right"),
)
# Validation positions come from np.random.default_rng([index, 0, VAL_STREAM]): numpy pads seed
# words with zeros, so no training stream [seed, index] can equal one with this nonzero third word.
VAL_STREAM = 0x76616C  # "val"
VIDEO_CODEC = "libvpx-vp9"
# Lossless VP9 is lossless in YUV, not in RGB. In 4:2:0 (profile 0, which every VP9 decoder takes;
# NVDEC takes no other) chroma is stored per 2x2 block, so colour bleeds about a pixel across the
# shape's outline (errors up to ~170/255 there) while luma stays exact. 4:4:4 (profile 1) round
# trips within 1/255 but needs a software decoder.
VIDEO_OPTIONS = {"lossless": "1"}
PIX_FMTS = ("yuv420p", "yuv444p")


def shape_size(size: int) -> int:
    """Side of the shape's bounding box: 6 px in a 16 px frame, scaled with the frame."""
    return max(3, round(size * 3 / 8))


def shape_mask(shape: str, side: int) -> np.ndarray:
    """Boolean (side, side) mask of a shape."""
    if shape == "square":
        return np.ones((side, side), dtype=bool)
    if shape == "diamond":
        c = (side - 1) / 2
        yy, xx = np.mgrid[:side, :side]
        return np.abs(yy - c) + np.abs(xx - c) <= side / 2
    raise ValueError(f"unknown shape {shape!r}; expected one of {SHAPES}")


def caption_for(color: str, shape: str, direction: str | None) -> str:
    """A sample's caption: "a red square moving left", or "a blue diamond" for a still."""
    words = f"a {color} {shape}"
    return words if direction is None else f"{words} moving {direction}"


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
        return caption_for(self.color, self.shape, self.direction)

    @classmethod
    def draw(cls, index: int, *, still: bool, size: int, frames: int, seed: int,
             colors: Collection[str] = tuple(COLORS)) -> ToySample:
        """Draws the factors from an RNG keyed by (seed, index), so a sample never depends on
        how many others are made or how they are sharded.

        A clip whose factors are a HELD_OUT combination, or any sample of a colour outside
        ``colors``, draws them again from the same RNG: the sample stays a function of (seed,
        index), and one whose first draw was allowed is the sample earlier dataset versions (and
        the dataset of all colours) made."""
        rng = np.random.default_rng([seed, index])
        while True:
            color = list(COLORS)[rng.integers(len(COLORS))]
            shape = SHAPES[rng.integers(len(SHAPES))]
            direction = None if still else list(DIRECTIONS)[rng.integers(len(DIRECTIONS))]
            if color in colors and (color, shape, direction) not in HELD_OUT:
                return cls.placed(rng, index, color, shape, direction, size=size, frames=frames)

    @classmethod
    def placed(cls, rng: np.random.Generator, index: int, color: str, shape: str,
               direction: str | None, *, size: int, frames: int) -> ToySample:
        """A sample of the given factors, its first-frame position drawn from ``rng`` so that the
        shape stays inside the frame for the whole clip."""
        free = size - shape_size(size)  # largest top-left coordinate that keeps the shape inside
        if direction is None:
            top, left = (int(v) for v in rng.integers(0, free + 1, size=2))
            return cls(index, color, shape, None, top, left)
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
    # Validation clips in VAL_DIR; a multiple of len(TRIPLES) shows every combination equally often.
    val_clips: int = 64
    # The colours training clips and stills may show (config data.toy_colors), so that a factor can
    # be left out of a base model and taught later (docs/recipes.md, LoRA on CPU); empty: every
    # colour. Normalised to COLORS order, and all of them to (), so that listing every colour makes
    # the default dataset. The validation split shows every colour regardless.
    colors: tuple[str, ...] = ()

    def __post_init__(self) -> None:
        if self.clips < 0 or self.images < 0 or self.clips + self.images == 0:
            raise ValueError(
                f"need at least one sample, got clips={self.clips} images={self.images}"
            )
        if self.shard_size < 1 or self.seed < 0 or self.val_clips < 0:
            raise ValueError(
                f"need shard_size >= 1, seed >= 0 and val_clips >= 0, got {self.shard_size}, "
                f"{self.seed}, {self.val_clips}"
            )
        if self.pix_fmt not in PIX_FMTS:
            raise ValueError(f"pix_fmt must be one of {PIX_FMTS}, got {self.pix_fmt!r}")
        check_colors(self.colors)
        chosen = tuple(c for c in COLORS if c in self.colors)
        object.__setattr__(self, "colors", () if len(chosen) == len(COLORS) else chosen)
        side = shape_size(self.size)
        moving = self.clips or self.val_clips
        if self.size < side or (moving and SPEED * (self.frames - 1) > self.size - side):
            raise ValueError(
                f"a {side} px shape moving {SPEED} px/frame for {self.frames} frames does not fit "
                f"in {self.size} px; use fewer frames or a larger size"
            )

    @property
    def training_colors(self) -> tuple[str, ...]:
        """The colours training samples draw from."""
        return self.colors or tuple(COLORS)

    def params(self) -> dict[str, Any]:
        """The manifest's ``params``: every field, but ``colors`` only where it leaves colours out,
        so a dataset of every colour keeps the manifest earlier versions wrote and is reused."""
        params = asdict(self)
        if self.colors:
            params["colors"] = list(self.colors)  # as JSON reads it back, to compare equal
        else:
            del params["colors"]
        return params


def check_colors(colors: Sequence[str]) -> None:
    """ValueError naming the vocabulary if ``colors`` holds a name that is not in COLORS."""
    unknown = [c for c in colors if c not in COLORS]
    if unknown:
        raise ValueError(f"unknown toy colour(s) {', '.join(map(str, unknown))}; choose from "
                         f"{', '.join(COLORS)}")


def parse_colors(text: str) -> tuple[str, ...]:
    """``"red,green"`` -> ("red", "green"), as goku-data and goku-eval take colours; ValueError
    (check_colors) for an unknown name."""
    colors = tuple(name.strip() for name in text.split(",") if name.strip())
    check_colors(colors)
    return colors


def validation_samples(count: int, *, size: int, frames: int) -> list[ToySample]:
    """The validation clips: clip i shows TRIPLES[i % 32], held-out combinations included, so any
    multiple of 32 clips shows each combination equally often.

    Positions come from a stream of their own (VAL_STREAM) keyed by the index alone: independent of
    every training draw, and independent of the dataset seed, so runs with different seeds are
    scored on the same clips. At 16 px a seen combination has only ~44 start positions, so a
    validation clip of one usually has a pixel-identical twin in training: the seen clips measure
    fit, the held-out ones generalisation.
    """
    return [ToySample.placed(np.random.default_rng([index, 0, VAL_STREAM]), index,
                             *TRIPLES[index % len(TRIPLES)], size=size, frames=frames)
            for index in range(count)]


def _clear(split_dir: Path) -> None:
    """Removes a split's manifest first (marking it incomplete), then its shards."""
    (split_dir / MANIFEST).unlink(missing_ok=True)
    for stale in split_dir.glob(SHARD_PATTERN.replace("{:05d}", "*")):
        stale.unlink()


def _write_split(split_dir: Path, samples: list[ToySample], spec: ToyDatasetSpec,
                 **extra: Any) -> list[Path]:
    """Writes ``samples`` as shards of ``spec.shard_size`` and then, atomically, the manifest."""
    split_dir.mkdir(parents=True, exist_ok=True)
    _clear(split_dir)
    shards: list[dict[str, Any]] = []
    for first in range(0, len(samples), spec.shard_size):
        chunk = samples[first : first + spec.shard_size]
        path = split_dir / SHARD_PATTERN.format(len(shards))
        with wds.TarWriter(str(path), mtime=0.0) as writer:
            for sample in chunk:
                writer.write(_tar_entry(sample, size=spec.size, frames=spec.frames,
                                        pix_fmt=spec.pix_fmt))
        shards.append({"name": path.name, "samples": len(chunk),
                       "clips": sum(s.direction is not None for s in chunk)})
    clips = sum(s["clips"] for s in shards)
    manifest = {
        "format": FORMAT,
        "params": spec.params(),
        **extra,
        "samples": len(samples),
        "clips": clips,
        "images": len(samples) - clips,
        "shards": shards,
        "held_out": [list(t) for t in HELD_OUT],
        "vocabulary": {"colors": list(COLORS), "shapes": list(SHAPES),
                       "directions": list(DIRECTIONS)},
    }
    tmp = split_dir / f".{MANIFEST}.tmp{os.getpid()}"
    tmp.write_text(json.dumps(manifest, indent=2) + "\n")
    os.replace(tmp, split_dir / MANIFEST)
    return [split_dir / s["name"] for s in shards]


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
    val_clips: int = ToyDatasetSpec.val_clips,
    colors: Sequence[str] = ToyDatasetSpec.colors,
) -> list[Path]:
    """Writes the toy dataset to ``out`` and returns its (training) shard paths.

    Samples 0..clips-1 are clips, the rest stills, of ``colors`` only (empty: all); the validation
    split (``validation_samples``) goes to ``out/val`` with a manifest of its own. The training
    manifest is removed first and written last (atomically), after the validation split, so a
    dataset without one is known to be incomplete. Shards are byte-identical for the same parameters. Call from one process only
    (rank 0) and barrier.
    """
    spec = ToyDatasetSpec(clips=clips, images=images, size=size, frames=frames,
                          shard_size=shard_size, seed=seed, pix_fmt=pix_fmt, val_clips=val_clips,
                          colors=tuple(colors))
    out = Path(out)
    out.mkdir(parents=True, exist_ok=True)
    (out / MANIFEST).unlink(missing_ok=True)
    _clear(out / VAL_DIR)
    if spec.val_clips:
        _write_split(out / VAL_DIR, validation_samples(spec.val_clips, size=spec.size,
                                                       frames=spec.frames), spec, split="val")
    train = [ToySample.draw(index, still=index >= spec.clips, size=spec.size, frames=spec.frames,
                            seed=spec.seed, colors=spec.training_colors)
             for index in range(spec.clips + spec.images)]
    return _write_split(out, train, spec, split="train",
                        val_dir=VAL_DIR if spec.val_clips else None)


def read_manifest(shard_dir: Path) -> dict[str, Any]:
    """The manifest of a complete toy dataset (or of its validation split); FileNotFoundError if it
    was never finished, ValueError if an older version of this module made it."""
    path = Path(shard_dir) / MANIFEST
    if not path.is_file():
        raise FileNotFoundError(
            f"{path} missing: no toy dataset in {shard_dir}, or an incomplete one; make it with "
            f"'goku-data make-toy --out {shard_dir}'"
        )
    manifest = json.loads(path.read_text())
    if manifest.get("format") != FORMAT:
        raise ConfigError(f"{path}: format {manifest.get('format')!r}, expected {FORMAT!r}; rebuild "
                          f"it with 'goku-data make-toy --out {shard_dir}'")
    return manifest


def _is_complete(split_dir: Path, params: dict[str, Any]) -> bool:
    """Whether ``split_dir`` holds a finished split of this version, made with ``params``."""
    try:
        manifest = read_manifest(split_dir)
    except (FileNotFoundError, ValueError):  # json.JSONDecodeError is a ValueError
        return False
    return (manifest.get("params") == params
            and manifest.get("held_out") == [list(t) for t in HELD_OUT]
            and all((split_dir / s["name"]).is_file() for s in manifest["shards"]))


def ensure_toy_dataset(out: Path, **params: Any) -> list[Path]:
    """Returns the shards of the dataset in ``out``, (re)building it when it is missing,
    incomplete (validation split included), was made by an older version of this module or with
    other held-out combinations, or with parameters other than ``params`` (keyword arguments of
    ``make_toy_dataset``)."""
    out = Path(out)
    wanted = ToyDatasetSpec(**params).params()
    if _is_complete(out, wanted) and (not wanted["val_clips"] or _is_complete(out / VAL_DIR, wanted)):
        return [out / s["name"] for s in read_manifest(out)["shards"]]
    log.info("data: writing the toy dataset to %s (%d clips, %d images, %dx%d, %d frames, colours: %s)", out,
             wanted["clips"], wanted["images"], wanted["size"], wanted["size"], wanted["frames"],
             ", ".join(wanted.get("colors", COLORS)))
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


@dataclass
class ToyValidation:
    """The validation split as one fixed batch, in key order."""

    pixels: torch.Tensor  # [N, 3, T, H, W] float32 in [-1, 1]
    captions: list[str]
    keys: list[str]
    held_out: list[bool]  # True where the clip shows a combination no training clip shows


def read_validation(shard_dir: Path) -> ToyValidation:
    """The validation split of the toy dataset in ``shard_dir`` (read from ``shard_dir/val``)."""
    read_manifest(shard_dir)  # the dataset itself: complete, and made by this version
    val_dir = Path(shard_dir) / VAL_DIR
    if not (val_dir / MANIFEST).is_file():
        raise FileNotFoundError(
            f"{val_dir / MANIFEST} missing: the toy dataset in {shard_dir} was made with "
            f"val_clips=0; rebuild it with 'goku-data make-toy --out {shard_dir}'"
        )
    manifest = read_manifest(val_dir)
    held = {tuple(t) for t in manifest["held_out"]}
    params = manifest["params"]
    # The training path's decoder (PyAV: the validation split is read once, where DALI's per-call
    # set-up would dominate), at the clips' own rate and size.
    spec = FrameSpec(fps=FPS, frames=params["frames"], height=params["size"], width=params["size"])
    bad = BadSamples()
    samples = [decode_sample(raw, spec, bad, backend="pyav") for raw in iter_raw_samples(val_dir)]
    if None in samples:
        raise ConfigError(f"{val_dir}: {sum(bad.counts.values())} validation clip(s) do not decode "
                          f"({dict(bad.counts)}); rebuild it with 'goku-data make-toy --out {shard_dir}'")
    return ToyValidation(
        pixels=torch.stack([s.pixels for s in samples]),
        captions=[s.caption for s in samples],
        keys=[s.key for s in samples],
        held_out=[(s.meta["color"], s.meta["shape"], s.meta["direction"]) in held for s in samples],
    )
