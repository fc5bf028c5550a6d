"""The optimizer and learning-rate schedule of a run: megatron's (distributed) Adam over the DDP
model, optim.* settings, warmup then cosine (or constant) decay, skipping non-finite steps.

Without Transformer Engine or apex megatron-core falls back to torch's AdamW, on any device (CPU
always, a GPU without them too), whose per-parameter ``step`` tensor the distributed optimizer's
checkpoint loading does not expect: ``install_torch_adam_step_fixes`` wraps two of its methods.
"""

from __future__ import annotations

from typing import Any, Callable

import torch
from megatron.core import optimizer as mcore_optimizer
from megatron.core.optimizer import OptimizerConfig, get_megatron_optimizer
from megatron.core.optimizer.distrib_optimizer import DistributedOptimizer
from megatron.core.optimizer_param_scheduler import OptimizerParamScheduler
from megatron.core.transformer.transformer_config import TransformerConfig

from goku_megatron.config import Config
from goku_megatron.patching import check_version, wrap_method
from goku_megatron.resilience import SkipNonFiniteSteps


def keep_torch_adam_step(set_states: Callable[..., Any]) -> Callable[..., Any]:
    """Wrapper for DistributedOptimizer._set_main_param_and_optimizer_states.

    Loading a ``fully_reshardable`` checkpoint hands it the param, exp_avg and exp_avg_sq of a
    parameter and copies into every state the optimizer holds; torch's AdamW also holds a 'step'
    (megatron restores it separately, from the param groups), so the copy fails with KeyError.
    The wrapper passes the optimizer's own step along, which leaves it as it is.
    """

    def set_main_param_and_optimizer_states(self: Any, model_param: torch.nn.Parameter,
                                            tensors: dict[str, torch.Tensor]) -> Any:
        if "step" not in tensors:
            group_index, group_order = self.model_param_group_index_map[model_param]
            main_param = self.optimizer.param_groups[group_index]["params"][group_order]
            state = self.optimizer.state[main_param]
            if "step" in state:
                tensors = {**tensors, "step": state["step"]}
        return set_states(self, model_param, tensors)

    return set_main_param_and_optimizer_states


def own_torch_adam_steps(load_state_dict: Callable[..., Any]) -> Callable[..., Any]:
    """Wrapper for DistributedOptimizer.load_state_dict.

    For torch's AdamW it gives every parameter the *same* 'step' tensor. AdamW increments each
    parameter's step in place, so after a resume the shared tensor advanced once per parameter
    per optimizer step and Adam's bias correction was wrong from then on. The wrapper gives each
    parameter its own copy of the loaded step.
    """

    def load(self: Any, state_dict: dict[str, Any]) -> None:
        load_state_dict(self, state_dict)
        for state in self.optimizer.state.values():
            if isinstance(state.get("step"), torch.Tensor):
                state["step"] = state["step"].clone()

    return load


def install_torch_adam_step_fixes() -> bool:
    """Wrap the distributed optimizer's loading for torch's AdamW (``keep_torch_adam_step``,
    ``own_torch_adam_steps``) when megatron-core fell back to it; returns whether it did.

    What decides is megatron's own choice at import (``USING_PYTORCH_OPTIMIZER``, which
    platform.optimizer_backend reports), not the device: TE's and apex's fused Adams keep the step
    in the param groups, and megatron's loading is left alone for them. ``build_optimizer`` calls
    it: every goku optimizer is built there, and only a built one loads a checkpoint. Idempotent.
    """
    if not mcore_optimizer.USING_PYTORCH_OPTIMIZER:
        return False
    check_version()
    wrap_method(DistributedOptimizer, "_set_main_param_and_optimizer_states", keep_torch_adam_step)
    wrap_method(DistributedOptimizer, "load_state_dict", own_torch_adam_steps)
    return True


def build_optimizer(cfg: Config, model: list[torch.nn.Module], tc: TransformerConfig) -> tuple[SkipNonFiniteSteps, Any]:
    """(optimizer, scheduler) for ``model``: megatron's optimizer wrapped so that a step with a
    non-finite gradient leaves the weights alone (resilience.SkipNonFiniteSteps), and megatron's
    OptimizerParamScheduler. With torch's AdamW the distributed optimizer's loading is fixed first
    (``install_torch_adam_step_fixes``)."""
    install_torch_adam_step_fixes()
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
