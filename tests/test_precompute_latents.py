"""goku-data precompute-latents on toy raw shards (VP9 clips, PNG stills, bad samples) with the tiny
random VAE and T5 of test_encoders: contents, resumability, and rank independence."""
from __future__ import annotations

import io
import json
import re
from pathlib import Path

import pytest
import torch

from conftest import run_torchrun
from numerics import assert_close_to_scale
from goku_megatron.cli import data as goku_data
from goku_megatron.data.decode import decode_sample
from goku_megatron.data.frames import FrameSpec
from goku_megatron.data.encoders import build_text_encoder, build_vae, pack_text
from goku_megatron.data.shards import BadSamples, ShardWriter, list_samples, read_sample
from goku_megatron.data.toy import ToySample, encode_png, encode_webm
from goku_megatron.resilience import EXIT_CONFIG_ERROR
from tiny_models import TINY_T5_DIM, make_tiny_t5, make_tiny_vae

SPEC = FrameSpec(fps=8, frames=9, height=16, width=16)
MAX_TOKENS = 24
GOOD_PER_SHARD = 4  # 3 clips (one of 5 frames, padded to 9) and one still per input shard


def toy_members(index: int, still: bool, frames: int = 9) -> dict[str, bytes]:
    sample = ToySample.draw(index, still=still, size=16, frames=frames, seed=0)
    pixels = sample.render(16, frames)
    media = {"png": encode_png(pixels[0])} if still else {"webm": encode_webm(pixels, 8)}
    meta = {"index": index, "color": sample.color}
    return {**media, "txt": sample.caption.encode(), "json": json.dumps(meta).encode()}


@pytest.fixture(scope="module")
def models(tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, Path]:
    return make_tiny_vae(tmp_path_factory.mktemp("vae")), make_tiny_t5(tmp_path_factory.mktemp("t5"))


@pytest.fixture(scope="module")
def raw_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """Three raw shards of 4 good samples each; the second also holds two bad ones."""
    out = tmp_path_factory.mktemp("raw")
    for shard in range(3):
        with ShardWriter(out, prefix="raw", samples_per_shard=100, first_shard=shard) as writer:
            for i in range(GOOD_PER_SHARD):
                index = 10 * shard + i
                writer.write(f"{index:08d}", toy_members(index, still=i == 3, frames=5 if i == 1 else 9))
            if shard == 1:
                writer.write("bad-bytes", {"webm": b"\x00not a video" * 50, "txt": b"garbage"})
                writer.write("bad-nocaption", {"png": toy_members(99, still=True)["png"]})
    return out


def run(raw: Path, out: Path, models: tuple[Path, Path], *extra: str, text: bool = True) -> list[str]:
    vae, t5 = models
    return ["precompute-latents", "--input", str(raw), "--output", str(out), "--vae", str(vae),
            *(["--text-encoder", str(t5)] if text else []), "--max-text-tokens", str(MAX_TOKENS),
            "--fps", "8", "--frames", "9", "--height", "16", "--width", "16", "--decoder", "pyav",
            "--samples-per-shard", "3", "--batch-size", "2", *extra]


def precompute(raw: Path, out: Path, models: tuple[Path, Path], capsys: pytest.CaptureFixture,
               text: bool = True) -> str:
    assert goku_data.main(run(raw, out, models, text=text)) == 0
    return capsys.readouterr().out


def snapshot(out: Path) -> dict[str, bytes]:
    return {p.name: p.read_bytes() for p in sorted(out.iterdir())}


def load(data: bytes) -> torch.Tensor:
    return torch.load(io.BytesIO(data), weights_only=True)


def test_latent_shards_hold_the_encodings_of_the_decoded_samples(
        raw_dir: Path, models: tuple[Path, Path], tmp_path: Path, capsys: pytest.CaptureFixture) -> None:
    summary = precompute(raw_dir, tmp_path, models, capsys).strip().splitlines()[-1]  # after the log
    assert summary == ("precompute-latents rank 0/1: 3 input shards (0 already complete), "
                       f"12 samples -> 6 shards, 2 bad (missing_caption 1, not_a_video 1), "
                       f"{summary.split(', ')[-1]}")
    done = json.loads((tmp_path / "raw-00001.done.json").read_text())
    assert done == {"input": "raw-00001.tar", "shards": ["raw-00001-00000.tar", "raw-00001-00001.tar"],
                    "samples": 4, "bad": {"missing_caption": 1, "not_a_video": 1}}
    assert sorted(p.name for p in tmp_path.glob("*.tar")) == [
        f"raw-{i:05d}-{j:05d}.tar" for i in range(3) for j in range(2)]

    vae, t5 = build_vae(models[0]), build_text_encoder("t5", models[1], TINY_T5_DIM, MAX_TOKENS)
    raw = {ref.key: read_sample(ref) for shard in sorted(raw_dir.glob("*.tar"))
           for ref in list_samples(shard, BadSamples()) if not ref.key.startswith("bad")}
    seen = []
    for shard in sorted(tmp_path.glob("*.tar")):
        for ref in list_samples(shard, BadSamples()):
            sample = read_sample(ref)
            assert set(sample) == {"__key__", "__url__", "latent.pth", "t5.pth", "txt", "json"}
            decoded = decode_sample(raw[ref.key], SPEC, BadSamples(), backend="pyav")
            latent = load(sample["latent.pth"])
            expected = vae.encode(decoded.pixels[None])[0]
            assert latent.dtype == torch.float32 and latent.shape == expected.shape
            assert latent.shape == ((4, 1, 2, 2) if "png" in raw[ref.key] else (4, 3, 2, 2))
            assert_close_to_scale(latent, expected, ulps=128)  # encoded in batches there, alone here
            emb, mask = t5([decoded.caption])
            assert_close_to_scale(load(sample["t5.pth"]), pack_text(emb[0], mask[0]), ulps=64)
            assert sample["txt"].decode() == decoded.caption
            meta = json.loads(sample["json"])
            assert meta["color"] == decoded.meta["color"] and meta["index"] == int(ref.key)
            assert meta["latent"] == {
                "shape": list(latent.shape), "dtype": "float32", "vae": str(models[0]),
                "scaling_factor": 0.7, "shift_factor": 0.0,
                "frame_spec": {"fps": 8.0, "frames": 9, "height": 16, "width": 16},
                "source_shard": Path(raw[ref.key]["__url__"]).name, "text_encoder": str(models[1]),
                "text_tokens": int(mask.sum())}
            seen.append(ref.key)
    assert sorted(seen) == sorted(raw) and len(seen) == 12  # every good sample exactly once


