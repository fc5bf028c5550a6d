"""ShapesBench: does a sampled toy clip show what its prompt says?

The toy prompts compose three factors ("a red square moving left"): colour, shape and motion
direction. ``detect`` reads them back from pixels with a deterministic analytic detector, so
prompt adherence is a number, not an impression:

- foreground: pixels farther than ``threshold`` (sum of absolute RGB differences) from the plain
  background; frames without foreground are ignored;
- colour: the palette colour nearest (RGB distance) to the mean foreground colour;
- shape: per frame, how strongly each pixel shows the detected colour (0 background .. 1 full
  colour); the shape-sized window that holds the most of it under the diamond template is the
  shape's place, and the mean weight on the square's corners (the pixels a diamond lacks) over the
  mean on the diamond's pixels says square (about 1) or diamond (about 0), split at 0.5, median
  over frames. Soft edges and stray pixels elsewhere barely move it, unlike a bounding box;
- direction: the foreground centroid's displacement from the first to the last frame; the larger
  axis and its sign name the direction, and less than half a pixel reads as no motion.

The benchmark samples all 32 colour x shape x direction prompts; the four ``toy.HELD_OUT`` ones were
never seen in training, so their accuracy measures composition and the others' measures fit
(``shapes_bench``, ``shapes_report``). The report also breaks the accuracy down by the prompt's
colour, with the colours the detector read in each colour's clips: a model trained without a colour
(config data.toy_colors) draws another one for it, and a finetune that teaches it moves that
colour's row; ``colors`` samples only the prompts of some colours, for a quicker look.
``validation_loss`` is the flow loss on the dataset's validation split at fixed timesteps and fixed
noise, comparable across runs and parallel layouts.

    goku-eval shapes --checkpoint runs/toy-20261122-0500 --out shapes.json --samples-per-prompt 4
    goku-eval shapes --checkpoint runs/toy-20261122-0500 --colors yellow   # its 8 prompts only
"""

from __future__ import annotations

import dataclasses
import math
import time
import zlib
from collections.abc import Callable, Collection, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch

from goku_megatron import flow
from goku_megatron.batch import Pack, pack_batch
from goku_megatron.config import Config, ConfigError
from goku_megatron.data.toy import (
    BACKGROUND,
    COLORS,
    DIRECTIONS,
    HELD_OUT,
    SHAPES,
    TRIPLES,
    ToyValidation,
    caption_for,
    check_colors,
    read_validation,
    shape_mask,
    shape_size,
)
from goku_megatron.media import to_uint8
from goku_megatron.sample import LiveSampler, SampleSpec, SamplerBase, run_spec

ATTRIBUTES = ("color", "shape", "direction")
# Picking uniformly at random; "all" is every attribute right at once.
CHANCE = {"color": 1 / len(COLORS), "shape": 1 / len(SHAPES), "direction": 1 / len(DIRECTIONS),
          "all": 1 / len(TRIPLES)}
VAL_TIMESTEPS = (0.1, 0.3, 0.5, 0.7, 0.9)

# (prompts, seed) -> pixels [N, 3, T, H, W] in [-1, 1], one clip per prompt; the same arguments
# must give the same clips (Sampler.sample with SampleSpec.seed = seed does).
SampleFn = Callable[[list[str], int], torch.Tensor]

SQUARE_CORNERS = 0.5
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

    background = np.array(BACKGROUND, dtype=np.float64)
    span = float(np.abs(np.array(COLORS[color], dtype=np.float64) - background).sum())
    weight = np.clip(np.abs(frames.astype(np.float64) - background).sum(-1) / span, 0.0, 1.0)
    side = shape_size(frames.shape[2])
    diamond = shape_mask("diamond", side)
    corners = shape_mask("square", side) & ~diamond
    ratios, centroids = [], []
    for t in visible:
        windows = np.lib.stride_tricks.sliding_window_view(weight[t], (side, side))
        y, x = np.unravel_index(np.argmax((windows * diamond).sum(axis=(-2, -1))), windows.shape[:2])
        window = windows[y, x]
        ratios.append(window[corners].mean() / max(window[diamond].mean(), 1e-6))
        ys, xs = np.nonzero(mask[t])
        centroids.append((ys.mean(), xs.mean()))
    shape = "square" if float(np.median(ratios)) >= SQUARE_CORNERS else "diamond"

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
    shape = next((w for w in words if w in SHAPES), None)
    direction = words[words.index("moving") + 1] if "moving" in words[:-1] else None
    return Attributes(color, shape, direction if direction in DIRECTIONS else None)


