"""Distributed checkpoints through megatron-core dist_checkpointing (torch_dist format).

Layout: ``RUN/checkpoints/iter_0000100/`` plus ``RUN/checkpoints/latest`` naming the newest
complete one. The pointer is written (atomically) only after every rank finished the save, so a
crash mid-save never makes a partial checkpoint "latest".
"""

from __future__ import annotations

import json
import os
from pathlib import Path
from typing import Any

import torch
from megatron.core import dist_checkpointing

from goku_megatron.model.goku import iter_stage_models

LATEST = "latest"


def checkpoint_dir(run_dir: Path, step: int) -> Path:
    return run_dir / "checkpoints" / f"iter_{step:07d}"


def _model_sharded_state_dict(model: list[torch.nn.Module]) -> dict[str, Any]:
    (stage,) = list(iter_stage_models(model))
    return stage.sharded_state_dict(prefix="model.")


def save_checkpoint(run_dir: Path, step: int, model: list[torch.nn.Module], config: dict[str, Any],
                    loader_state: dict[str, Any] | None = None) -> Path:
    """Save the model weights (all ranks take part) and this DP rank's loader state, then move the
    ``latest`` pointer: a checkpoint is "latest" only once all of it is on disk."""
    from megatron.core import parallel_state

    path = checkpoint_dir(run_dir, step)
    if torch.distributed.get_rank() == 0:
        path.mkdir(parents=True, exist_ok=True)
    torch.distributed.barrier()
    state = _model_sharded_state_dict(model)
    state["step"] = step
    state["config"] = config
    dist_checkpointing.save(state, str(path))
    # The loader state differs per DP rank and is the same on its TP/CP/PP peers: one file each.
    if loader_state is not None and parallel_state.get_tensor_model_parallel_rank() == 0 \
            and parallel_state.get_pipeline_model_parallel_rank() == 0 \
            and parallel_state.get_context_parallel_rank() == 0:
        target = loader_state_path(path, parallel_state.get_data_parallel_rank())
        tmp = target.with_suffix(".tmp")
        tmp.write_text(json.dumps(loader_state))
        os.replace(tmp, target)
    torch.distributed.barrier()
    if torch.distributed.get_rank() == 0:
        pointer = run_dir / "checkpoints" / LATEST
        tmp = pointer.with_suffix(".tmp")
        tmp.write_text(path.name + "\n")
        os.replace(tmp, pointer)
    return path


def loader_state_path(checkpoint: Path, dp_rank: int) -> Path:
    return checkpoint / f"loader_dp{dp_rank:05d}.json"


def load_loader_state(checkpoint: Path, dp_rank: int) -> dict[str, Any] | None:
    """The loader state DP rank ``dp_rank`` saved with ``checkpoint`` (None for toy runs)."""
    path = loader_state_path(checkpoint, dp_rank)
    return json.loads(path.read_text()) if path.is_file() else None


def latest_checkpoint(run_dir: Path) -> Path | None:
    pointer = run_dir / "checkpoints" / LATEST
    if not pointer.is_file():
        return None
    return run_dir / "checkpoints" / pointer.read_text().strip()


def load_model_weights(path: Path, model: list[torch.nn.Module]) -> dict[str, Any]:
    """Load model weights saved by save_checkpoint (any TP/PP layout); returns step and config."""
    state = _model_sharded_state_dict(model)
    state["step"] = 0
    state["config"] = {}
    loaded = dist_checkpointing.load(state, str(path))
    (stage,) = list(iter_stage_models(model))
    weights = {k[len("model."):]: v for k, v in loaded.items() if k.startswith("model.")}
    local = {_local_name(stage, k): v for k, v in weights.items()}
    stage.load_state_dict(local, strict=False)
    return {"step": loaded["step"], "config": loaded["config"]}


def _local_name(stage: Any, global_key: str) -> str:
    if global_key.startswith("layers."):
        _, idx, rest = global_key.split(".", 2)
        return f"layers.{int(idx) - stage.layer_offset}.{rest}"
    return global_key
