"""Encodes raw clip/image shards into latent shards: CogVideoX VAE latents plus T5 text embeddings.

    torchrun --nproc-per-node 8 tools/precompute_latents.py --input data/raw-480p \
        --output data/latents-480p --vae ckpt/CogVideoX-2b --text-encoder ckpt/flan-t5-xl \
        --fps 8 --frames 33 --height 480 --width 864

Each rank takes the input shards i with i % WORLD_SIZE == RANK (plain python runs as rank 0 of 1)
and no rank waits for another. Input shard ``NAME.tar`` becomes output shards
``NAME-00000.tar``, ``NAME-00001.tar``, ... (``--samples-per-shard`` samples each, DALI index
beside each), then ``NAME.done.json`` listing them: the output depends only on the input shard,
never on the number of ranks. The run is resumable: an input shard whose .done.json exists with
every shard it lists is skipped, and any other input shard is redone from scratch (its stale and
half-written outputs are removed first), so a rerun after a crash or after deleting an output shard
redoes only that input shard, writing byte-identical shards.

Per sample (same key as the raw sample):
  latent.pth  torch.save of the scaled VAE latent [C', T', H', W'] (posterior mean; bf16 when
              encoded on GPU, fp32 on CPU), see goku_megatron.data.encoders.VideoVAE
  t5.pth      torch.save of the caption's real text tokens [n, d] only (no padding: n <= the
              --max-text-tokens, the closing </s> included); encoders.pad_text rebuilds the padded
              (emb, mask) pair. Omitted without --text-encoder, so the trainer encodes the caption.
  txt         the caption
  json        the raw sample's metadata plus "latent": latent shape, dtype, VAE path and scaling,
              frame spec, source shard and text-encoder path/token count.
Samples are encoded in batches of --batch-size samples of equal shape (clips and stills apart), so
within a shard they are written grouped by shape. Bad samples are skipped and counted by kind; each
rank prints one summary line at the end.
"""
from __future__ import annotations

import argparse
import io
import json
import logging
import os
import sys
import time
from collections import Counter
from dataclasses import asdict, dataclass, field
from pathlib import Path

import torch

from goku_megatron.config import StageConfig
from goku_megatron.data.decode import BACKENDS, DecodedSample, FrameSpec, decode_sample
from goku_megatron.data.encoders import T5TextEncoder, VideoVAE, build_vae, pack_text
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
        return (f"precompute_latents rank {rank}/{world}: {self.inputs} input shards "
                f"({self.skipped} already complete), {self.samples} samples -> {self.outputs} "
                f"shards, {sum(self.bad.values())} bad{f' ({detail})' if detail else ''}, "
                f"{seconds:.1f} s")


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


def encode_batch(batch: list[DecodedSample], shard: Path, enc: Job, writer: ShardWriter) -> int:
    """VAE- (and T5-) encodes samples of one shape together and writes one output sample each."""
    latents = enc.vae.encode(torch.stack([s.pixels for s in batch]))
    texts: list[torch.Tensor | None] = [None] * len(batch)
    if enc.text is not None:
        emb, mask = enc.text([s.caption for s in batch])
        texts = [pack_text(e, m) for e, m in zip(emb, mask)]
    for sample, latent, text in zip(batch, latents, texts):
        info = {"shape": list(latent.shape), "dtype": str(latent.dtype).removeprefix("torch."),
                "vae": enc.vae.path, "scaling_factor": enc.vae.scaling_factor,
                "shift_factor": enc.vae.shift_factor, "frame_spec": asdict(enc.spec),
                "source_shard": shard.name,
                "text_encoder": None if enc.text is None else enc.text.path,
                "text_tokens": None if text is None else text.shape[0]}
        members = {"latent.pth": tensor_bytes(latent), "txt": sample.caption.encode("utf-8"),
                   "json": json.dumps({**sample.meta, "latent": info}, sort_keys=True).encode("utf-8")}
        if text is not None:
            members["t5.pth"] = tensor_bytes(text)
        writer.write(sample.key, members)
    return len(batch)


