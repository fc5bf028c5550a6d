"""From shards to packed micro-batches, stage by stage: the one data path of every run.

Per optimizer step and DP rank: draw samples (an image instead of a clip with the stage's
``image_ratio``, from an RNG keyed by (seed, step, draw)), turn each into a latent (raw and toy:
decode at the stage's fps/frames/size, then the frozen VAE, which for toy data is the identity on
pixels; latent: load the precomputed tensor), keep them in a small buffer, and cut packs of the
stage's token budget from it first-fit-decreasing. This is the one place the rectified-flow noise,
timestep and caption dropout are drawn (``flow.noise_sample``, keyed by (seed, step, key)), so
every parallel layout sees the same numbers.

The state (both streams, the buffered samples' shard references, draws so far, the bad samples
found) is plain JSON, so a resumed run rebuilds the buffer from the shards and continues with the
same keys, and counts no bad sample twice.

Bad samples are skipped, counted and remembered (a known-bad sample is not decoded again), but a
draw never retries without end: ``data.max_bad_in_a_row`` unusable samples in a row, or a whole
pass of a stream without one, stop the run with one line (ConfigError, exit 2), and a stop signal
(``PackedBatches.stop_requested``) ends the wait at once, the source rolled back to the start of
the step (``DataWaitStopped``). The trainer then tells every rank (train.run agrees on stops
before each step starts), rolls the others back too (``mark``/``rollback``) and checkpoints the
last complete step.
"""

from __future__ import annotations

import atexit
import contextlib
import copy
import io
import logging
import os
import queue
import threading
from collections import OrderedDict
from concurrent.futures import Future, ThreadPoolExecutor
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable, Sequence

import numpy as np
import torch

from goku_megatron import flow
from goku_megatron.batch import Pack, PackSample, build_pack, num_tokens, plan_packs
from goku_megatron.config import Config, ConfigError, StageConfig
from goku_megatron.data import dali
from goku_megatron.data.decode import decode_sample, one_line
from goku_megatron.data.frames import FrameSpec
from goku_megatron.data.encoders import PixelSpace, VideoVAE, pack_text, pad_text, run_text_encoder, run_vae
from goku_megatron.data.loader import SampleStream
from goku_megatron.data.shards import BadSamples, SampleRef, find_shards, read_sample_or_skip
from goku_megatron.data.toy import ensure_toy_dataset, read_manifest
from goku_megatron.platform import barrier, use_local_device

log = logging.getLogger(__name__)

@dataclass
class Prepared:
    """A sample ready to noise: latent x1 [C, T, H, W], caption, and its precomputed text tokens
    [n, text_dim] when the shard holds them (None: the caption is encoded at packing time)."""

    latent: torch.Tensor
    caption: str
    text: torch.Tensor | None = None


# (raw sample, stage) -> Prepared, or None for a bad sample (already counted).
Prepare = Callable[[dict[str, Any], StageConfig], "Prepared | None"]


@dataclass
class Buffered:
    ref: SampleRef
    sample: Prepared

    @property
    def key(self) -> str:
        return self.ref.key


def _tensor(data: bytes) -> torch.Tensor:
    return torch.load(io.BytesIO(data), map_location="cpu", weights_only=True)


def load_latent_sample(raw: dict[str, Any], stage: StageConfig) -> Prepared:
    """A precomputed sample (goku-data precompute-latents): ``latent.pth``, caption, ``t5.pth``."""
    text = _tensor(raw["t5.pth"]).float() if "t5.pth" in raw else None
    return Prepared(_tensor(raw["latent.pth"]).float(), raw["txt"].decode("utf-8").strip(), text)


def read_latent_sample(bad: BadSamples) -> Prepare:
    """Latent path: ``load_latent_sample``, a stored tensor that does not load counted as bad."""

    def prepare(raw: dict[str, Any], stage: StageConfig) -> Prepared | None:
        try:
            return load_latent_sample(raw, stage)
        except Exception as err:  # noqa: BLE001 - whatever torch.load makes of damaged bytes
            bad.record("unreadable_latent", raw["__url__"], raw["__key__"], f"{type(err).__name__}: {one_line(err)}")
            return None

    return prepare


