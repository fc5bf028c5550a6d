"""ShapesBench: the detector is right on ground truth (every toy factor combination, rendered),
the report's numbers on hand-built clips, and the fixed-noise validation loss."""

from __future__ import annotations

import itertools
import json

import numpy as np
import pytest
import torch
from numerics import EPS32

from goku_megatron.batch import Pack, unpack
from goku_megatron.data.toy import (
    COLORS,
    DIRECTIONS,
    HELD_OUT,
    SHAPES,
    TRIPLES,
    ToySample,
    caption_for,
    validation_samples,
)
from goku_megatron.evaluation import (
    CHANCE,
    VAL_TIMESTEPS,
    Attributes,
    detect,
    eval_scalars,
    format_table,
    parse_prompt,
    score,
    shapes_bench,
    shapes_prompts,
    shapes_report,
    validation_loss,
)


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
    sample = ToySample(0, "yellow", "diamond", "down", 2, 6)
    frames = sample.render(16, 8).astype(np.int32) + rng.integers(-25, 26, size=(8, 16, 16, 3))
    assert detect(np.clip(frames, 0, 255).astype(np.uint8)) == Attributes("yellow", "diamond", "down")


def test_survives_soft_edges_and_stray_pixels():
    """Sampled clips have soft edges and specks elsewhere: a 3x3 blur of every combination plus
    two stray pixels of the shape's colour far from it still reads right."""
    for sample in validation_samples(len(TRIPLES), size=16, frames=8):  # every combination, placed
        color, shape, direction = sample.color, sample.shape, sample.direction
        frames = sample.render(16, 8).astype(np.float64)
        padded = np.pad(frames, ((0, 0), (1, 1), (1, 1), (0, 0)), mode="edge")
        blurred = sum(padded[:, dy:dy + 16, dx:dx + 16] for dy in range(3) for dx in range(3)) / 9
        corner = 0 if (direction in ("left", "up")) else 15  # the side the shape moves away from
        blurred[:, corner, 15 - corner] = COLORS[color]
        blurred[:, 15 - corner, corner] = COLORS[color]
        assert detect(blurred.round().astype(np.uint8)) == Attributes(color, shape, direction), sample


def test_empty_clip():
    sample = ToySample(0, "red", "square", "left", 2, 9)
    blank = np.full_like(sample.render(16, 8), 48)
    assert detect(blank) == Attributes(None, None, None)


def test_prompts_and_scores():
    assert parse_prompt("a blue diamond moving up") == Attributes("blue", "diamond", "up")
    assert parse_prompt("a green square") == Attributes("green", "square", None)
    clip = ToySample(0, "red", "square", "left", 4, 9).render(16, 8)
    assert score("a red square moving left", clip) == {"color": True, "shape": True, "direction": True}
    assert score("a red diamond moving right", clip) == {"color": True, "shape": False, "direction": False}
    assert set(DIRECTIONS) == {"left", "right", "up", "down"}


# ------------------------------------------------------------------------------------ ShapesBench


def _truth(prompt: str, index: int = 0, size: int = 16, frames: int = 8) -> np.ndarray:
    """A clip that shows exactly what the prompt asks for."""
    wanted = parse_prompt(prompt)
    return ToySample.placed(np.random.default_rng(index), index, wanted.color, wanted.shape, wanted.direction,
                            size=size, frames=frames).render(size, frames)


def _bench_inputs() -> tuple[list[str], list[bool], list[np.ndarray]]:
    prompts, held = (list(column) for column in zip(*shapes_prompts()))
    return prompts, held, [_truth(p, i) for i, p in enumerate(prompts)]


def test_shapes_prompts_are_every_combination():
    prompts = shapes_prompts()
    assert [p for p, _ in prompts] == [caption_for(*t) for t in TRIPLES]
    assert {p for p, held in prompts if held} == {caption_for(*t) for t in HELD_OUT}
    assert [parse_prompt(p) for p, _ in prompts] == [Attributes(*t) for t in TRIPLES]