def precompute_shard(shard: Path, out_dir: Path, enc: Job, samples_per_shard: int,
                     batch_size: int) -> dict:
    """Writes the latent shards of one input shard, then (atomically) its .done.json, which it
    returns: {"input", "shards", "samples", "bad": {kind: count}}."""
    remove_outputs(out_dir, shard)
    bad = BadSamples()
    samples = 0
    pending: dict[tuple[int, ...], list[DecodedSample]] = {}  # by pixel shape, first seen first
    with ShardWriter(out_dir, prefix=shard.stem, samples_per_shard=samples_per_shard) as writer:
        for ref in list_samples(shard, bad):
            sample = decode_sample(read_sample(ref), enc.spec, bad, backend=enc.decoder)
            if sample is None:
                continue
            group = pending.setdefault(tuple(sample.pixels.shape), [])
            group.append(sample)
            if len(group) == batch_size:
                samples += encode_batch(group, shard, enc, writer)
                group.clear()
        for group in pending.values():
            if group:
                samples += encode_batch(group, shard, enc, writer)
    manifest = {"input": shard.name, "shards": [p.name for p in writer.written], "samples": samples,
                "bad": {k: v for k, v in sorted(bad.counts.items()) if v}}
    tmp = out_dir / f"{shard.stem}{DONE_SUFFIX}.tmp{os.getpid()}"
    tmp.write_text(json.dumps(manifest, indent=1, sort_keys=True) + "\n")
    os.replace(tmp, done_path(out_dir, shard))
    return manifest


def check_inputs(shards: list[Path], out_dir: Path) -> None:
    """Output shards are named by input shard: two inputs of one name, or inputs inside the output
    folder (a rerun would read its own outputs), are refused before any work."""
    seen: dict[str, Path] = {}
    for shard in shards:
        if shard.stem in seen:
            raise ValueError(f"input shards {seen[shard.stem]} and {shard} share the name "
                             f"{shard.stem}; output shards are named by input shard: rename one")
        seen[shard.stem] = shard
        if shard.resolve().parent == out_dir.resolve():
            raise ValueError(f"input shard {shard} lies in the output folder {out_dir}; "
                             f"write the latents to another folder")


def main(argv: list[str] | None = None) -> None:
    stage = StageConfig()
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--input", nargs="+", required=True, help="raw shard folder(s) or .tar files")
    parser.add_argument("--output", type=Path, required=True, help="latent shard folder")
    parser.add_argument("--vae", required=True, help="local CogVideoX VAE (or CogVideoX checkout)")
    parser.add_argument("--text-encoder", default=None,
                        help="local FLAN-T5 checkout; without it no t5.pth is written")
    parser.add_argument("--max-text-tokens", type=int, default=DEFAULT_MAX_TEXT_TOKENS,
                        help="T5 tokens kept per caption (</s> included)")
    parser.add_argument("--fps", type=float, default=stage.fps, help="frame rate clips are sampled at")
    parser.add_argument("--frames", type=int, default=stage.frames, help="frames per clip (1 + 4k)")
    parser.add_argument("--height", type=int, default=stage.height)
    parser.add_argument("--width", type=int, default=stage.width)
    parser.add_argument("--decoder", choices=BACKENDS, default="auto",
                        help="auto: DALI where it takes the codec, else PyAV")
    parser.add_argument("--samples-per-shard", type=int, default=1000)
    parser.add_argument("--batch-size", type=int, default=8, help="samples encoded together")
    args = parser.parse_args(argv)
    if args.samples_per_shard < 1 or args.batch_size < 1:
        parser.error("--samples-per-shard and --batch-size must be >= 1")
    rank, world = int(os.environ.get("RANK", 0)), int(os.environ.get("WORLD_SIZE", 1))
    logging.basicConfig(level=logging.WARNING, format=f"[rank {rank}] %(levelname)s %(message)s")
    start = time.perf_counter()
    device = torch.device(f"cuda:{int(os.environ.get('LOCAL_RANK', 0))}"
                          if torch.cuda.is_available() else "cpu")
    try:
        spec = FrameSpec(args.fps, args.frames, args.height, args.width)
        shards = find_shards(args.input)
        check_inputs(shards, args.output)
        vae = build_vae(args.vae, device)
        vae.latent_shape(spec.frames, spec.height, spec.width)  # refuse a bad spec before decoding
        text = (T5TextEncoder.from_pretrained(args.text_encoder, args.max_text_tokens, device)
                if args.text_encoder else None)
    except (FileNotFoundError, ValueError) as e:
        sys.exit(f"precompute_latents: {e}")
    enc = Job(vae, text, spec, args.decoder)
    args.output.mkdir(parents=True, exist_ok=True)
    stats = RankStats()
    for shard in shards[rank::world]:
        stats.inputs += 1
        if is_complete(args.output, shard):
            stats.skipped += 1
            continue
        manifest = precompute_shard(shard, args.output, enc, args.samples_per_shard, args.batch_size)
        stats.samples += manifest["samples"]
        stats.outputs += len(manifest["shards"])
        stats.bad.update(manifest["bad"])
    print(stats.line(rank, world, time.perf_counter() - start), flush=True)


if __name__ == "__main__":
    main()
