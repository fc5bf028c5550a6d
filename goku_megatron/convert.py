"""Convert between goku-train checkpoints and one safetensors file in the reference layout
(``goku-data convert-checkpoint export|import``).

Export loads a checkpoint of any TP/PP layout into one unsharded model and writes every weight
under its global name, transformer blocks as ``blocks.{i}.<name>`` with the authors' reference
block parameter names (docs/model.md, "The block": norm1.linear.*, attn1.{q,k,v,o}_proj.weight,
attn1.{q,k}_norm.weight, norm2.weight, attn2.*, norm3.weight, mlp.fc1.*, mlp.fc2.*); the embedders
and final layer keep their goku-megatron names. The run's config rides along as JSON in the file's
metadata.
Import writes a step-0 goku-train checkpoint (run directory with checkpoints/latest) from such a
file, to sample from or to fine-tune (``goku-train checkpoint.init_from=RUN_DIR``); any TP/PP
layout can then read it.
"""

from __future__ import annotations

import json
import re
from pathlib import Path
from typing import Any

import torch
from safetensors import SafetensorError, safe_open
from safetensors.torch import load_file, save_file

from goku_megatron.checkpoint import load_model_weights, resolve_checkpoint, save_checkpoint
from goku_megatron.model.goku import iter_stage_models
from goku_megatron.sample import checkpoint_config, config_for_one_process, unsharded_model

BLOCK = re.compile(r"^layers\.(\d+)\.")
REFERENCE_BLOCK = re.compile(r"^blocks\.(\d+)\.")
CONFIG_KEY = "goku_config"


def to_reference_names(state: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """Our global names -> the export layout (``layers.i.`` -> ``blocks.i.``); the blocks' own
    parameter names already are the reference block's. megatron's ``_extra_state`` is dropped."""
    return {BLOCK.sub(r"blocks.\1.", name): tensor for name, tensor in state.items()
            if not name.endswith("_extra_state")}


def from_reference_names(state: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    return {REFERENCE_BLOCK.sub(r"layers.\1.", name): tensor for name, tensor in state.items()}


def export_checkpoint(checkpoint: Path, out: Path) -> Path:
    """Writes the weights (float32, unsharded) and config of ``checkpoint`` (a run directory or
    its checkpoints/iter_N) to ``out`` (.safetensors)."""
    path = resolve_checkpoint(checkpoint)
    cfg = checkpoint_config(path)
    model, _ = unsharded_model(cfg)
    step = load_model_weights(path, [model])["step"]
    (stage,) = iter_stage_models([model])
    state = {name: t.detach().float().cpu().contiguous() for name, t in stage.state_dict().items()
             if isinstance(t, torch.Tensor)}
    out.parent.mkdir(parents=True, exist_ok=True)
    save_file(to_reference_names(state), str(out),
              metadata={CONFIG_KEY: json.dumps(cfg.to_dict()), "step": str(step)})
    return out


def import_checkpoint(weights: Path, run_dir: Path) -> Path:
    """A goku-train run directory holding ``weights`` as its step-0 checkpoint."""
    if not weights.is_file():
        raise FileNotFoundError(f"{weights}: no such file; pass a .safetensors file written by "
                                "'goku-data convert-checkpoint export'")
    try:
        with safe_open(str(weights), framework="pt") as f:
            meta = f.metadata() or {}
    except SafetensorError as err:
        raise ValueError(f"{weights}: not a safetensors file ({err}); pass a file written by "
                         "'goku-data convert-checkpoint export'") from err
    if CONFIG_KEY not in meta:
        raise ValueError(f"{weights}: no {CONFIG_KEY} metadata; export it with "
                         "'goku-data convert-checkpoint export'")
    saved: dict[str, Any] = json.loads(meta[CONFIG_KEY])
    model, _ = unsharded_model(config_for_one_process(saved, f"{weights} ({CONFIG_KEY} metadata)"))
    (stage,) = iter_stage_models([model])
    missing, unexpected = stage.load_state_dict(from_reference_names(load_file(str(weights))), strict=False)
    missing = [k for k in missing if not k.endswith("_extra_state")]
    if missing or unexpected:
        raise ValueError(f"{weights} does not fit the model in its config: missing {missing[:3]}, "
                         f"unexpected {unexpected[:3]}")
    return save_checkpoint(run_dir, 0, [model], saved)
