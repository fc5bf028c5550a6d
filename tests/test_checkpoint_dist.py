"""Checkpoints and restarts across processes (torchrun, gloo): exact resume with DP=2 and TP=2, a
SIGTERM that stops all ranks at one step (exit code 99), a SIGKILLed rank that torchrun restarts
from the latest checkpoint, and resharding TP2->TP1, PP2->PP1 and DP1->DP2 with the optimizer; FSDP
(4 ranks) resumes exactly and reshards to DP=2 and back to hybrid FSDP.

The toy run of conftest.TOY_CHECKPOINT_RUN (6 steps) is the reference every test compares with,
bit for bit: losses, weights, EMA, Adam moments and step counts."""

from __future__ import annotations

import os
import re
import signal
import subprocess
import sys
import time
from pathlib import Path

import psutil
import pytest
import torch
from checkpoint_utils import adam_steps, assert_same_tensors, checkpoint_tensors, losses, metrics
from conftest import REPO, TOY_CHECKPOINT_RUN, run_torchrun
from numerics import assert_close_to_scale

from goku_megatron.checkpoint import checkpoint_dir, latest_checkpoint, load_loader_state

pytestmark = [pytest.mark.slow, pytest.mark.usefixtures("megatron_world")]  # loads checkpoints here too

WORKER = str(Path(__file__).with_name("reshard_worker.py"))


def _args(toy_data: Path, run_dir: Path, *extra: str) -> list[str]:
    return ["-m", "goku_megatron.cli.train", *TOY_CHECKPOINT_RUN, f"data.path={toy_data}", f"train.run_dir={run_dir}",
            "train.save_interval=3", *extra]


def _log(run_dir: Path) -> Path:
    return run_dir.parent / f"{run_dir.name}.log"


def _train(toy_data: Path, run_dir: Path, *extra: str, nproc: int = 2) -> Path:
    """Train to the end under torchrun with Python's own warning filters, as a user's run has them;
    the output is kept in _log(run_dir)."""
    _log(run_dir).write_text(run_torchrun(nproc, _args(toy_data, run_dir, *extra), env={"PYTHONWARNINGS": ""}))
    return run_dir


def _start(toy_data: Path, run_dir: Path, *extra: str, max_restarts: int = 0) -> subprocess.Popen:
    cmd = [sys.executable, "-m", "torch.distributed.run", "--nproc-per-node", "2", "--standalone",
           "--max-restarts", str(max_restarts), *_args(toy_data, run_dir, *extra)]
    env = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONWARNINGS": "ignore"}
    log = open(_log(run_dir), "w")
    return subprocess.Popen(cmd, cwd=REPO, stdout=log, stderr=subprocess.STDOUT, text=True, env=env)


def _when_logged(run_dir: Path, step: int, proc: subprocess.Popen) -> None:
    deadline = time.monotonic() + 300
    while not ((run_dir / "metrics.jsonl").is_file() and len(metrics(run_dir)) >= step):
        assert proc.poll() is None and time.monotonic() < deadline, "the run ended before the fault"
        time.sleep(0.05)


def _ranks(proc: subprocess.Popen) -> dict[int, psutil.Process]:
    """torchrun's workers by RANK (its direct children; their own forks are not workers)."""
    return {int(p.environ()["RANK"]): p for p in psutil.Process(proc.pid).children()}


def _same_as(run_dir: Path, reference: Path) -> None:
    assert losses(run_dir) == losses(reference)
    assert [r["step"] for r in metrics(run_dir)] == list(range(1, 7))  # steps redone after a fault: once
    assert_same_tensors(checkpoint_tensors(checkpoint_dir(run_dir, 6)),
                        checkpoint_tensors(checkpoint_dir(reference, 6)))


@pytest.fixture(scope="module")
def dp2(toy_data, tmp_path_factory):
    """The DP=2 reference, with a checkpoint after every step to compare any step with."""
    return _train(toy_data, tmp_path_factory.mktemp("dp2") / "run", "train.save_interval=1", "checkpoint.keep_last=0")


@pytest.mark.parametrize("layout", ["dp2", "tp2"])
def test_a_two_rank_run_logs_no_library_warnings(layout, request):
    """megatron-core warned on every rank: its distributed optimizer at DP > 1 (renamed torch
    collectives; .grad of fp32 weight views; folded by logs.py), its linears at TP > 1 while
    CUDA_DEVICE_MAX_CONNECTIONS was not 1 (platform.init_distributed now sets it)."""
    log = _log(request.getfixturevalue(layout)).read_text()
    assert "step 6/6" in log and "rank1" not in log  # the run's own lines are there; rank 1 is quiet
    assert "Warning" not in log, log[-3000:]