def encode_raw_sample(decoder: str, vae: VideoVAE | PixelSpace, bad: BadSamples) -> Prepare:
    """Online path for raw and toy shards: decode to the stage's FrameSpec, then the frozen VAE.
    Read-ahead workers decode in parallel; the VAE encodes one sample at a time (a lock), so a GPU
    holds one encode's activations, not one per worker."""
    encoding = threading.Lock()

    def prepare(raw: dict[str, Any], stage: StageConfig) -> Prepared | None:
        spec = FrameSpec(fps=stage.fps, frames=stage.frames, height=stage.height, width=stage.width)
        decoded = decode_sample(raw, spec, bad, backend=decoder)
        if decoded is None:
            return None
        with encoding:
            latent = vae.encode(decoded.pixels[None].to(vae.device, vae.dtype))[0]
        return Prepared(latent.float().cpu(), decoded.caption)

    return prepare


class PreparedCache:
    """Prepared samples in memory up to ``limit_bytes`` (data.cache_mb), least recently used out
    first. Preparing is deterministic, so a hit is the sample that preparing again would give."""

    def __init__(self, limit_bytes: int) -> None:
        self.limit = limit_bytes
        self.items: OrderedDict[tuple[str, str, int], tuple[Prepared, int]] = OrderedDict()
        self.bytes = 0

    def get(self, key: tuple[str, str, int]) -> Prepared | None:
        if key not in self.items:
            return None
        self.items.move_to_end(key)
        return self.items[key][0]

    def put(self, key: tuple[str, str, int], sample: Prepared) -> None:
        size = sample.latent.nbytes + (0 if sample.text is None else sample.text.nbytes)
        if size > self.limit or key in self.items:
            return
        self.items[key] = (sample, size)
        self.bytes += size
        while self.bytes > self.limit:
            _, (_, evicted) = self.items.popitem(last=False)
            self.bytes -= evicted


def noised_pack(samples: Sequence[tuple[str, Prepared]], step: int, budget: int, cfg: Config,
                text_encoder: Callable[[list[str]], tuple[torch.Tensor, torch.Tensor]]) -> Pack:
    """The pack of ``samples`` (key, prepared sample) at optimizer step ``step``: each sample's
    noise, timestep and caption dropout (flow.noise_sample, keyed by (seed, step, key): the one
    place training draws them), its interpolated input, velocity target and I2V condition, and its
    caption tokens (stored ones, else encoded here; a dropped caption is the empty one)."""
    noisy, targets, times, texts, conds = [], [], [], [], []
    to_encode: list[tuple[int, str]] = []  # (sample, caption) without usable stored tokens
    for i, (key, sample) in enumerate(samples):
        x1 = sample.latent
        draw = flow.noise_sample(x1, cfg.train.seed, step, key, cfg.flow)
        noisy.append(flow.interpolate(x1[None], draw.x0[None], draw.t)[0])
        targets.append(flow.velocity_target(x1, draw.x0))
        conds.append(flow.first_frame_condition(x1) if cfg.model.i2v else None)
        times.append(draw.t[0])
        texts.append(None if draw.drop_caption else sample.text)
        if texts[-1] is None:
            to_encode.append((i, "" if draw.drop_caption else sample.caption))
    if to_encode:
        emb, mask = text_encoder([caption for _, caption in to_encode])
        for (i, _), e, m in zip(to_encode, emb, mask):
            texts[i] = pack_text(e.float().cpu(), m.cpu())
    text, text_mask = pad_text(texts, cfg.data.max_text_tokens)
    return build_pack(
        [PackSample(noisy=n, target=g, timestep=t, text=e, text_mask=m, key=key, cond=c)
         for n, g, t, e, m, (key, _), c in zip(noisy, targets, times, text, text_mask, samples, conds)],
        budget, cfg.model.patch_size,
    )


class DataWaitStopped(Exception):
    """A stop signal arrived while a step's samples were being drawn; the source is back at the
    start of that step, so its state is the one the last complete step left."""


