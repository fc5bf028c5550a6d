"""resilience.py: stop signals agreed at a step boundary, NaN/Inf steps skipped on the optimizer,
the bad-step and loss-spike guard, nvidia-resiliency-ext hooks (and its launcher restarting a hung
rank, when the package is installed)."""

from __future__ import annotations

import importlib.util
import logging
import math
import os
import signal
import subprocess
import sys
import time

import psutil
import pytest
import torch
from conftest import REPO, TOY_CHECKPOINT_RUN

from goku_megatron.config import ConfigError, ParallelConfig
from goku_megatron.model.fsdp import ShardedDataParallel, local
from goku_megatron.resilience import (
    EXIT_PREEMPTED,
    Diverged,
    FaultTolerance,
    SkipNonFiniteSteps,
    StepGuard,
    StopSignals,
)

# ----------------------------------------------------------------------------------------------
# Stop signals


def test_a_stop_signal_is_agreed_at_the_step_boundary_and_handlers_come_back(megatron_world):
    before = signal.getsignal(signal.SIGUSR1)
    with StopSignals() as signals:
        assert signals.agreed(torch.device("cpu")) == 0
        os.kill(os.getpid(), signal.SIGUSR1)  # SLURM's --signal=USR1@120
        assert signals.received == signal.SIGUSR1
        assert signals.agreed(torch.device("cpu")) == signal.SIGUSR1
    assert signal.getsignal(signal.SIGUSR1) is before


def test_processes_forked_by_a_training_process_keep_default_signals_and_die_with_it():
    """A helper process forked by a rank (a library's; goku's checkpoint writer is a thread) must
    not swallow SIGTERM, nor outlive a killed rank (it would keep its sockets, and so its peers'
    collectives, alive)."""
    code = """
import os, signal, sys, time
from goku_megatron.resilience import StopSignals
with StopSignals():
    pid = os.fork()
    if pid == 0:  # the helper: default SIGTERM, and waits to be killed with its parent
        sys.stdout.write(f"{os.getpid()} {signal.getsignal(signal.SIGTERM) == signal.SIG_DFL}\\n")
        sys.stdout.flush()
        time.sleep(60)
        os._exit(0)
    time.sleep(0.5)
    os.kill(os.getpid(), signal.SIGKILL)
"""
    proc = subprocess.run([sys.executable, "-c", code], cwd=REPO, capture_output=True, text=True, timeout=60)
    assert proc.returncode == -signal.SIGKILL
    child, default = proc.stdout.split()
    assert default == "True"
    deadline = time.monotonic() + 10
    while psutil.pid_exists(int(child)) and psutil.Process(int(child)).status() != psutil.STATUS_ZOMBIE:
        assert time.monotonic() < deadline, "the forked helper outlived its killed parent"
        time.sleep(0.05)


def test_goku_train_exits_99_after_saving_on_sigterm(toy_data, tmp_path):
    run_dir = tmp_path / "run"
    cmd = [sys.executable, "-m", "goku_megatron.cli.train", *TOY_CHECKPOINT_RUN, f"data.path={toy_data}",
           f"train.run_dir={run_dir}", "train.steps=200"]
    proc = subprocess.Popen(cmd, cwd=REPO, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL,
                            env={**os.environ, "PYTHONWARNINGS": "ignore"})
    deadline = time.monotonic() + 300
    while not (run_dir / "metrics.jsonl").is_file():
        assert proc.poll() is None and time.monotonic() < deadline
        time.sleep(0.05)
    proc.send_signal(signal.SIGTERM)
    assert proc.wait(timeout=300) == EXIT_PREEMPTED == 99
    assert (run_dir / "checkpoints" / "latest").is_file()


# ----------------------------------------------------------------------------------------------
# Non-finite steps never reach the weights


