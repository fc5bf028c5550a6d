"""Shared fixtures: a one-process megatron world (gloo, TP=PP=1) and a torchrun launcher."""

from __future__ import annotations

import logging
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch

import goku_megatron  # noqa: F401  before megatron-core: cpu_compat.disable_jit_fuser_on_cpu

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(Path(__file__).parent))  # tests/reference_goku.py


@pytest.fixture(autouse=True)
def _logging_as_found():
    """Commands run in-process (goku_megatron.cli.*.main) call logs.setup_logging; logging is put
    back after each test, so one test's set-up does not change what the next one captures."""
    root, goku = logging.getLogger(), logging.getLogger("goku_megatron")
    handlers, root_level, goku_level = root.handlers[:], root.level, goku.level
    yield
    root.handlers[:] = handlers
    root.setLevel(root_level)
    goku.setLevel(goku_level)
    logging.captureWarnings(False)


@pytest.fixture(scope="session")
def megatron_world():
    """torch.distributed + megatron parallel_state for one process, as goku-train sets them up."""
    from goku_megatron import cpu_compat
    from goku_megatron.config import Config
    from goku_megatron.platform import choose_backends, init_distributed, seed_everything

    cpu_compat.apply()
    cfg = Config()
    init_distributed(cfg, choose_backends(cfg))
    seed_everything(0)
    yield


def build_stage(cfg):
    """A whole (TP=PP=1) model for cfg, initialised and typed as goku-train builds it."""
    from goku_megatron.model.build import build_stage as build, build_transformer_config
    from goku_megatron.platform import choose_backends

    backends = choose_backends(cfg)
    return build(cfg, backends, build_transformer_config(cfg, backends), cfg.train.seed)


def backward_nodes(output: torch.Tensor, name: str) -> list[str]:
    """Names of the nodes of ``output``'s autograd graph that contain ``name`` (e.g. "Index": a
    gather whose backward is a scatter, IndexBackward0 / IndexPutBackward0)."""
    seen, stack, found = set(), [output.grad_fn], []
    while stack:
        node = stack.pop()
        if node is None or node in seen:
            continue
        seen.add(node)
        if name in type(node).__name__:
            found.append(type(node).__name__)
        stack += [next_node for next_node, _ in node.next_functions]
    return found


def run_torchrun(nproc: int, module_args: list[str], timeout: int = 600, env: dict | None = None) -> str:
    """Run ``torchrun --nproc-per-node nproc -m ...`` on CPU; fail the test with its output."""
    cmd = [sys.executable, "-m", "torch.distributed.run", "--nproc-per-node", str(nproc),
           "--standalone", *module_args]
    run_env = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONWARNINGS": "ignore", **(env or {})}
    proc = subprocess.run(cmd, cwd=REPO, capture_output=True, text=True, timeout=timeout, env=run_env)
    if proc.returncode != 0:
        pytest.fail(f"torchrun exited {proc.returncode}\n{proc.stdout[-4000:]}\n{proc.stderr[-6000:]}")
    return proc.stdout


def run_equivalence(tmp_path_factory, name: str, nproc: int, overrides: list[str]) -> dict:
    """tests/dist_equivalence.py under torchrun: its record (losses, grad norms), both steps' full
    gradients and the final weights by global name (merged over pipeline stages), and its dir."""
    out = tmp_path_factory.mktemp(name)
    run_torchrun(nproc, [str(Path(__file__).with_name("dist_equivalence.py")), str(out), *overrides])
    merged: dict = {"record": torch.load(out / "record.pt"), "dir": out}
    for kind in ("grads1", "grads2", "weights"):
        merged[kind] = {}
        for path in sorted(out.glob(f"{kind}_pp*.pt")):
            merged[kind].update(torch.load(path))
    return merged


# Checkpoint and restart tests (test_checkpoint*.py, test_resilience.py): the toy recipe, shrunk.
TOY_CHECKPOINT_RUN = ["model.hidden_size=64", "model.ffn_hidden_size=256", "data.toy_clips=32",
                      "data.toy_images=0", "train.global_batch_size=8", "train.micro_batch_size=2",
                      "train.log_interval=1", "optim.warmup_steps=2", "train.steps=6",
                      "optim.distributed_optimizer=true",  # the toy recipe turns it off for speed
                      "data.workers=2"]  # read-ahead, whatever the machine's core count


@pytest.fixture(scope="session")
def toy_data(tmp_path_factory):
    """The toy dataset of TOY_CHECKPOINT_RUN, made once (goku-train would rebuild it if its
    parameters differed)."""
    from goku_megatron.config import load_config
    from goku_megatron.data.toy import ensure_toy_dataset

    path = tmp_path_factory.mktemp("toy-data")
    d = load_config("toy", TOY_CHECKPOINT_RUN).data
    ensure_toy_dataset(path, clips=d.toy_clips, images=d.toy_images, size=d.toy_size, frames=d.toy_frames,
                       seed=load_config("toy", TOY_CHECKPOINT_RUN).train.seed)
    return path