@dataclass
class _Mark:
    """Where the source stood at the start of a step (see PackedBatches.next_step)."""

    streams: dict[str, dict[str, dict[str, int]]]
    buffer: list[Buffered]
    draws: int
    stage: int


class PackedBatches:
    """Endless per-step lists of ``Pack`` micro-batches for one DP rank (see the module doc):
    global_batch_size / (micro_batch_size x dp) packs per step (a stage run has micro-batch size 1,
    one pack per micro-batch; a toy pack holds micro_batch_size clips)."""

    def __init__(
        self,
        cfg: Config,
        streams: dict[str, dict[str, SampleStream]],
        prepare: Prepare,
        text_encoder: Callable[[list[str]], tuple[torch.Tensor, torch.Tensor]],
        bad: BadSamples,
        buffer_size: int = 16,
        workers: int = 0,
    ) -> None:
        self.cfg = cfg
        self.streams = streams  # data path -> {"video"/"image"/"any": stream}
        self.prepare = prepare
        self.text_encoder = text_encoder
        self.bad = bad
        self.buffer_size = buffer_size
        self.patch = tuple(cfg.model.patch_size)
        self.buffer: list[Buffered] = []
        self.draws = 0
        self._stage_index = -1
        self.cache = PreparedCache(cfg.data.cache_mb * 2**20)
        # Threads that read and prepare a round of draws at once (None: one draw at a time), each
        # on this process's GPU (a new thread's is GPU 0) and with its own decoders (dali.sample_decoder).
        self.pool = ThreadPoolExecutor(workers, thread_name_prefix="goku-data",
                                       initializer=use_local_device) if workers else None
        # The trainer's stop flag (a signal number, 0: none), checked before every draw.
        self.stop_requested: Callable[[], int] = lambda: 0

    def close(self) -> None:
        if self.pool is not None:
            self.pool.shutdown(wait=True, cancel_futures=True)

    def _stream_for(self, step: int, stage: StageConfig) -> SampleStream:
        streams = self.streams[self.cfg.data.stage_path(stage)]
        if len(streams) == 1:
            return next(iter(streams.values()))
        draw = np.random.default_rng([self.cfg.train.seed, step, self.draws, 3]).random()
        return streams["image" if draw < stage.image_ratio else "video"]

    def _fill(self, step: int, stage: StageConfig) -> None:
        """Draw until the buffer holds ``buffer_size`` usable samples. With a pool each round draws
        as many samples as the buffer lacks and prepares them in parallel; the draws (which stream,
        which sample) depend only on (seed, step, draw count), and a round never draws more than
        one-at-a-time drawing would, so both give the same buffer, draws and bad samples."""
        misses: dict[int, int] = {}  # per stream: unusable samples in a row
        while len(self.buffer) < self.buffer_size:
            if self.stop_requested():
                raise DataWaitStopped
            drawn = []
            for _ in range(self.buffer_size - len(self.buffer) if self.pool else 1):
                stream = self._stream_for(step, stage)
                if stream.epoch_length() == 0:  # every sample was left out when the shards were listed
                    raise self._no_usable_sample(stage, stream, 0)
                self.draws += 1
                drawn.append((stream, stream.next_ref()))
            for (stream, ref), prepared in zip(drawn, self._prepare_all([ref for _, ref in drawn], stage)):
                if prepared is None:
                    misses[id(stream)] = misses.get(id(stream), 0) + 1
                    if misses[id(stream)] >= min(self.cfg.data.max_bad_in_a_row, stream.epoch_length()):
                        raise self._no_usable_sample(stage, stream, misses[id(stream)])
                    continue
                misses[id(stream)] = 0
                self._check_fits(ref, prepared, stage)
                self.buffer.append(Buffered(ref, prepared))

    def _prepare_all(self, refs: list[SampleRef], stage: StageConfig) -> list[Prepared | None]:
        """Each ref's prepared sample (None: bad), from the cache, skipped as known bad, or read and
        prepared (on the pool's threads when there is one)."""
        keys = [(str(ref.shard), ref.key, self._stage_index) for ref in refs]
        results: list[Any] = [self.cache.get(key) for key in keys]
        for i, ref in enumerate(refs):
            if results[i] is None and not self.bad.is_bad(ref.shard, ref.key):
                results[i] = (self.pool.submit(self._read_and_prepare, ref, stage) if self.pool
                              else self._read_and_prepare(ref, stage))
        results = [r.result() if isinstance(r, Future) else r for r in results]
        for key, prepared in zip(keys, results):
            if prepared is not None:
                self.cache.put(key, prepared)
        return results

    def _read_and_prepare(self, ref: SampleRef, stage: StageConfig) -> Prepared | None:
        raw = read_sample_or_skip(ref, self.bad)
        return None if raw is None else self.prepare(raw, stage)

    def _check_fits(self, ref: SampleRef, prepared: Prepared, stage: StageConfig) -> None:
        channels = prepared.latent.shape[0]
        if channels != self.cfg.model.in_channels:
            raise ConfigError(f"sample {ref.key} in {ref.shard} has {channels}-channel latents but "
                              f"model.in_channels={self.cfg.model.in_channels}; set it to {channels}")
        tokens = num_tokens(prepared.latent.shape, self.patch)
        if tokens > stage.token_budget:
            raise ConfigError(
                f"sample {ref.key} in {ref.shard} has {tokens} tokens, over data.stages"
                f"[{self._stage_index}].token_budget={stage.token_budget}; raise the budget or "
                "lower the stage's frames/height/width"
            )

    def _no_usable_sample(self, stage: StageConfig, stream: SampleStream, misses: int) -> ConfigError:
        """The one line that ends a run whose data path yields nothing usable."""
        path = self.cfg.data.stage_path(stage)
        what = "" if stream.kind == "any" else f"{stream.kind} "
        fix = "repair or replace those shards (goku-data prepare-shards leaves bad samples out)"
        if stream.kind in ("image", "video") and len(self.streams[path]) == 2:
            fix += f", or set the stage's image_ratio to {0 if stream.kind == 'image' else 1}"
        if misses >= stream.epoch_length():
            found = f"none of the {stream.epoch_length()} {what}samples"
        else:
            found = f"{misses} {what}samples in a row"
        return ConfigError(
            f"stage {self._stage_index} ({stage.name or 'unnamed'}): {found} of dp rank {stream.dp_rank} "
            f"in {path} could be used (distinct bad samples so far: {self.bad.summary()}); {fix}"
        )

    def mark(self) -> _Mark:
        """Where the source stands now, for ``rollback``: cheap (positions and the buffer's list)."""
        return _Mark({path: {kind: s.state_dict() for kind, s in kinds.items()} for path, kinds in self.streams.items()},
                     list(self.buffer), self.draws, self._stage_index)

    def rollback(self, mark: _Mark) -> None:
        """Back to ``mark``: the samples drawn since are drawn again (bad ones stay counted once)."""
        for path, kinds in mark.streams.items():
            for kind, state in kinds.items():
                self.streams[path][kind].load_state_dict(state)
        self.buffer, self.draws, self._stage_index = mark.buffer, mark.draws, mark.stage

    def next_step(self, step: int) -> list[Pack]:
        """The micro-batches (packs) of optimizer step ``step`` for this DP rank. Raises
        DataWaitStopped (the source as it was before the call) when ``stop_requested`` turns
        true, and ConfigError when the data path yields nothing usable."""
        mark = self.mark()
        try:
            return self._next_step(step)
        except DataWaitStopped:
            self.rollback(mark)
            raise

    def _next_step(self, step: int) -> list[Pack]:
        index, stage = self.cfg.data.stage_at(step)
        if index != self._stage_index:  # samples prepared for the previous stage's size go back
            self.buffer.clear()
            self._stage_index = index
        t = self.cfg.train
        packs = []
        for _ in range(t.global_batch_size // (t.micro_batch_size * self.cfg.parallel.dp)):
            self._fill(step, stage)
            counts = [num_tokens(b.sample.latent.shape, self.patch) for b in self.buffer]
            chosen = plan_packs(counts, stage.token_budget)[0]
            samples = [self.buffer[i] for i in chosen]
            taken = set(chosen)
            self.buffer = [b for i, b in enumerate(self.buffer) if i not in taken]
            packs.append(noised_pack([(b.key, b.sample) for b in samples], step, stage.token_budget,
                                     self.cfg, self.text_encoder))
        return packs

    def state_dict(self) -> dict[str, Any]:
        return {
            "streams": {path: {kind: s.state_dict() for kind, s in kinds.items()}
                        for path, kinds in self.streams.items()},
            "buffer": [{"shard": b.ref.shard, "key": b.ref.key, "members": b.ref.members}
                       for b in self.buffer],
            "draws": self.draws,
            "stage": self._stage_index,
            "bad": self.bad.state_dict(),
        }

    def load_state_dict(self, state: dict[str, Any]) -> None:
        """Continue where ``state`` left off. A state saved for other data (its streams' paths or
        kinds differ from this run's) is not applied: the data order starts over, one line says so."""
        saved = {path: sorted(kinds) for path, kinds in state["streams"].items()}
        mine = {path: sorted(kinds) for path, kinds in self.streams.items()}
        if saved != mine:
            log.warning("the checkpoint's data loader state reads %s, this run reads %s: the data order "
                        "starts over", ", ".join(saved) or "-", ", ".join(mine))
            return
        for path, kinds in state["streams"].items():
            for kind, s in kinds.items():
                self.streams[path][kind].load_state_dict(s)
        self.draws = int(state["draws"])
        self._stage_index = int(state["stage"])
        self.bad.load_state_dict(state["bad"])
        self.buffer = []
        for item in state["buffer"]:
            ref = SampleRef(item["shard"], item["key"], {k: tuple(v) for k, v in item["members"].items()})
            stage = self.cfg.data.stages[self._stage_index]
            prepared = self._read_and_prepare(ref, stage)
            if prepared is not None:
                self.buffer.append(Buffered(ref, prepared))


class ReadAhead:
    """A PackedBatches run ahead of the training loop (data.workers > 0): one background thread
    prepares the packs of the next ``depth`` steps (its PackedBatches decodes each round of draws
    on the worker pool) while the current step trains; ``next_step`` hands them out in order.

    The packs are those the inline source gives (the same code, in the same order, only earlier),
    and the loader state is the one after the last step handed out, not after what was read ahead,
    so a checkpoint resumes at the step after it. A stop signal ends the wait for a step at once
    (DataWaitStopped); an error in the thread (a ConfigError: no usable sample, a sample over the
    token budget) is raised by ``next_step`` of the step it belongs to; a thread that ends without
    handing over its step is one RuntimeError, never a wait without end.
    """

    POLL_S = 0.05  # how often a wait for a step looks at the stop flag and the thread
    CLOSE_S = 60  # how long close waits for the samples being decoded

    def __init__(self, source: PackedBatches, depth: int, last_step: int, device: torch.device) -> None:
        self.source, self.last_step, self.device = source, last_step, device
        self.stop_requested: Callable[[], int] = lambda: 0
        self._queue: queue.Queue = queue.Queue(maxsize=depth)
        self._closing = threading.Event()
        self._thread: threading.Thread | None = None
        self._state = source.state_dict()  # after the last step handed out
        self._handed: tuple[int, Any, dict[str, Any]] | None = None  # since the last mark
        self._given_back: tuple[int, Any, dict[str, Any]] | None = None
        self._bad = _counted(self._state)

    @property
    def bad(self) -> BadSamples:
        """The bad samples as of the last step handed out (the thread has counted further)."""
        return self._bad

    def _produce(self, first_step: int) -> None:
        self.source.stop_requested = self._closing.is_set
        step = first_step
        try:
            # GPU work of the raw path (the VAE) runs on this thread's own CUDA stream, so it
            # overlaps the training step instead of queueing behind it.
            if self.device.type == "cuda":
                torch.cuda.set_device(self.device)
            with torch.cuda.stream(torch.cuda.Stream(self.device)) if self.device.type == "cuda" \
                    else contextlib.nullcontext():
                while step <= self.last_step and not self._closing.is_set():
                    packs = self.source.next_step(step)
                    self._put((step, packs, copy.deepcopy(self.source.state_dict())))
                    step += 1
        except DataWaitStopped:  # closing
            return
        except BaseException as err:  # noqa: BLE001 - handed to the training thread, raised there
            self._put((step, err, {}))

    def _put(self, item: tuple[int, Any, dict[str, Any]]) -> None:
        while not self._closing.is_set():
            try:
                self._queue.put(item, timeout=self.POLL_S)
                return
            except queue.Full:
                continue

    def next_step(self, step: int) -> list[Pack]:
        if self._thread is None:
            self._thread = threading.Thread(target=self._produce, args=(step,), name="goku-read-ahead", daemon=True)
            self._thread.start()
            atexit.register(self.close)  # a source nobody closed still ends its thread before exit
        item, self._given_back = self._given_back, None
        while item is None:
            if self.stop_requested():
                raise DataWaitStopped
            try:
                item = self._queue.get(timeout=self.POLL_S)
            except queue.Empty:
                if not self._thread.is_alive() and self._queue.empty():
                    raise RuntimeError(f"the data read-ahead thread ended before step {step}; see the log "
                                       "above for its error") from None
        got, packs, state = item
        if isinstance(packs, BaseException):
            raise packs
        if got != step:
            raise RuntimeError(f"read-ahead handed out step {got} for step {step}")
        self._handed, self._state, self._bad = item, state, _counted(state)
        return packs

    def mark(self) -> dict[str, Any]:
        self._handed = None
        return self._state

    def rollback(self, mark: dict[str, Any]) -> None:
        """Back to ``mark``: a step handed out since is handed out again by the next call."""
        if self._handed is not None:
            self._given_back, self._handed = self._handed, None
        self._state, self._bad = mark, _counted(mark)

    def state_dict(self) -> dict[str, Any]:
        return self._state

    def load_state_dict(self, state: dict[str, Any]) -> None:
        if self._thread is not None:
            raise RuntimeError("ReadAhead.load_state_dict after reading started")
        self.source.load_state_dict(state)
        self._state = copy.deepcopy(self.source.state_dict())
        self._bad = _counted(self._state)

    def close(self) -> None:
        """Stop the thread: it stops at its next draw, once the samples being decoded are done.
        A decode that does not finish within CLOSE_S is left behind (one warning), not waited for."""
        self._closing.set()
        if self._thread is not None:
            self._thread.join(timeout=self.CLOSE_S)
            atexit.unregister(self.close)
            if self._thread.is_alive():
                log.warning("data: the read-ahead thread is still decoding after %d s; leaving it", self.CLOSE_S)
                if self.source.pool is not None:
                    self.source.pool.shutdown(wait=False, cancel_futures=True)
                return
        self.source.close()


def _counted(state: dict[str, Any]) -> BadSamples:
    """The bad samples a loader state records (a quiet counter: the thread logged them)."""
    bad = BadSamples(quiet=True)
    bad.load_state_dict(state["bad"])
    return bad


def data_workers(setting: int, cuda: bool) -> int:
    """data.workers: -1 picks, on a GPU, one thread per core this process has beyond the training
    thread (the cores the process may use, shared by torchrun's local ranks), at least 1, at most
    8; on CPU 0, since the step's torch threads use every core already and read-ahead would only
    move work between threads (docs/data.md: the step 5% to 32% slower on 2 cores)."""
    if setting >= 0:
        return setting
    if not cuda:
        return 0
    cores = len(os.sched_getaffinity(0)) // max(1, int(os.environ.get("LOCAL_WORLD_SIZE", "1")))
    return max(1, min(8, cores - 1))


def check_vae_fits(cfg: Config, vae: VideoVAE | PixelSpace) -> None:
    """Fail before training when a stage's clips or the model's input width do not fit the VAE."""
    if vae.latent_channels != cfg.model.in_channels:
        where = "pixel-space toy data" if isinstance(vae, PixelSpace) else f"the VAE at {cfg.data.vae_path}"
        raise ConfigError(f"model.in_channels={cfg.model.in_channels} but {where} makes "
                          f"{vae.latent_channels}-channel latents; set model.in_channels={vae.latent_channels}")
    _, ph, pw = cfg.model.patch_size
    for i, stage in enumerate(cfg.data.stages):
        try:
            _, _, h, w = vae.latent_shape(stage.frames, stage.height, stage.width)
        except ValueError as err:
            raise ConfigError(f"data.stages[{i}]: {err}") from None
        if h % ph or w % pw:
            raise ConfigError(f"data.stages[{i}]: {stage.height}x{stage.width} gives {h}x{w} latents, "
                              f"not divisible by model.patch_size h/w={ph}/{pw}; use a multiple of "
                              f"{vae.spatial_factor * ph}x{vae.spatial_factor * pw}")


def ensure_toy_data(cfg: Config) -> None:
    """Toy runs: global rank 0 writes the toy dataset when it is missing (data.create_if_missing);
    every rank waits for it, then finds it complete or fails with one line."""
    d = cfg.data
    if torch.distributed.get_rank() == 0 and d.create_if_missing:
        ensure_toy_dataset(Path(d.path), clips=d.toy_clips, images=d.toy_images, size=d.toy_size,
                           frames=d.toy_frames, seed=cfg.train.seed, colors=d.toy_colors)
    barrier()
    try:
        read_manifest(Path(d.path))
    except (FileNotFoundError, ValueError) as err:
        raise ConfigError(f"{err}; or set data.create_if_missing=true") from None


def build_data_source(cfg: Config, dp_rank: int, dp_size: int, device: torch.device) -> PackedBatches | ReadAhead:
    """Every run's data: DP-sharded sample streams -> latents (decode + VAE, or stored) -> per-step
    packed micro-batches, read ahead by data.workers threads (inline with 0). Toy data is raw data
    whose VAE is the identity."""
    d = cfg.data
    bad = BadSamples()
    if d.kind == "toy":
        ensure_toy_data(cfg)
    if d.kind != "latent" and d.decoder == "dali" and not dali.available():
        raise ConfigError(f"data.decoder=dali but DALI is not installed: pip install {dali.PIP_PACKAGE}, "
                          "or set data.decoder=auto")
    if d.kind == "latent":
        prepare = read_latent_sample(bad)
    else:
        vae = run_vae(cfg, device)
        check_vae_fits(cfg, vae)
        prepare = encode_raw_sample(d.decoder, vae, bad)
    streams: dict[str, dict[str, SampleStream]] = {}
    for i, stage in enumerate(d.stages):
        path = d.stage_path(stage)
        try:
            shards = find_shards(path)
        except FileNotFoundError as err:
            raise ConfigError(f"data.stages[{i}]: {err}") from None
        if d.kind != "latent":
            ratios = [s.image_ratio for s in d.stages if d.stage_path(s) == path]
            kinds = ["video"] * any(r < 1 for r in ratios) + ["image"] * any(r > 0 for r in ratios)
        else:  # latent shards do not show from their members whether a sample is a still
            kinds = ["any"]
        streams[path] = {kind: SampleStream(shards, dp_rank=dp_rank, dp_size=dp_size,
                                            seed=cfg.train.seed, bad=bad, kind=kind) for kind in kinds}
        log.info("data: stage %d reads %d %s shards from %s (streams: %s)", i, len(shards), d.kind,
                 path, ", ".join(kinds))
    workers = data_workers(d.workers, device.type == "cuda")
    # A toy pack holds micro_batch_size clips: the buffer must hold that many to fill one.
    source = PackedBatches(cfg, streams, prepare, run_text_encoder(cfg, device), bad,
                           buffer_size=max(16, cfg.train.micro_batch_size), workers=workers)
    log.info("data: %s", f"{workers} read-ahead threads, {d.read_ahead_steps} steps ahead" if workers
             else "read inline (data.workers=0)")
    return ReadAhead(source, d.read_ahead_steps, cfg.train.steps, device) if workers else source
