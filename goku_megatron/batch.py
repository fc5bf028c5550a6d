"""The one batch type: a Patch n' Pack sequence (NaViT) of images and videos of any size.

Every micro-batch the model sees is a ``Pack``, in training (toy, raw and latent data alike),
sampling and evaluation: the samples' patch tokens back to back, zero-padded to exactly ``budget``
tokens. The length is fixed so pipeline-parallel stages exchange activations of one shape
([budget, 1, D]) and nothing is recompiled or reallocated per step. Attention never crosses
samples (varlen segments given by ``cu_seqlens``); the padding is a segment of its own, so no
real token attends to it, and the loss ignores it (what its tokens hold is never read: the SDPA
backend lets its queries attend the last sample's keys, sparing a call). A toy step of B
same-size clips is a pack of B equal segments, which the SDPA backend attends as one batch.

This is a leaf module (torch only): data/ builds packs, model/ consumes them, and neither imports
the other.

Time padding (images with a temporal patch pt > 1, or T not divisible by pt): the first latent frame
is repeated in front until T is a multiple of pt (the CogVideoX 1.5 convention). GOKU's causal VAE
encodes the first frame on its own, like an image, so an image (T = 1) becomes exactly the first
token frame of a video of that picture. The repeated frames are trained like any other (their target
is the first frame's target), and ``unpack`` drops them again, so latents round-trip unchanged.

Typical use, per data-parallel rank and step (goku_megatron/data/pipeline.py does this)::

    samples = [PackSample(noisy, target, t, text, text_mask, key) for ...]   # [C, T, H, W] each
    packs = pack_samples(samples, budget=stage.token_budget, patch=cfg.model.patch_size)
    velocity = model(pack)                                                   # [budget, 1, patch_dim]
    loss = flow.flow_loss(velocity, pack)
"""

from __future__ import annotations

import dataclasses
import math
from dataclasses import dataclass
from typing import Sequence

import torch
import torch.nn.functional as F
from torch import Tensor

Patch = Sequence[int]  # (pt, ph, pw)


