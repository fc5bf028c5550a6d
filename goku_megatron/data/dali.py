"""DALI decoding: clips and images from memory (``SampleDecoder``) and dense batches straight
from WebDataset shards (``WebDatasetClipReader``).

DALI's CPU video decoder takes VP8/VP9/MJPEG only; on GPU ("mixed", NVDEC) it also takes H.264,
HEVC, AV1 and MPEG-4. ``goku_megatron.data.decode`` chooses per codec; this module only runs
pipelines. DALI is imported inside functions, so the package works (with PyAV) without it.

Two DALI behaviours shape the code: a pipeline whose operator failed is dead ("Current pipeline
object is no longer valid"), so a failed pipeline is dropped and rebuilt on next use; and frame
indices past the end of a clip decode as black frames without an error, so callers pass indices
clamped to the clip's real length (``frames.sample_frame_indices`` does).
"""
from __future__ import annotations

import importlib.util
import threading
from pathlib import Path
from typing import Any, Iterator, Sequence

import numpy as np
import torch

from goku_megatron.data.frames import FrameSpec
from goku_megatron.data.shards import CAPTION_EXT, INDEX_SUFFIX, split_key
from goku_megatron.platform import local_device

PIP_PACKAGE = "nvidia-dali-cuda120"
DEVICES = ("cpu", "gpu")


def available() -> bool:
    """Whether DALI is installed (without importing it: the import costs ~1 s)."""
    try:
        return importlib.util.find_spec("nvidia.dali") is not None
    except ModuleNotFoundError:  # no `nvidia` namespace package at all
        return False


def _dali() -> tuple[Any, Any, Any]:
    """(nvidia.dali, nvidia.dali.fn, nvidia.dali.types), or ImportError in one line."""
    try:
        import nvidia.dali as dali
        import nvidia.dali.fn as fn
        import nvidia.dali.types as types
    except ImportError as e:
        raise ImportError(f"DALI decoding needs NVIDIA DALI: pip install {PIP_PACKAGE} ({e})"
                          ) from e
    return dali, fn, types


def _check_device(device: str) -> None:
    if device not in DEVICES:
        raise ValueError(f"device must be one of {DEVICES}, got {device!r}")


def _device_id(device: str, device_id: int | None) -> int | None:
    """The GPU a pipeline runs on: ``device_id`` when given, else for "gpu" this process's local
    rank's GPU (``platform.local_device``, not the calling thread's current device: a pool
    thread's is GPU 0); None for "cpu" (DALI runs CPU-only pipelines without a device)."""
    if device == "gpu" and device_id is None:
        return local_device().index
    return device_id


def _resize_crop_normalize(fn: Any, types: Any, frames: Any, height: int, width: int,
                           layout: str) -> Any:
    """Inside a pipeline: scale until the frame covers height x width, cut the centre, map to
    float [-1, 1] in ``layout``; the same geometry as ``frames.resize_geometry``."""
    frames = fn.resize(frames, resize_x=width, resize_y=height, mode="not_smaller",
                       antialias=True)
    return fn.crop_mirror_normalize(frames, crop=(height, width), mean=127.5, std=127.5,
                                    dtype=types.FLOAT, output_layout=layout)


def _to_torch(batch: Any, device: str, device_id: int | None) -> list[torch.Tensor]:
    """A DALI TensorList as one torch tensor per sample (copies: DALI reuses its buffers)."""
    if device == "cpu":
        return [torch.from_numpy(np.array(batch[i])) for i in range(len(batch))]
    from nvidia.dali.plugin.pytorch import feed_ndarray

    out = []
    stream = torch.cuda.current_stream(device_id)
    for i in range(len(batch)):
        tensor = torch.empty(batch[i].shape(), dtype=torch.float32, device=f"cuda:{device_id}")
        feed_ndarray(batch[i], tensor, cuda_stream=stream)
        out.append(tensor)
    return out


