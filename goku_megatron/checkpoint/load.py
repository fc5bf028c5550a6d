"""Loading checkpoints: a whole training state (resume), or the weights alone (sampling, finetuning).

Tensors are stored by global name and offset, so a checkpoint loads into any TP/PP/DP/FSDP layout
(resharding); RNG states and the data loader's state belong to one layout and are restored only
into that one. ``init_weights_from`` starts a finetune from another run's weights.
"""

from __future__ import annotations

import dataclasses
import logging
from pathlib import Path
from typing import Any, Callable

import torch
from megatron.core import dist_checkpointing, parallel_state
from megatron.core.dist_checkpointing import ShardedTensor
from megatron.core.optimizer.distrib_optimizer import DistributedOptimizer

from goku_megatron.checkpoint.integrity import SHAPE_FIELDS, check_compatible, validate_checkpoint, verify_checkpoint
from goku_megatron.checkpoint.reference import read_shards, saved_config
from goku_megatron.checkpoint.layout import load_loader_state, read_manifest, resolve_checkpoint
from goku_megatron.checkpoint.optimizer_state import (load_plain_optimizer, optimizer_metadata, optimizer_parts,
                                                      plain_fully_reshardable, prepare_optimizer_for_loading,
                                                      saved_by_megatrons_plain_optimizer, unwrapped)
from goku_megatron.checkpoint.state import (TrainingState, fsdp_rows, model_sharded_state_dict, parallel_layout,
                                            rng_sharded, rng_state, set_rng_state, stage_of, trained)
from goku_megatron.config import LORA_SEED_BASE, Config, ConfigError
from goku_megatron.ema import EMA_PREFIX, MODEL_PREFIX
from goku_megatron.model.fsdp import is_sharded, local
from goku_megatron.model.goku import NEW_LAYERS
from goku_megatron.model.lora import is_adapter

log = logging.getLogger(__name__)

# The shape fields a finetune's starting weights must share with it: the I2V layer may be new.
STARTING_FIELDS = [f for f in SHAPE_FIELDS if f != "i2v"]

def load_checkpoint(path: Path, state: TrainingState) -> dict[str, Any]:
    """Load every part of ``state`` that ``path`` holds, resharding weights, optimizer and EMA to
    this layout. RNG states are restored only in the layout they were saved in. Returns the common
    part: step, config, train_state, and ``same_layout``."""
    path = Path(path)
    manifest = read_manifest(path)
    same_layout = manifest["layout"] == parallel_layout()
    base = manifest.get("base")
    if base is not None and base["path"] != LORA_SEED_BASE:  # a LoRA run: its frozen weights are the base's
        load_base(base, state.model)  # (a seed base is what the run's model was built with)
    model_sd = model_sharded_state_dict(state.model)
    template: dict[str, Any] = dict(model_sd)
    ema_template: dict[str, ShardedTensor] = {}
    if state.ema is not None and manifest["parts"]["ema"]:
        ema_template = state.ema.sharded_state_dict(model_sd)
        template.update(ema_template)
    template = fsdp_rows(template)
    has_ema = bool(ema_template)
    ema_template = {key: template[key] for key in ema_template if key in template}
    load_optimizer = state.optimizer is not None and manifest["parts"]["optimizer"]
    parts = optimizer_parts(state.optimizer) if load_optimizer else []
    plain = load_optimizer and not any(isinstance(p, DistributedOptimizer) for p in parts)
    legacy = load_optimizer and saved_by_megatrons_plain_optimizer(path)
    fsdp = any(is_sharded(param) for param in stage_of(state.model).parameters())
    if legacy and (fsdp or not plain):
        raise ConfigError(f"{path}: its optimizer state is megatron's plain-optimizer format, which only a run "
                          f"with optim.distributed_optimizer=false and parallel.fsdp=false reads; resume with "
                          f"those, or start a new optimizer from its weights with checkpoint.init_from={path}")
    if plain and not legacy:
        (part,) = parts
        template["optimizer"] = plain_fully_reshardable(part, model_sd, loading=True)
    elif load_optimizer:
        optimizer = unwrapped(state.optimizer)
        prepare_optimizer_for_loading(optimizer)
        template["optimizer"] = optimizer.sharded_state_dict(model_sd, is_loading=True,
                                                             metadata=optimizer_metadata())
    if same_layout:
        template["rng_state"] = rng_sharded(rng_state())

    loaded = dist_checkpointing.load(template, str(path))

    _load_weights(state.model, loaded, MODEL_PREFIX, template)
    if plain and not legacy:
        load_plain_optimizer(part, loaded["optimizer"])
    elif load_optimizer:
        unwrapped(state.optimizer).load_state_dict(loaded["optimizer"])
    if state.scheduler is not None and "scheduler" in loaded:
        state.scheduler.load_state_dict(loaded["scheduler"])
    with torch.no_grad():
        for key, sharded in ema_template.items():
            sharded.data.copy_(loaded[key])
    if state.ema is not None and not has_ema:
        state.ema.restart()
        log.info("%s has no EMA: the EMA starts from its weights", path.name)
    if same_layout:
        set_rng_state(loaded["rng_state"])
    else:
        log.info("resharding %s from %s to %s: weights, optimizer and EMA are exact; RNG states restart "
                 "from the seed", path.name, _describe(manifest["layout"]), _describe(parallel_layout()))
    return {"step": loaded["step"], "config": loaded["config"], "train_state": loaded.get("train_state", {}),
            "same_layout": same_layout}