def _distributed_tiny(seed: int = 0, fsdp: bool = False):
    """A tiny model under megatron DDP with the distributed optimizer, or (``fsdp``) sharded by
    goku's FSDP wrapper with megatron's plain optimizer over its DTensor weights."""
    from megatron.core.distributed import DistributedDataParallel, DistributedDataParallelConfig
    from megatron.core.enums import ModelType
    from megatron.core.optimizer import OptimizerConfig, get_megatron_optimizer
    from megatron.core.transformer import TransformerConfig
    from megatron.core.transformer.module import MegatronModule

    config = TransformerConfig(num_layers=1, hidden_size=8, num_attention_heads=1, use_cpu_initialization=True)

    class Tiny(MegatronModule):
        model_type = ModelType.encoder_or_decoder

        def __init__(self):
            super().__init__(config)
            self.lin = torch.nn.Linear(8, 3)

        def forward(self, x):
            return self.lin(x)

    torch.manual_seed(seed)
    model = Tiny()
    if fsdp:
        ddp = ShardedDataParallel(config, model, ParallelConfig(fsdp=True))
    else:
        ddp = DistributedDataParallel(config=config, module=model, ddp_config=DistributedDataParallelConfig(
            grad_reduce_in_fp32=True, overlap_grad_reduce=False, use_distributed_optimizer=True))
    optimizer = get_megatron_optimizer(OptimizerConfig(
        optimizer="adam", lr=0.1, clip_grad=0.5, bf16=False, params_dtype=torch.float32,
        use_distributed_optimizer=not fsdp), [ddp])
    return model, ddp, optimizer


def _backward(ddp, optimizer, x):
    ddp.zero_grad_buffer()
    optimizer.zero_grad()
    ddp(x).pow(2).sum().backward()
    ddp.finish_grad_sync()


@pytest.mark.parametrize("fsdp", [False, True], ids=["ddp", "fsdp"])
@pytest.mark.parametrize("bad", [float("nan"), float("inf")])
def test_a_non_finite_gradient_skips_the_update(megatron_world, bad, fsdp):
    model, ddp, optimizer = _distributed_tiny(fsdp=fsdp)
    guarded = SkipNonFiniteSteps(optimizer)
    x = torch.randn(4, 8, generator=torch.Generator().manual_seed(1))
    _backward(ddp, guarded, x)
    assert guarded.step()[0]  # a good step first, so Adam has state to keep
    weights = {n: p.detach().clone() for n, p in model.named_parameters()}
    state = {k: v.clone() for s in optimizer.chained_optimizers[0].optimizer.state.values() for k, v in s.items()}
    _backward(ddp, guarded, x * bad)
    ok, grad_norm, _ = guarded.step()
    assert not ok and not math.isfinite(grad_norm)
    for name, p in model.named_parameters():
        assert torch.equal(local(p), local(weights[name])), name
    after = {k: v for s in optimizer.chained_optimizers[0].optimizer.state.values() for k, v in s.items()}
    assert all(torch.equal(local(after[k]), local(v)) for k, v in state.items())


def test_finite_steps_equal_megatrons_own_step(megatron_world):
    model, ddp, optimizer = _distributed_tiny()
    twin, twin_ddp, twin_optimizer = _distributed_tiny()
    guarded = SkipNonFiniteSteps(optimizer)
    for seed in (1, 2, 3):
        x = torch.randn(4, 8, generator=torch.Generator().manual_seed(seed)) * 5  # clipped at 0.5
        _backward(ddp, guarded, x)
        _backward(twin_ddp, twin_optimizer, x)
        ours, theirs = guarded.step(), twin_optimizer.step()
        assert ours[0] and theirs[0] and ours[1] == theirs[1] > 0.5
    for (name, p), q in zip(model.named_parameters(), twin.parameters()):
        assert torch.equal(p, q), name
    # everything else is the wrapped optimizer (the LR schedule sets lr in these very groups)
    assert all(a is b for a, b in zip(guarded.param_groups, optimizer.param_groups, strict=True))


# ----------------------------------------------------------------------------------------------
# The step guard


def test_guard_counts_skips_and_stops_after_max_bad_steps_in_a_row():
    guard = StepGuard(max_bad_steps=3, spike_factor=0, spike_window=10)
    assert guard.observe(1, 1.0, 1.0, skipped=False) == {"skipped_steps": 0, "loss_spikes": 0}
    guard.observe(2, float("nan"), float("nan"), skipped=True)
    guard.observe(3, float("nan"), float("nan"), skipped=True)
    assert guard.observe(4, 0.9, 1.0, skipped=False) == {"skipped_steps": 2, "loss_spikes": 0}  # the run resets
    guard.observe(5, float("inf"), float("inf"), skipped=True)
    guard.observe(6, float("nan"), float("nan"), skipped=True)
    with pytest.raises(Diverged, match=r"^steps 5\.\.7: 3 steps in a row had a non-finite loss"):
        guard.observe(7, float("nan"), float("nan"), skipped=True)