def test_rerun_skips_complete_shards_and_redoes_the_rest_byte_identically(
        raw_dir: Path, models: tuple[Path, Path], tmp_path: Path, capsys: pytest.CaptureFixture) -> None:
    precompute(raw_dir, tmp_path, models, capsys)
    first = snapshot(tmp_path)
    mtimes = {p.name: p.stat().st_mtime_ns for p in tmp_path.iterdir()}

    assert "3 input shards (3 already complete), 0 samples -> 0 shards" in precompute(
        raw_dir, tmp_path, models, capsys)
    assert {p.name: p.stat().st_mtime_ns for p in tmp_path.iterdir()} == mtimes  # nothing rewritten

    # a deleted output shard, and a crash mid-shard (temporary file, no .done.json)
    (tmp_path / "raw-00001-00000.tar").unlink()
    (tmp_path / "raw-00002.done.json").unlink()
    (tmp_path / "raw-00002-00001.tar").rename(tmp_path / "raw-00002-00001.tar.tmp999")
    summary = precompute(raw_dir, tmp_path, models, capsys)
    assert "3 input shards (1 already complete), 8 samples -> 4 shards, 2 bad" in summary
    assert snapshot(tmp_path) == first
    assert (tmp_path / "raw-00000-00000.tar").stat().st_mtime_ns == mtimes["raw-00000-00000.tar"]


def test_without_text_encoder_captions_stay_text(raw_dir: Path, models: tuple[Path, Path],
                                                 tmp_path: Path, capsys: pytest.CaptureFixture) -> None:
    precompute(raw_dir / "raw-00000.tar", tmp_path, models, capsys, text=False)
    samples = [read_sample(r) for s in sorted(tmp_path.glob("*.tar")) for r in list_samples(s, BadSamples())]
    assert len(samples) == GOOD_PER_SHARD
    for sample in samples:
        assert set(sample) == {"__key__", "__url__", "latent.pth", "txt", "json"}
        meta = json.loads(sample["json"])["latent"]
        assert meta["text_encoder"] is None and meta["text_tokens"] is None


def test_refuses_bad_arguments_in_one_line(raw_dir: Path, models: tuple[Path, Path], tmp_path: Path,
                                           capsys: pytest.CaptureFixture) -> None:
    cases = [
        (["--vae", str(tmp_path / "novae")], "no model there.*huggingface-cli download THUDM/CogVideoX-2b"),
        (["--frames", "8"], r"1 or 1 \+ k\*4 frames"),
        (["--input", str(raw_dir), str(raw_dir / "raw-00000.tar")], "share the name raw-00000"),
        (["--output", str(raw_dir)], "lies in the output folder"),
    ]
    for extra, message in cases:
        assert goku_data.main(run(raw_dir, tmp_path / "out", models, *extra)) == EXIT_CONFIG_ERROR
        err = capsys.readouterr().err
        assert err.count("\n") == 1 and re.match(f"goku-data: error: .*{message}", err), err
    assert not any(raw_dir.glob("*.done.json"))


@pytest.mark.slow
def test_two_ranks_write_the_same_samples_as_one(
        raw_dir: Path, models: tuple[Path, Path], tmp_path: Path, capsys: pytest.CaptureFixture) -> None:
    one, two = tmp_path / "one", tmp_path / "two"
    precompute(raw_dir, one, models, capsys)
    stdout = run_torchrun(2, ["-m", "goku_megatron.cli.data", *run(raw_dir, two, models)], timeout=300)
    assert "rank 0/2: 2 input shards (0 already complete), 8 samples -> 4 shards" in stdout
    assert "rank 1/2: 1 input shards (0 already complete), 4 samples -> 2 shards, 2 bad" in stdout
    assert sorted(p.name for p in one.iterdir()) == sorted(p.name for p in two.iterdir())
    for shard in sorted(one.glob("*.tar")):
        ours, theirs = ([read_sample(r) for r in list_samples(d / shard.name, BadSamples())] for d in (one, two))
        assert [s["__key__"] for s in ours] == [s["__key__"] for s in theirs]
        for a, b in zip(ours, theirs):
            assert a["txt"] == b["txt"] and a["json"] == b["json"]
            # other processes may use other CPU kernels (thread counts): equal up to rounding
            assert_close_to_scale(load(a["latent.pth"]), load(b["latent.pth"]), ulps=64)
            assert_close_to_scale(load(a["t5.pth"]), load(b["t5.pth"]), ulps=64)
