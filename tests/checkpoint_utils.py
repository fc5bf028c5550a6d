"""Helpers for the checkpoint and restart tests: what a checkpoint holds, compared bit for bit."""

from __future__ import annotations

import json
from pathlib import Path

import torch


def checkpoint_tensors(path: Path) -> dict[str, torch.Tensor]:
    """Every tensor of a checkpoint, unsharded, by global key (model., ema., optimizer.)."""
    from megatron.core import dist_checkpointing

    loaded = dist_checkpointing.load_plain_tensors(str(path))
    return {k: v for k, v in loaded.items() if isinstance(v, torch.Tensor)}


def adam_steps(path: Path) -> list[float]:
    """The Adam step count of each parameter group (the distributed optimizer keeps it there)."""
    from megatron.core import dist_checkpointing

    common = dist_checkpointing.load_common_state_dict(str(path))
    return [float(g["step"]) for g in common["optimizer"]["optimizer"]["param_groups"]]


def assert_same_tensors(got: dict[str, torch.Tensor], want: dict[str, torch.Tensor]) -> None:
    assert got.keys() == want.keys(), sorted(got.keys() ^ want.keys())[:5]
    assert any(k.startswith("model.") for k in want) and any(k.startswith("optimizer.") for k in want)
    for key, value in want.items():
        assert got[key].dtype == value.dtype and torch.equal(got[key], value), key


def metrics(run_dir: Path) -> list[dict]:
    return [json.loads(line) for line in (Path(run_dir) / "metrics.jsonl").read_text().splitlines()]


def losses(run_dir: Path) -> dict[int, float]:
    return {r["step"]: r["loss"] for r in metrics(run_dir)}
