"""platform.cuda_device_max_connections: the CUDA_DEVICE_MAX_CONNECTIONS rule Megatron-LM applies
(one hardware queue for tensor/context parallelism, more than one for FSDP), and goku-train's
one-line refusal of FSDP under "1"."""

from __future__ import annotations

import os
import subprocess
import sys

import pytest

from goku_megatron.config import ConfigError, load_config
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
