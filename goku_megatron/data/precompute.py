"""Encodes raw clip/image shards into latent shards: CogVideoX VAE latents plus T5 text embeddings
(``goku-data precompute-latents``).

Each rank takes the input shards i with i % WORLD_SIZE == RANK (one process is rank 0 of 1) and no
rank waits for another. Input shard ``NAME.tar`` becomes output shards ``NAME-00000.tar``,
``NAME-00001.tar``, ... (``samples_per_shard`` samples each, DALI index beside each), then
``NAME.done.json`` listing them: the output depends only on the input shard, never on the number of
ranks. The run is resumable: an input shard whose .done.json exists with every shard it lists is
skipped, and any other input shard is redone from scratch (its stale and half-written outputs are
removed first), so a rerun after a crash or after deleting an output shard redoes only that input
shard, writing byte-identical shards.

Per sample (same key as the raw sample):
  latent.pth  torch.save of the scaled VAE latent [C', T', H', W'] (posterior mean; bf16 when
              encoded on GPU, fp32 on CPU), see goku_megatron.data.encoders.VideoVAE
  t5.pth      torch.save of the caption's real text tokens [n, d] only (no padding: n <= the
              max_text_tokens, the closing </s> included); encoders.pad_text rebuilds the padded
              (emb, mask) pair. Omitted without a text encoder, so the trainer encodes the caption.
  txt         the caption
  json        the raw sample's metadata plus "latent": latent shape, dtype, VAE path and scaling,
              frame spec, source shard and text-encoder path/token count.
Samples are encoded in batches of ``batch_size`` samples of equal shape (clips and stills apart),
so within a shard they are written grouped by shape. Bad samples are skipped and counted by kind.
"""
from __future__ import annotations

import io
import json
import os
from collections import Counter
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Sequence

import torch

from goku_megatron.data.decode import DecodedSample, decode_sample
from goku_megatron.data.encoders import T5TextEncoder, VideoVAE, build_vae, pack_text
from goku_megatron.data.frames import FrameSpec
from goku_megatron.data.shards import BadSamples, ShardWriter, find_shards, list_samples, read_sample

DONE_SUFFIX = ".done.json"
DEFAULT_MAX_TEXT_TOKENS = 256


@dataclass
class Job:
    """What every sample goes through: decode to ``spec``, VAE, T5 (None: captions stay text)."""

    vae: VideoVAE
    text: T5TextEncoder | None
    spec: FrameSpec
    decoder: str


@dataclass
class RankStats:
    """One rank's summary; samples, outputs and bad count the input shards processed in this run
    (those found complete are only counted as skipped)."""

    inputs: int = 0
    skipped: int = 0
    samples: int = 0
    outputs: int = 0
    bad: Counter = field(default_factory=Counter)

    def line(self, rank: int, world: int, seconds: float) -> str:
        detail = ", ".join(f"{kind} {n}" for kind, n in sorted(self.bad.items()))
        return (f"rank {rank}/{world}: {self.inputs} input shards "
                f"({self.skipped} already complete), {self.samples} samples -> {self.outputs} "
                f"shards, {sum(self.bad.values())} bad{f' ({detail})' if detail else ''}, "
                f"{seconds:.1f} s")


def load_job(vae: str | Path, spec: FrameSpec, decoder: str, device: torch.device,
             text_encoder: str | Path | None = None,
             max_text_tokens: int = DEFAULT_MAX_TEXT_TOKENS) -> Job:
    """Loads the VAE (and T5, when ``text_encoder`` is given), refusing a frame spec the VAE
    cannot encode before any sample is decoded."""
    video = build_vae(vae, device)
    video.latent_shape(spec.frames, spec.height, spec.width)
    text = T5TextEncoder.from_pretrained(text_encoder, max_text_tokens, device) if text_encoder else None
    return Job(video, text, spec, decoder)


def done_path(out_dir: Path, shard: Path) -> Path:
    return out_dir / f"{shard.stem}{DONE_SUFFIX}"


def is_complete(out_dir: Path, shard: Path) -> bool:
    """True when the input shard's .done.json exists and every output shard it lists does too."""
    done = done_path(out_dir, shard)
    if not done.is_file():
        return False
    return all((out_dir / name).is_file() for name in json.loads(done.read_text())["shards"])


def remove_outputs(out_dir: Path, shard: Path) -> None:
    """Removes whatever an earlier, unfinished run left for this input shard: its .done.json,
    output shards and their indexes, and ShardWriter's temporary files."""
    done_path(out_dir, shard).unlink(missing_ok=True)
    for pattern in ("-?????.tar", "-?????.idx", "-?????.tar.tmp*"):
        for stale in out_dir.glob(f"{shard.stem}{pattern}"):
            stale.unlink()