def test_report_on_ground_truth_is_perfect():
    report = shapes_report(*_bench_inputs())
    json.dumps(report, allow_nan=False)
    assert report["chance"] == CHANCE == {"color": 0.25, "shape": 0.5, "direction": 0.25, "all": 1 / 32}
    for split, clips in (("seen", 28), ("held_out", 4)):
        assert report[split]["clips"] == clips
        assert report[split]["scored"] == {"color": clips, "shape": clips, "direction": clips, "all": clips}
        assert report[split]["accuracy"] == {"color": 1.0, "shape": 1.0, "direction": 1.0, "all": 1.0}
    assert list(report["colors"]) == list(COLORS)
    for color, summary in report["colors"].items():
        assert (summary["clips"], summary["detected"]) == (8, {color: 8})
        assert summary["accuracy"] == {"color": 1.0, "shape": 1.0, "direction": 1.0, "all": 1.0}
    assert len(report["samples"]) == 32
    assert report["samples"][0] == {
        "prompt": "a red square moving left", "held_out": False,
        "detected": {"color": "red", "shape": "square", "direction": "left"},
        "correct": {"color": True, "shape": True, "direction": True},
    }


@pytest.mark.parametrize("attribute, wrong", [("color", "yellow"), ("shape", "square"), ("direction", "down")])
def test_a_wrong_clip_lowers_only_its_attribute(attribute, wrong):
    prompts, held, clips = _bench_inputs()
    index = prompts.index("a blue diamond moving left")  # held out
    asked = vars(parse_prompt(prompts[index]))
    clips[index] = _truth(caption_for(**{**asked, attribute: wrong}))
    report = shapes_report(prompts, held, clips)
    assert report["held_out"]["accuracy"] == {name: 0.75 if name in (attribute, "all") else 1.0
                                              for name in ("color", "shape", "direction", "all")}
    assert set(report["seen"]["accuracy"].values()) == {1.0}
    assert report["colors"]["blue"]["accuracy"] == {name: 7 / 8 if name in (attribute, "all") else 1.0
                                                    for name in ("color", "shape", "direction", "all")}
    assert report["colors"]["blue"]["detected"] == ({"blue": 7, "yellow": 1} if attribute == "color" else {"blue": 8})
    assert all(set(report["colors"][c]["accuracy"].values()) == {1.0} for c in ("red", "green", "yellow"))
    sample = report["samples"][index]
    assert sample["held_out"] and sample["detected"][attribute] == wrong
    assert sample["correct"] == {name: name != attribute for name in ("color", "shape", "direction")}


def test_report_scores_only_what_a_prompt_names():
    blank = np.full((8, 16, 16, 3), 48, dtype=np.uint8)  # nothing drawn: nothing detected
    still = ToySample(0, "red", "diamond", None, 3, 5).render(16, 1)
    report = shapes_report(["a red diamond", "a green square moving up"], [False, True], [still, blank])
    assert report["seen"]["scored"] == {"color": 1, "shape": 1, "direction": 0, "all": 1}
    assert report["seen"]["accuracy"] == {"color": 1.0, "shape": 1.0, "direction": None, "all": 1.0}
    assert report["held_out"]["accuracy"] == {"color": 0.0, "shape": 0.0, "direction": 0.0, "all": 0.0}
    assert report["samples"][1]["detected"] == {"color": None, "shape": None, "direction": None}
    json.dumps(report, allow_nan=False)
    with pytest.raises(ValueError, match="one clip per prompt"):
        shapes_report(["a red diamond"], [False], [])


def test_a_colour_never_learnt_shows_in_its_row_alone():
    """A model trained without yellow (data.toy_colors) that draws yellow prompts green, right in
    shape and motion: yellow's colour accuracy is 0, its clips read as green, every other row is
    perfect, and the training log gets eval/color_yellow."""
    prompts, held, clips = _bench_inputs()
    for i, prompt in enumerate(prompts):
        if parse_prompt(prompt).color == "yellow":
            clips[i] = _truth(prompt.replace("yellow", "green"), i)
    report = shapes_report(prompts, held, clips)
    yellow = report["colors"]["yellow"]
    assert yellow["accuracy"] == {"color": 0.0, "shape": 1.0, "direction": 1.0, "all": 0.0}
    assert (yellow["clips"], yellow["detected"]) == (8, {"green": 8})
    assert report["colors"]["green"]["detected"] == {"green": 8}
    assert all(set(report["colors"][c]["accuracy"].values()) == {1.0} for c in ("red", "green", "blue"))
    scalars = eval_scalars(report, {"val_loss": 0.5})
    assert {f"eval/color_{c}": scalars[f"eval/color_{c}"] for c in COLORS} == {
        "eval/color_red": 1.0, "eval/color_green": 1.0, "eval/color_blue": 1.0, "eval/color_yellow": 0.0}
    assert scalars["eval/color_seen"] == 21 / 28 and scalars["eval/val_loss"] == 0.5