@pytest.fixture(scope="module")
def tp2(toy_data, tmp_path_factory):
    return _train(toy_data, tmp_path_factory.mktemp("tp2") / "run", "parallel.tp=2")


# FSDP over 4 ranks; an FFN of width 202 splits its rows unevenly (51, 51, 51, 49).
FSDP = ["parallel.fsdp=true", "optim.distributed_optimizer=false", "model.ffn_hidden_size=202"]


@pytest.fixture(scope="module")
def fsdp4(toy_data, tmp_path_factory):
    return _train(toy_data, tmp_path_factory.mktemp("fsdp4") / "run", *FSDP, nproc=4)


# ----------------------------------------------------------------------------------------------
# Exact resume


def test_tp2_resume_from_step_3_is_exact(toy_data, tp2, tmp_path):
    run_dir = _train(toy_data, tmp_path / "run", "parallel.tp=2", f"--resume={checkpoint_dir(tp2, 3)}")
    assert [r["step"] for r in metrics(run_dir)] == [4, 5, 6]
    assert {s: v for s, v in losses(tp2).items() if s > 3} == losses(run_dir)
    assert_same_tensors(checkpoint_tensors(checkpoint_dir(run_dir, 6)), checkpoint_tensors(checkpoint_dir(tp2, 6)))


def test_fsdp_resume_from_step_3_is_exact(toy_data, fsdp4, tmp_path):
    run_dir = _train(toy_data, tmp_path / "run", *FSDP, f"--resume={checkpoint_dir(fsdp4, 3)}", nproc=4)
    assert [r["step"] for r in metrics(run_dir)] == [4, 5, 6]
    assert {s: v for s, v in losses(fsdp4).items() if s > 3} == losses(run_dir)
    assert_same_tensors(checkpoint_tensors(checkpoint_dir(run_dir, 6)), checkpoint_tensors(checkpoint_dir(fsdp4, 6)))


def test_sigterm_on_one_rank_stops_both_at_one_step(toy_data, dp2, tmp_path):
    """Preemption: SIGTERM reaches rank 1 only; both ranks save the same step, which holds exactly
    the uninterrupted run's state at that step, and exit with 99. (test_checkpoint.py resumes
    after a SIGTERM; the SIGKILL test below resumes across processes.)"""
    run_dir = tmp_path / "run"
    proc = _start(toy_data, run_dir, "train.save_interval=0")
    _when_logged(run_dir, 2, proc)
    ranks = _ranks(proc)
    ranks[0].suspend()  # keeps the run from finishing before the signal lands
    ranks[1].send_signal(signal.SIGTERM)
    ranks[0].resume()
    assert proc.wait(timeout=300) != 0
    out = _log(run_dir).read_text()
    stopped = latest_checkpoint(run_dir)
    step = int(stopped.name.split("_")[1])
    for rank in (0, 1):  # both stopped after the same step, once its checkpoint was complete
        assert re.search(rf"rank{rank} [\w.]+\] SIGTERM: stopped after step {step} with a checkpoint; exit code 99",
                         out), out[-3000:]
    # torchrun reports the first exit (99); the other rank may still be tearing down when torchrun
    # stops it in turn
    assert "exitcode  : 99" in out
    assert 2 <= step < 6 and [r["step"] for r in metrics(run_dir)] == list(range(1, step + 1))
    assert load_loader_state(stopped, 0) == load_loader_state(checkpoint_dir(dp2, step), 0)
    assert load_loader_state(stopped, 1) == load_loader_state(checkpoint_dir(dp2, step), 1)
    assert {s: v for s, v in losses(dp2).items() if s <= step} == losses(run_dir)
    assert_same_tensors(checkpoint_tensors(stopped), checkpoint_tensors(checkpoint_dir(dp2, step)))


