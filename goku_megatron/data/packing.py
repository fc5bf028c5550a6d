"""Patch n' Pack (NaViT): images and videos of any resolution and duration in one token sequence.

A training micro-batch becomes one ``Pack``: the samples' patch tokens back to back, zero-padded to
exactly ``budget`` tokens. The length is fixed so pipeline-parallel stages exchange activations of
one shape ([budget, 1, D]) and nothing is recompiled or reallocated per step. Attention never crosses
samples (varlen segments given by ``cu_seqlens``); the padding is a segment of its own, so it attends
only to padding and no real token attends to it, and the loss ignores it.

Time padding (images with a temporal patch pt > 1, or T not divisible by pt): the first latent frame
is repeated in front until T is a multiple of pt (the CogVideoX 1.5 convention). GOKU's causal VAE
encodes the first frame on its own, like an image, so an image (T = 1) becomes exactly the first
token frame of a video of that picture. The repeated frames are trained like any other (their target
is the first frame's target), and ``unpack`` drops them again, so latents round-trip unchanged.

Typical use, per data-parallel rank and step::

    samples = [PackSample(noisy, target, t, text, text_mask, key) for ...]   # [C, T, H, W] each
    packs = pack_samples(samples, budget=stage.token_budget, patch=cfg.model.patch_size)
    velocity = model(pack)                                                   # [budget, 1, patch_dim]
    loss = packed_flow_loss(velocity, pack)
"""

from __future__ import annotations

import dataclasses
import math
from dataclasses import dataclass
from typing import Literal, Sequence

import torch
import torch.nn.functional as F
from torch import Tensor

from goku_megatron.flow import flow_loss
from goku_megatron.model.goku import patchify, unpatchify
from goku_megatron.model.rope import grid_positions

Patch = Sequence[int]  # (pt, ph, pw)


def plan_packs(token_counts: Sequence[int], budget: int) -> list[list[int]]:
    """First-fit-decreasing bin packing of sample indices into packs of at most ``budget`` tokens.

    Samples are placed largest first (ties by index) into the first pack with room, so the plan
    depends only on the counts; each pack lists its samples in placement order. FFD needs at most
    11/9 * OPT + 6/9 packs.
    """
    if budget < 1:
        raise ValueError(f"token budget must be positive, got {budget}")
    for i, n in enumerate(token_counts):
        if n > budget:
            raise ValueError(f"sample {i} has {n} tokens, over the token budget of {budget}: raise "
                             f"data.stages[].token_budget or lower the sample's resolution/frames")
        if n < 1:
            raise ValueError(f"sample {i} has {n} tokens; every sample needs at least one")
    packs: list[list[int]] = []
    room: list[int] = []
    for i in sorted(range(len(token_counts)), key=lambda i: (-token_counts[i], i)):
        n = token_counts[i]
        target = next((p for p, free in enumerate(room) if n <= free), None)
        if target is None:
            packs.append([])
            room.append(budget)
            target = len(packs) - 1
        packs[target].append(i)
        room[target] -= n
    return packs


