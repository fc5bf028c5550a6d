"""Tiny randomly initialised models of the real encoder classes, saved offline for tests (no hub),
and the shards of random latents that tests train on."""

from __future__ import annotations

import io
import json
from pathlib import Path

import torch

TINY_T5_DIM = 16


def make_tiny_vae(path: Path) -> Path:
    """A randomly initialised AutoencoderKLCogVideoX with the released compression, saved to path."""
    from diffusers import AutoencoderKLCogVideoX

    torch.manual_seed(0)
    vae = AutoencoderKLCogVideoX(
        block_out_channels=(8, 8, 8, 8), down_block_types=("CogVideoXDownBlock3D",) * 4,
        up_block_types=("CogVideoXUpBlock3D",) * 4, latent_channels=4, layers_per_block=1,
        norm_num_groups=4, temporal_compression_ratio=4, scaling_factor=0.7)
    vae.save_pretrained(path)
    return path


def make_tiny_t5(path: Path) -> Path:
    """A randomly initialised T5EncoderModel plus a SentencePiece-unigram T5 tokenizer, saved to path."""
    import sentencepiece as spm
    from transformers import T5Config, T5EncoderModel, T5Tokenizer

    sentences = ["a red square moving left", "a blue circle moving up", "a green square moving down",
                 "the quick brown fox jumps over the lazy dog", "a yellow circle moving right"] * 10
    proto = io.BytesIO()
    spm.SentencePieceTrainer.train(sentence_iterator=iter(sentences), model_writer=proto, vocab_size=40,  # all pieces these sentences give
                                   model_type="unigram", pad_id=0, eos_id=1, unk_id=2, bos_id=-1,
                                   hard_vocab_limit=False, minloglevel=2)
    sp = spm.SentencePieceProcessor(model_proto=proto.getvalue())
    vocab = [(sp.id_to_piece(i), sp.get_score(i)) for i in range(sp.get_piece_size())]
    tokenizer = T5Tokenizer(vocab=vocab, extra_ids=0)
    torch.manual_seed(0)
    config = T5Config(vocab_size=len(vocab), d_model=TINY_T5_DIM, d_kv=4, d_ff=32, num_layers=2,
                      num_heads=4, decoder_start_token_id=0)
    T5EncoderModel(config).save_pretrained(path)
    tokenizer.save_pretrained(path)
    return path


def tensor_bytes(x: torch.Tensor) -> bytes:
    """A tensor as the bytes of a ``.pth`` shard member."""
    buf = io.BytesIO()
    torch.save(x, buf)
    return buf.getvalue()


def write_latent_shards(out: Path, sizes: list[tuple[int, int, int]], count: int, samples_per_shard: int,
                        t5_every: int = 0) -> Path:
    """``count`` precomputed samples (4-channel latents of ``sizes[i % len(sizes)]`` = (T, H, W),
    caption "sample i", every ``t5_every``-th with stored text tokens) as goku-data precompute-latents
    writes them, keys k000, k001, ...; seeded, so the same arguments write the same shards."""
    from goku_megatron.data.shards import ShardWriter

    gen = torch.Generator().manual_seed(0)
    with ShardWriter(out, samples_per_shard=samples_per_shard) as writer:
        for i in range(count):
            t, h, w = sizes[i % len(sizes)]
            members = {"latent.pth": tensor_bytes(torch.randn(4, t, h, w, generator=gen)),
                       "txt": f"sample {i}".encode(), "json": json.dumps({"frames": t}).encode()}
            if t5_every and i % t5_every == 0:
                members["t5.pth"] = tensor_bytes(torch.randn(3, 32, generator=gen))
            writer.write(f"k{i:03d}", members)
    return out
