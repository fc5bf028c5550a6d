"""3D rotary position embedding over (t, h, w) patch-grid coordinates.

The head dimension's rotary pairs are split across the three axes: a quarter for time, the rest
shared between height and width (an assumed split: docs/model.md, "3D RoPE"). Pairs are
interleaved, i.e. pair j is (x[..., 2j], x[..., 2j+1]), as in the Goku reference block. Positions
are given per token, so a packed sequence simply carries each sample's own grid coordinates
(batch.grid_positions).
"""

from __future__ import annotations

import torch


def rope_pair_split(head_dim: int) -> tuple[int, int, int]:
    """Number of rotary pairs for the (t, h, w) axes."""
    pairs = head_dim // 2
    n_t = pairs // 4
    n_h = (pairs - n_t) // 2
    return n_t, n_h, pairs - n_t - n_h


def rope_angles(positions: torch.Tensor, head_dim: int, theta: float = 10000.0) -> torch.Tensor:
    """Rotation angle of every rotary pair: float32 [..., head_dim // 2] for positions [..., 3]."""
    parts = []
    for axis, n in enumerate(rope_pair_split(head_dim)):
        freqs = theta ** (-torch.arange(n, device=positions.device, dtype=torch.float32) / n)
        parts.append(positions[..., axis : axis + 1].float() * freqs)
    return torch.cat(parts, dim=-1)


Rotation = tuple[torch.Tensor, torch.Tensor]


def rope_rotation(angles: torch.Tensor) -> Rotation:
    """cos and sin of angles [s, b, head_dim // 2] as float32 [s, b, 1, head_dim // 2] (broadcast
    over heads): computed once per micro-batch, every layer's Q and K rotations share them."""
    return angles.cos().unsqueeze(-2), angles.sin().unsqueeze(-2)


def apply_rope(x: torch.Tensor, rotation: Rotation) -> torch.Tensor:
    """Rotate interleaved pairs of x [s, b, heads, head_dim] by ``rope_rotation``'s (cos, sin).

    The rotation is computed in float32 and returned in x's dtype.
    """
    cos, sin = rotation
    xf = x.float()
    a, b = xf[..., 0::2], xf[..., 1::2]
    out = torch.stack((a * cos - b * sin, a * sin + b * cos), dim=-1).flatten(-2)
    return out.to(x.dtype)
