"""A frozen text encoder that needs no downloaded weights, for the toy recipe and tests.

It stands in for FLAN-T5 where only the interface matters: a caption becomes a padded sequence of
token embeddings plus a validity mask, the same shape contract the caption projection and the
cross-attention consume. Each word gets a fixed random vector seeded by its CRC32, so every process
and every run encodes a caption identically (Python's hash() is salted per process).
"""
from __future__ import annotations

import re
import zlib

import torch

NULL_TOKEN = "<null>"
_WORD = re.compile(r"[a-z0-9]+")


class HashTextEncoder(torch.nn.Module):
    """Bag of hashed word vectors: captions -> (emb [B, L, dim] float32, mask [B, L] bool).

    L is always ``max_tokens`` (longer captions are truncated, shorter ones padded with zeros and
    mask False). A caption without words, such as the "" used for classifier-free-guidance dropout,
    encodes as the single ``NULL_TOKEN`` so attention always has one valid key. Entries are
    N(0, 1), the scale of a normalised transformer output. Nothing is trainable; the outputs follow
    the module's device.
    """

    def __init__(self, dim: int = 64, max_tokens: int = 16) -> None:
        super().__init__()
        if dim < 1 or max_tokens < 1:
            raise ValueError(f"need dim >= 1 and max_tokens >= 1, got {dim}, {max_tokens}")
        self.dim = dim
        self.max_tokens = max_tokens
        self._cache: dict[str, torch.Tensor] = {}
        # Empty and non-persistent: only tracks the device the module is moved to.
        self.register_buffer("_device_anchor", torch.empty(0), persistent=False)

    @staticmethod
    def tokenize(caption: str) -> list[str]:
        """Lower-cased alphanumeric words; punctuation is dropped."""
        return _WORD.findall(caption.lower()) or [NULL_TOKEN]

    def word_embedding(self, word: str) -> torch.Tensor:
        """The fixed (dim,) CPU vector of a word, drawn from a generator seeded by its CRC32."""
        vector = self._cache.get(word)
        if vector is None:
            generator = torch.Generator().manual_seed(zlib.crc32(word.encode("utf-8")))
            vector = torch.randn(self.dim, generator=generator, dtype=torch.float32)
            self._cache[word] = vector
        return vector

    @torch.no_grad()
    def forward(self, captions: list[str]) -> tuple[torch.Tensor, torch.Tensor]:
        emb = torch.zeros(len(captions), self.max_tokens, self.dim, dtype=torch.float32)
        mask = torch.zeros(len(captions), self.max_tokens, dtype=torch.bool)
        for row, caption in enumerate(captions):
            words = self.tokenize(caption)[: self.max_tokens]
            emb[row, : len(words)] = torch.stack([self.word_embedding(w) for w in words])
            mask[row, : len(words)] = True
        device = self._device_anchor.device
        return emb.to(device), mask.to(device)
