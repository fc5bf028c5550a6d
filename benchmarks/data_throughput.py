"""Decoded frames per second of each clip-decoding path on this machine.

    python benchmarks/data_throughput.py                    # builds 64 VP9 + 64 H.264 clips
    python benchmarks/data_throughput.py --shards DIR ...   # shards of your own (codecs probed)

Every path produces the same thing, float [3, T, H, W] in [-1, 1] at the output size:
- PyAV: ``decode_sample(backend="pyav")``, one clip at a time; the baseline per codec;
- DALI CPU per sample: ``decode_sample(backend="dali")``, VP8/VP9/MJPEG only (``auto`` takes
  PyAV on CPU: it is faster, see docs/data.md);
- DALI CPU reader: ``WebDatasetClipReader`` reading and decoding whole batches from the tars;
- DALI mixed (GPU) per sample and reader: every codec NVDEC takes, when CUDA is available.
- the training pipeline (data/pipeline.py: read from the tars, decode with ``auto``, the identity
  "VAE", noise and pack), inline on one thread and read ahead by ``--workers`` threads.
Per-sample paths time decoding of clips already read from the tars; reader and pipeline paths
include reading.
Frames per CPU-second (all threads) are printed beside frames per second: on a shared machine
they drift less. Paths that cannot run here are listed with the reason. Not a test: figures
depend on the machine.
"""
from __future__ import annotations

import argparse
import io
import math
import tempfile
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable

import av
import numpy as np
import torch

from goku_megatron.config import Config, StageConfig
from goku_megatron.data import dali
from goku_megatron.data.decode import DALI_CPU_CODECS, decode_sample, probe_video
from goku_megatron.data.encoders import PixelSpace
from goku_megatron.data.frames import FrameSpec
from goku_megatron.data.loader import SampleStream
from goku_megatron.data.pipeline import PackedBatches, ReadAhead, encode_raw_sample
from goku_megatron.data.shards import (
    VIDEO_EXTS,
    BadSamples,
    ShardWriter,
    find_shards,
    list_samples,
    read_sample,
)
from goku_megatron.data.text_encoder import HashTextEncoder

FPS = 24
# Typical delivery settings (lossy 4:2:0), fast to encode.
ENCODERS = {
    "vp9": ("libvpx-vp9", "webm", {"deadline": "realtime", "cpu-used": "8", "crf": "32", "b": "0"}),
    "h264": ("libx264", "mp4", {"preset": "veryfast", "crf": "23"}),
}