def test_guard_logs_loss_spikes_against_the_running_mean(caplog):
    guard = StepGuard(max_bad_steps=3, spike_factor=3.0, spike_window=4)
    with caplog.at_level(logging.WARNING, logger="goku_megatron"):
        for step, loss in enumerate([1.0, 1.2, 0.8, 1.0, 1.0, 5.0, 1.0, 2.5], start=1):
            counts = guard.observe(step, loss, 1.0, skipped=False)
    assert counts == {"skipped_steps": 0, "loss_spikes": 1}
    spikes = [r.getMessage() for r in caplog.records if "loss spike" in r.getMessage()]
    assert spikes == ["step 6: loss spike 5 = 5.0 x the running mean 1 of the last 4 steps"]
    assert list(guard.recent) == [1.0, 1.0, 1.0, 2.5]  # the spike stays out of the mean


def test_guard_state_round_trips():
    guard = StepGuard(max_bad_steps=5, spike_factor=2.0, spike_window=3)
    for step, (loss, skipped) in enumerate([(1.0, False), (2.0, False), (float("nan"), True)], start=1):
        guard.observe(step, loss, 1.0, skipped)
    other = StepGuard(max_bad_steps=5, spike_factor=2.0, spike_window=3)
    other.load_state_dict(guard.state_dict())
    assert other.state_dict() == guard.state_dict()
    assert other.observe(4, float("nan"), 1.0, True) == guard.observe(4, float("nan"), 1.0, True)


# ----------------------------------------------------------------------------------------------
# nvidia-resiliency-ext


def test_fault_tolerance_off_does_nothing():
    ft = FaultTolerance(enabled=False)
    with ft.section("step"):
        ft.heartbeat()
    ft.close()


def test_fault_tolerance_without_the_package_fails_in_one_line(monkeypatch):
    monkeypatch.setitem(sys.modules, "nvidia_resiliency_ext.fault_tolerance", None)  # import fails
    with pytest.raises(ConfigError, match=r"^checkpoint.fault_tolerance=true but nvidia_resiliency_ext does "
                                          r"not import .*; pip install nvidia-resiliency-ext$"):
        FaultTolerance(enabled=True)


@pytest.mark.slow
@pytest.mark.skipif(importlib.util.find_spec("nvidia_resiliency_ext") is None,
                    reason="nvidia-resiliency-ext is not installed")
def test_ft_launcher_restarts_a_hung_rank(toy_data, tmp_path):
    """A rank that stops making progress (SIGSTOP) misses its step section's timeout: its rank
    monitor kills it, ft_launcher restarts the job and it resumes from the latest checkpoint."""
    from checkpoint_utils import metrics

    run_dir = tmp_path / "run"
    cmd = ["ft_launcher", "--nproc-per-node", "2", "--max-restarts", "1", "--ft-workload-check-interval=1",
           "--ft-rank-section-timeouts=setup:300,step:5,checkpointing:120", "--ft-rank-out-of-section-timeout=10",
           "-m", "goku_megatron.cli.train", *TOY_CHECKPOINT_RUN, f"data.path={toy_data}", f"train.run_dir={run_dir}",
           "train.save_interval=1", "checkpoint.fault_tolerance=true"]
    log = open(tmp_path / "run.log", "w")
    proc = subprocess.Popen(cmd, cwd=REPO, stdout=log, stderr=subprocess.STDOUT,
                            env={**os.environ, "OMP_NUM_THREADS": "1", "PYTHONWARNINGS": "ignore"})
    deadline = time.monotonic() + 300
    while not ((run_dir / "metrics.jsonl").is_file() and len(metrics(run_dir)) >= 2):
        assert proc.poll() is None and time.monotonic() < deadline
        time.sleep(0.05)
    def trainer(p: psutil.Process | None) -> bool:  # a rank, or a process a rank forked
        try:
            return p is not None and p.cmdline()[1:4] == ["-u", "-m", "goku_megatron.cli.train"]
        except psutil.Error:  # exited meanwhile
            return False

    (rank1,) = [p for p in psutil.Process(proc.pid).children(recursive=True)
                if trainer(p) and not trainer(p.parent()) and p.environ().get("RANK") == "1"]
    rank1.suspend()
    assert proc.wait(timeout=300) == 0, (tmp_path / "run.log").read_text()[-3000:]
    assert [r["step"] for r in metrics(run_dir)] == list(range(1, 7))
    assert "resumed from" in (tmp_path / "run.log").read_text()