def tensor_bytes(tensor: torch.Tensor) -> bytes:
    buf = io.BytesIO()
    torch.save(tensor.detach().cpu().clone(), buf)  # clone: save this sample, not the batch storage
    return buf.getvalue()


def encode_batch(batch: list[DecodedSample], shard: Path, job: Job, writer: ShardWriter) -> int:
    """VAE- (and T5-) encodes samples of one shape together and writes one output sample each."""
    latents = job.vae.encode(torch.stack([s.pixels for s in batch]))
    texts: list[torch.Tensor | None] = [None] * len(batch)
    if job.text is not None:
        emb, mask = job.text([s.caption for s in batch])
        texts = [pack_text(e, m) for e, m in zip(emb, mask)]
    for sample, latent, text in zip(batch, latents, texts):
        info = {"shape": list(latent.shape), "dtype": str(latent.dtype).removeprefix("torch."),
                "vae": job.vae.path, "scaling_factor": job.vae.scaling_factor,
                "shift_factor": job.vae.shift_factor, "frame_spec": asdict(job.spec),
                "source_shard": shard.name,
                "text_encoder": None if job.text is None else job.text.path,
                "text_tokens": None if text is None else text.shape[0]}
        members = {"latent.pth": tensor_bytes(latent), "txt": sample.caption.encode("utf-8"),
                   "json": json.dumps({**sample.meta, "latent": info}, sort_keys=True).encode("utf-8")}
        if text is not None:
            members["t5.pth"] = tensor_bytes(text)
        writer.write(sample.key, members)
    return len(batch)


def precompute_shard(shard: Path, out_dir: Path, job: Job, samples_per_shard: int,
                     batch_size: int) -> dict:
    """Writes the latent shards of one input shard, then (atomically) its .done.json, which it
    returns: {"input", "shards", "samples", "bad": {kind: count}}."""
    remove_outputs(out_dir, shard)
    bad = BadSamples()
    samples = 0
    pending: dict[tuple[int, ...], list[DecodedSample]] = {}  # by pixel shape, first seen first
    with ShardWriter(out_dir, prefix=shard.stem, samples_per_shard=samples_per_shard) as writer:
        for ref in list_samples(shard, bad):
            sample = decode_sample(read_sample(ref), job.spec, bad, backend=job.decoder)
            if sample is None:
                continue
            group = pending.setdefault(tuple(sample.pixels.shape), [])
            group.append(sample)
            if len(group) == batch_size:
                samples += encode_batch(group, shard, job, writer)
                group.clear()
        for group in pending.values():
            if group:
                samples += encode_batch(group, shard, job, writer)
    manifest = {"input": shard.name, "shards": [p.name for p in writer.written], "samples": samples,
                "bad": {k: v for k, v in sorted(bad.counts.items()) if v}}
    tmp = out_dir / f"{shard.stem}{DONE_SUFFIX}.tmp{os.getpid()}"
    tmp.write_text(json.dumps(manifest, indent=1, sort_keys=True) + "\n")
    os.replace(tmp, done_path(out_dir, shard))
    return manifest


def input_shards(inputs: Sequence[str | Path], out_dir: Path) -> list[Path]:
    """The input shards (folders or .tar files). Output shards are named by input shard: two
    inputs of one name, or inputs inside the output folder (a rerun would read its own outputs),
    are refused before any work."""
    shards = find_shards(inputs)
    seen: dict[str, Path] = {}
    for shard in shards:
        if shard.stem in seen:
            raise ValueError(f"input shards {seen[shard.stem]} and {shard} share the name "
                             f"{shard.stem}; output shards are named by input shard: rename one")
        seen[shard.stem] = shard
        if shard.resolve().parent == out_dir.resolve():
            raise ValueError(f"input shard {shard} lies in the output folder {out_dir}; "
                             f"write the latents to another folder")
    return shards


def precompute_latents(shards: Sequence[Path], out_dir: Path, job: Job, *, rank: int = 0, world: int = 1,
                       samples_per_shard: int = 1000, batch_size: int = 8) -> RankStats:
    """Encodes this rank's share of ``shards`` (every ``world``-th, from ``rank``) into ``out_dir``,
    skipping input shards already complete there."""
    out_dir.mkdir(parents=True, exist_ok=True)
    stats = RankStats()
    for shard in shards[rank::world]:
        stats.inputs += 1
        if is_complete(out_dir, shard):
            stats.skipped += 1
            continue
        manifest = precompute_shard(shard, out_dir, job, samples_per_shard, batch_size)
        stats.samples += manifest["samples"]
        stats.outputs += len(manifest["shards"])
        stats.bad.update(manifest["bad"])
    return stats