def _matches(wanted: Attributes, seen: Attributes) -> dict[str, bool]:
    return {name: getattr(seen, name) == value
            for name, value in vars(wanted).items() if value is not None}


def score(prompt: str, frames: np.ndarray) -> dict[str, bool]:
    """Per attribute the prompt names: does the clip show it?"""
    return _matches(parse_prompt(prompt), detect(frames))


# ------------------------------------------------------------------------------------ ShapesBench


def shapes_prompts(colors: Collection[str] = ()) -> list[tuple[str, bool]]:
    """Every colour x shape x direction prompt (toy.TRIPLES order), of ``colors`` only where given,
    and whether training held it out."""
    return [(caption_for(*triple), triple in HELD_OUT) for triple in TRIPLES
            if not colors or triple[0] in colors]


def _summary(samples: list[dict[str, Any]]) -> dict[str, Any]:
    """Clip count, and per attribute how many clips were scored on it and the fraction right."""
    scored = {name: [s["correct"][name] for s in samples if name in s["correct"]]
              for name in ATTRIBUTES}
    scored["all"] = [all(s["correct"].values()) for s in samples if s["correct"]]
    return {
        "clips": len(samples),
        "scored": {name: len(hits) for name, hits in scored.items()},
        # None rather than NaN where nothing was scored: NaN is not JSON.
        "accuracy": {name: sum(hits) / len(hits) if hits else None for name, hits in scored.items()},
    }


def _color_summary(samples: list[dict[str, Any]]) -> dict[str, Any]:
    """``_summary`` of the clips of one prompt colour, and how many of them the detector read as
    each colour ("none": nothing drawn), so a colour the model never learnt shows what it draws."""
    detected = [s["detected"]["color"] or "none" for s in samples]
    return {**_summary(samples),
            "detected": {name: detected.count(name) for name in (*COLORS, "none") if name in detected}}


def shapes_report(prompts: list[str], held_out: list[bool], clips: list[np.ndarray]) -> dict[str, Any]:
    """ShapesBench numbers for sampled ``clips`` (uint8 [T, H, W, 3], one per prompt), as JSON.

    ``seen`` and ``held_out`` summarise the clips whose prompt training showed or held out:
    ``accuracy`` per attribute the prompts name (and ``all``: every named attribute right), with
    ``scored`` clips behind each; ``chance`` is what guessing uniformly scores. ``colors`` has the
    same per prompt colour (seen and held-out prompts together; the colours the prompts name, in
    toy.COLORS order), with ``detected``: how many of its clips the detector read as each colour.
    ``samples`` has one entry per clip, in order: prompt, held_out, what the detector saw, and per
    attribute whether that is what the prompt asked for.
    """
    if not len(prompts) == len(held_out) == len(clips):
        raise ValueError(f"need one held_out flag and one clip per prompt, got {len(prompts)} prompts, "
                         f"{len(held_out)} flags and {len(clips)} clips")
    samples = []
    for prompt, held, clip in zip(prompts, held_out, clips):
        seen = detect(clip)
        samples.append({"prompt": prompt, "held_out": bool(held), "detected": dataclasses.asdict(seen),
                        "correct": _matches(parse_prompt(prompt), seen)})
    asked = [parse_prompt(s["prompt"]).color for s in samples]
    return {
        "chance": dict(CHANCE),
        "seen": _summary([s for s in samples if not s["held_out"]]),
        "held_out": _summary([s for s in samples if s["held_out"]]),
        "colors": {color: _color_summary([s for s, c in zip(samples, asked) if c == color])
                   for color in COLORS if color in asked},
        "samples": samples,
    }


def shapes_bench(sample_fn: SampleFn, *, samples_per_prompt: int = 1, seed: int = 0,
                 colors: Collection[str] = ()) -> dict[str, Any]:
    """Samples every ShapesBench prompt (of ``colors`` only, where given) ``samples_per_prompt``
    times and scores the clips (``shapes_report``). Repeat r samples all prompts with seed
    ``seed + r``, so a larger count extends a smaller one's clips instead of replacing them. The
    sampler's noise follows a prompt's place in the batch (sample.py), so a prompt's clips with
    ``colors`` differ from its clips in the full benchmark: compare counts, not clips."""
    if samples_per_prompt < 1:
        raise ValueError(f"samples_per_prompt must be >= 1, got {samples_per_prompt}")
    check_colors(list(colors))
    prompts, held = (list(column) for column in zip(*shapes_prompts(colors)))
    clips: list[np.ndarray] = []
    for repeat in range(samples_per_prompt):
        clips += [to_uint8(pixels) for pixels in sample_fn(prompts, seed + repeat)]
    return shapes_report(prompts * samples_per_prompt, held * samples_per_prompt, clips)


