"""Convert between goku-train checkpoints and one safetensors file in the reference layout
(``goku-data convert-checkpoint export|import``).

Export loads a checkpoint of any TP/PP layout into one unsharded model and writes every weight
under its global name, transformer blocks as ``blocks.{i}.<name>`` with the authors' reference
block parameter names (docs/model.md, "The block": norm1.linear.*, attn1.{q,k,v,o}_proj.weight,
attn1.{q,k}_norm.weight, norm2.weight, attn2.*, norm3.weight, mlp.fc1.*, mlp.fc2.*); the embedders
and final layer keep their goku-megatron names. The run's config rides along as JSON in the file's
metadata.
Import writes a step-0 goku-train checkpoint (run directory with checkpoints/latest) from such a
file, to sample from or to fine-tune (``goku-train checkpoint.init_from=RUN_DIR``, or
``lora.base=FILE`` directly); any TP/PP layout can then read it. The names and the file's reading
live in checkpoint/reference.py.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import torch
from safetensors.torch import load_file, save_file

from goku_megatron.checkpoint import load_model_weights, read_manifest, resolve_checkpoint, save_checkpoint
from goku_megatron.checkpoint.reference import (CONFIG_KEY, from_reference_names, read_metadata,
                                                to_reference_names)
from goku_megatron.config import LoraConfig
from goku_megatron.model.goku import iter_stage_models
from goku_megatron.model.lora import is_adapter, merge_adapters
from goku_megatron.sample import checkpoint_config, config_for_one_process, unsharded_model


def export_checkpoint(checkpoint: Path, out: Path, adapters: bool = False) -> Path:
    """Writes the weights (float32, unsharded) and config of ``checkpoint`` (a run directory or
    its checkpoints/iter_N) to ``out`` (.safetensors). A LoRA run's checkpoint is written merged
    (scale * B @ A folded into each base weight: a whole model, its config without lora) or, with
    ``adapters``, as its adapters alone (``blocks.{i}.<layer>.lora_A.weight`` / ``lora_B.weight``,
    the names peft and diffusers use, with rank, alpha and the base in the metadata)."""
    path = resolve_checkpoint(checkpoint)
    cfg = checkpoint_config(path)
    base = read_manifest(path).get("base")
    if adapters and not cfg.lora.rank:
        raise ValueError(f"{path} is not a LoRA run's checkpoint (lora.rank=0): it has no adapters to export; "
                         "drop --adapters to export its weights")
    model, _ = unsharded_model(cfg)
    step = load_model_weights(path, [model])["step"]
    (stage,) = iter_stage_models([model])
    metadata = {"step": str(step)}
    if adapters:
        metadata.update(lora_rank=str(cfg.lora.rank), lora_alpha=str(cfg.lora.alpha),
                        lora_targets=",".join(cfg.lora.targets), base=str(base["path"]))
    elif cfg.lora.rank:
        merge_adapters(stage)
        cfg.lora = LoraConfig()
    state = {name: t.detach().float().cpu().contiguous() for name, t in stage.state_dict().items()
             if isinstance(t, torch.Tensor) and is_adapter(name) == adapters}
    out.parent.mkdir(parents=True, exist_ok=True)
    save_file(to_reference_names(state), str(out), metadata={CONFIG_KEY: json.dumps(cfg.to_dict()), **metadata})
    return out


def import_checkpoint(weights: Path, run_dir: Path) -> Path:
    """A goku-train run directory holding ``weights`` as its step-0 checkpoint."""
    saved: dict[str, Any] = json.loads(read_metadata(weights)[CONFIG_KEY])
    model, _ = unsharded_model(config_for_one_process(saved, f"{weights} ({CONFIG_KEY} metadata)"))
    (stage,) = iter_stage_models([model])
    missing, unexpected = stage.load_state_dict(from_reference_names(load_file(str(weights))), strict=False)
    missing = [k for k in missing if not k.endswith("_extra_state")]
    if missing or unexpected:
        raise ValueError(f"{weights} does not fit the model in its config: missing {missing[:3]}, "
                         f"unexpected {unexpected[:3]}")
    return save_checkpoint(run_dir, 0, [model], saved)
