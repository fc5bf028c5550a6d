"""ShapesBench's detector must be right on ground truth: every toy factor combination, rendered."""

from __future__ import annotations

import itertools

import numpy as np
import pytest

from goku_megatron.data.toy import COLORS, DIRECTIONS, SHAPES, ToySample
from goku_megatron.evaluation import Attributes, detect, parse_prompt, score


@pytest.mark.parametrize("size, frames", [(16, 8), (32, 9), (64, 17)])
def test_detector_is_right_on_every_rendered_clip(size, frames):
    for index in range(200):
        sample = ToySample.draw(index, still=False, size=size, frames=frames, seed=3)
        got = detect(sample.render(size, frames))
        assert got == Attributes(sample.color, sample.shape, sample.direction), sample


@pytest.mark.parametrize("color, shape", list(itertools.product(COLORS, SHAPES)))
def test_stills_have_no_direction(color, shape):
    sample = ToySample(0, color, shape, None, 3, 5)
    assert detect(sample.render(16, 1)) == Attributes(color, shape, None)


def test_survives_noise():
    rng = np.random.default_rng(0)
    sample = ToySample(0, "yellow", "circle", "down", 2, 6)
    frames = sample.render(16, 8).astype(np.int32) + rng.integers(-25, 26, size=(8, 16, 16, 3))
    assert detect(np.clip(frames, 0, 255).astype(np.uint8)) == Attributes("yellow", "circle", "down")


def test_empty_clip():
    sample = ToySample(0, "red", "square", "left", 2, 9)
    blank = np.full_like(sample.render(16, 8), 48)
    assert detect(blank) == Attributes(None, None, None)


def test_prompts_and_scores():
    assert parse_prompt("a blue circle moving up") == Attributes("blue", "circle", "up")
    assert parse_prompt("a green square") == Attributes("green", "square", None)
    clip = ToySample(0, "red", "square", "left", 4, 9).render(16, 8)
    assert score("a red square moving left", clip) == {"color": True, "shape": True, "direction": True}
    assert score("a red circle moving right", clip) == {"color": True, "shape": False, "direction": False}
    assert set(DIRECTIONS) == {"left", "right", "up", "down"}
