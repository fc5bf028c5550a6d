"""The optimizer and learning-rate schedule of a run: megatron's (distributed) Adam over the DDP
model, optim.* settings, warmup then cosine (or constant) decay, skipping non-finite steps."""

from __future__ import annotations

from typing import Any

import torch
from megatron.core.optimizer import OptimizerConfig, get_megatron_optimizer
from megatron.core.optimizer_param_scheduler import OptimizerParamScheduler
from megatron.core.transformer.transformer_config import TransformerConfig

from goku_megatron.config import Config
from goku_megatron.resilience import SkipNonFiniteSteps


def build_optimizer(cfg: Config, model: list[torch.nn.Module], tc: TransformerConfig) -> tuple[SkipNonFiniteSteps, Any]:
    """(optimizer, scheduler) for ``model``: megatron's optimizer wrapped so that a step with a
    non-finite gradient leaves the weights alone (resilience.SkipNonFiniteSteps), and megatron's
    OptimizerParamScheduler."""
    o = cfg.optim
    optimizer = get_megatron_optimizer(
        OptimizerConfig(
            optimizer="adam", lr=o.lr, min_lr=o.min_lr, weight_decay=o.weight_decay,
            adam_beta1=o.adam_beta1, adam_beta2=o.adam_beta2, adam_eps=o.adam_eps,
            clip_grad=o.clip_grad, bf16=tc.bf16, params_dtype=tc.params_dtype,
            use_distributed_optimizer=o.distributed_optimizer,
            # How the distributed optimizer treats FP8 weights (optim.fp8_param_gather) depends on
            # the recipe; overlap_param_gather mirrors the DDP setting, as megatron asks.
            fp8_recipe=tc.fp8_recipe if tc.fp8 else None, overlap_param_gather=o.overlap_param_gather,
        ),
        model,
    )
    scheduler = OptimizerParamScheduler(
        optimizer,
        init_lr=0.0,
        max_lr=o.lr,
        min_lr=o.min_lr if o.decay == "cosine" else o.lr,
        lr_warmup_steps=o.warmup_steps,
        lr_decay_steps=max(cfg.train.steps, o.warmup_steps + 1),
        lr_decay_style=o.decay,
        start_wd=o.weight_decay,
        end_wd=o.weight_decay,
        wd_incr_steps=cfg.train.steps,
        wd_incr_style="constant",
    )
    return SkipNonFiniteSteps(optimizer), scheduler