class SampleDecoder:
    """Decodes clips and images held in memory to float [3, T, H, W] in [-1, 1] at one output
    size, in batches of up to ``max_batch_size``.

    One pipeline per kind (video, image) is built on first use and reused: building costs far
    more than decoding a small clip. Not thread-safe: one decoder per thread (``sample_decoder``). Samples come in through ``external_source``; clip frames are
    chosen by index (``frames.sample_frame_indices``), so resampling and the short-clip policy are
    the caller's and the same as on the PyAV path. A batch with one bad sample fails as a whole
    (ValueError); decode one sample per call where that matters (``decode.decode_sample`` does).
    """

    def __init__(self, height: int, width: int, device: str = "cpu", *, max_batch_size: int = 8,
                 num_threads: int = 2, device_id: int | None = None) -> None:
        _check_device(device)
        self.height, self.width, self.device = height, width, device
        self.max_batch_size = max_batch_size
        self.num_threads = num_threads
        self.device_id = _device_id(device, device_id)
        self._pipes: dict[str, Any] = {}

    def _pipeline(self, kind: str) -> Any:
        if kind in self._pipes:
            return self._pipes[kind]
        dali, fn, types = _dali()
        # Synchronous execution: each run decodes exactly the inputs just fed.
        pipe = dali.Pipeline(batch_size=self.max_batch_size, num_threads=self.num_threads,
                             device_id=self.device_id, exec_async=False, exec_pipelined=False,
                             prefetch_queue_depth=1)
        decoder_device = "mixed" if self.device == "gpu" else "cpu"
        with pipe:
            encoded = fn.external_source(name="encoded", dtype=types.UINT8, ndim=1)
            if kind == "video":
                indices = fn.external_source(name="frames", dtype=types.INT32, ndim=1)
                decoded = fn.decoders.video(encoded, device=decoder_device, frames=indices)
                layout = "CFHW"
            else:
                decoded = fn.decoders.image(encoded, device=decoder_device, output_type=types.RGB)
                layout = "CHW"
            pipe.set_outputs(_resize_crop_normalize(fn, types, decoded, self.height, self.width,
                                                    layout))
        pipe.build()
        self._pipes[kind] = pipe
        return pipe

    def _run(self, kind: str, inputs: dict[str, list[np.ndarray]]) -> list[torch.Tensor]:
        out: list[torch.Tensor] = []
        count = len(next(iter(inputs.values())))
        for first in range(0, count, self.max_batch_size):
            pipe = self._pipeline(kind)
            for name, values in inputs.items():
                pipe.feed_input(name, values[first : first + self.max_batch_size])
            try:
                (batch,) = pipe.run()
            except RuntimeError as e:
                del self._pipes[kind]  # a pipeline whose operator failed cannot run again
                detail = str(e).strip().splitlines()
                raise ValueError(f"DALI {kind} decode failed: {_dali_reason(detail)}") from e
            out.extend(_to_torch(batch, self.device, self.device_id))
        return out

    def decode_videos(self, clips: Sequence[bytes], frame_indices: Sequence[np.ndarray]
                      ) -> list[torch.Tensor]:
        """Each clip's frames at ``frame_indices`` (valid indices: DALI pads others with black)
        as float [3, T, H, W] in [-1, 1]; on the GPU for device "gpu"."""
        if len(clips) != len(frame_indices):
            raise ValueError(f"{len(clips)} clips but {len(frame_indices)} index lists")
        return self._run("video", {
            "encoded": [np.frombuffer(c, dtype=np.uint8) for c in clips],
            "frames": [np.asarray(i, dtype=np.int32) for i in frame_indices],
        })

    def decode_images(self, images: Sequence[bytes]) -> list[torch.Tensor]:
        """Images as float [3, 1, H, W] in [-1, 1] (an image is a one-frame clip)."""
        encoded = [np.frombuffer(b, dtype=np.uint8) for b in images]
        decoded = self._run("image", {"encoded": encoded})
        return [x.unsqueeze(1) for x in decoded]


def _dali_reason(lines: list[str]) -> str:
    """The informative line of a DALI error (its message starts with the pipeline traceback)."""
    for marker in ("Assert on", "Error", "error"):
        for line in lines:
            if marker in line and "Critical error in pipeline" not in line:
                return line.strip()
    return lines[-1].strip() if lines else "unknown error"


_decoders = threading.local()  # per thread: (height, width, device) -> SampleDecoder


def sample_decoder(height: int, width: int, device: str) -> SampleDecoder:
    """The calling thread's decoder for one output size and device, built on its first use.

    One per thread rather than one per process behind a lock. A decode is two calls on one
    pipeline (``feed_input``, then ``run``, which first releases the pipeline's single output
    buffer), so threads sharing it deadlock in ``run`` (four read-ahead threads did,
    tests/test_read_ahead.py), and a ``run`` that does return may have decoded the clip another
    thread fed: frames under the wrong caption. A lock would make sharing safe but would
    serialise the decoding the read-ahead pool exists to run in parallel. The price is one
    pipeline per pool thread (data.workers: at most 8 by default), each built once and freed with
    its thread. DALI pipelines hold threads: build them in the process that uses them (after a
    DataLoader fork, not before)."""
    cache: dict[tuple[int, int, str], SampleDecoder] = vars(_decoders).setdefault("by_spec", {})
    key = (height, width, device)
    if key not in cache:
        cache[key] = SampleDecoder(height, width, device)
    return cache[key]