# -------------------------------------------------------------------------------- validation loss


def _validation_noise(shape: torch.Size, seed: int, key: str, index: int) -> torch.Tensor:
    """The noise of clip ``key`` at timestep ``index``: its own generator, so it does not depend on
    the batch the clip is in, its place there, or the parallel layout."""
    return torch.randn(shape, generator=torch.Generator().manual_seed(
        zlib.crc32(f"val:{seed}:{key}:{index}".encode())))


@torch.no_grad()
def validation_loss(
    velocity: Callable[[Pack], torch.Tensor],
    pixels: torch.Tensor,
    text: torch.Tensor,
    text_mask: torch.Tensor,
    keys: Sequence[str],
    patch: Sequence[int],
    timesteps: Sequence[float] = VAL_TIMESTEPS,
    seed: int = 0,
    *,
    held_out: Sequence[bool] | None = None,
    batch_size: int | None = None,
) -> dict[str, float]:
    """Rectified-flow loss (flow.flow_loss, each clip's own) of a model on a fixed batch, at fixed
    timesteps with fixed noise.

    Training losses move with the random timesteps and noise of each step; here clip ``key`` at
    timestep i always gets the same noise (seeded by (seed, key, i)), so the numbers of two
    checkpoints, runs or layouts differ only by their models. ``batch_size`` clips at a time (all
    at once by default) go to ``velocity`` as one pack (batch.pack_batch with ``patch``), which
    returns the velocity tokens [budget, (1,) patch_dim]; put the model in eval mode first. Returns
    ``val_loss`` (mean over clips and timesteps) and ``val_loss_t0.10`` ... (mean over clips at
    each timestep); with ``held_out`` flags also ``val_loss_seen`` and ``val_loss_held_out`` where
    they have clips. Means are exactly rounded sums (math.fsum) of the per-clip losses, so the
    clips' order does not change them; only the model's own batched arithmetic can, by float
    rounding.
    """
    n = pixels.shape[0]
    if not len(keys) == text.shape[0] == text_mask.shape[0] == n or len(set(keys)) != n:
        raise ValueError(f"need {n} unique keys and {n} captions for {n} clips, got {len(keys)} keys "
                         f"({len(set(keys))} unique) and {text.shape[0]}/{text_mask.shape[0]} captions")
    names = [f"val_loss_t{t:.2f}" for t in timesteps]
    if not timesteps or not all(0.0 <= t <= 1.0 for t in timesteps) or len(set(names)) != len(names):
        raise ValueError(f"timesteps must be distinct (to 2 decimals) and in [0, 1], got {tuple(timesteps)}")
    if held_out is not None and len(held_out) != n:
        raise ValueError(f"need one held_out flag per clip, got {len(held_out)} for {n} clips")
    step = batch_size or n
    losses = torch.empty(len(timesteps), n, dtype=torch.float64)  # [timestep, clip]
    for i, t_value in enumerate(timesteps):
        for lo in range(0, n, step):
            x1 = pixels[lo : lo + step]
            x0 = torch.stack([_validation_noise(x1.shape[1:], seed, key, i) for key in keys[lo : lo + step]])
            x0 = x0.to(device=x1.device, dtype=x1.dtype)
            t = torch.full((x1.shape[0],), float(t_value), device=x1.device)
            pack = pack_batch(flow.interpolate(x1, x0, t), t, text[lo : lo + step], text_mask[lo : lo + step],
                              patch, target=flow.velocity_target(x1, x0), keys=keys[lo : lo + step])
            losses[i, lo : lo + step] = flow.flow_loss(velocity(pack), pack, per_sample=True).double().cpu()

    def mean(values: torch.Tensor) -> float:
        return math.fsum(values.flatten().tolist()) / values.numel()

    out = {"val_loss": mean(losses), **{name: mean(losses[i]) for i, name in enumerate(names)}}
    if held_out is not None:
        flags = torch.tensor([bool(h) for h in held_out], dtype=torch.bool)
        for name, select in (("val_loss_seen", ~flags), ("val_loss_held_out", flags)):
            if select.any():
                out[name] = mean(losses[:, select])
    return out


# ------------------------------------------------------------------------- in goku-eval and training


