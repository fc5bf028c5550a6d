"""Exponential moving average of the weights, as Goku (and DiT) keep for sampling.

Each rank averages its own parameters that train (its tensor- and pipeline-parallel shard; in a
LoRA run the adapters: the frozen base never changes) in fp32, after every successful optimizer
step: ``ema = decay * ema + (1 - decay) * param``. In a checkpoint the average is stored under
``ema.<name>`` with exactly the sharding (global shape, offsets, replica ids) of the weight it
follows, so it reshards like the weights and loads into an unsharded model for sampling
(``checkpoint.load_model_weights(..., ema=True)``).
"""

from __future__ import annotations

import dataclasses
from typing import Any

import torch
from megatron.core.dist_checkpointing import ShardedTensor

from goku_megatron.model.fsdp import local
from goku_megatron.model.goku import iter_stage_models

MODEL_PREFIX = "model."
EMA_PREFIX = "ema."


class EMA:
    """fp32 moving averages of this rank's trainable parameters of ``model`` (megatron model chunks)."""

    def __init__(self, model: list[torch.nn.Module], decay: float) -> None:
        if not 0 < decay < 1:
            raise ValueError(f"EMA decay must be in (0, 1), got {decay}")
        self.decay = decay
        self.params = [p for stage in iter_stage_models(model) for p in stage.parameters() if p.requires_grad]
        self.averages = [p.detach().float().clone() for p in self.params]
        self._by_param = {id(p): avg for p, avg in zip(self.params, self.averages)}

    @torch.no_grad()
    def restart(self) -> None:
        """Start the average at the current weights (a resumed run whose checkpoint has none)."""
        # On the local shards: DTensor (parallel.fsdp) has no sharding rule for _foreach_copy_.
        torch._foreach_copy_([local(a) for a in self.averages], [local(p).detach().float() for p in self.params])

    @torch.no_grad()
    def update(self) -> None:
        """One step of the average; call after each optimizer step that changed the weights."""
        current = [p.detach().float() for p in self.params]
        torch._foreach_lerp_(self.averages, current, 1.0 - self.decay)

    def sharded_state_dict(self, model_sharded: dict[str, Any]) -> dict[str, ShardedTensor]:
        """The averages as ShardedTensors mirroring the weights' entries of ``model_sharded``
        (a model sharded state dict whose keys start with ``model.``)."""
        out: dict[str, ShardedTensor] = {}
        for key, sharded in model_sharded.items():
            average = self._by_param.get(id(getattr(sharded, "data", None)))
            if average is None or not isinstance(sharded, ShardedTensor):
                continue
            ema_key = EMA_PREFIX + sharded.key[len(MODEL_PREFIX):]
            out[EMA_PREFIX + key[len(MODEL_PREFIX):]] = dataclasses.replace(
                sharded, key=ema_key, data=average, dtype=average.dtype)
        if len(out) != len(self.averages):
            raise ValueError(f"EMA: {len(self.averages)} parameters but {len(out)} of them are in the "
                             "model's sharded state dict")
        return out