class WebDatasetClipReader:
    """Endless dense batches of clips from WebDataset shards, read and decoded by one DALI
    pipeline: ``{"pixels": [B, 3, T, H, W] float in [-1, 1], "captions": [str], "keys": [str]}``.

    For shards whose clips share one codec the decoder takes (on CPU: VP8/VP9/MJPEG), one frame
    rate and one shape: the high-throughput path. DP rank ``r`` of ``n`` reads DALI's shard ``r``
    (samples ``[r*N//n, (r+1)*N//n)`` in tar order) and only it (``stick_to_shard``), so ranks
    never overlap; each rank's stream wraps around its own share. ``shuffle`` draws batches from
    a buffer of ``initial_fill`` samples (DALI's shuffle, seeded). Frames: ``spec.frames`` frames
    every ``source_fps / spec.fps`` source frames (an integer stride), short clips padded with
    their last frame as on the per-sample path.

    Unlike ``decode.decode_sample`` this path does not count bad samples: DALI skips samples
    without a clip or caption silently, and a clip that does not decode stops the pipeline with
    an error. Feed it shards that passed curation (which probes every clip).
    """

    def __init__(self, shards: Sequence[str | Path], spec: FrameSpec, *, batch_size: int,
                 source_fps: float, dp_rank: int = 0, dp_size: int = 1, seed: int = 0,
                 shuffle: bool = True, initial_fill: int = 256, video_ext: str = "webm",
                 device: str = "cpu", num_threads: int = 2, device_id: int | None = None) -> None:
        _check_device(device)
        if not 0 <= dp_rank < dp_size:
            raise ValueError(f"need 0 <= dp_rank < dp_size, got {dp_rank} and {dp_size}")
        stride = 1.0 if spec.fps is None else source_fps / spec.fps
        if stride < 1 or abs(stride - round(stride)) > 1e-6:
            raise ValueError(f"source_fps / spec.fps = {source_fps} / {spec.fps} must be a whole "
                             "number >= 1 for DALI's strided frame selection")
        dali, fn, types = _dali()
        self.batch_size = batch_size
        self.device = device
        self.device_id = _device_id(device, device_id)
        paths = [str(p) for p in shards]
        indexes = [str(Path(p).with_suffix(INDEX_SUFFIX)) for p in paths]
        # Without its .idx files DALI indexes the tars itself at start-up (slower, same result).
        index_paths = indexes if all(Path(i).is_file() for i in indexes) else None
        pipe = dali.Pipeline(batch_size=batch_size, num_threads=num_threads, device_id=device_id,
                             seed=seed)
        with pipe:
            clip, caption = fn.readers.webdataset(
                paths=paths, index_paths=index_paths, ext=[video_ext, CAPTION_EXT],
                shard_id=dp_rank, num_shards=dp_size, stick_to_shard=True,
                random_shuffle=shuffle, initial_fill=initial_fill, seed=seed,
                missing_component_behavior="skip", name="reader")
            frames = fn.decoders.video(clip, device="mixed" if device == "gpu" else "cpu",
                                       start_frame=0, sequence_length=spec.frames,
                                       stride=round(stride), pad_mode="edge")
            pixels = _resize_crop_normalize(fn, types, frames, spec.height, spec.width, "CFHW")
            pipe.set_outputs(pixels, caption, fn.get_property(caption, key="source_info"))
        pipe.build()
        self._pipe = pipe
        total = pipe.reader_meta("reader")["epoch_size"]
        self.samples_per_rank = (dp_rank + 1) * total // dp_size - dp_rank * total // dp_size

    def __iter__(self) -> Iterator[dict[str, Any]]:
        return self

    def __next__(self) -> dict[str, Any]:
        pixels, captions, sources = self._pipe.run()
        if self.device == "cpu":
            batch = torch.from_numpy(np.array(pixels.as_tensor()))
        else:
            batch = torch.stack(_to_torch(pixels, self.device, self.device_id))
        # source_info is "<tar>:<offset>:<member name>"; the member name carries the key
        names = [np.array(sources[i]).tobytes().decode().rpartition(":")[2]
                 for i in range(len(sources))]
        return {
            "pixels": batch,
            "captions": [np.array(captions[i]).tobytes().decode("utf-8", errors="replace").strip()
                         for i in range(len(captions))],
            "keys": [split_key(name)[0] for name in names],
        }
