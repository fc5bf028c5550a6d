"""Resumable, data-parallel sample streams over WebDataset shards.

Sharding: only data-parallel ranks split the data; the TP/CP/PP peers of a DP rank build the same
stream (it depends on (seed, dp_rank, dp_size) alone), so they see the same samples. With at least
as many shards as DP ranks a rank owns the shards ``i % dp_size == dp_rank`` (no rank reads
another's files); with fewer, every rank lists all shards and owns the samples
``n % dp_size == dp_rank`` in global order, and DP rank 0 alone counts the bad samples a listing
finds (every rank finds the same ones; the trainer sums the counts over DP ranks).

Order: each epoch permutes the rank's shards (RNG keyed by seed, epoch, rank) and takes them
``interleave`` at a time, merging each group's samples round-robin after permuting every shard's
samples (RNG keyed by seed, epoch, shard). The whole order is a function of the shard listings, so
the state is two integers and a resumed stream yields exactly the keys the uninterrupted one would.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable, Iterator, Sequence

import numpy as np

from goku_megatron.data.shards import IMAGE_EXTS, BadSamples, SampleRef, list_samples, read_sample

MEDIA_KINDS = ("video", "image", "any")


def media_kind(ref: SampleRef) -> str:
    """Returns "image" for a sample holding an image file, else "video". Latent samples hold no
    image file; a latent stream that mixes modalities passes its own ``kind_of`` to SampleStream."""
    return "image" if any(ext in ref.members for ext in IMAGE_EXTS) else "video"


@dataclass
class StreamState:
    epoch: int = 0
    position: int = 0  # samples of this epoch already yielded

    def as_dict(self) -> dict[str, int]:
        return {"epoch": self.epoch, "position": self.position}


class SampleStream:
    """Endless stream of one DP rank's raw samples ({"__key__", "__url__", ext: bytes}).

    ``kind`` keeps only videos or only images (a stage mixes the two at its own ratio by drawing
    from two streams). Shard listings (tar headers, no data) are cached, so bad samples found while
    listing are counted once.
    """

    def __init__(
        self,
        shards: Sequence[Path],
        *,
        dp_rank: int,
        dp_size: int,
        seed: int,
        bad: BadSamples,
        kind: str = "any",
        interleave: int = 4,
        kind_of: Callable[[SampleRef], str] = media_kind,
    ) -> None:
        if not 0 <= dp_rank < dp_size:
            raise ValueError(f"need 0 <= dp_rank < dp_size, got {dp_rank} and {dp_size}")
        if kind not in MEDIA_KINDS:
            raise ValueError(f"kind must be one of {MEDIA_KINDS}, got {kind!r}")
        if interleave < 1:
            raise ValueError(f"interleave must be >= 1, got {interleave}")
        self.shards = [Path(s) for s in shards]
        self.dp_rank, self.dp_size, self.seed = dp_rank, dp_size, seed
        self.bad, self.kind, self.interleave, self.kind_of = bad, kind, interleave, kind_of
        self.by_shard = len(self.shards) >= dp_size
        self.mine = [i for i in range(len(self.shards)) if not self.by_shard or i % dp_size == dp_rank]
        self._listings: dict[int, list[SampleRef]] = {}
        self._unsplit: dict[int, list[SampleRef]] = {}
        self.state = StreamState()
        self._order: list[SampleRef] | None = None
        self._order_epoch = -1

    def _listing(self, shard: int) -> list[SampleRef]:
        if shard not in self._listings:
            counts_listing = self.by_shard or self.dp_rank == 0
            refs = list_samples(self.shards[shard], self.bad if counts_listing else BadSamples(quiet=True))
            if not self.by_shard:  # sample-level split: global sample number n -> rank n % dp
                start = sum(len(self._all_listing(i)) for i in range(shard))
                refs = [r for n, r in enumerate(refs, start) if n % self.dp_size == self.dp_rank]
            self._listings[shard] = [r for r in refs if self.kind in ("any", self.kind_of(r))]
        return self._listings[shard]

    def _all_listing(self, shard: int) -> list[SampleRef]:
        """Unsplit listing of an earlier shard, for global sample numbers (few-shard case only)."""
        if shard not in self._unsplit:  # its bad samples are counted by _listing
            self._unsplit[shard] = list_samples(self.shards[shard], BadSamples(quiet=True))
        return self._unsplit[shard]

    def epoch_order(self, epoch: int) -> list[SampleRef]:
        """This rank's samples in the order epoch ``epoch`` yields them."""
        rng = np.random.default_rng([self.seed, epoch, self.dp_rank])
        shard_order = [self.mine[i] for i in rng.permutation(len(self.mine))]
        order: list[SampleRef] = []
        for g in range(0, len(shard_order), self.interleave):
            streams = []
            for shard in shard_order[g:g + self.interleave]:
                refs = self._listing(shard)
                perm = np.random.default_rng([self.seed, epoch, shard, 1]).permutation(len(refs))
                streams.append([refs[i] for i in perm])
            for i in range(max(map(len, streams), default=0)):
                order.extend(s[i] for s in streams if i < len(s))
        return order

    def _current_order(self) -> list[SampleRef]:
        if self._order_epoch != self.state.epoch:
            self._order = self.epoch_order(self.state.epoch)
            self._order_epoch = self.state.epoch
        assert self._order is not None
        return self._order

    def epoch_length(self) -> int:
        """How many samples one pass (epoch) of this stream yields."""
        return len(self._current_order())

    def next_ref(self) -> SampleRef:
        order = self._current_order()
        if not order:
            raise ValueError(
                f"no {self.kind} samples for dp rank {self.dp_rank} of {self.dp_size} in "
                f"{len(self.shards)} shard(s) starting {self.shards[0] if self.shards else '-'}; "
                "add data or lower the data-parallel size"
            )
        while self.state.position >= len(order):
            self.state = StreamState(self.state.epoch + 1, 0)
            order = self._current_order()
        ref = order[self.state.position]
        self.state.position += 1
        return ref

    def __iter__(self) -> Iterator[dict[str, Any]]:
        return self

    def __next__(self) -> dict[str, Any]:
        return read_sample(self.next_ref())

    def state_dict(self) -> dict[str, int]:
        return self.state.as_dict()

    def load_state_dict(self, state: dict[str, int]) -> None:
        self.state = StreamState(int(state["epoch"]), int(state["position"]))