def patchify(x: Tensor, patch: Patch) -> Tensor:
    """[B, C, T, H, W] -> tokens [T'*H'*W', B, C*pt*ph*pw] in row-major (t, h, w) order."""
    b, c, t, h, w = x.shape
    pt, ph, pw = patch
    x = x.reshape(b, c, t // pt, pt, h // ph, ph, w // pw, pw)
    x = x.permute(2, 4, 6, 0, 1, 3, 5, 7)  # t' h' w' b c pt ph pw
    return x.reshape((t // pt) * (h // ph) * (w // pw), b, c * pt * ph * pw)


def unpatchify(tokens: Tensor, patch: Patch, channels: int, grid: Sequence[int]) -> Tensor:
    """Inverse of patchify: [S, B, C*pt*ph*pw] -> [B, C, T, H, W]."""
    gt, gh, gw = grid
    pt, ph, pw = patch
    b = tokens.shape[1]
    x = tokens.reshape(gt, gh, gw, b, channels, pt, ph, pw)
    x = x.permute(3, 4, 0, 5, 1, 6, 2, 7)  # b c t' pt h' ph w' pw
    return x.reshape(b, channels, gt * pt, gh * ph, gw * pw)


def grid_positions(t: int, h: int, w: int, device: torch.device | None = None) -> Tensor:
    """Row-major (t, h, w) coordinates of a patch grid: LongTensor [t*h*w, 3] (RoPE positions)."""
    grid = torch.meshgrid(
        torch.arange(t, device=device), torch.arange(h, device=device), torch.arange(w, device=device),
        indexing="ij",
    )
    return torch.stack(grid, dim=-1).reshape(-1, 3)


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


def num_tokens(shape: Sequence[int], patch: Patch) -> int:
    """Tokens of a latent of shape [C, T, H, W]: the product of its ``token_grid``."""
    return math.prod(token_grid(shape, patch))


def pad_frames(x: Tensor, pt: int) -> Tensor:
    """[C, T, H, W] -> [C, ceil(T / pt) * pt, H, W], repeating the first frame in front."""
    missing = -x.shape[1] % pt
    return torch.cat([x[:, :1].expand(-1, missing, -1, -1), x], dim=1) if missing else x


@dataclass
class PackSample:
    """One sample's rectified-flow inputs, before packing."""

    noisy: Tensor  # x_t, [C, T, H, W]
    target: Tensor | None  # velocity x1 - x0, [C, T, H, W]; None when sampling (no loss)
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
    target: Tensor | None  # [budget, patch_dim] velocity; None in a sampling pack
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
    # The valid caption tokens of text.flatten(0, 1), in order: [sum(text_lengths)] long. Indexing
    # with it packs the captions back to back (cu_seqlens_text) without a boolean mask, whose
    # result size the device would have to report to the host.
    text_index: Tensor
    text_lengths: tuple[int, ...]  # per sample, the valid caption tokens (host ints)
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

    @property
    def segment_lengths(self) -> tuple[int, ...]:
        """Video tokens per segment, the samples' then the padding's (if any): ``cu_seqlens`` as
        host ints, which the model's host-side work (CP shards, attention segments) reads without
        asking the device."""
        samples = tuple(math.prod(grid) for grid in self.grids)
        return samples + (self.padding,) * (self.padding > 0)

    @property
    def text_segment_lengths(self) -> tuple[int, ...]:
        """Caption tokens per segment (the padding segment's one null token): ``cu_seqlens_text``
        as host ints."""
        return self.text_lengths + (1,) * (self.padding > 0)

    def to(self, device: torch.device | str) -> Pack:
        """The pack on ``device``. To a GPU, host tensors are copied from pinned memory without
        blocking, so the copies overlap the work already queued and the host runs on."""
        moved = {f.name: to_device(getattr(self, f.name), device) for f in dataclasses.fields(self)
                 if isinstance(getattr(self, f.name), Tensor)}
        return dataclasses.replace(self, **moved)


def to_device(tensor: Tensor, device: torch.device | str) -> Tensor:
    """``tensor`` on ``device``; a host tensor bound for a GPU is copied from pinned memory without
    blocking (a pageable copy would wait for the GPU's queue to drain: a host sync)."""
    device = torch.device(device)
    if device.type == "cuda" and tensor.device.type == "cpu":
        return tensor.pin_memory().to(device, non_blocking=True)
    return tensor.to(device)


def segment_offsets(lengths: Sequence[int], device: torch.device | str) -> Tensor:
    """cu_seqlens (int32) of back-to-back segments of the given host lengths, built on the host
    and copied to ``device`` asynchronously (``to_device``), so a pack or a CP shard built on the
    training device costs no host sync."""
    return to_device(torch.tensor([0, *lengths]).cumsum(0).int(), device)


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
    text_lens = [int(s.text_mask.sum()) for s in samples]  # host work of the data path, not of a step
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
    text_mask = torch.stack([F.pad(s.text_mask.bool(), (0, text_width - s.text_mask.shape[0])) for s in samples])
    return Pack(
        noisy=tokens([s.noisy for s in samples]),
        target=None if samples[0].target is None else tokens([s.target for s in samples]),
        loss_mask=torch.arange(budget, device=device) < sum(lengths),
        sample_index=F.pad(torch.repeat_interleave(torch.arange(n, device=device), lengths_t), (0, pad),
                           value=n - 1),
        positions=F.pad(torch.cat([grid_positions(*g, device=device) for g in grids]), (0, 0, 0, pad)),
        cu_seqlens=segment_offsets(segments, device),
        max_seqlen=max(segments),
        timesteps=torch.stack([torch.as_tensor(s.timestep, dtype=torch.float32).reshape(())
                               for s in samples]).to(device),
        text=torch.stack([F.pad(s.text, (0, 0, 0, text_width - s.text.shape[0])) for s in samples]),
        text_mask=text_mask,
        cu_seqlens_text=segment_offsets(text_segments, device),
        max_seqlen_text=max(text_segments),
        text_index=text_mask.flatten().nonzero().flatten(),
        text_lengths=tuple(text_lens),
        grids=grids,
        frames=[s.noisy.shape[1] for s in samples],
        keys=[s.key for s in samples],
        patch=patch,
        cond=None if conds[0] is None else tokens(conds),
    )


def pack_samples(samples: Sequence[PackSample], budget: int, patch: Patch) -> list[Pack]:
    """Plan (first-fit decreasing) and build the packs of a list of samples."""
    counts = [num_tokens(s.noisy.shape, patch) for s in samples]
    return [build_pack([samples[i] for i in plan], budget, patch) for plan in plan_packs(counts, budget)]


def unpack(pack: Pack, tokens: Tensor) -> list[Tensor]:
    """Model output tokens [budget, (1,) patch_dim] -> per-sample latents [C, T, H, W].

    The inverse of the packing: time padding is dropped again, so ``unpack(pack, pack.noisy)``
    returns the samples' noisy latents.
    """
    tokens = tokens.reshape(pack.budget, -1)
    channels = tokens.shape[1] // math.prod(pack.patch)
    latents = []
    start = 0
    for grid, frames in zip(pack.grids, pack.frames):
        end = start + math.prod(grid)
        x = unpatchify(tokens[start:end, None], pack.patch, channels, grid)[0]
        start = end
        latents.append(x[:, x.shape[1] - frames:])
    return latents


def pack_batch(noisy: Tensor, timesteps: Tensor, text: Tensor, text_mask: Tensor, patch: Patch, *,
               target: Tensor | None = None, cond: Tensor | None = None,
               keys: Sequence[str] | None = None) -> Pack:
    """A batch of same-shape latents [N, C, T, H, W] (timesteps [N], captions [N, L, d] with mask
    [N, L]) as one pack of N equal segments, budget N x tokens per sample: how the sampler and the
    validation loss hand a batch to the model. ``unpack`` and ``torch.stack`` give [N, C, T, H, W]
    back."""
    n = noisy.shape[0]
    budget = n * num_tokens(noisy.shape[1:], patch)
    return build_pack([
        PackSample(noisy=noisy[i], target=None if target is None else target[i], timestep=timesteps[i],
                   text=text[i], text_mask=text_mask[i], key=keys[i] if keys else str(i),
                   cond=None if cond is None else cond[i])
        for i in range(n)], budget, patch)
