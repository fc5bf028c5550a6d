"""optim.py's patch of megatron-core: with torch's AdamW (megatron's fallback without Transformer
Engine or apex, on a GPU as on the CPU) a distributed optimizer resumed from a checkpoint gets
every parameter's Adam step back, each parameter its own step tensor."""

from __future__ import annotations

import pytest
import torch
from conftest import TOY_CHECKPOINT_RUN
from megatron.core import optimizer as mcore_optimizer
from megatron.core.optimizer.distrib_optimizer import DistributedOptimizer

from goku_megatron import cpu_compat, optim, patching
from goku_megatron.checkpoint import Checkpointer, TrainingState, checkpoint_dir, load_checkpoint
from goku_megatron.config import load_config, validate
from goku_megatron.train import setup

FIXED = {"keep_torch_adam_step": "_set_main_param_and_optimizer_states", "own_torch_adam_steps": "load_state_dict"}


def _as_megatron_ships(monkeypatch, *names: str) -> None:
    """DistributedOptimizer's methods ``names`` without goku's wrappers, whoever installed them
    before (monkeypatch puts them back)."""
    for name in names:
        method = DistributedOptimizer.__dict__[name]
        monkeypatch.setattr(DistributedOptimizer, name, getattr(method, "__wrapped__", method))


def _fixed() -> list[bool]:
    return [getattr(DistributedOptimizer.__dict__[name], patching.WRAPPED, False) for name in FIXED.values()]


def test_the_fixes_install_with_torch_adam_whatever_the_device(monkeypatch):
    """As on a GPU without TE/apex: CUDA is there, cpu_compat applies nothing, the fixes install."""
    _as_megatron_ships(monkeypatch, *FIXED.values())
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    monkeypatch.setattr(cpu_compat, "_applied", False)
    assert cpu_compat.apply() is False
    assert mcore_optimizer.USING_PYTORCH_OPTIMIZER  # no TE or apex on this machine
    assert _fixed() == [False, False]
    assert optim.install_torch_adam_step_fixes() is True
    assert optim.install_torch_adam_step_fixes() is True  # idempotent: wrapped once
    assert _fixed() == [True, True]
    method = DistributedOptimizer.__dict__["load_state_dict"]
    assert not getattr(method.__wrapped__, patching.WRAPPED, False)


def test_fused_adams_leave_megatrons_loading_alone(monkeypatch):
    """TE's or apex's FusedAdam keeps its step in the param groups: nothing to fix."""
    _as_megatron_ships(monkeypatch, *FIXED.values())
    monkeypatch.setattr(mcore_optimizer, "USING_PYTORCH_OPTIMIZER", False)
    assert optim.install_torch_adam_step_fixes() is False
    assert _fixed() == [False, False]


def _trained(steps: int):
    """The toy model with the distributed optimizer (built by train.setup, as goku-train builds it)
    after ``steps`` optimizer steps on seeded gradients."""
    cfg = load_config("toy", TOY_CHECKPOINT_RUN)
    validate(cfg, 1)
    training = setup(cfg)
    for seed in range(steps):
        gen = torch.Generator().manual_seed(seed)
        for p in training.model[0].parameters():
            p.main_grad.copy_(torch.randn(p.shape, generator=gen))
        training.optimizer.step()
    (part,) = training.optimizer.inner.chained_optimizers
    return cfg, part.optimizer, TrainingState(training.model, training.optimizer)


@pytest.mark.parametrize("without", [None, "keep_torch_adam_step", "own_torch_adam_steps"])
def test_a_resumed_torch_adam_has_a_step_per_parameter(megatron_world, monkeypatch, tmp_path, without):
    """build_optimizer installs the fixes (megatron's own methods before it), and loading the
    checkpoint restores every parameter's moments and step. Without keep_torch_adam_step the load
    fails on AdamW's 'step'; without own_torch_adam_steps all parameters share one step tensor
    (which AdamW then increments once per parameter)."""
    _as_megatron_ships(monkeypatch, *FIXED.values())
    cfg, saved, state = _trained(2)
    assert _fixed() == [True, True]
    Checkpointer(tmp_path).save(2, state, cfg.to_dict(), blocking=True)
    _, loaded, fresh_state = _trained(0)
    if without:
        _as_megatron_ships(monkeypatch, FIXED[without])
    if without == "keep_torch_adam_step":
        with pytest.raises(KeyError, match="step"):
            load_checkpoint(checkpoint_dir(tmp_path, 2), fresh_state)
        return
    load_checkpoint(checkpoint_dir(tmp_path, 2), fresh_state)
    steps = [s["step"] for s in loaded.state.values()]
    assert [float(s) for s in steps] == [2.0] * len(steps)
    assert len({id(s) for s in steps}) == (1 if without else len(steps))
    for a, b in zip(saved.state.values(), loaded.state.values()):
        assert torch.equal(a["exp_avg"], b["exp_avg"]) and torch.equal(a["exp_avg_sq"], b["exp_avg_sq"])
