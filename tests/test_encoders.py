"""Frozen encoders on tiny random models of the real classes, saved and loaded offline.

The tiny VAE keeps the released CogVideoX compression (4 blocks: 8x in space, 4x in time) with
8 channels; the tiny T5 has a 40-piece SentencePiece vocabulary trained here on a few sentences.
"""
from __future__ import annotations

from pathlib import Path

import pytest
import torch

from goku_megatron.data.encoders import (MissingWeightsError, T5TextEncoder, VideoVAE, build_text_encoder,
                                         build_vae, pack_text, pad_text)
from goku_megatron.data.text_encoder import HashTextEncoder
from numerics import assert_close_to_scale
from tiny_models import TINY_T5_DIM, make_tiny_t5, make_tiny_vae

CAPTIONS = ["a red square moving left", "", "a blue circle", "the quick brown fox jumps over the lazy dog "
            "and the red square moving up and down and left and right"]


@pytest.fixture(scope="module")
def vae_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return make_tiny_vae(tmp_path_factory.mktemp("vae"))


@pytest.fixture(scope="module")
def t5_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return make_tiny_t5(tmp_path_factory.mktemp("t5"))


@pytest.fixture(scope="module")
def vae(vae_dir: Path) -> VideoVAE:
    return build_vae(vae_dir)


def clip(frames: int, batch: int = 2, size: int = 16, seed: int = 0) -> torch.Tensor:
    gen = torch.Generator().manual_seed(seed)
    return torch.rand(batch, 3, frames, size, size, generator=gen) * 2 - 1


def assert_frozen(module: torch.nn.Module) -> None:
    module.train()  # as a parent module's .train() would: must not switch on T5's dropout
    assert not any(m.training for m in module.modules())
    assert not any(p.requires_grad for p in module.parameters())


@pytest.mark.parametrize("frames,latent_frames", [(1, 1), (5, 2), (9, 3), (13, 4)])
def test_vae_encode_shape_dtype(vae: VideoVAE, frames: int, latent_frames: int) -> None:
    latents = vae.encode(clip(frames))
    assert latents.shape == (2, 4, latent_frames, 2, 2)
    assert latents.shape[1:] == vae.latent_shape(frames, 16, 16)
    assert latents.dtype == torch.float32 and not latents.requires_grad
    assert torch.isfinite(latents).all()


def test_vae_is_frozen_deterministic_and_scaled(vae: VideoVAE) -> None:
    assert_frozen(vae)
    assert (vae.spatial_factor, vae.temporal_factor, vae.latent_channels) == (8, 4, 4)
    pixels = clip(9)
    latents = vae.encode(pixels)
    assert torch.equal(latents, vae.encode(pixels))
    # the posterior mean times the config's scaling factor, as the CogVideoX pipelines scale it
    expected = vae.vae.encode(pixels).latent_dist.mean * 0.7
    assert_close_to_scale(latents, expected, ulps=16)
    # one clip encodes the same alone as in a batch (convolutions over another batch size)
    assert_close_to_scale(vae.encode(pixels[1:]), latents[1:], ulps=64)


@pytest.mark.parametrize("latent_frames,frames", [(1, 1), (3, 9)])
def test_vae_decode_shape(vae: VideoVAE, latent_frames: int, frames: int) -> None:
    latents = torch.randn(2, 4, latent_frames, 2, 2)
    pixels = vae.decode(latents)
    assert pixels.shape == (2, 3, frames, 16, 16) and pixels.dtype == torch.float32
    assert pixels.min() >= -1 and pixels.max() <= 1
    assert vae.encode(pixels).shape == latents.shape  # an image (T=1) round-trips as T'=1 too


def test_vae_refuses_invalid_sizes(vae: VideoVAE) -> None:
    with pytest.raises(ValueError, match=r"1 or 1 \+ k\*4 frames \(e\.g\. 9\), got 8"):
        vae.encode(clip(8))
    with pytest.raises(ValueError, match="divisible by 8, got 12x16"):
        vae.encode(torch.zeros(1, 3, 1, 12, 16))
    with pytest.raises(ValueError, match=r"\[B, 3, T, H, W\]"):
        vae.encode(torch.zeros(3, 1, 16, 16))
    with pytest.raises(ValueError, match="odd number of latent frames.*1 \\+ 8k frames.*got 2"):
        vae.decode(torch.zeros(1, 4, 2, 2, 2))
    with pytest.raises(ValueError, match=r"\[B, 4, T', H', W'\]"):
        vae.decode(torch.zeros(1, 16, 1, 2, 2))