def token_grid(shape: Sequence[int], patch: Patch) -> tuple[int, int, int]:
    """Patch grid (T', H', W') of a latent of shape [C, T, H, W]; T rounds up (time padding)."""
    _, t, h, w = shape
    pt, ph, pw = patch
    if h % ph or w % pw:
        raise ValueError(f"latent of {h}x{w} is not divisible by the spatial patch {ph}x{pw}")
    return -(-t // pt), h // ph, w // pw


def pad_frames(x: Tensor, pt: int) -> Tensor:
    """[C, T, H, W] -> [C, ceil(T / pt) * pt, H, W], repeating the first frame in front."""
    missing = -x.shape[1] % pt
    return torch.cat([x[:, :1].expand(-1, missing, -1, -1), x], dim=1) if missing else x


@dataclass
class PackSample:
    """One sample's rectified-flow inputs, before packing."""

    noisy: Tensor  # x_t, [C, T, H, W]
    target: Tensor  # velocity x1 - x0, [C, T, H, W]
    timestep: float | Tensor
    text: Tensor  # [L, text_dim]
    text_mask: Tensor  # [L] bool, True = token; at least one
    key: str = ""
    cond: Tensor | None = None  # I2V: the first-frame latent broadcast over T, [C, T, H, W]


@dataclass
class Pack:
    """One packed sequence of exactly ``budget`` tokens: n samples, then padding (if any).

    Segments: the n samples, plus one padding segment when the samples leave room. Padding tokens
    are zero, carry loss_mask False and position 0, and borrow the last sample's timestep
    (``sample_index`` n - 1): their values never reach a real token.
    """

    noisy: Tensor  # [budget, patch_dim] patchified x_t
    target: Tensor  # [budget, patch_dim] velocity
    loss_mask: Tensor  # [budget] bool, False on padding
    sample_index: Tensor  # [budget] long, the sample each token belongs to
    positions: Tensor  # [budget, 3] long, (t, h, w) inside the token's own sample grid
    cu_seqlens: Tensor  # [segments + 1] int32, video token segment offsets
    max_seqlen: int
    timesteps: Tensor  # [n] float32
    text: Tensor  # [n, L, text_dim]
    text_mask: Tensor  # [n, L] bool
    cu_seqlens_text: Tensor  # [segments + 1] int32 over the valid text tokens; padding gets 1 (null)
    max_seqlen_text: int
    grids: list[tuple[int, int, int]]  # per sample (T', H', W')
    frames: list[int]  # per sample latent T before time padding
    keys: list[str]
    patch: tuple[int, int, int]
    # Tokens the pack occupies in the model's sequence layout when that is not the budget: Transformer
    # Engine's context parallelism pads every sample to a multiple of 2*cp, and all micro-batches of
    # a step share the longest such length so that pipeline stages exchange one shape
    # (model.context_parallel.align_packs). 0: the budget.
    layout_length: int = 0
    cond: Tensor | None = None  # [budget, patch_dim] I2V first-frame tokens (model.i2v); else None

    @property
    def budget(self) -> int:
        return self.noisy.shape[0]

    @property
    def num_samples(self) -> int:
        return len(self.grids)

    @property
    def padding(self) -> int:
        """Number of padding tokens at the end."""
        return self.budget - sum(math.prod(grid) for grid in self.grids)

    def to(self, device: torch.device | str) -> Pack:
        moved = {f.name: getattr(self, f.name).to(device) for f in dataclasses.fields(self)
                 if isinstance(getattr(self, f.name), Tensor)}
        return dataclasses.replace(self, **moved)


def _offsets(lengths: Sequence[int], device: torch.device) -> Tensor:
    return F.pad(torch.tensor(lengths, device=device).cumsum(0), (1, 0)).int()


def build_pack(samples: Sequence[PackSample], budget: int, patch: Patch) -> Pack:
    """Patchify and concatenate ``samples`` (any grids, captions of any length) into one Pack."""
    if not samples:
        raise ValueError("a pack needs at least one sample")
    patch = (patch[0], patch[1], patch[2])
    device = samples[0].noisy.device
    grids = [token_grid(s.noisy.shape, patch) for s in samples]
    lengths = [math.prod(g) for g in grids]
    pad = budget - sum(lengths)
    if pad < 0:
        raise ValueError(f"samples hold {sum(lengths)} tokens, over the token budget of {budget}; "
                         f"split them with plan_packs")
    text_lens = [int(s.text_mask.sum()) for s in samples]
    if min(text_lens) == 0:
        raise ValueError(f"sample {samples[text_lens.index(0)].key!r} has no valid text token; "
                         f"encode an empty caption as a null token (HashTextEncoder does)")

    def tokens(latents: list[Tensor]) -> Tensor:
        flat = torch.cat([patchify(pad_frames(x, patch[0])[None], patch)[:, 0] for x in latents])
        return F.pad(flat, (0, 0, 0, pad))

    conds = [s.cond for s in samples]
    if any(c is None for c in conds) and any(c is not None for c in conds):
        raise ValueError("some samples carry an I2V first-frame condition and some do not; give it to all "
                         "(model.i2v) or none")
    n = len(samples)
    lengths_t = torch.tensor(lengths, device=device)
    text_width = max(s.text.shape[0] for s in samples)
    segments = lengths + [pad] * (pad > 0)
    text_segments = text_lens + [1] * (pad > 0)
    return Pack(
        noisy=tokens([s.noisy for s in samples]),
        target=tokens([s.target for s in samples]),
        loss_mask=torch.arange(budget, device=device) < sum(lengths),
        sample_index=F.pad(torch.repeat_interleave(torch.arange(n, device=device), lengths_t), (0, pad),
                           value=n - 1),
        positions=F.pad(torch.cat([grid_positions(*g, device=device) for g in grids]), (0, 0, 0, pad)),
        cu_seqlens=_offsets(segments, device),
        max_seqlen=max(segments),
        timesteps=torch.stack([torch.as_tensor(s.timestep, dtype=torch.float32).reshape(())
                               for s in samples]).to(device),
        text=torch.stack([F.pad(s.text, (0, 0, 0, text_width - s.text.shape[0])) for s in samples]),
        text_mask=torch.stack([F.pad(s.text_mask.bool(), (0, text_width - s.text_mask.shape[0]))
                               for s in samples]),
        cu_seqlens_text=_offsets(text_segments, device),
        max_seqlen_text=max(text_segments),
        grids=grids,
        frames=[s.noisy.shape[1] for s in samples],
        keys=[s.key for s in samples],
        patch=patch,
        cond=None if conds[0] is None else tokens(conds),
    )


def pack_samples(samples: Sequence[PackSample], budget: int, patch: Patch) -> list[Pack]:
    """Plan (first-fit decreasing) and build the packs of a list of samples."""
    counts = [math.prod(token_grid(s.noisy.shape, patch)) for s in samples]
    return [build_pack([samples[i] for i in plan], budget, patch) for plan in plan_packs(counts, budget)]


def unpack(pack: Pack, tokens: Tensor) -> list[Tensor]:
    """Model output tokens [budget, (1,) patch_dim] -> per-sample latents [C, T, H, W].

    The inverse of the packing: time padding is dropped again, so ``unpack(pack, pack.noisy)``
    returns the samples' noisy latents.
    """
    tokens = tokens.reshape(pack.budget, -1)
    channels = tokens.shape[1] // math.prod(pack.patch)
    cu = pack.cu_seqlens.tolist()
    latents = []
    for i, (grid, frames) in enumerate(zip(pack.grids, pack.frames)):
        x = unpatchify(tokens[cu[i]:cu[i + 1], None], pack.patch, channels, grid)[0]
        latents.append(x[:, x.shape[1] - frames:])
    return latents


def loss_weights(pack: Pack, weighting: Literal["token", "sample"] = "token") -> Tensor:
    """Weight of each token's MSE in the pack's loss: [budget] float32, zero on padding, sum 1.

    - "token" (default): every real token counts the same, 1 / (real tokens). A sample's share
      of the gradient grows with its token count, so a 720p clip outweighs a 256px image, as in
      training on the concatenated sequence; the loss is the mean over real token elements.
    - "sample": every sample counts the same, 1 / (n * its tokens): the pack's loss is the mean of
      the per-sample MSEs, as an unpacked batch's ``flow_loss(...).mean()`` weights them.
    """
    lengths = pack.cu_seqlens.diff()[: pack.num_samples].float()
    if weighting == "token":
        per_sample = 1.0 / lengths.sum().expand(pack.num_samples)
    elif weighting == "sample":
        per_sample = 1.0 / (pack.num_samples * lengths)
    else:
        raise ValueError(f"unknown loss weighting {weighting!r}; expected 'token' or 'sample'")
    return torch.where(pack.loss_mask, per_sample[pack.sample_index], 0.0)


def packed_flow_loss(pred: Tensor, pack: Pack, weighting: Literal["token", "sample"] = "token",
                     tokens: Tensor | None = None) -> Tensor:
    """Velocity MSE of a pack's prediction [budget, (1,) patch_dim]: a float32 scalar.

    Each token's MSE over its patch elements (``flow.flow_loss``, tokens as the batch) is weighted
    by ``loss_weights``; padding has weight zero and is dropped with ``where``, so whatever the
    model outputs there cannot reach the loss or the gradients.

    ``tokens`` ([S_local] long) says which pack tokens ``pred`` holds when it is one context-parallel
    rank's share (-1: a filler token of the layout, no loss). The weights stay those of the whole
    pack, so the ranks' losses add up to the loss of the whole pack.
    """
    weights = loss_weights(pack, weighting)
    target, mask = pack.target, pack.loss_mask
    if tokens is not None:
        index = tokens.clamp_min(0)
        target, weights, mask = target[index], weights[index], mask[index] & (tokens >= 0)
    per_token = flow_loss(pred.reshape(target.shape), target)
    return torch.where(mask, per_token * weights, 0.0).sum()