def restore(path: Path, state: TrainingState, guard: Any, loader: Any) -> tuple[int, int]:
    """Resume a run: load checkpoint ``path`` into the training state, the step guard
    (resilience.StepGuard) and the data loader (data.pipeline.PackedBatches); returns (step,
    consumed samples). The loader continues exactly when the data-parallel size is the one it was
    saved with; otherwise it starts over (one line says so)."""
    info = load_checkpoint(path, state)
    train_state = info["train_state"]
    if "guard" in train_state:
        guard.load_state_dict(train_state["guard"])
    saved_dp = read_manifest(path)["layout"]["dp"]
    loader_state = load_loader_state(path, parallel_state.get_data_parallel_rank())
    if saved_dp != parallel_state.get_data_parallel_world_size():
        log.warning("%s was saved with dp=%d, this run has dp=%d: the data order starts over",
                    path.name, saved_dp, parallel_state.get_data_parallel_world_size())
    elif loader_state is None:
        log.warning("%s holds no data loader state: the data order starts over", path.name)
    else:
        loader.load_state_dict(loader_state)
    log.info("resumed from %s: step %d, %d samples consumed", path, info["step"],
             train_state.get("consumed_samples", 0))
    return int(info["step"]), int(train_state.get("consumed_samples", 0))


def _describe(lay: dict[str, int]) -> str:
    return " ".join(f"{k}={v}" for k, v in lay.items())


def _load_weights(model: list[torch.nn.Module], loaded: dict[str, Any], prefix: str, template: dict[str, Any]) -> None:
    """Copy the weights ``loaded`` holds under ``prefix`` into this rank's parameters; every weight
    ``template`` asked for must be there."""
    stage = stage_of(model)
    weights = {_local_name(stage, k[len(prefix):]): v for k, v in loaded.items()
               if isinstance(k, str) and k.startswith(prefix)}
    wanted = {_local_name(stage, entry.key[len(prefix):]) for entry in template.values()
              if isinstance(entry, ShardedTensor) and entry.key.startswith(prefix)}
    params = dict(stage.named_parameters())
    if any(is_sharded(param) for param in params.values()):  # parallel.fsdp: this rank's rows of each
        missing = []
        with torch.no_grad():
            for name, param in params.items():
                if name in weights:
                    local(param).copy_(weights[name])
                elif name in wanted and local(param).numel():
                    missing.append(name)
    else:
        missing, _ = stage.load_state_dict(weights, strict=False)
        missing = [k for k in missing if k in wanted]
    if missing:
        raise ConfigError(f"the checkpoint lacks weights for {missing[:3]}: it holds another model.* shape; "
                          "use a checkpoint of this model")