def test_the_table_has_a_row_per_prompt_colour():
    prompts, held, clips = _bench_inputs()
    blank = np.full_like(clips[0], 48)
    clips = [blank if parse_prompt(p).color == "yellow" else c for p, c in zip(prompts, clips)]
    report = {"checkpoint": "runs/base", "step": 600, "validation": {"val_loss": 0.25},
              "sampling": {"samples_per_prompt": 1, "steps": 20, "cfg_scale": 4.0},
              **shapes_report(prompts, held, clips)}
    lines = format_table(report).splitlines()
    assert lines[0] == "ShapesBench: runs/base (step 600), 1 samples x 32 prompts, 20 steps, cfg 4.0"
    assert lines[-5].split() == ["prompt", "color", "shape", "direction", "all", "clips", "detected", "colours"]
    assert lines[-4].split() == ["red", "1.000", "1.000", "1.000", "1.000", "8", "red", "8"]
    assert lines[-1].split() == ["yellow", "0.000", "0.000", "0.000", "0.000", "8", "none", "8"]


def test_shapes_bench_samples_every_prompt_once_per_seed():
    seeds = []

    def sample_fn(prompts: list[str], seed: int) -> torch.Tensor:
        seeds.append(seed)
        clips = [torch.from_numpy(_truth(p, seed)).permute(3, 0, 1, 2).float() / 127.5 - 1 for p in prompts]
        return torch.stack(clips)

    report = shapes_bench(sample_fn, samples_per_prompt=2, seed=5)
    assert seeds == [5, 6]
    assert [s["prompt"] for s in report["samples"]] == [p for p, _ in shapes_prompts()] * 2
    assert (report["seen"]["clips"], report["held_out"]["clips"]) == (56, 8)
    assert report["held_out"]["accuracy"]["all"] == report["seen"]["accuracy"]["all"] == 1.0


# -------------------------------------------------------------------------------- validation loss


def _val_batch(n: int = 6) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, list[str]]:
    gen = torch.Generator().manual_seed(0)
    pixels = torch.rand(n, 3, 4, 8, 8, generator=gen) * 2 - 1
    text = torch.randn(n, 5, 8, generator=gen)
    mask = torch.ones(n, 5, dtype=torch.bool)
    return pixels, text, mask, [f"{i:08d}" for i in range(n)]


PATCH = (1, 2, 2)


def _text_dependent(pack: Pack) -> torch.Tensor:
    """A velocity that depends on each clip's own t and text, so misrouted conditioning shows."""
    per_sample = pack.timesteps * pack.text.mean(dim=(1, 2))
    return 0.5 * pack.noisy + per_sample[pack.sample_index][:, None]


def test_validation_loss_of_zero_velocity_is_the_mean_squared_target():
    pixels, text, mask, keys = _val_batch()
    calls = []

    def zero(pack: Pack) -> torch.Tensor:
        calls.append(pack)
        return torch.zeros_like(pack.noisy)

    out = validation_loss(zero, pixels, text, mask, keys, PATCH)
    names = [f"val_loss_t{t:.2f}" for t in VAL_TIMESTEPS]
    assert list(out) == ["val_loss", *names] == ["val_loss", "val_loss_t0.10", "val_loss_t0.30", "val_loss_t0.50",
                                                 "val_loss_t0.70", "val_loss_t0.90"]
    assert len(calls) == len(VAL_TIMESTEPS)
    for pack, t_value, name in zip(calls, VAL_TIMESTEPS, names):
        assert torch.equal(pack.timesteps, torch.full((6,), t_value)) and pack.keys == keys
        assert torch.equal(pack.text, text) and torch.equal(pack.text_mask, mask)
        x = torch.stack(unpack(pack, pack.noisy))
        noise = (x - t_value * pixels) / (1 - t_value)  # x_t = t x1 + (1 - t) x0
        assert 0.9 < noise.std() < 1.1
        target = pixels - noise
        assert out[name] == pytest.approx(target.double().square().mean().item(), rel=64 * EPS32)
    assert out["val_loss"] == pytest.approx(sum(out[n] for n in names) / len(names), rel=1e-12)