def evaluate(sampler: SamplerBase, spec: SampleSpec, val: ToyValidation, samples_per_prompt: int = 1,
             colors: Collection[str] = ()) -> tuple[dict[str, Any], dict[str, float]]:
    """ShapesBench (``shapes_bench``, seeds from spec.seed, the prompts of ``colors`` only where
    given) and the validation loss of a sampler's model (always the whole split): what goku-eval
    reports and what training logs every train.eval_interval steps."""
    bench = shapes_bench(lambda prompts, seed: sampler.sample(prompts, dataclasses.replace(spec, seed=seed)),
                         samples_per_prompt=samples_per_prompt, seed=spec.seed, colors=colors)
    text, text_mask = sampler.text_encoder(val.captions)
    losses = validation_loss(sampler.velocity, val.pixels.to(sampler.device), text.to(sampler.device),
                             text_mask.to(sampler.device), val.keys, sampler.cfg.model.patch_size,
                             held_out=val.held_out, batch_size=sampler.cfg.train.micro_batch_size)
    return bench, losses


def eval_scalars(bench: dict[str, Any], losses: dict[str, float]) -> dict[str, float]:
    """Flat ``eval/...`` scalars for metrics.jsonl and TensorBoard: accuracy per attribute (and all
    three) on seen and held-out prompts, the colour accuracy per prompt colour (``eval/color_red``
    ...: the curve a finetune that teaches a colour moves), and the validation losses."""
    out = {f"eval/{name}_{split}": accuracy for split in ("seen", "held_out")
           for name, accuracy in bench[split]["accuracy"].items() if accuracy is not None}
    out.update({f"eval/color_{color}": summary["accuracy"]["color"] for color, summary in bench["colors"].items()
                if summary["accuracy"]["color"] is not None})
    return {**out, **{f"eval/{name}": value for name, value in losses.items()}}


def format_table(report: dict[str, Any]) -> str:
    """The report's headline numbers: accuracy per attribute, seen vs held out, and the val loss;
    then per prompt colour the accuracy per attribute and the colours the detector read."""
    def cell(value: float | None, digits: int = 3) -> str:
        return f"{'-' if value is None else f'{value:.{digits}f}':>10}"

    seen, held, val, how = report["seen"], report["held_out"], report["validation"], report["sampling"]
    prompts = len(report["samples"]) // how["samples_per_prompt"]
    lines = [f"ShapesBench: {report['checkpoint']} (step {report['step']}), {how['samples_per_prompt']} "
             f"samples x {prompts} prompts, {how['steps']} steps, cfg {how['cfg_scale']}",
             f"{'':<10}{'seen':>10}{'held-out':>10}{'chance':>10}"]
    lines += [f"{name:<10}{cell(seen['accuracy'][name])}{cell(held['accuracy'][name])}{cell(CHANCE[name])}"
              for name in (*ATTRIBUTES, "all")]
    lines.append(f"{'clips':<10}{seen['clips']:>10}{held['clips']:>10}")
    lines.append(f"{'val_loss':<10}{cell(val.get('val_loss_seen'), 4)}{cell(val.get('val_loss_held_out'), 4)}"
                 f"   (all {val['val_loss']:.4f})")
    lines.append(f"{'prompt':<10}{''.join(f'{name:>10}' for name in (*ATTRIBUTES, 'all'))}{'clips':>8}  detected colours")
    for color, summary in report["colors"].items():
        detected = ", ".join(f"{name} {count}" for name, count in summary["detected"].items())
        lines.append(f"{color:<10}{''.join(cell(summary['accuracy'][name]) for name in (*ATTRIBUTES, 'all'))}"
                     f"{summary['clips']:>8}  {detected}")
    return "\n".join(lines)


class Evaluator:
    """train.eval_interval: the loop's evaluation component. Every ``train.eval_interval`` steps and
    at the last step it runs ``evaluate`` on the model being trained (a LiveSampler) and the run's
    toy validation split, read once here, so a missing split fails before the model is built."""

    def __init__(self, cfg: Config) -> None:
        self.cfg = cfg
        self.interval = cfg.train.eval_interval
        self.validation: ToyValidation | None = None
        if self.interval:
            try:
                self.validation = read_validation(Path(cfg.data.path))
            except (FileNotFoundError, ValueError) as err:
                raise ConfigError(f"train.eval_interval={self.interval} evaluates on the toy validation split: "
                                  f"{err}") from None

    def due(self, step: int) -> bool:
        return bool(self.interval) and (step % self.interval == 0 or step == self.cfg.train.steps)

    def run(self, step: int, live: LiveSampler) -> dict[str, float]:
        """The ``eval/...`` scalars at ``step`` (eval_scalars), with the seconds evaluation took."""
        start = time.perf_counter()
        bench, losses = evaluate(live, run_spec(self.cfg, step), self.validation, self.cfg.train.eval_samples_per_prompt)
        return {**eval_scalars(bench, losses), "eval/time_s": time.perf_counter() - start}