def _local_name(stage: Any, global_key: str) -> str:
    if global_key.startswith("layers."):
        _, idx, rest = global_key.split(".", 2)
        return f"layers.{int(idx) - stage.layer_offset}.{rest}"
    return global_key


def load_model_weights(path: Path, model: list[torch.nn.Module], ema: bool = False,
                       new_layers: tuple[str, ...] = (),
                       select: Callable[[str, torch.nn.Parameter | None], bool] = trained) -> dict[str, Any]:
    """Load only the weights (any TP/PP layout), or with ``ema`` the EMA weights in their place;
    returns step and config. The weights are those ``select`` keeps (by default those that train:
    all of them but a LoRA model's frozen base, which comes from the base the checkpoint names).
    Parameters whose names start with one of ``new_layers`` may be missing from the checkpoint and
    then keep their current values."""
    path = Path(path)
    manifest = read_manifest(path)
    if manifest.get("base") is not None:
        if not any(is_adapter(name) for name, _ in stage_of(model).named_parameters()):
            raise ConfigError(f"{path} holds LoRA adapters on the base {manifest['base']['path']}; load it into a "
                              "model with its lora.* settings (goku-sample does), or export it merged into its base "
                              "(goku-data convert-checkpoint export) and use that file")
        load_base(manifest["base"], model)
    model_sd = fsdp_rows(model_sharded_state_dict(model, select))
    if new_layers:
        saved = dist_checkpointing.load_tensors_metadata(str(path))
        model_sd = {k: v for k, v in model_sd.items() if not (
            isinstance(v, ShardedTensor) and v.key.startswith(tuple(MODEL_PREFIX + n for n in new_layers))
            and (EMA_PREFIX + v.key[len(MODEL_PREFIX):] if ema else v.key) not in saved)}
    if ema:
        if not manifest["parts"]["ema"]:
            raise ConfigError(f"{path}: no EMA weights in this checkpoint (checkpoint.ema_decay was 0); "
                              "load its trained weights instead (checkpoint.init_from_ema=false, lora.base_ema=false)")
        template = {EMA_PREFIX + k[len(MODEL_PREFIX):]: dataclasses.replace(
            sh, key=EMA_PREFIX + sh.key[len(MODEL_PREFIX):], data=torch.empty_like(sh.data, dtype=torch.float32),
            dtype=torch.float32) for k, sh in model_sd.items() if isinstance(sh, ShardedTensor)}
    else:
        template = dict(model_sd)
    template["step"] = 0
    template["config"] = {}
    loaded = dist_checkpointing.load(template, str(path))
    _load_weights(model, loaded, EMA_PREFIX if ema else MODEL_PREFIX, template)
    return {"step": loaded["step"], "config": loaded["config"]}


def base_weights(key: str, param: torch.nn.Parameter | None) -> bool:
    """What a LoRA model takes from its base: every entry but the adapters'."""
    return not is_adapter(key)


def load_base(base: dict[str, Any], model: list[torch.nn.Module]) -> None:
    """The frozen base of a LoRA model, as a LoRA run's manifest records it (``start_from_base``):
    a goku-train checkpoint (its trained or EMA weights), a reference-layout .safetensors file
    (each rank reads its own shards), or the weights ``train.seed`` initialises. Layers the base
    lacks (NEW_LAYERS) keep their values; the adapters are left as they are."""
    path = base["path"]
    if path == LORA_SEED_BASE:
        stage_of(model).init_weights(base["seed"])
    elif path.endswith(".safetensors"):
        template = fsdp_rows(model_sharded_state_dict(model, base_weights))
        loaded = read_shards(Path(path), template, MODEL_PREFIX)
        template = {k: v for k, v in template.items() if not (
            isinstance(v, ShardedTensor) and v.key[len(MODEL_PREFIX):].startswith(NEW_LAYERS) and v.key not in loaded)}
        _load_weights(model, loaded, MODEL_PREFIX, template)
    else:
        load_model_weights(Path(path), model, ema=base["ema"], new_layers=NEW_LAYERS, select=base_weights)