def test_validation_loss_is_fixed_and_independent_of_batch_order_and_size():
    pixels, text, mask, keys = _val_batch()
    reference = validation_loss(_text_dependent, pixels, text, mask, keys, PATCH)
    assert validation_loss(_text_dependent, pixels, text, mask, keys, PATCH) == reference
    order = torch.randperm(6, generator=torch.Generator().manual_seed(1))
    shuffled = validation_loss(_text_dependent, pixels[order], text[order], mask[order], [keys[i] for i in order],
                               PATCH)
    # means of squares summed in another order: bounded relative to themselves
    assert shuffled == pytest.approx(reference, rel=16 * EPS32)
    assert (validation_loss(_text_dependent, pixels, text, mask, keys, PATCH, batch_size=4)
            == pytest.approx(reference, rel=16 * EPS32))
    assert validation_loss(_text_dependent, pixels, text, mask, keys, PATCH, seed=1) != reference
    renamed = [f"clip-{k}" for k in keys]
    assert validation_loss(_text_dependent, pixels, text, mask, renamed, PATCH) != reference  # noise follows the key


def test_validation_loss_splits_seen_and_held_out():
    pixels, text, mask, keys = _val_batch()
    held = [False, True, False, False, True, False]
    out = validation_loss(_text_dependent, pixels, text, mask, keys, PATCH, timesteps=(0.25, 0.75), held_out=held)
    assert set(out) == {"val_loss", "val_loss_t0.25", "val_loss_t0.75", "val_loss_seen", "val_loss_held_out"}
    for name, select in (("val_loss_seen", [0, 2, 3, 5]), ("val_loss_held_out", [1, 4])):
        alone = validation_loss(_text_dependent, pixels[select], text[select], mask[select],
                                [keys[i] for i in select], PATCH, timesteps=(0.25, 0.75))
        assert out[name] == pytest.approx(alone["val_loss"], rel=16 * EPS32)
    assert out["val_loss"] == pytest.approx((4 * out["val_loss_seen"] + 2 * out["val_loss_held_out"]) / 6)
    only_seen = validation_loss(_text_dependent, pixels, text, mask, keys, PATCH, held_out=[False] * 6)
    assert "val_loss_held_out" not in only_seen and only_seen["val_loss_seen"] == only_seen["val_loss"]


def test_validation_loss_refuses_bad_inputs():
    pixels, text, mask, keys = _val_batch()
    with pytest.raises(ValueError, match="unique keys"):
        validation_loss(_text_dependent, pixels, text, mask, keys[:5] + keys[:1], PATCH)
    with pytest.raises(ValueError, match="timesteps"):
        validation_loss(_text_dependent, pixels, text, mask, keys, PATCH, timesteps=(0.5, 1.5))
    with pytest.raises(ValueError, match="held_out flag"):
        validation_loss(_text_dependent, pixels, text, mask, keys, PATCH, held_out=[True])


def test_shapes_bench_samples_only_the_prompts_of_the_colours_asked_for():
    asked = []

    def sample_fn(prompts: list[str], seed: int) -> torch.Tensor:
        asked.append(prompts)
        return torch.stack([torch.from_numpy(_truth(p)).permute(3, 0, 1, 2).float() / 127.5 - 1 for p in prompts])

    report = shapes_bench(sample_fn, samples_per_prompt=2, colors=("yellow",))
    assert asked == [[caption_for(*t) for t in TRIPLES if t[0] == "yellow"]] * 2
    assert list(report["colors"]) == ["yellow"] and report["colors"]["yellow"]["clips"] == 16
    assert (report["seen"]["clips"], report["held_out"]["clips"]) == (14, 2)
    assert [p for p, _ in shapes_prompts(["red", "yellow"])] == [
        caption_for(*t) for t in TRIPLES if t[0] in ("red", "yellow")]
    with pytest.raises(ValueError, match="unknown toy colour.* purple; choose from red, green, blue, yellow"):
        shapes_bench(sample_fn, colors=("purple",))