def test_sigterm_in_one_rank_data_wait_stops_every_rank_at_the_last_step(toy_data, dp2, tmp_path):
    """Rank 1 waits for data at step 3 (each sample it draws is bad) and gets SIGTERM there, while
    rank 0 has its samples: both save step 2, the uninterrupted run's state, and exit with 99,
    instead of rank 0 entering step 3's collectives alone (a hang until the gloo timeout)."""
    run_dir = tmp_path / "run"
    # Inline data: data_wait_worker.py patches the draws of the training thread's source.
    args = _args(toy_data, run_dir, "train.save_interval=0", "data.cache_mb=0", "data.workers=0")[2:]
    cmd = [sys.executable, "-m", "torch.distributed.run", "--nproc-per-node", "2", "--standalone",
           "--max-restarts", "0", str(Path(__file__).with_name("data_wait_worker.py")), "1", "3", *args]
    env = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONWARNINGS": "ignore"}
    proc = subprocess.run(cmd, cwd=REPO, capture_output=True, text=True, timeout=180, env=env)
    out = proc.stdout + proc.stderr
    assert proc.returncode != 0 and "exitcode  : 99" in out, out[-3000:]
    for rank in (0, 1):
        assert re.search(rf"rank{rank} [\w.]+\] SIGTERM: stopped after step 2 with a checkpoint; exit code 99",
                         out), out[-3000:]
    stopped = latest_checkpoint(run_dir)
    assert stopped == checkpoint_dir(run_dir, 2)
    assert [r["step"] for r in metrics(run_dir)] == [1, 2]
    for rank in (0, 1):  # rank 0's drawn step-3 samples were put back, rank 1's never taken
        assert load_loader_state(stopped, rank) == load_loader_state(checkpoint_dir(dp2, 2), rank)
    assert_same_tensors(checkpoint_tensors(stopped), checkpoint_tensors(checkpoint_dir(dp2, 2)))


def test_sigkilled_rank_is_restarted_by_torchrun_from_the_latest_checkpoint(toy_data, dp2, tmp_path):
    run_dir = tmp_path / "run"
    proc = _start(toy_data, run_dir, "train.save_interval=1", "checkpoint.keep_last=0", max_restarts=1)
    _when_logged(run_dir, 2, proc)
    ranks = _ranks(proc)
    ranks[0].suspend()
    ranks[1].send_signal(signal.SIGKILL)
    ranks[0].resume()
    assert proc.wait(timeout=300) == 0, _log(run_dir).read_text()[-3000:]
    out = _log(run_dir).read_text()
    assert "exitcode: -9" in out and "resumed from" in out
    _same_as(run_dir, dp2)


# ----------------------------------------------------------------------------------------------
# Resharding: load into another layout, save again, compare every tensor


def _reshard(source: Path, into: list[str], nproc: int, out: Path) -> Path:
    overrides = [*TOY_CHECKPOINT_RUN, *into]
    if nproc > 1:
        run_torchrun(nproc, [WORKER, str(source), str(out), *overrides])
    else:  # this process's one-rank world
        from goku_megatron.checkpoint import Checkpointer, TrainingState, load_checkpoint
        from goku_megatron.config import load_config, validate
        from goku_megatron.train import setup

        cfg = load_config("toy", overrides)
        validate(cfg, 1)
        training = setup(cfg)
        state = TrainingState(training.model, training.optimizer, training.scheduler, training.ema)
        info = load_checkpoint(source, state)
        assert not info["same_layout"]
        Checkpointer(out).save(info["step"], state, cfg.to_dict(), blocking=True)
    return latest_checkpoint(out)


def _assert_resharded(got: Path, source: Path) -> None:
    assert_same_tensors(checkpoint_tensors(got), checkpoint_tensors(source))
    assert adam_steps(got) == adam_steps(source) and adam_steps(source)[0] == 3.0


def test_reshard_tp2_to_tp1(tp2, tmp_path, megatron_world):
    source = checkpoint_dir(tp2, 3)
    _assert_resharded(_reshard(source, [], 1, tmp_path), source)


def test_reshard_pp2_to_pp1(toy_data, tmp_path_factory, tmp_path, megatron_world):
    pp2 = _train(toy_data, tmp_path_factory.mktemp("pp2") / "run", "parallel.pp=2", "train.steps=3")
    source = checkpoint_dir(pp2, 3)
    _assert_resharded(_reshard(source, ["train.steps=3"], 1, tmp_path), source)


def test_reshard_dp1_to_dp2(toy_data, tmp_path_factory, tmp_path, megatron_world):
    from goku_megatron.config import load_config, validate
    from goku_megatron.train import run

    dp1 = tmp_path_factory.mktemp("dp1") / "run"
    cfg = load_config("toy", [*TOY_CHECKPOINT_RUN, f"data.path={toy_data}", f"train.run_dir={dp1}", "train.steps=3"])
    validate(cfg, 1)
    run(cfg)
    source = checkpoint_dir(dp1, 3)
    _assert_resharded(_reshard(source, ["train.steps=3"], 2, tmp_path), source)