def base_of(cfg: Config) -> dict[str, Any]:
    """``lora.base`` resolved and checked, as a LoRA run's manifests record it (``base``): a sound
    goku-train checkpoint (or the run directory whose latest one it is) or a reference
    .safetensors file, of this model's shape (NEW_LAYERS aside), holding whole weights rather than
    adapters; or ``seed``. A checkpoint is recorded resolved, so a resume or goku-sample reads the
    same weights after the base's own run has moved on."""
    lora = cfg.lora
    if lora.base == LORA_SEED_BASE:
        return {"path": LORA_SEED_BASE, "seed": cfg.train.seed}
    if lora.base.endswith(".safetensors"):
        path = Path(lora.base).absolute()
        try:
            saved = saved_config(path)
        except (FileNotFoundError, ValueError) as err:
            raise ConfigError(f"lora.base: {err}") from None
        check_compatible({"config": saved}, cfg, path, fields=STARTING_FIELDS)
        return {"path": str(path)}
    checkpoint = _starting_checkpoint("lora.base", lora.base, cfg).absolute()
    if read_manifest(checkpoint).get("base") is not None:
        raise ConfigError(f"lora.base={lora.base} is itself a LoRA run's checkpoint; export it merged into its "
                          f"base (goku-data convert-checkpoint export) and use that .safetensors file")
    return {"path": str(checkpoint), "ema": lora.base_ema}


def start_from_base(state: TrainingState, cfg: Config) -> dict[str, Any]:
    """A fresh LoRA run's frozen weights from ``lora.base`` (``base_of``: checked first); the
    optimizer's fp32 copies and the EMA restart from them. Returns the base's record."""
    base = base_of(cfg)
    if base["path"] != LORA_SEED_BASE:  # build_stage initialised the model from train.seed already
        load_base(base, state.model)
    _restart_from_weights(state)
    return base


def init_weights_from(path: Path, state: TrainingState, cfg: Config, ema: bool = False) -> Path:
    """Finetuning: a fresh run's weights from ``path`` (a run directory or checkpoints/iter_N),
    optimizer, schedule and step starting anew. Layers of this model that the checkpoint lacks
    (NEW_LAYERS, e.g. the I2V condition layer of a T2V checkpoint) keep their initialisation; the
    optimizer's fp32 main weights and the EMA restart from the loaded weights."""
    checkpoint = _starting_checkpoint("checkpoint.init_from", str(path), cfg)
    load_model_weights(checkpoint, state.model, ema=ema, new_layers=NEW_LAYERS)
    _restart_from_weights(state)
    return checkpoint


def _starting_checkpoint(field: str, path: str, cfg: Config) -> Path:
    """The checkpoint a finetune starts from (``field``: checkpoint.init_from or lora.base): a sound
    one (or the run directory whose latest one it is) of this model's shape, where the layers a
    finetune adds (NEW_LAYERS: the I2V layer) may be new. One line for anything else."""
    try:
        checkpoint = resolve_checkpoint(Path(path))
    except FileNotFoundError as err:
        raise ConfigError(f"{field}: {err}") from None
    reason = validate_checkpoint(checkpoint) or verify_checkpoint(checkpoint)
    if reason is not None:
        raise ConfigError(f"{field}={path}: {reason}; pass a sound checkpoint")
    check_compatible(read_manifest(checkpoint), cfg, checkpoint, fields=STARTING_FIELDS)
    return checkpoint


def _restart_from_weights(state: TrainingState) -> None:
    """The optimizer's fp32 main weights and the EMA start again from weights just loaded."""
    unwrapped(state.optimizer).reload_model_params()
    if state.ema is not None:
        state.ema.restart()