def synthetic_clip(frames: int, size: int, seed: int) -> np.ndarray:
    """Coloured blocks scrolling sideways over a moving gradient, plus noise: motion and texture
    for the codec to work on."""
    rng = np.random.default_rng(seed)
    blocks = rng.integers(0, 256, (size // 16, size // 16, 3)).repeat(16, 0).repeat(16, 1)
    yy, xx = np.mgrid[:size, :size]
    out = np.empty((frames, size, size, 3), np.uint8)
    for t in range(frames):
        frame = np.roll(blocks, 2 * t, axis=1)
        frame[..., 2] = (xx + yy + 4 * t) % 256
        out[t] = np.clip(frame + rng.integers(-8, 8, frame.shape), 0, 255)
    return out


def encode(frames: np.ndarray, codec: str) -> bytes:
    name, container_format, options = ENCODERS[codec]
    buf = io.BytesIO()
    with av.open(buf, "w", format=container_format) as container:
        stream = container.add_stream(name, rate=FPS, options=options)
        stream.height, stream.width = frames.shape[1:3]
        stream.pix_fmt = "yuv420p"
        for frame in frames:
            container.mux(stream.encode(av.VideoFrame.from_ndarray(frame, format="rgb24")))
        container.mux(stream.encode())
    return buf.getvalue()


def build_shards(out: Path, clips: int, size: int, frames: int) -> dict[str, list[Path]]:
    shards = {}
    for codec, (_, ext, _) in ENCODERS.items():
        with ShardWriter(out / codec, prefix=codec, samples_per_shard=16) as writer:
            for i in range(clips):
                clip = encode(synthetic_clip(frames, size, i), codec)
                writer.write(f"{codec}{i:04d}", {ext: clip, "txt": f"clip {i}".encode()})
        shards[codec] = writer.written
    return shards


def group_by_codec(paths: list[Path]) -> dict[str, list[Path]]:
    """Shards per codec, judged by each shard's first clip (the reader wants one codec per set)."""
    groups: dict[str, list[Path]] = {}
    for shard in paths:
        refs = list_samples(shard, BadSamples())
        ext = next((e for r in refs for e in VIDEO_EXTS if e in r.members), None)
        if ext is not None:
            groups.setdefault(probe_video(read_sample(refs[0])[ext]).codec, []).append(shard)
    return groups


@dataclass
class Result:
    path: str
    codec: str
    frames: int
    wall: float  # seconds
    cpu: float  # CPU seconds of all this process's threads (DALI's workers included)

    @property
    def fps(self) -> float:
        return self.frames / self.wall


class Timer:
    """Wall and process CPU time: on a shared machine frames per CPU-second stay comparable
    when wall-clock figures drift with the load."""

    def __enter__(self) -> Timer:
        self.wall, self.cpu = time.perf_counter(), time.process_time()
        return self

    def __exit__(self, *_: Any) -> None:
        self.wall = time.perf_counter() - self.wall
        self.cpu = time.process_time() - self.cpu


def time_per_sample(name: str, codec: str, raws: list[dict[str, Any]], spec: FrameSpec,
                    backend: str, sync: Callable[[], None]) -> Result:
    bad = BadSamples()
    decode_sample(raws[0], spec, bad, backend)  # warm-up: imports, pipeline build
    with Timer() as timer:
        frames = sum(d.pixels.shape[1] for raw in raws
                     if (d := decode_sample(raw, spec, bad, backend)) is not None)
        sync()
    if bad.counts:
        raise RuntimeError(f"bad samples in the benchmark set: {dict(bad.counts)}")
    return Result(name, codec, frames, timer.wall, timer.cpu)


def time_reader(name: str, codec: str, shards: list[Path], spec: FrameSpec, source_fps: float,
                ext: str, device: str, batch: int, threads: int, samples: int,
                sync: Callable[[], None]) -> Result:
    reader = dali.WebDatasetClipReader(shards, spec, batch_size=batch, source_fps=source_fps,
                                       shuffle=False, video_ext=ext, device=device,
                                       num_threads=threads)
    next(reader)  # warm-up
    with Timer() as timer:
        frames = sum(next(reader)["pixels"].shape[0] * spec.frames
                     for _ in range(math.ceil(samples / batch)))
        sync()
    return Result(name, codec, frames, timer.wall, timer.cpu)


def time_pipeline(name: str, codec: str, shards: list[Path], spec: FrameSpec, workers: int,
                  steps: int) -> Result:
    """The training data path over ``shards``: ``steps`` steps of 8 clips at ``spec`` (no cache),
    inline (workers=0) or read ahead; frames of the clips in the packs per second."""
    cfg = Config()
    cfg.data.kind, cfg.data.path, cfg.data.cache_mb = "raw", str(shards[0].parent), 0
    cfg.model.in_channels, cfg.model.patch_size = 3, [1, 16, 16]
    tokens = spec.frames * (spec.height // 16) * (spec.width // 16)
    cfg.data.stages = [StageConfig(steps=steps + 1, height=spec.height, width=spec.width, frames=spec.frames,
                                   fps=spec.fps or FPS, token_budget=2 * tokens)]
    cfg.train.steps, cfg.train.micro_batch_size, cfg.train.global_batch_size = steps + 1, 1, 4
    cfg.parallel.dp = 1
    bad = BadSamples()
    streams = {cfg.data.path: {"video": SampleStream(shards, dp_rank=0, dp_size=1, seed=0, bad=bad, kind="video")}}
    inline = PackedBatches(cfg, streams, encode_raw_sample("auto", PixelSpace(), bad),
                           HashTextEncoder(dim=8, max_tokens=cfg.data.max_text_tokens), bad, buffer_size=8,
                           workers=workers)
    source = ReadAhead(inline, cfg.data.read_ahead_steps, cfg.train.steps, torch.device("cpu")) if workers else inline
    try:
        source.next_step(1)  # warm-up: imports, the buffer's first fill
        with Timer() as timer:
            frames = sum(len(pack.keys) * spec.frames for step in range(2, steps + 2) for pack in source.next_step(step))
    finally:
        source.close()
    if bad.counts:
        raise RuntimeError(f"bad samples in the benchmark set: {dict(bad.counts)}")
    return Result(name, codec, frames, timer.wall, timer.cpu)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--shards", type=Path, nargs="*", help="existing shards or directories")
    parser.add_argument("--clips", type=int, default=64, help="clips per codec to build")
    parser.add_argument("--size", type=int, default=256, help="side of the clips to build")
    parser.add_argument("--frames", type=int, default=32, help="frames per clip to build")
    parser.add_argument("--out-size", type=int, nargs=2, metavar=("H", "W"),
                        help="output height and width (default: the clips' own)")
    parser.add_argument("--batch", type=int, default=8, help="reader batch size")
    parser.add_argument("--threads", type=int, default=2, help="DALI worker threads")
    parser.add_argument("--workers", type=int, default=2, help="read-ahead threads of the pipeline rows")
    parser.add_argument("--steps", type=int, default=16, help="steps (of 8 clips) the pipeline rows time")
    args = parser.parse_args()

    with tempfile.TemporaryDirectory() as tmp:
        if args.shards:
            shards = group_by_codec(find_shards(args.shards))
            origin = f"shards from {', '.join(map(str, args.shards))}"
        else:
            start = time.perf_counter()
            shards = build_shards(Path(tmp), args.clips, args.size, args.frames)
            origin = (f"built {args.clips} clips per codec, {args.size}x{args.size}, {args.frames}"
                      f" frames at {FPS} fps, in {time.perf_counter() - start:.0f} s")
        run(shards, origin, args)


def run(shards: dict[str, list[Path]], origin: str, args: argparse.Namespace) -> None:
    cuda = torch.cuda.is_available()
    sync = torch.cuda.synchronize if cuda else (lambda: None)
    results: list[Result] = []
    skipped: list[str] = []
    print(f"data throughput: {origin}")
    for codec, paths in sorted(shards.items()):
        raws = [read_sample(r) for p in paths for r in list_samples(p, BadSamples())]
        ext = next(e for e in VIDEO_EXTS if e in raws[0])
        info = probe_video(raws[0][ext])
        height, width = args.out_size or (info.height, info.width)
        spec = FrameSpec(fps=None, frames=info.frames, height=height, width=width)
        print(f"  {codec}: {len(raws)} clips {info.width}x{info.height}, {info.frames} frames, "
              f"{info.bitrate / 1e3:.0f} kb/s -> output {spec.frames} x {height}x{width}")
        # backend="pyav" never touches the GPU; "auto" is DALI on CPU only for DALI's CPU codecs.
        results.append(time_per_sample("PyAV, per sample", codec, raws, spec, "pyav",
                                       lambda: None))
        results.append(time_pipeline("pipeline, inline (workers=0)", codec, paths, spec, 0, args.steps))
        results.append(time_pipeline(f"pipeline, read-ahead (workers={args.workers})", codec, paths, spec,
                                     args.workers, args.steps))
        if not dali.available():
            skipped.append(f"DALI paths for {codec}: DALI not installed "
                           f"(pip install {dali.PIP_PACKAGE})")
            continue
        if cuda:
            results.append(time_per_sample("DALI mixed (GPU), per sample", codec, raws, spec,
                                           "auto", sync))
            results.append(time_reader(f"DALI mixed (GPU), reader, batch {args.batch}", codec,
                                       paths, spec, info.fps, ext, "gpu", args.batch,
                                       args.threads, len(raws), sync))
            skipped.append(f"DALI CPU paths for {codec}: CUDA available, 'auto' decodes on the GPU")
        elif codec in DALI_CPU_CODECS:
            results.append(time_per_sample("DALI CPU, per sample", codec, raws, spec, "dali",
                                           sync))
            results.append(time_reader(f"DALI CPU, reader, batch {args.batch}", codec, paths,
                                       spec, info.fps, ext, "cpu", args.batch, args.threads,
                                       len(raws), sync))
        else:
            skipped.append(f"DALI CPU for {codec}: DALI's CPU decoder takes only VP8/VP9/MJPEG")
        if not cuda:
            skipped.append(f"DALI mixed (GPU) for {codec}: no CUDA device")

    baseline = {r.codec: r for r in results if r.path.startswith("PyAV")}
    print(f"{'path':<34} {'codec':<5} {'frames/s':>9} {'vs PyAV':>8} {'frames/CPU-s':>13} "
          f"{'vs PyAV':>8}")
    for r in results:
        base = baseline[r.codec]
        print(f"{r.path:<34} {r.codec:<5} {r.fps:>9.0f} {r.fps / base.fps:>7.2f}x "
              f"{r.frames / r.cpu:>13.0f} {r.frames / r.cpu / (base.frames / base.cpu):>7.2f}x")
    device = (torch.cuda.get_device_name() if cuda
              else f"CPU only, torch threads {torch.get_num_threads()}")
    print(f"device: {device}; DALI threads {args.threads}")
    for line in skipped:
        print(f"skipped: {line}")


if __name__ == "__main__":
    main()
