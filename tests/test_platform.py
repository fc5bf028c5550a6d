"""platform.py: the CUDA_DEVICE_MAX_CONNECTIONS rule Megatron-LM applies (one hardware queue for
tensor/context parallelism, more than one for FSDP) and goku-train's one-line refusal of FSDP under
"1"; the process group's CUDA hygiene (its device named at init and in every barrier, destroyed on
every way out of a process), written blind on CPU and checked here through the calls it makes."""

from __future__ import annotations

import atexit
import dataclasses
import os
import subprocess
import sys

import pytest
import torch
from conftest import REPO
from megatron.core import parallel_state

from goku_megatron import platform
from goku_megatron.config import Config, ConfigError, load_config
from goku_megatron.platform import cuda_device_max_connections
from goku_megatron.resilience import EXIT_CONFIG_ERROR

HOPPER, BLACKWELL = (9, 0), (10, 0)
FSDP = ["parallel.fsdp=true", "optim.distributed_optimizer=false"]


@pytest.mark.parametrize("overrides, current, capability, expected", [
    (["parallel.tp=2"], None, HOPPER, "1"),
    (["parallel.cp=2"], None, HOPPER, "1"),
    (["parallel.tp=2"], None, None, "1"),  # CPU: megatron's linears read the variable all the same
    (["parallel.tp=2"], "4", HOPPER, None),  # the user's own value stays
    (["parallel.tp=2"], None, BLACKWELL, None),  # Blackwell orders the queues without it
    ([], None, HOPPER, None),  # TP = CP = 1: nothing to overlap
    (["parallel.pp=2"], None, HOPPER, None),
    (["parallel.tp=2", *FSDP], None, HOPPER, None),  # FSDP wins over TP: the driver's default
    (FSDP, "8", HOPPER, None),
])
def test_the_connections_a_layout_needs(overrides, current, capability, expected):
    cfg = load_config(None, overrides)
    assert cuda_device_max_connections(cfg, current, capability) == expected


def test_fsdp_under_one_connection_is_refused_in_one_line():
    cfg = load_config(None, FSDP)
    with pytest.raises(ConfigError, match=r"^CUDA_DEVICE_MAX_CONNECTIONS=1 serializes FSDP's all-gathers .*"
                                          r"unset it \(or set it > 1\) for parallel.fsdp=true$"):
        cuda_device_max_connections(cfg, "1", HOPPER)


def test_goku_train_refuses_fsdp_under_one_connection_before_any_work(tmp_path):
    env = {**os.environ, "OMP_NUM_THREADS": "1", "CUDA_DEVICE_MAX_CONNECTIONS": "1"}
    env.pop("WORLD_SIZE", None)
    proc = subprocess.run([sys.executable, "-m", "goku_megatron.cli.train", *FSDP], cwd=tmp_path,
                          capture_output=True, text=True, timeout=300, env=env)
    assert proc.returncode == EXIT_CONFIG_ERROR, proc.stdout[-2000:] + proc.stderr[-2000:]
    assert proc.stderr.splitlines() == ["goku-train: error: CUDA_DEVICE_MAX_CONNECTIONS=1 serializes FSDP's "
                                        "all-gathers with compute; unset it (or set it > 1) for parallel.fsdp=true"]
    assert not (tmp_path / "runs").exists() and not (tmp_path / "data").exists()


# ----------------------------------------------------------------------------------------------
# The process group's device and lifetime


def _record_init(monkeypatch, cuda: bool) -> tuple[dict, list]:
    """init_distributed with torch.distributed's entry points recording what they are given."""
    calls: dict = {}
    exits: list = []
    monkeypatch.setattr(torch.distributed, "is_initialized", lambda: False)
    monkeypatch.setattr(torch.distributed, "init_process_group", lambda **kwargs: calls.update(kwargs))
    monkeypatch.setattr(parallel_state, "model_parallel_is_initialized", lambda: True)
    monkeypatch.setattr(platform, "has_cuda", lambda: cuda)
    monkeypatch.setattr(torch.cuda, "set_device", lambda device: calls.update(set_device=device))
    monkeypatch.setattr(torch.cuda, "get_device_capability", lambda device=None: (9, 0))
    monkeypatch.setattr(atexit, "register", exits.append)
    monkeypatch.setattr(atexit, "unregister", lambda fn: None)
    monkeypatch.setenv("LOCAL_RANK", "3")
    monkeypatch.setenv("RANK", "11")
    cfg = Config()
    backends = dataclasses.replace(platform.choose_backends(cfg), device="cuda" if cuda else "cpu",
                                   distributed="nccl" if cuda else "gloo")
    platform.init_distributed(cfg, backends)
    return calls, exits


def test_on_a_gpu_the_process_group_is_bound_to_the_local_ranks_device(monkeypatch):
    """NCCL learns the rank's GPU from init_process_group(device_id=...), instead of "Guessing
    device ID based on global rank. This can cause a hang"; the GPU is the local rank's."""
    calls, exits = _record_init(monkeypatch, cuda=True)
    assert calls["device_id"] == torch.device("cuda", 3) == calls["set_device"]
    assert calls["backend"] == "nccl"
    assert exits == [platform.shutdown_distributed]


def test_on_the_cpu_the_same_calls_name_no_device(monkeypatch):
    calls, exits = _record_init(monkeypatch, cuda=False)
    assert calls["device_id"] is None and "set_device" not in calls
    assert calls["backend"] == "gloo"
    assert exits == [platform.shutdown_distributed]


@pytest.mark.parametrize("backend, device_ids", [("nccl", [3]), ("gloo", None)])
def test_a_barrier_names_the_ranks_gpu_on_nccl_only(monkeypatch, backend, device_ids):
    seen = []
    monkeypatch.setattr(platform, "has_cuda", lambda: backend == "nccl")
    monkeypatch.setenv("LOCAL_RANK", "3")
    monkeypatch.setattr(torch.distributed, "get_backend", lambda group=None: backend)
    monkeypatch.setattr(torch.distributed, "barrier", lambda group=None, device_ids=None: seen.append(device_ids))
    platform.barrier()
    assert seen == [device_ids]


def test_a_real_gloo_barrier_goes_through(megatron_world):
    platform.barrier()
    platform.barrier(parallel_state.get_data_parallel_group())


@pytest.mark.parametrize("ending", ["return", "raise RuntimeError('boom')", "sys.exit(3)"])
def test_every_way_out_of_a_process_destroys_its_process_group(ending):
    code = f"""
import sys
import torch
from goku_megatron import cpu_compat
from goku_megatron.config import Config
from goku_megatron.platform import choose_backends, init_distributed

destroy = torch.distributed.destroy_process_group
def destroyed(group=None):
    destroy(group)
    if group is None:  # the default group (megatron destroys its own groups first)
        print("destroyed", flush=True)
torch.distributed.destroy_process_group = destroyed

def main():
    cpu_compat.apply()
    init_distributed(Config(), choose_backends(Config()))
    {ending}

main()
"""
    proc = subprocess.run([sys.executable, "-c", code], cwd=REPO, capture_output=True, text=True, timeout=120,
                          env={**os.environ, "PYTHONWARNINGS": "ignore"})
    assert proc.stdout.split() == ["destroyed"], proc.stdout + proc.stderr[-2000:]
