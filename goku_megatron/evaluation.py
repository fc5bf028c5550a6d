"""ShapesBench: does a sampled toy clip show what its prompt says?

The toy prompts compose three factors ("a red square moving left"): colour, shape and motion
direction. ``detect`` reads them back from pixels with a deterministic analytic detector, so
prompt adherence is a number, not an impression:

- foreground: pixels farther than ``threshold`` (sum of absolute RGB differences) from the plain
  background; frames without foreground are ignored;
- colour: the palette colour nearest (RGB distance) to the mean foreground colour;
- shape: fill ratio of the foreground inside its bounding box, median over frames: a square fills
  it (1.0), a circle does not (0.89 at the toy's 6 px, pi/4 for large ones), split at 0.94;
- direction: the foreground centroid's displacement from the first to the last frame; the larger
  axis and its sign name the direction, and less than half a pixel reads as no motion.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np

from goku_megatron.data.toy import BACKGROUND, COLORS, DIRECTIONS

SQUARE_FILL = 0.94
MIN_TRAVEL_PX = 0.5


@dataclass(frozen=True)
class Attributes:
    """What a clip shows; None where the detector cannot tell (no foreground, no motion)."""

    color: str | None
    shape: str | None
    direction: str | None


def foreground(frames: np.ndarray, threshold: int = 96) -> np.ndarray:
    """Boolean [T, H, W]: pixels that differ from the background."""
    diff = np.abs(frames.astype(np.int32) - np.array(BACKGROUND, dtype=np.int32)).sum(-1)
    return diff > threshold


def detect(frames: np.ndarray, threshold: int = 96) -> Attributes:
    """Colour, shape and direction of the one shape in uint8 frames [T, H, W, 3] (T=1: a still)."""
    mask = foreground(frames, threshold)
    visible = [t for t in range(mask.shape[0]) if mask[t].any()]
    if not visible:
        return Attributes(None, None, None)
    mean = frames[mask].astype(np.float64).mean(0)
    color = min(COLORS, key=lambda name: float(np.sum((np.array(COLORS[name]) - mean) ** 2)))

    fills, centroids = [], []
    for t in visible:
        ys, xs = np.nonzero(mask[t])
        box = (ys.max() - ys.min() + 1) * (xs.max() - xs.min() + 1)
        fills.append(len(ys) / box)
        centroids.append((ys.mean(), xs.mean()))
    shape = "square" if float(np.median(fills)) >= SQUARE_FILL else "circle"

    direction = None
    if len(centroids) > 1:
        dy, dx = np.subtract(centroids[-1], centroids[0])
        if max(abs(dy), abs(dx)) >= MIN_TRAVEL_PX:
            step = (int(np.sign(dy)), 0) if abs(dy) > abs(dx) else (0, int(np.sign(dx)))
            direction = next(name for name, d in DIRECTIONS.items() if d == step)
    return Attributes(color, shape, direction)


def parse_prompt(prompt: str) -> Attributes:
    """The factors a toy prompt asks for ("a red square moving left" -> red, square, left)."""
    words = prompt.lower().split()
    color = next((w for w in words if w in COLORS), None)
    shape = next((w for w in words if w in ("square", "circle")), None)
    direction = words[words.index("moving") + 1] if "moving" in words[:-1] else None
    return Attributes(color, shape, direction if direction in DIRECTIONS else None)


def score(prompt: str, frames: np.ndarray) -> dict[str, bool]:
    """Per attribute the prompt names: does the clip show it?"""
    wanted, seen = parse_prompt(prompt), detect(frames)
    return {name: getattr(seen, name) == value
            for name, value in vars(wanted).items() if value is not None}
