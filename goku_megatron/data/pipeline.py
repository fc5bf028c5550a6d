"""From shards to packed micro-batches, stage by stage: the data path of ``raw`` and ``latent`` runs.

Per optimizer step and DP rank: draw samples (an image instead of a clip with the stage's
``image_ratio``, from an RNG keyed by (seed, step, draw)), turn each into a latent (raw: decode at
the stage's fps/frames/size, then the frozen VAE; latent: load the precomputed tensor), keep them
in a small buffer, and cut packs of the stage's token budget from it first-fit-decreasing. The
rectified-flow noise, timestep and caption dropout of each sample come from (seed, step, key),
exactly as in the toy path, so every parallel layout sees the same numbers.

The state (both streams, the buffered samples' shard references, draws so far) is plain JSON, so
a resumed run rebuilds the buffer from the shards and continues with the same keys.
"""

from __future__ import annotations

import io
import math
from dataclasses import dataclass
from typing import Any, Callable, Sequence

import numpy as np
import torch

from goku_megatron.config import Config, StageConfig
from goku_megatron.data.loader import SampleStream
from goku_megatron.data.packing import Pack, PackSample, build_pack, plan_packs, token_grid
from goku_megatron.data.shards import BadSamples, SampleRef, read_sample

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
    """A precomputed sample (tools/precompute_latents.py): ``latent.pth``, caption, ``t5.pth``."""
    text = _tensor(raw["t5.pth"]).float() if "t5.pth" in raw else None
    return Prepared(_tensor(raw["latent.pth"]).float(), raw["txt"].decode("utf-8").strip(), text)


def encode_raw_sample(decoder: str, vae: Any, bad: BadSamples) -> Prepare:
    """Online path for raw shards: decode to the stage's FrameSpec, then the frozen VAE."""
    from goku_megatron.data.decode import FrameSpec, decode_sample

    def prepare(raw: dict[str, Any], stage: StageConfig) -> Prepared | None:
        spec = FrameSpec(fps=stage.fps, frames=stage.frames, height=stage.height, width=stage.width)
        decoded = decode_sample(raw, spec, bad, backend=decoder)
        if decoded is None:
            return None
        latent = vae.encode(decoded.pixels[None].to(vae.device, vae.dtype))[0]
        return Prepared(latent.float().cpu(), decoded.caption)

    return prepare


class PackedBatches:
    """Endless per-step lists of ``Pack`` micro-batches for one DP rank (see the module doc)."""

    def __init__(
        self,
        cfg: Config,
        streams: dict[str, dict[str, SampleStream]],
        prepare: Prepare,
        text_encoder: Callable[[list[str]], tuple[torch.Tensor, torch.Tensor]],
        bad: BadSamples,
        buffer_size: int = 16,
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

    def _stream_for(self, step: int, stage: StageConfig) -> SampleStream:
        streams = self.streams[self.cfg.data.stage_path(stage)]
        if len(streams) == 1:
            return next(iter(streams.values()))
        draw = np.random.default_rng([self.cfg.train.seed, step, self.draws, 3]).random()
        return streams["image" if draw < stage.image_ratio else "video"]

    def _fill(self, step: int, stage: StageConfig) -> None:
        while len(self.buffer) < self.buffer_size:
            stream = self._stream_for(step, stage)
            self.draws += 1
            ref = stream.next_ref()
            prepared = self.prepare(read_sample(ref), stage)
            if prepared is None:
                continue
            channels = prepared.latent.shape[0]
            if channels != self.cfg.model.in_channels:
                raise ValueError(f"sample {ref.key} in {ref.shard} has {channels}-channel latents but "
                                 f"model.in_channels={self.cfg.model.in_channels}; set it to {channels}")
            tokens = math.prod(token_grid(prepared.latent.shape, self.patch))
            if tokens > stage.token_budget:
                raise ValueError(
                    f"sample {ref.key} in {ref.shard} has {tokens} tokens, over data.stages"
                    f"[{self._stage_index}].token_budget={stage.token_budget}; raise the budget or "
                    "lower the stage's frames/height/width"
                )
            self.buffer.append(Buffered(ref, prepared))

    def next_step(self, step: int) -> list[Pack]:
        """The micro-batches (packs) of optimizer step ``step`` for this DP rank."""
        index, stage = self.cfg.data.stage_at(step)
        if index != self._stage_index:  # samples prepared for the previous stage's size go back
            self.buffer.clear()
            self._stage_index = index
        t = self.cfg.train
        packs = []
        for _ in range(t.global_batch_size // self.cfg.parallel.dp):
            self._fill(step, stage)
            counts = [math.prod(token_grid(b.sample.latent.shape, self.patch)) for b in self.buffer]
            chosen = plan_packs(counts, stage.token_budget)[0]
            samples = [self.buffer[i] for i in chosen]
            taken = set(chosen)
            self.buffer = [b for i, b in enumerate(self.buffer) if i not in taken]
            packs.append(self._pack(samples, step, stage))
        return packs

    def _pack(self, samples: Sequence[Buffered], step: int, stage: StageConfig) -> Pack:
        from goku_megatron import flow

        from goku_megatron.data.encoders import pack_text, pad_text

        noisy, targets, times, texts, conds = [], [], [], [], []
        to_encode: list[tuple[int, str]] = []  # (sample, caption) without usable stored tokens
        for i, b in enumerate(samples):
            x1 = b.sample.latent
            draw = flow.noise_sample(x1, self.cfg.train.seed, step, b.key, self.cfg.flow)
            noisy.append(flow.interpolate(x1[None], draw.x0[None], draw.t)[0])
            targets.append(flow.velocity_target(x1, draw.x0))
            conds.append(flow.first_frame_condition(x1) if self.cfg.model.i2v else None)
            times.append(draw.t[0])
            texts.append(None if draw.drop_caption else b.sample.text)
            if texts[-1] is None:
                to_encode.append((i, "" if draw.drop_caption else b.sample.caption))
        if to_encode:
            emb, mask = self.text_encoder([caption for _, caption in to_encode])
            for (i, _), e, m in zip(to_encode, emb, mask):
                texts[i] = pack_text(e.float().cpu(), m.cpu())
        text, text_mask = pad_text(texts, self.cfg.data.max_text_tokens)
        return build_pack(
            [PackSample(noisy=n, target=g, timestep=t, text=e, text_mask=m, key=b.key, cond=c)
             for n, g, t, e, m, b, c in zip(noisy, targets, times, text, text_mask, samples, conds)],
            stage.token_budget, self.patch,
        )

    def state_dict(self) -> dict[str, Any]:
        return {
            "streams": {path: {kind: s.state_dict() for kind, s in kinds.items()}
                        for path, kinds in self.streams.items()},
            "buffer": [{"shard": b.ref.shard, "key": b.ref.key, "members": b.ref.members}
                       for b in self.buffer],
            "draws": self.draws,
            "stage": self._stage_index,
            "bad": dict(self.bad.counts),
        }

    def load_state_dict(self, state: dict[str, Any]) -> None:
        for path, kinds in state["streams"].items():
            for kind, s in kinds.items():
                self.streams[path][kind].load_state_dict(s)
        self.draws = int(state["draws"])
        self._stage_index = int(state["stage"])
        self.bad.counts.update(state["bad"])
        self.buffer = []
        for item in state["buffer"]:
            ref = SampleRef(item["shard"], item["key"], {k: tuple(v) for k, v in item["members"].items()})
            stage = self.cfg.data.stages[self._stage_index]
            prepared = self.prepare(read_sample(ref), stage)
            if prepared is not None:
                self.buffer.append(Buffered(ref, prepared))

