"""Tiny randomly initialised models of the real encoder classes, saved offline for tests (no hub)."""

from __future__ import annotations

import io
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