def test_vae_loads_from_pipeline_checkout(vae_dir: Path, tmp_path: Path, vae: VideoVAE) -> None:
    (tmp_path / "vae").symlink_to(vae_dir)  # the layout `--include 'vae/*' --local-dir PATH` leaves
    loaded = build_vae(tmp_path)
    pixels = clip(5)
    assert torch.equal(loaded.encode(pixels), vae.encode(pixels))


def test_missing_weights_error_names_path_and_download(tmp_path: Path) -> None:
    # a hub repo id is no local folder: it must fail here, without any download attempt
    for kind, path, hint in [("vae", tmp_path / "nowhere", "THUDM/CogVideoX-2b --include 'vae/*'"),
                             ("t5", Path("google/flan-t5-xl"), "google/flan-t5-xl --local-dir")]:
        with pytest.raises(MissingWeightsError) as err:
            build_vae(path) if kind == "vae" else build_text_encoder("t5", path, dim=2048)
        message = str(err.value)
        assert isinstance(err.value, FileNotFoundError) and "\n" not in message
        assert str(path) in message and f"huggingface-cli download {hint}" in message
    (tmp_path / "config.json").write_text("{}")  # config without weights: an interrupted download
    with pytest.raises(MissingWeightsError, match="no \\*.safetensors/\\*.bin weights"):
        build_vae(tmp_path)


@pytest.fixture(scope="module")
def t5(t5_dir: Path) -> T5TextEncoder:
    return build_text_encoder("t5", t5_dir, dim=TINY_T5_DIM, max_tokens=24)


def test_t5_encode_shape_mask_and_padding(t5: T5TextEncoder) -> None:
    emb, mask = t5(CAPTIONS)
    assert emb.shape == (4, 24, TINY_T5_DIM) and emb.dtype == torch.float32
    assert mask.shape == (4, 24) and mask.dtype == torch.bool
    lengths = [len(t5.tokenizer(c)["input_ids"]) for c in CAPTIONS]  # tokens + </s>
    assert lengths[1] == 1 and lengths[3] > 24  # "" is just </s>; the last one gets truncated
    assert mask.sum(1).tolist() == [min(n, 24) for n in lengths]
    assert torch.equal(mask, mask.cummin(1).values)  # real tokens first, then padding
    assert (emb[~mask] == 0).all() and (emb[mask].abs().sum(-1) > 0).all()


def test_t5_is_frozen_deterministic_and_matches_the_model(t5: T5TextEncoder, t5_dir: Path) -> None:
    from transformers import T5EncoderModel

    assert_frozen(t5)
    emb, mask = t5(CAPTIONS)
    again, again_mask = t5.encode(CAPTIONS)
    assert torch.equal(emb, again) and torch.equal(mask, again_mask) and not emb.requires_grad
    reference = T5EncoderModel.from_pretrained(t5_dir).eval()
    ids = t5.tokenizer(CAPTIONS[0], return_tensors="pt")["input_ids"]
    with torch.no_grad():
        expected = reference(input_ids=ids).last_hidden_state[0]
    assert_close_to_scale(emb[0, : ids.shape[1]], expected, ulps=64)  # padding does not leak in


def test_build_text_encoder_kinds(t5_dir: Path) -> None:
    hashed = build_text_encoder("hash", dim=8, max_tokens=4)
    assert isinstance(hashed, HashTextEncoder)
    emb, mask = hashed(["a red square"])
    assert emb.shape == (1, 4, 8) and mask.tolist() == [[True, True, True, False]]
    with pytest.raises(ValueError, match=f"width {TINY_T5_DIM} but model.text_dim=2048; "
                                         f"set model.text_dim={TINY_T5_DIM}"):
        build_text_encoder("t5", t5_dir, dim=2048)
    with pytest.raises(ValueError, match="data.text_encoder='clip' is not one of hash, t5"):
        build_text_encoder("clip")


def test_pack_and_pad_text_round_trip(t5: T5TextEncoder) -> None:
    emb, mask = t5(CAPTIONS)
    packed = [pack_text(e, m) for e, m in zip(emb, mask)]
    assert [p.shape[0] for p in packed] == mask.sum(1).tolist()
    assert packed[0].untyped_storage().nbytes() == packed[0].numel() * packed[0].element_size()
    padded, padded_mask = pad_text(packed, 24)
    assert torch.equal(padded, emb) and torch.equal(padded_mask, mask)
    short, short_mask = pad_text(packed, 3)
    assert torch.equal(short, emb[:, :3]) and torch.equal(short_mask, mask[:, :3])