def test_fsdp_checkpoint_holds_the_ddp_runs_tensors(toy_data, fsdp4, tmp_path):
    """Six steps under FSDP and under DDP with the distributed optimizer (4 ranks each) end with the
    same weights, EMA, Adam moments and fp32 main weights, to rounding: FSDP's EMA and optimizer
    state mean what DDP's mean, not only what FSDP itself reads back."""
    dp4 = _train(toy_data, tmp_path / "dp4", "model.ffn_hidden_size=202", nproc=4)
    assert losses(fsdp4) == pytest.approx(losses(dp4), rel=1e-5)
    got, want = checkpoint_tensors(checkpoint_dir(fsdp4, 6)), checkpoint_tensors(checkpoint_dir(dp4, 6))
    assert got.keys() == want.keys() and any(k.startswith("ema.") for k in want)
    for key, value in want.items():
        assert_close_to_scale(got[key], value, ulps=512, msg=key)  # 45 at most, measured


def test_fsdp_finetune_starts_from_the_checkpoints_weights(toy_data, fsdp4, tmp_path):
    """checkpoint.init_from under FSDP (2 ranks, from the 4-rank checkpoint): the weights load
    into the shards and the EMA restarts from them; at lr 1e-12 one step moves nothing."""
    run_dir = _train(toy_data, tmp_path / "run", *FSDP, f"checkpoint.init_from={fsdp4}", "train.steps=1",
                     "train.save_interval=1", "optim.lr=1e-12", "optim.min_lr=0")
    got, source = checkpoint_tensors(checkpoint_dir(run_dir, 1)), checkpoint_tensors(checkpoint_dir(fsdp4, 6))
    weights = [k for k in source if k.startswith("model.")]
    assert weights
    for key in weights:
        torch.testing.assert_close(got[key], source[key], rtol=0, atol=1e-9, msg=key)
        torch.testing.assert_close(got["ema." + key[len("model."):]], source[key], rtol=0, atol=1e-9, msg=key)


def test_reshard_fsdp4_to_dp2_and_back_to_hybrid_fsdp(fsdp4, tmp_path, megatron_world):
    """An FSDP checkpoint (4 ranks) loads at DP=2 without FSDP (the toy recipe's plain optimizer),
    weights, EMA and Adam state exactly; that checkpoint loads into hybrid FSDP (2 x 2), and that
    one into one process with the distributed optimizer, each exactly."""
    source = checkpoint_dir(fsdp4, 3)
    dp2 = _reshard(source, ["model.ffn_hidden_size=202", "optim.distributed_optimizer=false"], 2, tmp_path / "dp2")
    _assert_resharded(dp2, source)
    hybrid = _reshard(dp2, [*FSDP, "parallel.fsdp_shard_size=2"], 4, tmp_path / "hsdp")
    _assert_resharded(hybrid, source)
    _assert_resharded(_reshard(hybrid, ["model.ffn_hidden_size=202"], 1, tmp_path / "dist1"), source)


# ----------------------------------------------------------------------------------------------
# The distributed optimizer's checkpoint: each rank's own shards = megatron's gathered format


@pytest.mark.parametrize("layout", [[], ["parallel.tp=2"]], ids=["dp2", "tp2"])
def test_each_rank_writes_megatrons_fully_reshardable_checkpoint_from_its_own_shards(tmp_path, layout):
    """With DP=2 the ranks split the distributed optimizer's buffer between them, here (an FFN
    of width 200) inside a row of an MLP weight: each rank writes its part as a partial row and
    whole rows. With TP=2 each writes its tensor-parallel shards. Either way the checkpoint holds,
    bit for bit, the tensors megatron writes after gathering the state to data-parallel rank 0,
    with the same common part (param groups, Adam step)."""
    from megatron.core import dist_checkpointing

    run_torchrun(2, [str(Path(__file__).with_name("optimizer_format_worker.py")), str(tmp_path),
                     *TOY_CHECKPOINT_RUN, "model.ffn_hidden_size=200", *layout])
    own, gathered = checkpoint_dir(tmp_path / "own", 1), checkpoint_dir(tmp_path / "gathered", 1)
    assert_same_tensors(checkpoint_tensors(own), checkpoint_tensors(gathered))
    assert adam_steps(own) == adam_steps(gathered) == [2.0] * len(adam_steps(own))
    common_own, common_gathered = (dist_checkpointing.load_common_state_dict(str(p))["optimizer"] for p in (own, gathered))
    assert common_own == common_gathered
