"""What a training stage asks of every sample's frames, and the frame geometry both decoders share.

A leaf module (numpy only): the PyAV path (data/decode.py) and the DALI path (data/dali.py) select
the same frames (``sample_frame_indices``) and cut the same window (``resize_geometry``), so each
imports these from here and neither imports the other's internals.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np


@dataclass(frozen=True)
class FrameSpec:
    """What a training stage wants from each sample: ``frames`` frames at ``fps`` (None: the
    source rate), resized and centre-cropped to ``height x width``. Images give one frame."""

    fps: float | None
    frames: int
    height: int
    width: int

    def __post_init__(self) -> None:
        if self.fps is not None and self.fps <= 0:
            raise ValueError(f"FrameSpec.fps must be > 0 or None, got {self.fps}")
        if self.frames < 1 or self.height < 1 or self.width < 1:
            raise ValueError(f"FrameSpec needs frames, height, width >= 1, got {self}")


def sample_frame_indices(n_src: int, src_fps: float, target_fps: float | None, count: int,
                         start: float = 0.0) -> np.ndarray:
    """Source frame indices (int64, length ``count``) for a clip of ``n_src`` frames at
    ``src_fps`` resampled to ``target_fps`` from ``start`` seconds on.

    Index-based twin of ``decode_video_pyav``'s timestamp rule, for decoders that take frame
    indices (DALI): target time ``start + k / target_fps`` takes the nearest source frame, ties
    to the earlier; ``target_fps=None`` takes consecutive frames. Targets past the clip's end
    repeat the last frame sampled (the short-clip policy in the module docstring), as the PyAV
    path and DALI's ``pad_mode="edge"`` on the reader path do.
    """
    if n_src < 1 or count < 0:
        raise ValueError(f"need n_src >= 1 and count >= 0, got {n_src} and {count}")
    k = np.arange(count)
    if target_fps is None:
        idx = round(start * src_fps) + k
    else:
        # ceil(x - 0.5) is the nearest integer with ties down; the epsilon absorbs float noise
        idx = np.ceil((start + k / target_fps) * src_fps - 0.5 - 1e-9).astype(np.int64)
    inside = idx < n_src
    last = idx[inside][-1] if inside.any() else n_src - 1
    return np.where(inside, idx, last).astype(np.int64)


def resize_geometry(height: int, width: int, out_height: int, out_width: int
                    ) -> tuple[int, int, int, int]:
    """(resized height, resized width, crop top, crop left) that scale a frame, keeping its aspect
    ratio, until it covers ``out_height x out_width``, then cut the centre: no padding and no
    distortion, at the cost of the edges of the longer side. Rounds as DALI's ``fn.resize``
    (mode "not_smaller") and ``fn.crop_mirror_normalize`` do, so both paths cut the same window.
    """
    scale = max(out_height / height, out_width / width)
    rh = max(out_height, round(height * scale))
    rw = max(out_width, round(width * scale))
    return rh, rw, (rh - out_height + 1) // 2, (rw - out_width + 1) // 2  # odd margins: .5 up
